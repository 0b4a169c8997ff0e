//! `persistence`: parse `--config`, load and validate the configuration (exit 64 when it is
//! bad, before binding), start telemetry and metrics, bind, and hand over to
//! [`persistence::run`] until SIGTERM/SIGINT.

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;

/// jemalloc, so that `/debug/pprof/heap` can read its sampling heap profiler (kit::debug).
#[global_allocator]
static ALLOC: kit::debug::Jemalloc = kit::debug::Jemalloc;

/// jemalloc's options, read at start-up from this symbol: heap profiling on, one sample per
/// 512 KiB allocated on average (`kit::debug::MALLOC_CONF`).
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
static malloc_conf: &u8 = &kit::debug::MALLOC_CONF[0];

/// Stores the exchange's events in PostgreSQL and serves order status.
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
    let config: persistence::Config =
        kit::config::load_or_exit(persistence::SERVICE, args.config.as_deref());
    kit::telemetry::init(persistence::SERVICE, &config.log);
    kit::metrics::install();
    let listener = kit::http::bind(config.http.addr)
        .await
        .context("binding the HTTP listener")?;
    let shutdown = kit::shutdown::Shutdown::on_signals().context("installing signal handlers")?;
    // On a worker thread, not this one: see kit::runtime.
    kit::runtime::on_workers(persistence::run(config, listener, shutdown))
        .await
        .context("persistence's main task")?
        .context("persistence stopped with an error")
}
