//! `persistence`: parse `--config`, load and validate the configuration (exit 64 when it is
//! bad, before binding), start telemetry and metrics, bind, and hand over to
//! [`persistence::run`] until SIGTERM/SIGINT.

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;

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
    persistence::run(config, listener, shutdown)
        .await
        .context("persistence stopped with an error")
}
