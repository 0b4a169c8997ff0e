//! `matching-engine`: parse configuration, start telemetry, run. Everything else is in the
//! library.

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

#[derive(Parser)]
#[command(version, about = "The simulated exchange's matching engine")]
struct Args {
    /// TOML configuration file (then APP__SECTION__KEY environment variables override it).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: matching_engine::config::EngineConfig =
        kit::config::load_or_exit("matching-engine", args.config.as_deref());
    kit::telemetry::init("matching-engine", &config.log);
    let shutdown = kit::shutdown::Shutdown::on_signals()?;
    let listener = kit::http::bind(config.http.addr).await?;
    // On a worker thread, not this one: see kit::runtime.
    kit::runtime::on_workers(matching_engine::run(config, listener, shutdown))
        .await
        .context("the engine's main task")??;
    Ok(())
}
