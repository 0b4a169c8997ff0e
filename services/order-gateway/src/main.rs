//! `order-gateway`: loads the configuration (exit 64 if it is bad), starts telemetry and
//! metrics, binds, and runs [`order_gateway::run`] until SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use order_gateway::GatewayConfig;
use std::path::PathBuf;

/// jemalloc, so that `/debug/pprof/heap` can read its sampling heap profiler (kit::debug).
#[global_allocator]
static ALLOC: kit::debug::Jemalloc = kit::debug::Jemalloc;

/// jemalloc's options, read at start-up from this symbol: heap profiling on, one sample per
/// 512 KiB allocated on average (`kit::debug::MALLOC_CONF`).
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
static malloc_conf: &u8 = &kit::debug::MALLOC_CONF[0];

/// The simulated exchange's public order API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; `APP__SECTION__KEY` environment variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: GatewayConfig =
        kit::config::load_or_exit(order_gateway::SERVICE, args.config.as_deref());
    kit::telemetry::init(order_gateway::SERVICE, &config.log);
    kit::metrics::install();
    let shutdown = kit::shutdown::Shutdown::on_signals().context("installing signal handlers")?;
    let listener = kit::http::bind(config.http.addr)
        .await
        .context("binding the HTTP listener")?;
    // On a worker thread, not this one: see kit::runtime.
    kit::runtime::on_workers(order_gateway::run(config, listener, shutdown))
        .await
        .context("the gateway's main task")?
        .context("running the order gateway")
}
