//! Order ids that never repeat, across restarts too, without a database.
//!
//! An [`OrderId`] is `generation << 32 | counter`. The generation is read from
//! `<data dir>/generation`, incremented and made durable (write a temporary file, fsync it,
//! rename it over the old one, fsync the directory) at every start, before any id is handed
//! out; the counter counts from 0 within one run. Generations stay below 2^21, so every id is
//! below 2^53 and survives a trip through a JSON number in any language.
//!
//! The data directory is also locked (`<data dir>/gateway.lock`, an advisory `flock`) so two
//! gateways can never share one spool and one generation.

use domain::OrderId;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Generations are below this, so ids are below 2^53.
pub const MAX_GENERATION: u64 = 1 << 21;
/// Ids one run can hand out.
pub const IDS_PER_GENERATION: u64 = 1 << 32;

/// Why ids cannot be handed out.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a generation number: {content:?}")]
    Corrupt { path: PathBuf, content: String },
    #[error("{path}: generation {generation} is the last one (ids would pass 2^53)")]
    GenerationsExhausted { path: PathBuf, generation: u64 },
    #[error("{path}: data directory is in use by another gateway")]
    Locked { path: PathBuf },
    #[error("this run handed out all of its {IDS_PER_GENERATION} order ids; restart the gateway")]
    RunExhausted,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdError + '_ {
    move |source| IdError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An exclusive lock on the data directory, held while this value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (creating it), or fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, IdError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join("gateway.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(IdError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => Err(IdError::Io { path, source: e }),
        }
    }
}

/// Hands out this run's order ids.
#[derive(Debug)]
pub struct OrderIds {
    generation: u64,
    next: AtomicU64,
}

impl OrderIds {
    /// Starts a new generation in `dir` (durably) and returns its id source.
    pub fn start(dir: &Path) -> Result<OrderIds, IdError> {
        let generation = bump_generation(dir)?;
        tracing::info!(generation, "order-id generation started");
        Ok(OrderIds {
            generation,
            next: AtomicU64::new(0),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next id of this run.
    pub fn next_id(&self) -> Result<OrderId, IdError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if n >= IDS_PER_GENERATION {
            // Keep the counter saturated so it never wraps back into used ids.
            self.next.store(IDS_PER_GENERATION, Ordering::Relaxed);
            return Err(IdError::RunExhausted);
        }
        Ok(OrderId(self.generation << 32 | n))
    }
}

/// Minutes since 2026-01-01T00:00:00Z: a floor for new generations, so a gateway whose data
/// directory was wiped (while the engine kept its journal) still does not reuse old ids, as
/// long as it does not restart more than once a minute on average. 2^21 minutes last 4 years.
fn clock_floor() -> u64 {
    const EPOCH_2026: u64 = 1_767_225_600;
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(EPOCH_2026) / 60)
}

/// Reads `dir/generation` (0 if absent), writes back the next one (one more, or the clock
/// floor if that is higher), durably, and returns it.
fn bump_generation(dir: &Path) -> Result<u64, IdError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join("generation");
    let previous = match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| IdError::Corrupt {
            path: path.clone(),
            content: s.chars().take(40).collect(),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(IdError::Io { path, source: e }),
    };
    let generation = (previous + 1).max(clock_floor());
    if generation >= MAX_GENERATION {
        return Err(IdError::GenerationsExhausted {
            path,
            generation: previous,
        });
    }
    let tmp = dir.join("generation.tmp");
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        writeln!(f, "{generation}").map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_increase_and_ids_stay_json_safe() {
        let dir = tempfile::tempdir().unwrap();
        let a = OrderIds::start(dir.path()).unwrap();
        let b = OrderIds::start(dir.path()).unwrap();
        // A fresh directory starts at the clock floor; restarts count up from there.
        assert!(a.generation() >= clock_floor().max(1));
        assert_eq!(b.generation(), a.generation() + 1);
        let x = a.next_id().unwrap();
        let y = b.next_id().unwrap();
        assert!(x < y && y.0 < 1 << 53);
        assert_eq!(a.next_id().unwrap().0, x.0 + 1);
        fs::write(dir.path().join("generation"), "junk").unwrap();
        assert!(matches!(
            OrderIds::start(dir.path()),
            Err(IdError::Corrupt { .. })
        ));
        fs::write(
            dir.path().join("generation"),
            format!("{}", MAX_GENERATION - 1),
        )
        .unwrap();
        assert!(matches!(
            OrderIds::start(dir.path()),
            Err(IdError::GenerationsExhausted { .. })
        ));
    }

    #[test]
    fn the_data_dir_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(dir.path()),
            Err(IdError::Locked { .. })
        ));
        drop(lock);
        DirLock::acquire(dir.path()).unwrap();
    }
}
