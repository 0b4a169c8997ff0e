//! `chaos list | run NAME | cleanup | report DIR`: the command line over the runner.
//!
//! Exit codes of `chaos run`: 0 the hypothesis held, 1 it did not, 2 the fault could not be
//! injected, 3 the run left kernel state behind.

use anyhow::Context;
use chaos::experiment::{self, BUILT_IN, Experiment};
use chaos::runner::{self, Options};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    version,
    about = "Chaos experiments against the lab, with verdicts, recovery times and a loss audit"
)]
struct Cli {
    /// The lab's state file (written by `lab up`).
    #[arg(long, global = true, default_value = ".lab/state.json")]
    lab_state: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The built-in experiments.
    List,
    /// Run an experiment (a built-in name or a TOML file) under load.
    Run {
        experiment: String,
        /// Short phases (CI): the experiment's [quick] section.
        #[arg(long)]
        quick: bool,
        /// Orders per second instead of the experiment's.
        #[arg(long)]
        rate: Option<f64>,
        /// How long the fault holds, e.g. 30s.
        #[arg(long, value_parser = humantime::parse_duration)]
        hold: Option<std::time::Duration>,
        /// Where reports go.
        #[arg(long, default_value = "reports")]
        reports: PathBuf,
        /// Where chaos_fault_active / chaos_phase are served for Prometheus.
        #[arg(long, default_value = "127.0.0.1:9436")]
        metrics_addr: std::net::SocketAddr,
    },
    /// Revert whatever an interrupted run left behind (from the fault journal).
    Cleanup,
    /// Re-render report.md, report.html and junit.xml from a report's report.json.
    Report { dir: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::List => {
            for (name, text) in BUILT_IN {
                let e = Experiment::parse(text)?;
                let first = e.description.split(". ").next().unwrap_or_default();
                println!("  {name:<18} {first}.");
            }
            Ok(())
        }
        Cmd::Run {
            experiment,
            quick,
            rate,
            hold,
            reports,
            metrics_addr,
        } => {
            let exp = experiment::find(&experiment)?;
            let opts = Options {
                lab_state: cli.lab_state,
                quick,
                hold_s: hold.map(|d| d.as_secs_f64()),
                rate,
                reports_dir: reports,
                metrics_addr: Some(metrics_addr),
            };
            // SIGINT / SIGTERM: heal, audit and report early.
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                if let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    eprintln!("interrupted: healing the faults, then auditing and reporting");
                    let _ = tx.send(true);
                }
            });
            eprintln!("chaos: {} — {}", exp.name, exp.description);
            let done = runner::run(&exp, &opts, rx).await?;
            print!("{}", done.report.markdown());
            println!("\nreport: {}", done.dir.join("report.html").display());
            std::process::exit(done.report.exit_code);
        }
        Cmd::Cleanup => {
            let stack = chaos::target::Stack::open(&cli.lab_state)?;
            let mut journal = chaos::journal::Journal::open(
                &stack.state.root.join("chaos").join("journal.jsonl"),
            )?;
            let done =
                chaos::inject::cleanup(&stack, &mut journal).context("reverting the journal")?;
            if done.is_empty() {
                println!("nothing to clean up: the fault journal lists no change still in effect");
            } else {
                for d in done {
                    println!("reverted {d}");
                }
            }
            Ok(())
        }
        Cmd::Report { dir } => {
            let r = runner::rerender(&dir)?;
            println!(
                "{}: {} (re-rendered report.md, report.html, junit.xml)",
                dir.display(),
                r.verdict.headline()
            );
            Ok(())
        }
    }
}
