//! Finding (and, as root, mounting) tracefs, and reading tracepoint `id` and `format` files.
//!
//! aya attaches tracepoints through the `id` files under tracefs, so the agent needs it
//! mounted; on this machine kind it often is not, and mounting it is harmless.

use std::fs;
use std::path::{Path, PathBuf};

use crate::layout::{LayoutError, LayoutOk, Tracepoint};

/// Where tracefs usually lives, preferred first.
pub const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// A usable tracefs mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracefs {
    pub root: PathBuf,
}

/// Why a tracepoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TracepointError {
    #[error("{tracepoint} does not exist in this kernel ({path}: {source})")]
    Missing {
        tracepoint: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Mount points of tracefs listed in `/proc/mounts`.
pub fn mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
                    (fstype == "tracefs").then(|| PathBuf::from(target))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Tracefs {
    /// The first candidate that has an `events` directory.
    pub fn find() -> Option<Tracefs> {
        CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events").is_dir())
            .map(|root| Tracefs { root })
    }

    /// Why [`Tracefs::find`] found nothing, in one line.
    pub fn why_missing() -> String {
        match mounts().first() {
            Some(m) => format!(
                "tracefs is mounted at {} but not readable by uid {} (needs root or CAP_DAC_READ_SEARCH)",
                m.display(),
                nix::unistd::geteuid()
            ),
            None => {
                "tracefs is not mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing".into()
            }
        }
    }

    /// [`Tracefs::find`], else mounts tracefs at `/sys/kernel/tracing` (needs root).
    pub fn find_or_mount() -> Result<Tracefs, String> {
        if let Some(t) = Tracefs::find() {
            return Ok(t);
        }
        let target = Path::new(CANDIDATES[0]);
        nix::mount::mount(
            Some("tracefs"),
            target,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "tracefs is not mounted and mounting it at {} failed: {e}",
                target.display()
            )
        })?;
        tracing::info!(path = %target.display(), "mounted tracefs");
        Tracefs::find().ok_or_else(|| {
            format!(
                "mounted tracefs at {} but it has no events directory",
                target.display()
            )
        })
    }

    fn event_dir(&self, tp: &Tracepoint) -> PathBuf {
        self.root.join("events").join(tp.category).join(tp.name)
    }

    /// The tracepoint's numeric id (what perf_event_open needs).
    pub fn id(&self, tp: &Tracepoint) -> Result<u64, TracepointError> {
        let path = self.event_dir(tp).join("id");
        let text = fs::read_to_string(&path).map_err(|source| TracepointError::Missing {
            tracepoint: tp.id(),
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|e| TracepointError::Missing {
            tracepoint: tp.id(),
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Reads the tracepoint's format file and checks the fields the program reads.
    pub fn verify(&self, tp: &Tracepoint) -> Result<LayoutOk, TracepointError> {
        let path = self.event_dir(tp).join("format");
        let text = fs::read_to_string(&path).map_err(|source| TracepointError::Missing {
            tracepoint: tp.id(),
            path,
            source,
        })?;
        Ok(crate::layout::verify(tp, &text)?)
    }
}
