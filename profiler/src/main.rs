//! `profiler`: CPU and heap profiles of the running lab, flamegraphs, the category breakdown,
//! and the profiling-overhead benchmark. See docs/profiling.md.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use profiler::analyze::{self, Rules};
use profiler::capture::{self, CaptureOptions};
use profiler::overhead::{self, OverheadOptions, Subject};
use profiler::target::{SERVICES, Stack};
use profiler::view;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Profiles of the simulated exchange: flamegraphs, heap, category breakdown, overhead"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CPU profile of every service while the demo load runs -> profiles/<time>/<service>.svg, .pb.gz
    Cpu(CaptureArgs),
    /// CPU and heap profiles of every service, plus a metrics snapshot
    All(CaptureArgs),
    /// Write profiles/<time>/index.html linking every flamegraph; open it or serve it
    View(ViewArgs),
    /// CPU share by category, top functions and suggestions (markdown on screen, JSON on disk)
    Analyze(AnalyzeArgs),
    /// Throughput and CPU per 1,000 orders with continuous profiling on vs off (JSON report)
    Overhead(OverheadArgs),
}

#[derive(clap::Args)]
struct CaptureArgs {
    /// The lab's state file (services, addresses, debug token).
    #[arg(long, default_value = ".lab/state.json")]
    state: PathBuf,
    /// Where the <time> folders go.
    #[arg(long, default_value = "profiles")]
    out: PathBuf,
    /// Length of the CPU profile.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Samples per CPU-second.
    #[arg(long, default_value_t = kit::debug::DEFAULT_HZ)]
    hz: u32,
    /// Orders per second sent to the gateway while profiling (the demo's 30); 0 = no load.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Load before profiling starts.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Seed of the order flow.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
struct ViewArgs {
    /// A profiles folder [default: the newest under --out].
    dir: Option<PathBuf>,
    #[arg(long, default_value = "profiles")]
    out: PathBuf,
    /// Port to serve on when there is no browser (0: any free port).
    #[arg(long, default_value_t = 8099)]
    port: u16,
    /// Only write index.html and print its path.
    #[arg(long)]
    no_serve: bool,
}

#[derive(clap::Args)]
struct AnalyzeArgs {
    /// A profiles folder or one profile (.pb.gz or .collapsed) [default: the newest folder under --out].
    path: Option<PathBuf>,
    #[arg(long, default_value = "profiles")]
    out: PathBuf,
    /// Rules file [default: profiler/categories.toml if present, else the built-in copy].
    #[arg(long)]
    rules: Option<PathBuf>,
}

#[derive(clap::Args)]
struct OverheadArgs {
    /// What the "on" windows switch on: `profiling` (every service profiled at --hz) or
    /// `probes` (the lab's eBPF agent runs; needs root; target 0.5 %).
    #[arg(long, value_enum, default_value_t = SubjectArg::Profiling)]
    subject: SubjectArg,
    #[arg(long, default_value = ".lab/state.json")]
    state: PathBuf,
    /// Fixed load in orders per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Length of each on/off window ("on": back-to-back profiles of `--profile` per service).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Number of (off, on) pairs, alternated ABBA.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    #[arg(long, default_value_t = kit::debug::DEFAULT_HZ)]
    hz: u32,
    /// Length of each profile in an "on" window; they follow each other back to back, as a
    /// continuous profiler takes them.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    profile: Duration,
    /// Load before the first window; with `--subject profiling` the services are profiled
    /// continuously meanwhile, so their first symbolization is not in the windows.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// With `--subject probes`: after the agent is started or stopped, wait this long before
    /// the window begins, so that an "on" window measures a settled agent (its first lab
    /// refresh, socket scan and cold caches are a one-off of its start) and an "off" window
    /// does not catch the agent's exit.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// With `--subject profiling`: after the windows, profile back to back this long (whole
    /// pprof-rs sessions and their renewals: the steady state of a continuous profiler);
    /// 0s skips it [default: three times kit's session age plus two profiles].
    #[arg(long, value_parser = humantime::parse_duration)]
    steady: Option<Duration>,
    /// Where to write the JSON report [default: target/bench/<subject>-overhead.json].
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SubjectArg {
    Profiling,
    Probes,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Cpu(a) => capture_cmd(a, false).await,
        Cmd::All(a) => capture_cmd(a, true).await,
        Cmd::View(a) => view_cmd(a).await,
        Cmd::Analyze(a) => analyze_cmd(a),
        Cmd::Overhead(a) => overhead_cmd(a).await,
    }
}

async fn capture_cmd(a: CaptureArgs, all: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=kit::debug::MAX_SECONDS).contains(&a.seconds),
        "--seconds must be between 1 and {}",
        kit::debug::MAX_SECONDS
    );
    anyhow::ensure!(
        (1..=kit::debug::MAX_HZ).contains(&a.hz),
        "--hz must be between 1 and {}",
        kit::debug::MAX_HZ
    );
    let stack = Stack::from_state(&a.state, &SERVICES)?;
    let opts = CaptureOptions {
        out: a.out,
        seconds: a.seconds,
        hz: a.hz,
        rate: a.rate,
        warmup: a.warmup,
        all,
        seed: a.seed,
    };
    let dir = capture::capture(&stack, &opts).await?;
    // Analyze right away so that the index page can show the breakdown.
    let rules = default_rules(None)?;
    for file in analyze::find_profiles(&dir)? {
        match analyze::analyze_file(&file, &rules) {
            Ok(an) => {
                write_json(&analyze::json_path(&file), &an)?;
                if let Some(d) = an
                    .categories
                    .iter()
                    .find(|c| Some(&c.id) == an.dominant.as_ref())
                {
                    eprintln!(
                        "  {}: largest CPU share {} ({:.1} %)",
                        an.service, d.label, d.share_pct
                    );
                }
            }
            Err(e) => eprintln!("  {}: not analyzed: {e:#}", file.service),
        }
    }
    println!("{}", dir.display());
    eprintln!("next: make profile-analyze (breakdown), make profile-view (flamegraphs)");
    Ok(())
}

fn default_rules(path: Option<PathBuf>) -> anyhow::Result<Rules> {
    match path {
        Some(p) => Rules::load(&p),
        None => {
            let local = PathBuf::from("profiler/categories.toml");
            if local.is_file() {
                Rules::load(&local)
            } else {
                Ok(Rules::builtin())
            }
        }
    }
}

fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn analyze_cmd(a: AnalyzeArgs) -> anyhow::Result<()> {
    let rules = default_rules(a.rules)?;
    let path = match a.path {
        Some(p) => p,
        None => capture::newest_run_dir(&a.out)?,
    };
    let files = analyze::find_profiles(&path)?;
    let mut md = format!(
        "## CPU time distribution by category — {}\n\nRules: {} (first match from the leaf up decides).\n\n",
        path.display(),
        rules.source
    );
    let mut all = Vec::new();
    let mut failed = 0;
    for file in &files {
        match analyze::analyze_file(file, &rules) {
            Ok(an) => {
                let json = analyze::json_path(file);
                write_json(&json, &an)?;
                md.push_str(&analyze::markdown(&an));
                md.push_str(&format!("\nJSON: {}\n\n", json.display()));
                all.push(an);
            }
            Err(e) => {
                failed += 1;
                md.push_str(&format!("### {}\n\nnot analyzed: {e:#}\n\n", file.service));
            }
        }
    }
    println!("{md}");
    if path.is_dir() {
        write_json(&path.join("analysis.json"), &all)?;
        std::fs::write(path.join("analysis.md"), &md)
            .with_context(|| format!("writing {}", path.join("analysis.md").display()))?;
    }
    anyhow::ensure!(failed < files.len(), "no profile could be analyzed");
    Ok(())
}

async fn view_cmd(a: ViewArgs) -> anyhow::Result<()> {
    let dir = match a.dir {
        Some(d) => d,
        None => capture::newest_run_dir(&a.out)?,
    };
    let dir = std::fs::canonicalize(&dir).with_context(|| format!("{}", dir.display()))?;
    let index = view::write_index(&dir)?;
    println!("{}", index.display());
    if a.no_serve {
        return Ok(());
    }
    if let Some(browser) = view::browser() {
        let status = std::process::Command::new(&browser).arg(&index).status();
        match status {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => eprintln!("{browser} exited with {s}; serving instead"),
            Err(e) => eprintln!("could not run {browser}: {e}; serving instead"),
        }
    } else {
        eprintln!("no browser here (no $BROWSER, no display): serving the folder instead");
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{} (try --port 0)", a.port))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "open http://{addr}/ (loopback only; from another machine: ssh -L {0}:127.0.0.1:{0} HOST). Ctrl-C stops.",
        addr.port()
    );
    view::serve(dir, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

async fn overhead_cmd(a: OverheadArgs) -> anyhow::Result<()> {
    let stack = Stack::from_state(&a.state, &SERVICES)?;
    let subject = match a.subject {
        SubjectArg::Profiling => Subject::Profiling,
        SubjectArg::Probes => Subject::ProbesAgent,
    };
    let opts = OverheadOptions {
        subject,
        rate: a.rate,
        window: a.window,
        pairs: a.pairs,
        hz: a.hz,
        profile_seconds: a.profile.as_secs().max(1),
        warmup: a.warmup,
        settle: a.settle,
        steady: a.steady.unwrap_or(
            3 * kit::debug::SESSION_MAX_AGE + 2 * Duration::from_secs(a.profile.as_secs().max(1)),
        ),
        json: a
            .json
            .unwrap_or_else(|| format!("target/bench/{}-overhead.json", subject.name()).into()),
        seed: a.seed,
    };
    eprintln!(
        "{} overhead: {} orders/s, {} pairs of {} s windows{}",
        subject.name(),
        opts.rate,
        opts.pairs,
        opts.window.as_secs(),
        if subject == Subject::Profiling {
            format!(", {} Hz", opts.hz)
        } else {
            String::new()
        }
    );
    let r = overhead::run(&stack, &opts).await?;
    println!(
        "off: {:.1} orders/s, {:.1} CPU-ms per 1,000 orders\non:  {:.1} orders/s, {:.1} CPU-ms per 1,000 orders\nCPU overhead {:+.2} % (pairs: mean {:+.2} %, median {:+.2} %, sd {:.2} %; off-window noise {:.2} %), throughput loss {:.2} %",
        r.off.throughput_per_sec,
        r.off.cpu_ms_per_1000_orders,
        r.on.throughput_per_sec,
        r.on.cpu_ms_per_1000_orders,
        r.cpu_overhead_pct,
        r.cpu_overhead_pct_pair_mean,
        r.cpu_overhead_pct_pair_median,
        r.cpu_overhead_pct_pair_stddev,
        r.off_noise_pct,
        r.throughput_loss_pct,
    );
    match subject {
        Subject::Profiling => {
            println!(
                "measured inside the services: building the \"on\" windows' profiles costs {:.2} % of their CPU (the warm-up's profiles, first symbolization included: {:.0} ms of CPU, once per process)",
                r.profile_building_pct,
                r.warmup_building_cpu_seconds * 1e3
            );
            if let Some(st) = &r.steady {
                println!(
                    "steady state ({} back-to-back profiles per service over {:.0} s, session renewal included): {:.2} % of their CPU",
                    st.profiles, st.seconds, r.steady_building_pct
                );
            }
        }
        Subject::ProbesAgent => {
            let of = if r.backends.is_empty() {
                "the services' CPU".to_string()
            } else {
                format!(
                    "the exchange's CPU (the services, {})",
                    r.backends.join(", ")
                )
            };
            println!(
                "measured directly: the agent's own CPU {:.3} %, the eBPF programs' kernel run time {:.3} % of {of} ({:.3} % of one CPU); together {:.3} %, {:.3} % of the three services' CPU alone",
                r.agent_cpu_pct,
                r.ebpf_run_pct,
                r.ebpf_run_cpu_share_pct,
                r.direct_pct,
                r.services_direct_pct
            );
            for (p, ms) in &r.ebpf_run_ms_per_sec_by_program {
                match (
                    r.ebpf_runs_per_sec_by_program.get(p),
                    r.ebpf_ns_per_run_by_program.get(p),
                ) {
                    (Some(runs), Some(ns)) => println!(
                        "  {p:<28} {ms:>8.3} ms per second ({runs:>9.0} runs/s, {ns:>6.0} ns per run)"
                    ),
                    _ => println!("  {p:<28} {ms:>8.3} ms per second"),
                }
            }
        }
    }
    println!("{}\nJSON: {}", r.verdict, opts.json.display());
    Ok(())
}
