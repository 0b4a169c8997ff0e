//! eBPF probes for the simulated-exchange lab and the agent that serves what they see.
//!
//! Tracepoint programs (C, `bpf/`, compiled by `build.rs` with clang-14 and embedded) watch TCP
//! retransmits and connection lifecycles, run-queue latency, block I/O latency and OOM kills;
//! the agent attributes what they report to lab components and serves Prometheus metrics and a
//! timeline of notable events. Modules, from the kernel outwards:
//!
//! * [`layout`]: the tracepoint fields the programs read, checked against the running kernel.
//! * [`tracefs`]: finding or mounting tracefs; reading `id` and `format` files.
//! * [`wire`]: decoding map keys/values and ring buffer events (layouts shared with `bpf/`).
//! * [`kernel`]: loading the object, attaching probes, typed map access.
//! * [`lab`], [`procfs`], [`attribution`]: who is who (lab state file, `/proc`, cgroups).
//! * [`metrics`], [`events`]: the numbers and the event ring, and their exposition.
//! * [`agent`]: ties it together (ring buffer, poll and refresh loops).
//! * [`http`]: `/metrics`, `/events`, `/healthz`, `/readyz`.
//! * [`check`]: `probes check`.
//! * [`offcpu`]: off-CPU stacks of chosen processes, on demand (`probes offcpu`,
//!   `GET /debug/offcpu`).
//! * [`config`]: the agent's typed configuration.

pub mod agent;
pub mod attribution;
pub mod btf;
pub mod check;
pub mod config;
pub mod events;
pub mod http;
pub mod kernel;
pub mod lab;
pub mod layout;
pub mod metrics;
pub mod offcpu;
pub mod procfs;
pub mod selfcost;
pub mod tracefs;
pub mod watch;
pub mod wire;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use agent::{Agent, AgentOptions};
pub use kernel::LoadError;

/// Serves the agent's routes on `listener` and runs its background loops until `shutdown`.
pub async fn run(
    agent: Arc<Agent>,
    config: config::ProbesConfig,
    listener: TcpListener,
    shutdown: kit::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let handle = kit::metrics::install();
    let extra: http::ExtraMetrics = Arc::new(move || kit::metrics::render(&handle));
    let router =
        kit::http::with_standard_layers(http::app(Arc::clone(&agent), extra), &config.http)
            .merge(http::debug_routes(Arc::clone(&agent), &config.debug));
    let background = tokio::spawn(Arc::clone(&agent).run_background(shutdown.clone()));
    let served = kit::http::serve(listener, router, shutdown.clone())
        .await
        .context("serving HTTP");
    shutdown.trigger();
    let loops = background.await.context("joining the agent's loops")?;
    served?;
    loops
}
