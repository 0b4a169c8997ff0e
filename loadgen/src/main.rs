//! `loadgen run | audit`: the command line over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use loadgen::flow::FlowSpec;
use loadgen::run::RunSpec;
use std::path::PathBuf;
use std::time::Duration;

/// jemalloc: at thousands of orders per second glibc's malloc and free were a fifth of the
/// generator's CPU, on the same cores as the exchange it measures (docs/loadgen.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Load generator, ledger and zero-loss audit for the simulated exchange"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send orders at a constant arrival rate and record every one in a ledger.
    Run(RunArgs),
    /// Compare a ledger with what the exchange persisted; exit 1 on any loss or violation.
    Audit(AuditArgs),
    /// Step the rate up until the service level breaks; report the highest sustainable rate.
    Capacity(CapacityArgs),
}

#[derive(clap::Args)]
struct CapacityArgs {
    /// The order-gateway's base URL [default: from the lab's state file, else
    /// http://127.0.0.1:8080].
    #[arg(long)]
    target: Option<String>,
    /// The lab's state file.
    #[arg(long, default_value = ".lab/state.json")]
    lab_state: PathBuf,
    /// First rate tried (orders/s).
    #[arg(long, default_value_t = 30.0)]
    start_rate: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// Stop searching above this rate.
    #[arg(long, default_value_t = 100_000.0)]
    max_rate: f64,
    /// How long each rate is held.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    step: Duration,
    /// Service level: acknowledged-order p99 at most this.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    max_p99: Duration,
    /// Service level: error rate at most this (0.01 = 1 %).
    #[arg(long, default_value_t = 0.01)]
    max_error_rate: f64,
    /// The rate headroom is reported against (the demo load).
    #[arg(long, default_value_t = 30.0)]
    baseline_rate: f64,
    /// Bisection steps between the last good and the first bad rate.
    #[arg(long, default_value_t = 3)]
    refine: u32,
    /// How many more times a rate that broke the service level is held before it counts as
    /// broken (one stall of a shared host should not end the search; 0: the first break decides).
    #[arg(long, default_value_t = 1)]
    confirm: u32,
    /// Most new orders per request: orders due at the same moment go to the gateway as one
    /// `POST /v1/orders/batch` of up to this many (1: one `POST /v1/orders` each; at most 100).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "AAPL,MSFT,GOOG,AMZN,TSLA"
    )]
    symbols: Vec<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/loadgen/capacity.json")]
    report: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Orders per second (open model: the rate does not slow down when the exchange does).
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// How long to send, e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The order-gateway's base URL [default: from the lab's state file, else
    /// http://127.0.0.1:8080].
    #[arg(long)]
    target: Option<String>,
    /// The lab's state file, where the gateway and database addresses come from.
    #[arg(long, default_value = ".lab/state.json")]
    lab_state: PathBuf,
    /// Symbols to trade, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "AAPL,MSFT,GOOG,AMZN,TSLA"
    )]
    symbols: Vec<String>,
    /// Seed of the order flow.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the ledger (one JSON line per order).
    #[arg(long, default_value = "target/loadgen/ledger.jsonl")]
    ledger: PathBuf,
    /// Where to write the JSON summary.
    #[arg(long, default_value = "target/loadgen/summary.json")]
    summary: PathBuf,
    /// Share of commands that cancel one of our resting orders.
    #[arg(long, default_value_t = 0.1)]
    cancel_share: f64,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Most requests outstanding at once; orders beyond it are recorded as dropped.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// Most new orders per request: orders due at the same moment go to the gateway as one
    /// `POST /v1/orders/batch` of up to this many (1: one `POST /v1/orders` each; at most 100).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct AuditArgs {
    /// The ledger written by `loadgen run`.
    #[arg(long, default_value = "target/loadgen/ledger.jsonl")]
    ledger: PathBuf,
    /// PostgreSQL URL of the exchange's persistence database [default: from the lab's state
    /// file, else postgres://postgres@127.0.0.1:5433/exchange].
    #[arg(long)]
    database: Option<String>,
    /// The lab's state file, where the database address comes from.
    #[arg(long, default_value = ".lab/state.json")]
    lab_state: PathBuf,
    /// How long to wait for the pipeline to drain.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/loadgen/audit.json")]
    report: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Run(a) => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&a.cancel_share),
                "--cancel-share must be between 0 and 1"
            );
            let started = unix_secs();
            let spec = RunSpec {
                target: resolve(
                    a.target,
                    &a.lab_state,
                    lab::Component::OrderGateway,
                    DEFAULT_TARGET,
                ),
                rate_per_sec: a.rate,
                duration: a.duration,
                flow: FlowSpec {
                    seed: a.seed,
                    symbols: a.symbols,
                    cancel_share: a.cancel_share,
                    accounts: 50,
                    client_id_prefix: format!("lg{}-{started}", a.seed),
                },
                ledger: Some(a.ledger),
                summary: Some(a.summary.clone()),
                request_timeout: a.timeout,
                max_in_flight: a.max_in_flight,
                batch: a.batch,
                progress: !a.quiet,
            };
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let summary = loadgen::run::run(spec, stop).await?;
            print!("{}", summary.table());
            println!("  summary: {}", a.summary.display());
            if summary.interrupted {
                std::process::exit(130);
            }
            Ok(())
        }
        Cmd::Capacity(a) => {
            let spec = loadgen::capacity::CapacitySpec {
                target: resolve(
                    a.target,
                    &a.lab_state,
                    lab::Component::OrderGateway,
                    DEFAULT_TARGET,
                ),
                start_rate: a.start_rate,
                factor: a.factor,
                max_rate: a.max_rate,
                step: a.step,
                max_p99: a.max_p99,
                max_error_rate: a.max_error_rate,
                baseline_rate: a.baseline_rate,
                refine: a.refine,
                confirm: a.confirm,
                symbols: a.symbols,
                seed: a.seed,
                request_timeout: Duration::from_secs(10),
                max_in_flight: 20_000,
                batch: a.batch,
                client_id_prefix: format!("cap{}-{}", a.seed, unix_secs()),
            };
            let report = loadgen::capacity::search(&spec, |s| {
                eprintln!(
                    "  {:>8.0}/s  p99 {:>8.2} ms  errors {:.2}%  {}",
                    s.rate_per_sec,
                    s.ack_p99_ms,
                    s.error_rate * 100.0,
                    s.verdict()
                )
            })
            .await?;
            print!("{}", report.table());
            write_json(&a.report, &report)?;
            println!("  report: {}", a.report.display());
            Ok(())
        }
        Cmd::Audit(a) => {
            let database = resolve(
                a.database,
                &a.lab_state,
                lab::Component::Postgres,
                DEFAULT_DATABASE,
            );
            let report = loadgen::audit::audit(&a.ledger, &database, a.deadline).await?;
            print!("{}", report.table());
            write_json(&a.report, &report)?;
            println!("  report: {}", a.report.display());
            if !report.passed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

const DEFAULT_TARGET: &str = "http://127.0.0.1:8080";
const DEFAULT_DATABASE: &str = "postgres://postgres@127.0.0.1:5433/exchange";

/// An explicit flag wins; else the component's URL in the lab's state file; else the default
/// ports of `make demo`.
fn resolve(
    flag: Option<String>,
    lab_state: &std::path::Path,
    component: lab::Component,
    default: &str,
) -> String {
    if let Some(url) = flag {
        return url;
    }
    if let Ok(state) = lab::LabState::read(lab_state) {
        if !state.is_running() {
            eprintln!(
                "note: the lab in {} is not running (start it with `make demo`); using {default}",
                lab_state.display()
            );
        } else if let Some(url) = state.component(component).and_then(|c| c.primary_url()) {
            return url.to_owned();
        }
    }
    default.to_owned()
}
