//! The native lab: starts and supervises the whole stack on one machine, from system packages,
//! in a runtime folder — a private PostgreSQL cluster, a private RabbitMQ node, Prometheus, the
//! three services and (as root) the probe agent — the way a container runtime would: health-gated
//! start in dependency order, restart on failure with bounded backoff, one log per component,
//! and a state file with every pid and port. As root, each component also gets its own network
//! namespace on a lab bridge and its own cgroups, so a fault hits exactly one component or one
//! edge ([`isolation`]).
//!
//! Two ways in:
//! - the library: [`Lab::start`] runs the supervisor as tokio tasks inside the caller (tests,
//!   chaos experiments); dropping the [`Lab`] kills everything it started;
//! - the `lab` binary (`src/main.rs`, `src/cli.rs`): `lab up` spawns a detached
//!   `lab supervise` daemon that owns a [`Lab`] and answers the control socket
//!   (`lab stop|start|restart|kill|status|down`).
//!
//! Code map: [`component`] (the component table), [`config`] (configuration, layout, restart
//! policy), [`ports`] (port plan), [`state`] (state file), [`launch`] (per-kind recipes),
//! `supervisor` (one task per component), [`lab`] (the handle), [`control`] (socket
//! protocol), [`probe`] (readiness checks), [`process`] (pids, signals, logs), [`isolation`]
//! (bridge, namespaces, cgroups: plan, setup, teardown), [`netns`] (entering a namespace),
//! [`cgroup`] (the lab's cgroup v1 folders).
//!
//! ```no_run
//! # async fn demo() -> Result<(), lab::LabError> {
//! use lab::{Component, Lab, LabConfig, Signal};
//! let config = LabConfig::ephemeral("/tmp/my-lab", Component::INFRA)?;
//! let lab = Lab::start(config).await?;
//! let amqp = lab.url(Component::Rabbitmq)?;
//! lab.kill(Component::Rabbitmq, Signal::SIGKILL)?; // restarted by the supervisor
//! lab.stop(Component::Postgres).await?; // held down
//! lab.start_component(Component::Postgres).await?;
//! lab.shutdown().await?;
//! # let _ = amqp; Ok(()) }
//! ```

pub mod cgroup;
pub mod component;
pub mod config;
pub mod control;
pub mod error;
pub mod isolation;
pub mod lab;
pub mod launch;
pub mod netns;
pub mod ports;
pub mod probe;
pub mod process;
pub mod state;
mod supervisor;

pub use component::{Component, ComponentSet};
pub use config::{LabConfig, RestartPolicy};
pub use error::{LabError, Result};
pub use isolation::{Isolation, IsolationPlan};
pub use lab::Lab;
pub use nix::sys::signal::Signal;
pub use ports::{PortPlan, PortsMode};
pub use state::{ComponentState, ExitRecord, IsolationMode, LabState, Phase, Status};

/// Exit code of a service that rejected its configuration: never restarted.
pub const EXIT_CONFIG: i32 = 64;

/// How many lines of a component log go into an error message.
pub const LOG_TAIL_LINES: usize = 20;
