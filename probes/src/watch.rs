//! Wakes the agent when the lab's state file changes: inotify on the directories that may hold
//! it, so that a quiet lab costs no periodic `stat`.
//!
//! On this VM every wake-up of an idle agent costs ~0.5–1 ms of its CPU (the kernel's wake-up
//! and timer path, cold caches), far more than the `stat` it was for: checking the state file
//! every 2 s was two fifths of the agent's CPU at 100 orders/s (docs/probes.md, "Cost"). The
//! lab rewrites the file atomically (a temporary file, then a rename), which the directory
//! watch sees as `IN_MOVED_TO` of the file's name.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The inotify instance, for the runtime's reactor.
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A watch on the directories of the candidate state files.
pub struct StateWatch {
    fd: AsyncFd<Fd>,
    /// Each live watch and the file name it is for.
    names: HashMap<WatchDescriptor, OsString>,
}

/// What a wait on the watch saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A candidate state file was written, renamed into place or removed.
    StateFile,
    /// Only other files of the watched directories changed.
    Other,
    /// Every watched directory is gone: the caller falls back to checking by time.
    Gone,
}

const MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_CREATE);

impl StateWatch {
    /// Watches the directory of each of `paths` that exists; `None` when none could be
    /// watched (no such directory, no inotify), with the reason logged at debug level.
    /// Must be called within a Tokio runtime.
    pub fn new(paths: &[PathBuf]) -> Option<StateWatch> {
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, "no inotify: the lab state file is checked every refresh interval");
                return None;
            }
        };
        let mut names = HashMap::new();
        for path in paths {
            let Some(name) = path.file_name() else {
                continue;
            };
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            match inotify.add_watch(dir, MASK) {
                Ok(wd) => {
                    names.insert(wd, name.to_owned());
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "not watching for the lab state file");
                }
            }
        }
        if names.is_empty() {
            return None;
        }
        // The `register_*` replacements are `unsafe` (the caller must keep the fd open while it
        // is registered); `Fd` owns the instance, so it does.
        #[allow(deprecated)]
        let registered = AsyncFd::with_interest(Fd(inotify), Interest::READABLE);
        match registered {
            Ok(fd) => Some(StateWatch { fd, names }),
            Err(e) => {
                tracing::debug!(error = %e, "registering the inotify fd");
                None
            }
        }
    }

    /// Waits for the next batch of events and says what they were.
    pub async fn changed(&mut self) -> Change {
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(_) => return Change::Gone,
            };
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(Into::into)) {
                Ok(Ok(events)) => events,
                // Nothing to read after all (readiness was stale): wait again.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(Err(_)) => return Change::Gone,
                Err(_would_block) => continue,
            };
            let mut change = Change::Other;
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory was removed (or unmounted): its watch is gone.
                    self.names.remove(&e.wd);
                    continue;
                }
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: one of them may have been the state file.
                    change = Change::StateFile;
                    continue;
                }
                if e.name.is_some() && self.names.get(&e.wd) == e.name.as_ref() {
                    change = Change::StateFile;
                }
            }
            if self.names.is_empty() {
                return Change::Gone;
            }
            return change;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(w: &mut StateWatch) -> Change {
        tokio::time::timeout(Duration::from_secs(10), w.changed())
            .await
            .expect("an inotify event within 10 s")
    }

    #[tokio::test]
    async fn sees_an_atomic_rewrite_of_the_state_file_and_not_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let mut w = StateWatch::new(std::slice::from_ref(&state)).expect("watch a temp dir");

        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        assert_eq!(next(&mut w).await, Change::Other);

        // What the lab does: a temporary file, then a rename over the state file.
        let tmp = dir.path().join("state.json.tmp");
        std::fs::write(&tmp, "{}").unwrap();
        std::fs::rename(&tmp, &state).unwrap();
        let mut saw = next(&mut w).await;
        while saw == Change::Other {
            saw = next(&mut w).await;
        }
        assert_eq!(saw, Change::StateFile);

        std::fs::remove_file(&state).unwrap();
        assert_eq!(next(&mut w).await, Change::StateFile);
    }

    #[tokio::test]
    async fn says_gone_when_the_directory_goes_and_none_when_there_is_nothing_to_watch() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("lab");
        std::fs::create_dir(&sub).unwrap();
        let mut w = StateWatch::new(&[sub.join("state.json")]).expect("watch");
        std::fs::remove_dir(&sub).unwrap();
        let mut saw = next(&mut w).await;
        while saw == Change::Other {
            saw = next(&mut w).await;
        }
        assert_eq!(saw, Change::Gone);

        assert!(StateWatch::new(&[dir.path().join("missing/state.json")]).is_none());
    }
}
