//! `probes`: the eBPF agent of the lab. `probes run` (the default) loads the probes, then
//! serves `/metrics` and `/events` until SIGTERM; `probes check` says what this host offers;
//! `probes offcpu --pid PID` records where a process's threads wait.
//!
//! Exit codes: 0 done, 64 bad configuration, 77 not allowed to load eBPF (the lab then runs
//! without kernel probes), 1 anything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use probes::check::{self, EXIT_NO_PERMISSION};
use probes::config::{ProbesConfig, SERVICE};
use probes::{Agent, LoadError};

/// eBPF probes for the simulated-exchange lab.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; `APP__SECTION__KEY` environment variables override it.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the probes and serve /metrics and /events (the default).
    Run(RunArgs),
    /// Say what is available (privileges, BTF, tracefs, each tracepoint) and why not.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Skip the trial load and attach of the programs.
        #[arg(long)]
        no_load: bool,
    },
    /// Record where the threads of some processes wait (off-CPU stacks weighted by time) for a
    /// while, and write a flamegraph, folded stacks or JSON. Needs root.
    Offcpu(OffCpuArgs),
}

#[derive(Debug, clap::Args)]
struct OffCpuArgs {
    /// A process to follow (repeat for more).
    #[arg(long = "pid", value_name = "PID", required = true)]
    pids: Vec<u32>,
    /// How long to record, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Shortest wait counted, in microseconds.
    #[arg(long, default_value_t = 1)]
    min_us: u64,
    /// svg (a flamegraph), collapsed (folded stacks), json, or pprof (gzipped protobuf for
    /// `go tool pprof`).
    #[arg(long, value_enum, default_value_t = OffCpuFormat::Svg)]
    format: OffCpuFormat,
    /// Where to write it (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OffCpuFormat {
    Svg,
    Collapsed,
    Json,
    Pprof,
}

#[derive(Debug, Default, clap::Args)]
struct RunArgs {
    /// Address to serve on (default 127.0.0.1:9435, or [http] addr / APP__HTTP__ADDR).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The lab's state file (default .lab/state.json, then ../state.json).
    #[arg(long, value_name = "PATH")]
    lab_state: Option<PathBuf>,
    /// Enable BPF run-time statistics while running (probes_program_run_seconds_total).
    #[arg(long)]
    bpf_stats: bool,
    /// Keep the run-queue and block I/O programs attached all the time instead of sampling
    /// them (`[agent] sample_period_ms = 0`; docs/probes.md, "Sampling").
    #[arg(long)]
    no_sampling: bool,
}

fn main() {
    let args = Args::parse();
    let code = match args.command {
        Some(Command::Check { json, no_load }) => {
            let report = check::run(!no_load);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
                );
            } else {
                print!("{}", report.render());
            }
            report.exit_code()
        }
        Some(Command::Run(run)) => run_agent(args.config, run),
        Some(Command::Offcpu(o)) => offcpu(&o),
        None => run_agent(args.config, RunArgs::default()),
    };
    std::process::exit(code);
}

fn run_agent(config_file: Option<PathBuf>, run: RunArgs) -> i32 {
    let mut config: ProbesConfig = kit::config::load_or_exit(SERVICE, config_file.as_deref());
    if let Some(addr) = run.listen {
        config.http.addr = addr;
    }
    if let Some(path) = run.lab_state {
        config.agent.lab_state = Some(path);
    }
    config.agent.bpf_stats |= run.bpf_stats;
    if run.no_sampling {
        config.agent.sample_period_ms = 0;
    }

    // Before anything else is printed: without privileges, one line and EX_NOPERM.
    if let Some(why) = check::privilege_problem() {
        eprintln!("probes: {why}; the lab runs without kernel probes");
        return EXIT_NO_PERMISSION;
    }
    kit::telemetry::init(SERVICE, &config.log);

    // One thread: the agent's work is a few map reads and a scrape every few seconds, and a
    // multi-threaded runtime's workers cost wake-ups of their own (idle agent, 45 s each,
    // alternated: 2.63 and 1.96 ms of CPU a second with worker threads, 1.75 and 1.55 with
    // one). Blocking work (the lab rescans every 30 s, off-CPU captures) goes to the blocking
    // pool, whose thread is kept between rescans instead of exiting after tokio's default 10 s
    // idle: no thread to create every 30 s, and the agent's CPU stays readable from its live
    // threads' clocks (`/proc/PID/task/*/schedstat`: an exited thread takes its time with it).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(24 * 3600))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("probes: starting the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => 0,
        Err(Failure::Permission(why)) => {
            eprintln!("probes: {why}; the lab runs without kernel probes");
            EXIT_NO_PERMISSION
        }
        Err(Failure::Other(e)) => {
            eprintln!("probes: {e:#}");
            1
        }
    }
}

fn offcpu(o: &OffCpuArgs) -> i32 {
    use probes::offcpu::{OffCpuError, OffCpuOptions};
    let opts = OffCpuOptions {
        pids: o.pids.clone(),
        duration: std::time::Duration::from_secs(o.seconds),
        min: std::time::Duration::from_micros(o.min_us),
    };
    let profile = match probes::offcpu::capture(&opts) {
        Ok(p) => p,
        Err(OffCpuError::Invalid(why)) => {
            eprintln!("probes offcpu: {why}");
            return 64;
        }
        Err(OffCpuError::Unavailable(why)) => {
            eprintln!("probes offcpu: {why}");
            return EXIT_NO_PERMISSION;
        }
        Err(OffCpuError::Failed(e)) => {
            eprintln!("probes offcpu: {e:#}");
            return 1;
        }
    };
    let pids: Vec<String> = o.pids.iter().map(u32::to_string).collect();
    let body = match o.format {
        OffCpuFormat::Collapsed => Ok(profile.collapsed().into_bytes()),
        OffCpuFormat::Pprof => Ok(profile.pprof()),
        OffCpuFormat::Json => serde_json::to_vec_pretty(&profile).map_err(anyhow::Error::from),
        OffCpuFormat::Svg => profile.svg(&format!(
            "Off-CPU time of pid {} ({} s)",
            pids.join(", "),
            o.seconds
        )),
    };
    let written = body.and_then(|b| match &o.output {
        Some(path) => {
            std::fs::write(path, b).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(&b)
                .context("writing to standard output")
        }
    });
    if let Err(e) = written {
        eprintln!("probes offcpu: {e:#}");
        return 1;
    }
    eprintln!(
        "probes offcpu: {:.1} s, {} waits, {:.3} s off-CPU in all, {} distinct stacks, {} still waiting at the end{}{}",
        profile.seconds,
        profile.waits,
        profile.total_ns as f64 / 1e9,
        profile.stacks.len(),
        profile.still_waiting,
        if profile.lost + profile.unwalkable > 0 {
            format!(
                "; {} stacks lost, {} not walkable (partial)",
                profile.lost, profile.unwalkable
            )
        } else {
            String::new()
        },
        match (profile.program_runs, profile.program_ns) {
            (Some(runs), Some(ns)) if runs > 0 => format!(
                "; the program ran {runs} times, {:.1} ms of kernel CPU ({} ns a run)",
                ns as f64 / 1e6,
                ns / runs
            ),
            _ => String::new(),
        }
    );
    0
}

enum Failure {
    Permission(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

async fn serve(config: ProbesConfig) -> Result<(), Failure> {
    let shutdown = kit::shutdown::Shutdown::on_signals().context("installing signal handlers")?;
    // Bind first so a taken port fails before the (slower) program load.
    let listener = kit::http::bind(config.http.addr)
        .await
        .context("binding the HTTP listener")?;
    let options = config.agent_options();
    let agent = tokio::task::spawn_blocking(move || Agent::start(options))
        .await
        .context("loading the probes")?
        .map_err(|e| match e {
            LoadError::Permission(why) => Failure::Permission(why),
            LoadError::Other(e) => Failure::Other(e.context("starting the probes")),
        })?;
    probes::run(Arc::new(agent), config, listener, shutdown)
        .await
        .map_err(Failure::Other)
}
