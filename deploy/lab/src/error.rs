//! The library's error type.
//!
//! The variants a caller may want to act on (a port taken, a component that did not come up or
//! that failed for good) are typed and carry the last lines of the component's log, so the
//! message alone is enough to diagnose a failed start; everything else is an `anyhow` chain
//! with context, displayed in full.

use std::path::PathBuf;
use std::time::Duration;

use crate::component::Component;

/// Errors from the lab library.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A port of the plan is already bound by someone else.
    #[error(
        "port {port} ({component} {name} port) is already in use where it listens (127.0.0.1, \
         or its network namespace): stop whatever holds it, or use --ports ephemeral"
    )]
    PortInUse {
        component: Component,
        name: String,
        port: u16,
    },

    /// Things missing before anything was started (binaries, users, paths).
    #[error("cannot start the lab:\n  - {}", .0.join("\n  - "))]
    Preflight(Vec<String>),

    /// A component was not ready before its deadline.
    #[error(
        "{component} did not become ready within {} ({detail})\n--- last lines of {} ---\n{tail}",
        humantime::format_duration(*deadline), log.display()
    )]
    NotReady {
        component: Component,
        deadline: Duration,
        detail: String,
        log: PathBuf,
        tail: String,
    },

    /// A component is in the `failed` state (bad configuration, or too many restarts).
    #[error("{component} failed: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    Failed {
        component: Component,
        reason: String,
        log: PathBuf,
        tail: String,
    },

    /// The component is not part of this lab's component set.
    #[error("{0} is not part of this lab (start it with --only or add it to the component set)")]
    NotInLab(Component),

    /// The operation needs a running process and there is none.
    #[error("{component} is not running (status {status})")]
    NotRunning {
        component: Component,
        status: String,
    },

    /// The lab is shutting down or its supervisor tasks are gone.
    #[error("the lab is shutting down")]
    ShuttingDown,

    /// Anything else, with its context chain.
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// Result with [`LabError`] as the default error.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
