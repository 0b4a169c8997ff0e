//! `matching-engine`: parse configuration, start telemetry, run. Everything else is in the
//! library.

use clap::Parser;
use std::path::PathBuf;

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
    matching_engine::run(config, listener, shutdown).await?;
    Ok(())
}
