//! What every service of the exchange shares, written once so that no service forgets a piece:
//!
//! * [`amqp`]: the RabbitMQ topology of engine events, declared in one place.
//! * [`config`]: typed configuration (defaults, optional TOML file, `APP__SECTION__KEY`
//!   environment), validated before any port is bound; exit code 64 on bad configuration.
//!   **Architecture invariant:** this is the only module in the workspace's services that
//!   reads the environment.
//! * [`telemetry`]: `tracing` logs, human by default, JSON on request.
//! * [`alloc`]: jemalloc as the global allocator, with an arena of its own for the CPU
//!   profiler's sample tables.
//! * [`debug`]: `/debug/pprof` (CPU profiles, jemalloc heap profiles) behind a loopback-or-token
//!   guard, and the jemalloc allocator every service installs; [`sigprof`] times the CPU
//!   profiler's signal handler, so that a profile reports its whole cost.
//! * [`runtime`]: where a service's main future runs (on the runtime's workers).
//! * [`metrics`]: the Prometheus recorder with real histogram buckets, and process metrics.
//! * [`health`]: readiness flags per dependency behind `GET /readyz`.
//! * [`http`]: the admin routes (`/healthz`, `/readyz`, `/metrics`), the tower-http layers
//!   every service uses (tracing, body limit, timeout, RED metrics) and graceful serving.
//! * [`shutdown`]: SIGTERM/SIGINT turned into a drain signal every task can wait on.
//! * [`record`] and [`checkpoint`]: crash-safe on-disk framing and checkpoints, shared by the
//!   spool and the engine journal.
//! * [`spool`]: the durable retry queue, an fsync'ed, bounded, append-only log on disk.

pub mod alloc;
pub mod amqp;
pub mod checkpoint;
pub mod config;
pub mod debug;
pub mod health;
pub mod http;
pub mod metrics;
pub mod record;
pub mod runtime;
pub mod shutdown;
pub mod sigprof;
pub mod spool;
pub mod telemetry;
