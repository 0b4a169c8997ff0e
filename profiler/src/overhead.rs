//! `profiler overhead` (`make bench-profiling-overhead`): what continuous CPU profiling costs.
//!
//! One constant open-model load runs for the whole benchmark. Time is cut into windows of
//! equal length; in the "on" windows every service is being profiled at `hz` (99 Hz) as a
//! continuous profiler does it — back-to-back profiles of `profile_seconds` (10 s), each
//! symbolized and fetched — and after an "on" window the benchmark waits until the services'
//! profilers stopped (`debug_pprof_sampling` 0), so that stopping one is charged to no window;
//! in the "off" windows nothing is profiled. Windows alternate in ABBA order (off,on / on,off / ...) so that a slow
//! drift of the machine (other builds on a shared host) cancels out instead of biasing one
//! side. Per window: orders the gateway answered (its `http_server_requests_total` for
//! `POST /v1/orders` and `DELETE /v1/orders/{order_id}`), CPU seconds of the three services (utime+stime from `/proc/<pid>/stat`,
//! or their `process_cpu_seconds_total`), hence throughput and CPU per 1,000 orders.
//! The overhead is the relative increase of CPU per 1,000 orders (and the relative loss of
//! throughput) from off to on; the target is at most 1 %. The report gives the spread of the
//! per-pair differences so that a number below the machine's noise is read as such.
//!
//! The same machinery measures the eBPF agent (`make bench-probes-overhead`,
//! [`Subject::ProbesAgent`]): in "on" windows the lab's `probes` agent runs, in "off" windows
//! it is stopped (through the lab's control socket, between windows). Its own CPU is added to
//! the exchange's CPU — the three services, PostgreSQL and RabbitMQ, whose context switches
//! its programs see as well — and each eBPF program's kernel run time
//! (`kernel.bpf_stats_enabled`, switched on for one window and restored after) is reported as
//! measured directly. Target 0.5 % of the exchange's CPU; the share of the three services alone
//! is reported next to it.

use crate::target::{Service, Stack};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the "on" windows switch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// Every service is CPU-profiled at `hz`.
    Profiling,
    /// The lab's eBPF agent (`probes`) runs.
    ProbesAgent,
}

impl Subject {
    /// The target: at most this much more CPU per order.
    pub fn target_pct(self) -> f64 {
        match self {
            Subject::Profiling => TARGET_PCT,
            Subject::ProbesAgent => PROBES_TARGET_PCT,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Subject::Profiling => "profiling",
            Subject::ProbesAgent => "probes",
        }
    }

    /// Whether a window's CPU includes PostgreSQL and RabbitMQ. Profiling: no, the profilers run
    /// inside the three services and their cost is a share of those. The eBPF agent: yes, its
    /// programs run on every context switch and block request of the host, PostgreSQL's and
    /// RabbitMQ's included, so its cost is a share of what every order costs end to end.
    pub fn counts_backends(self) -> bool {
        self == Subject::ProbesAgent
    }

    fn describe(self, hz: u32) -> String {
        match self {
            Subject::Profiling => format!("with profiling at {hz} Hz"),
            Subject::ProbesAgent => "with the eBPF agent running".into(),
        }
    }
}

/// Options of the benchmark.
#[derive(Debug, Clone)]
pub struct OverheadOptions {
    pub subject: Subject,
    pub rate: f64,
    pub window: Duration,
    /// Number of (off, on) pairs.
    pub pairs: usize,
    pub hz: u32,
    /// Length of each profile in an "on" window: profiles follow each other back to back, as
    /// a continuous profiler takes them (Parca and Pyroscope: 10 s).
    pub profile_seconds: u64,
    /// Load before the first window. With the profiling subject every service is profiled
    /// continuously meanwhile, so the one-time cost of loading debug information and of the
    /// first symbolization of its code is not charged to the "on" windows (it is reported
    /// as `warmup_building_cpu_seconds`).
    pub warmup: Duration,
    /// Probes subject: wait this long after starting or stopping the agent before a window
    /// begins (the agent's start-up — first lab refresh, socket scan, cold caches — and its
    /// exit are one-offs, not the steady state the windows measure).
    pub settle: Duration,
    /// Profiling subject: after the windows, profile back to back for this long and charge
    /// every profile's building cost, session renewals included (kit renews its pprof-rs
    /// session every `SESSION_MAX_AGE`, and a session's profiles cost more the older it is):
    /// the steady state of a continuous profiler, which the short "on" windows (a fresh
    /// session each) cannot show. Zero: skipped.
    pub steady: Duration,
    pub json: PathBuf,
    pub seed: u64,
}

/// The steady-state phase of the profiling subject (see [`OverheadOptions::steady`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Steady {
    pub seconds: f64,
    pub profiles: usize,
    /// CPU seconds the services reported for building the phase's profiles.
    pub building_cpu_seconds: f64,
    /// Seconds the services' threads spent in the profiler's signal handler during the phase
    /// (`x-profile-handler-ms`, kit::sigprof).
    #[serde(default)]
    pub handler_cpu_seconds: f64,
}

/// What the services reported a set of profiles cost them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProfilesCost {
    /// Building them (`x-profile-cpu-ms`).
    pub building: f64,
    /// The signal handler while they ran (`x-profile-handler-ms`).
    pub handler: f64,
}

impl std::ops::AddAssign for ProfilesCost {
    fn add_assign(&mut self, o: ProfilesCost) {
        self.building += o.building;
        self.handler += o.handler;
    }
}

/// The target: continuous profiling costs at most this much CPU per order.
pub const TARGET_PCT: f64 = 1.0;

/// The target of the eBPF agent (Grafana Beyla publishes 0.5 % in its default mode).
pub const PROBES_TARGET_PCT: f64 = 0.5;

/// One measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub index: usize,
    pub profiling: bool,
    pub seconds: f64,
    pub orders: f64,
    pub throughput_per_sec: f64,
    /// CPU seconds per service.
    pub cpu_seconds: std::collections::BTreeMap<String, f64>,
    pub cpu_seconds_total: f64,
    pub cpu_ms_per_1000_orders: f64,
    /// CPU seconds the services reported for building this window's profiles (symbolizing,
    /// encoding): measured directly, so free of the host's noise. Zero in "off" windows.
    #[serde(default)]
    pub profile_building_cpu_seconds: f64,
    /// Seconds the services' threads spent in the profiler's signal handler in this window
    /// (unwinding and counting samples; kit::sigprof times it). Zero in "off" windows.
    #[serde(default)]
    pub profile_handler_cpu_seconds: f64,
    /// Kernel run time of each eBPF program during this window (probes subject, "on" windows).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ebpf_run_seconds: std::collections::BTreeMap<String, f64>,
    /// Runs of each eBPF program during this window.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ebpf_runs: std::collections::BTreeMap<String, f64>,
}

/// Means over the windows of one side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    pub windows: usize,
    pub throughput_per_sec: f64,
    pub cpu_ms_per_1000_orders: f64,
    /// Per service, mean CPU ms per 1,000 orders.
    pub cpu_ms_per_1000_orders_by_service: std::collections::BTreeMap<String, f64>,
}

/// The benchmark's JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// `profiling` or `probes`: what the "on" windows switched on.
    #[serde(default)]
    pub subject: String,
    pub rate_per_sec: f64,
    pub window_s: f64,
    /// Probes subject: seconds waited after each start or stop of the agent before a window.
    #[serde(default)]
    pub settle_s: f64,
    pub pairs: usize,
    pub hz: u32,
    /// Length of each back-to-back profile in an "on" window.
    #[serde(default)]
    pub profile_s: u64,
    pub services: Vec<String>,
    /// Where CPU time was read from: `proc` or `metrics`.
    pub cpu_source: String,
    /// Where order counts were read from: `gateway_metrics` or `offered_rate`.
    pub orders_source: String,
    pub windows: Vec<Window>,
    pub off: Side,
    pub on: Side,
    /// (on - off) / off of CPU per 1,000 orders, in percent, from the side means.
    pub cpu_overhead_pct: f64,
    /// Mean, median and standard deviation of the same quantity computed per (off, on) pair
    /// (the median is not moved by one window that a burst of other work on the host hit).
    pub cpu_overhead_pct_pair_mean: f64,
    pub cpu_overhead_pct_pair_median: f64,
    pub cpu_overhead_pct_pair_stddev: f64,
    /// (off - on) / off of throughput, in percent.
    pub throughput_loss_pct: f64,
    /// The part of the overhead measured inside the services: CPU spent building the profiles
    /// per "on" window, relative to the mean CPU of an "off" window, in percent. It leaves out
    /// the signal handler's unwinding (about 99 samples per CPU-second).
    pub profile_building_pct: f64,
    /// The signal handler's time per "on" window relative to the mean CPU of an "off" window,
    /// in percent (the part `profile_building_pct` leaves out).
    #[serde(default)]
    pub profile_handler_pct: f64,
    /// The overhead measured directly, in percent of the CPU the windows count (the services;
    /// with the probes subject also PostgreSQL and RabbitMQ, see `backends`) (profiling: building
    /// the profiles plus the signal handler, from the steady-state phase when it ran, else
    /// from the "on" windows; probes: agent CPU + eBPF run time): free of the host's noise.
    /// What it leaves out: for profiling, the kernel's side of delivering each SIGPROF (a
    /// signal frame per sample); for probes, the tracepoint trampolines around the programs.
    #[serde(default)]
    pub direct_pct: f64,
    /// `direct_pct` against the three services' CPU alone (the same number when `backends` is
    /// empty).
    #[serde(default)]
    pub services_direct_pct: f64,
    /// Components whose CPU the windows count besides the services (probes subject: PostgreSQL
    /// and RabbitMQ, so that CPU per 1,000 orders is the whole exchange's).
    #[serde(default)]
    pub backends: Vec<String>,
    /// Profiling subject: the steady-state phase, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steady: Option<Steady>,
    /// Profiling subject: the steady-state phase's building CPU relative to the services' CPU
    /// over as long in an "off" window, in percent (`direct_pct` when the phase ran).
    #[serde(default)]
    pub steady_building_pct: f64,
    /// Profiling subject: the steady-state phase's signal-handler time, relative likewise.
    #[serde(default)]
    pub steady_handler_pct: f64,
    /// Profiling subject: CPU seconds the services spent building the warm-up's profiles
    /// (first symbolization of their code: a one-off per process, outside the windows).
    #[serde(default)]
    pub warmup_building_cpu_seconds: f64,
    /// Relative spread (stddev / mean, percent) of CPU per 1,000 orders across "off" windows:
    /// the noise floor of this measurement on this machine.
    pub off_noise_pct: f64,
    /// Probes subject: the agent's own CPU in an "on" window relative to the CPU of an "off"
    /// window (the services, PostgreSQL and RabbitMQ), in percent (already part of
    /// `cpu_overhead_pct`).
    #[serde(default)]
    pub agent_cpu_pct: f64,
    /// Probes subject: the eBPF programs' kernel run time per "on" window, relative to the CPU
    /// of an "off" window, in percent (measured by the kernel; it is charged to whichever task
    /// hit the tracepoint, so part of it is in the windows' CPU already).
    #[serde(default)]
    pub ebpf_run_pct: f64,
    /// Probes subject: the window after the pairs with the agent on and
    /// `kernel.bpf_stats_enabled` on, which the `ebpf_*` figures come from (absent in reports
    /// from before it existed, whose "on" windows all had the statistics on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_stats_window: Option<Window>,
    /// Probes subject: the same run time as a share of one CPU, in percent.
    #[serde(default)]
    pub ebpf_run_cpu_share_pct: f64,
    /// Probes subject: mean kernel run time of each program, milliseconds per second of window.
    #[serde(default)]
    pub ebpf_run_ms_per_sec_by_program: std::collections::BTreeMap<String, f64>,
    /// Probes subject: runs of each program per second, and its run time per run (ns), over
    /// the "on" windows.
    #[serde(default)]
    pub ebpf_runs_per_sec_by_program: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    pub ebpf_ns_per_run_by_program: std::collections::BTreeMap<String, f64>,
    pub target_pct: f64,
    pub verdict: String,
}

/// CPU seconds so far of the threads of `pid` alive now, from each thread's
/// `/proc/PID/task/TID/schedstat` (nanoseconds on a CPU). Precise where `/proc/PID/stat` counts
/// 10 ms ticks, but it forgets a thread that exited: see [`window_cpu`].
pub fn live_threads_cpu_seconds(pid: i32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// One service's CPU seconds in a window from its two readings: the threads' nanosecond clocks
/// when they agree with the process's tick count (within its rounding: a reading is up to 10 ms
/// low per field), else the ticks (a thread exited in between and took its time with it). A
/// small consumer like the eBPF agent (~25 ms in a 30 s window) needs the precise one.
fn window_cpu(ticks: f64, live_threads: Option<f64>) -> f64 {
    match live_threads {
        Some(precise) if precise >= 0.0 && (precise - ticks).abs() <= 0.045 => precise,
        _ => ticks.max(0.0),
    }
}

/// CPU seconds so far of one service.
pub fn cpu_seconds_proc(pid: i32) -> Option<f64> {
    lab::process::stat(pid).map(|s| s.cpu_ticks as f64 / lab::process::TICKS_PER_SEC)
}

/// Sums the samples of metric `name` whose labels contain every one of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let (series, value) = match rest.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        if labels.iter().all(|l| series.contains(l))
            && let Ok(v) = value.trim().parse::<f64>()
        {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

struct Counters {
    at: Instant,
    cpu: Vec<f64>,
    /// Per service: [`live_threads_cpu_seconds`], when read from `/proc`.
    cpu_live_threads: Vec<Option<f64>>,
    /// Per backend (PostgreSQL, RabbitMQ): CPU seconds so far of each of its processes alive
    /// now, by pid.
    backend_cpu: Vec<std::collections::BTreeMap<i32, f64>>,
    orders: Option<f64>,
}

/// CPU seconds so far of each of a backend's processes alive now (from its threads' clocks).
fn backend_cpu_seconds(b: &crate::target::Backend) -> std::collections::BTreeMap<i32, f64> {
    b.pids()
        .into_iter()
        .filter_map(|pid| Some((pid, live_threads_cpu_seconds(pid)?)))
        .collect()
}

/// A backend's CPU seconds between two readings: what each process alive at the second used
/// since the first (all of it for a process started in between). A process that exited in
/// between takes its time in the window with it, so the figure can only be low: as a
/// denominator, that overstates an overhead, never understates it.
fn backend_window_cpu(
    before: &std::collections::BTreeMap<i32, f64>,
    after: &std::collections::BTreeMap<i32, f64>,
) -> f64 {
    after
        .iter()
        .map(|(pid, a)| (a - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// The services' CPU and the gateway's order count now; with `subject` counting them
/// ([`Subject::counts_backends`]), PostgreSQL's and RabbitMQ's CPU too.
async fn read_counters(
    stack: &Stack,
    use_proc: bool,
    subject: Subject,
) -> anyhow::Result<Counters> {
    let mut cpu = Vec::new();
    let mut cpu_live_threads = Vec::new();
    for s in &stack.services {
        cpu_live_threads.push(
            s.pid
                .filter(|_| use_proc)
                .and_then(live_threads_cpu_seconds),
        );
        cpu.push(service_cpu(stack, s, use_proc).await?);
    }
    let gateway = stack
        .services
        .iter()
        .find(|s| s.name == "order-gateway")
        .context("the gateway is needed to count orders")?;
    let text = stack
        .get(gateway, "/metrics", Duration::from_secs(10))
        .await?;
    // Orders = new orders and cancels (the flow's 10 % cancels are orders too).
    let text = String::from_utf8_lossy(&text);
    let new = metric_sum(
        &text,
        "http_server_requests_total",
        &["route=\"/v1/orders\"", "method=\"POST\""],
    );
    let cancels = metric_sum(
        &text,
        "http_server_requests_total",
        &["route=\"/v1/orders/{order_id}\"", "method=\"DELETE\""],
    );
    let orders = new.map(|n| n + cancels.unwrap_or(0.0));
    Ok(Counters {
        at: Instant::now(),
        cpu,
        cpu_live_threads,
        backend_cpu: if subject.counts_backends() {
            stack.backends.iter().map(backend_cpu_seconds).collect()
        } else {
            Vec::new()
        },
        orders,
    })
}

async fn service_cpu(stack: &Stack, s: &Service, use_proc: bool) -> anyhow::Result<f64> {
    if use_proc && let Some(v) = s.pid.and_then(cpu_seconds_proc) {
        return Ok(v);
    }
    let text = stack.get(s, "/metrics", Duration::from_secs(10)).await?;
    metric_sum(
        &String::from_utf8_lossy(&text),
        "process_cpu_seconds_total",
        &[],
    )
    .with_context(|| format!("{}: no process_cpu_seconds_total in /metrics", s.name))
}

/// Profiles every service for `seconds` at `hz`, waits for all the profiles, and returns what
/// the services reported they cost: building them (`x-profile-cpu-ms`) and the signal handler
/// while they ran (`x-profile-handler-ms`).
async fn profile_all(stack: &Stack, seconds: u64, hz: u32) -> anyhow::Result<ProfilesCost> {
    let tasks: Vec<_> = stack
        .services
        .iter()
        .map(|s| {
            let (stack, s) = (stack.clone(), s.clone());
            tokio::spawn(async move {
                stack
                    .get_with_headers(
                        &s,
                        &format!("/debug/pprof/profile?seconds={seconds}&hz={hz}"),
                        Duration::from_secs(seconds + 120),
                    )
                    .await
                    .map(|(_, h)| {
                        let seconds = |name: &str| {
                            h.get(name)
                                .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                                .unwrap_or(0.0)
                                / 1e3
                        };
                        ProfilesCost {
                            building: seconds("x-profile-cpu-ms"),
                            handler: seconds("x-profile-handler-ms"),
                        }
                    })
            })
        })
        .collect();
    let mut spent = ProfilesCost::default();
    for t in tasks {
        spent += t.await.context("profile task")??;
    }
    Ok(spent)
}

/// Profiles every service back to back, `each` seconds at a time, as many as fit in `span`
/// (half a second of slack for the round trips): (their cost, profiles per service).
async fn back_to_back(
    stack: &Stack,
    span: Duration,
    each: u64,
    hz: u32,
) -> anyhow::Result<(ProfilesCost, usize)> {
    let started = Instant::now();
    let (mut building, mut profiles) = (ProfilesCost::default(), 0);
    while started.elapsed() + Duration::from_secs(each) <= span + Duration::from_millis(500) {
        building += profile_all(stack, each, hz).await?;
        profiles += 1;
    }
    Ok((building, profiles))
}

/// The steady-state phase: back-to-back profiles of every service for `opts.steady`.
async fn steady_phase(stack: &Stack, opts: &OverheadOptions) -> anyhow::Result<Steady> {
    eprintln!(
        "  steady state: back-to-back {} s profiles for {} s (whole pprof-rs sessions and their renewals)",
        opts.profile_seconds,
        opts.steady.as_secs()
    );
    let started = Instant::now();
    let (building, profiles) =
        back_to_back(stack, opts.steady, opts.profile_seconds, opts.hz).await?;
    let seconds = started.elapsed().as_secs_f64();
    wait_until_not_sampling(stack).await?;
    eprintln!(
        "  steady state: {profiles} profiles per service, {:.0} ms of building CPU and {:.0} ms in the signal handler in {seconds:.0} s",
        building.building * 1e3,
        building.handler * 1e3
    );
    Ok(Steady {
        seconds,
        profiles,
        building_cpu_seconds: building.building,
        handler_cpu_seconds: building.handler,
    })
}

/// Waits until no service's CPU profiler samples any more (`debug_pprof_sampling` 0 on all),
/// polling, within the profilers' linger time plus a margin.
async fn wait_until_not_sampling(stack: &Stack) -> anyhow::Result<()> {
    let deadline = Instant::now() + kit::debug::SESSION_LINGER + Duration::from_secs(30);
    loop {
        let mut sampling = Vec::new();
        for s in &stack.services {
            let text = stack.get(s, "/metrics", Duration::from_secs(10)).await?;
            let text = String::from_utf8_lossy(&text);
            if metric_sum(&text, kit::debug::SAMPLING_GAUGE, &[]).unwrap_or(0.0) > 0.0 {
                sampling.push(s.name.clone());
            }
        }
        if sampling.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the CPU profiler of {} did not stop within {:?} of the last profile",
            sampling.join(", "),
            kit::debug::SESSION_LINGER + Duration::from_secs(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the benchmark against the running lab and writes the JSON report.
pub async fn run(stack: &Stack, opts: &OverheadOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(opts.pairs >= 1, "--pairs must be at least 1");
    anyhow::ensure!(
        opts.window >= Duration::from_secs(2),
        "--window must be at least 2s"
    );
    // Minutes of load against a stopped lab would end in a report of nothing: refuse now.
    for service in &stack.services {
        stack
            .get(service, "/metrics", Duration::from_secs(5))
            .await
            .with_context(|| {
                format!(
                    "{} does not answer; is the lab running? Start it with `make demo`",
                    service.name
                )
            })?;
    }
    let use_proc = stack
        .services
        .iter()
        .all(|s| s.pid.and_then(cpu_seconds_proc).is_some());
    let window_s = opts.window.as_secs().max(2);
    let total = opts.warmup
        + (Duration::from_secs(window_s + 30) + opts.settle) * 2 * opts.pairs as u32
        + Duration::from_secs(60);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let spec = loadgen::run::RunSpec {
        target: stack.gateway.clone(),
        rate_per_sec: opts.rate,
        duration: total,
        flow: loadgen::flow::FlowSpec {
            seed: opts.seed,
            symbols: crate::capture::SYMBOLS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            cancel_share: 0.1,
            accounts: 50,
            client_id_prefix: format!(
                "ovh{}-{}",
                opts.seed,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ),
        },
        ledger: None,
        summary: None,
        request_timeout: Duration::from_secs(10),
        max_in_flight: 20_000,
        batch: 1,
        progress: false,
    };
    spec.validate()?;
    let load = tokio::spawn(loadgen::run::run(spec, async move {
        let _ = stop_rx.await;
    }));
    eprintln!(
        "warming up for {} s at {} orders/s{}",
        opts.warmup.as_secs(),
        opts.rate,
        if opts.subject == Subject::Profiling {
            " with every service profiled (their first symbolization happens here, outside the windows)"
        } else {
            ""
        }
    );
    // The probes subject: the agent. The kernel's run-time statistics stay off in the on/off
    // windows (they cost two clock reads per program run, which the agent alone does not
    // cost) and are on for one window of their own after them.
    let probes = match opts.subject {
        Subject::ProbesAgent => {
            let agent = crate::agent::Agent::from_state(&stack.state_file)?;
            let was_running = agent.running()?;
            Some((agent, was_running))
        }
        Subject::Profiling => None,
    };
    let mut warm = Duration::ZERO;
    let mut warmup_building = 0.0;
    if opts.subject == Subject::Profiling {
        // Continuous profiling for the warm-up: the first profiles of a process symbolize
        // every address they meet for the first time (kit caches them), a one-off that the
        // steady state measured below does not pay. Its cost is reported on its own.
        let started = Instant::now();
        loop {
            let left = opts.warmup.saturating_sub(started.elapsed()).as_secs();
            warmup_building += profile_all(stack, left.clamp(1, opts.profile_seconds), opts.hz)
                .await?
                .building;
            if started.elapsed() + Duration::from_secs(1) >= opts.warmup {
                break;
            }
        }
        wait_until_not_sampling(stack).await?;
        warm = started.elapsed();
    }
    tokio::time::sleep(opts.warmup.saturating_sub(warm)).await;

    let mut windows = Vec::new();
    let result: anyhow::Result<(Option<Steady>, Option<Window>)> = async {
        for pair in 0..opts.pairs {
            // ABBA: off,on then on,off, so that a linear drift cancels.
            let order = if pair % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for profiling in order {
                // Switching the agent happens between windows: its start-up (loading and
                // verifying the programs) is not charged to the steady state measured here.
                let mut agent_before = crate::agent::AgentReading::default();
                if let Some((agent, _)) = &probes {
                    agent.switch_settled(profiling, opts.settle).await?;
                    agent_before = agent.read().await?;
                }
                let before = read_counters(stack, use_proc, opts.subject).await?;
                let building = if profiling && opts.subject == Subject::Profiling {
                    let each = opts.profile_seconds.clamp(1, window_s);
                    back_to_back(stack, Duration::from_secs(window_s), each, opts.hz)
                        .await?
                        .0
                } else {
                    tokio::time::sleep(Duration::from_secs(window_s)).await;
                    ProfilesCost::default()
                };
                let after = read_counters(stack, use_proc, opts.subject).await?;
                if profiling && opts.subject == Subject::Profiling {
                    // The profilers linger for a next profile, then stop; their stop is a one-off
                    // of a profiling session and must not land in the next window.
                    wait_until_not_sampling(stack).await?;
                }
                let mut w = window(
                    windows.len(),
                    profiling,
                    stack,
                    (&before, &after),
                    opts.rate,
                );
                w.profile_building_cpu_seconds = building.building;
                w.profile_handler_cpu_seconds = building.handler;
                if let Some((agent, _)) = &probes {
                    let agent_after = agent.read().await?;
                    add_agent(&mut w, &agent_before, &agent_after);
                }
                eprintln!(
                    "  window {:>2} {} {:<3} {:>6.1} orders/s  {:>7.1} CPU-ms per 1,000 orders",
                    w.index,
                    opts.subject.name(),
                    if profiling { "on" } else { "off" },
                    w.throughput_per_sec,
                    w.cpu_ms_per_1000_orders
                );
                windows.push(w);
            }
        }
        if let Some((agent, _)) = &probes {
            let w = stats_window(
                stack,
                agent,
                window_s,
                use_proc,
                opts.rate,
                windows.len(),
                opts.settle,
            )
            .await?;
            return Ok((None, Some(w)));
        }
        if opts.subject == Subject::Profiling && !opts.steady.is_zero() {
            return Ok((Some(steady_phase(stack, opts).await?), None));
        }
        Ok((None, None))
    }
    .await;
    let _ = stop_tx.send(());
    let _ = load.await;
    if let Some((agent, was_running)) = probes {
        // Leave the agent as it was found.
        if let Err(e) = agent.set(was_running).await {
            eprintln!(
                "could not {} the agent again: {e:#}",
                if was_running { "start" } else { "stop" }
            );
        }
    }
    let (steady, stats_window) = result?;
    let orders_source = if windows.is_empty() {
        "none"
    } else {
        "gateway_metrics"
    };
    let mut report = summarize(
        opts,
        stack.services.iter().map(|s| s.name.clone()).collect(),
        if use_proc { "proc" } else { "metrics" },
        orders_source,
        windows,
        steady,
        stats_window,
    );
    report.warmup_building_cpu_seconds = warmup_building;
    if let Some(dir) = opts.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    Ok(report)
}

/// Probes subject, after the pairs: one more window with the agent running and the kernel's
/// run-time statistics on (`kernel.bpf_stats_enabled`, restored after), for each program's
/// run time and runs. Kept out of the on/off comparison: the statistics cost two clock reads
/// per program run, which the agent does not cost when they are off, as they are by default.
async fn stats_window(
    stack: &Stack,
    agent: &crate::agent::Agent,
    window_s: u64,
    use_proc: bool,
    rate: f64,
    index: usize,
    settle: Duration,
) -> anyhow::Result<Window> {
    agent.switch_settled(true, settle).await?;
    let stats = crate::agent::BpfStats::enable()?;
    let agent_before = agent.read().await?;
    let before = read_counters(stack, use_proc, Subject::ProbesAgent).await?;
    tokio::time::sleep(Duration::from_secs(window_s)).await;
    let after = read_counters(stack, use_proc, Subject::ProbesAgent).await?;
    let agent_after = agent.read().await?;
    drop(stats);
    let mut w = window(index, true, stack, (&before, &after), rate);
    add_agent(&mut w, &agent_before, &agent_after);
    eprintln!(
        "  window {:>2} probes on, with kernel.bpf_stats_enabled=1: {:>6.1} orders/s  {:>7.1} CPU-ms per 1,000 orders",
        w.index, w.throughput_per_sec, w.cpu_ms_per_1000_orders
    );
    Ok(w)
}

/// One window from its two readings. When the readings have PostgreSQL's and RabbitMQ's CPU
/// (the probes subject, [`Subject::counts_backends`]) the window's CPU includes it.
fn window(
    index: usize,
    profiling: bool,
    stack: &Stack,
    (before, after): (&Counters, &Counters),
    rate: f64,
) -> Window {
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let orders = match (before.orders, after.orders) {
        (Some(b), Some(a)) if a >= b => a - b,
        // No counter (renamed metric?): the open model sends `rate` per second.
        _ => rate * seconds,
    };
    let mut cpu_seconds: std::collections::BTreeMap<String, f64> = stack
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let live = match (before.cpu_live_threads[i], after.cpu_live_threads[i]) {
                (Some(b), Some(a)) => Some(a - b),
                _ => None,
            };
            (
                s.name.clone(),
                window_cpu(after.cpu[i] - before.cpu[i], live),
            )
        })
        .collect();
    for (i, b) in stack.backends.iter().enumerate() {
        let (Some(x), Some(y)) = (before.backend_cpu.get(i), after.backend_cpu.get(i)) else {
            continue;
        };
        cpu_seconds.insert(b.name.clone(), backend_window_cpu(x, y));
    }
    let total: f64 = cpu_seconds.values().sum();
    Window {
        index,
        profiling,
        seconds,
        orders,
        throughput_per_sec: if seconds > 0.0 { orders / seconds } else { 0.0 },
        cpu_seconds,
        cpu_seconds_total: total,
        cpu_ms_per_1000_orders: if orders > 0.0 {
            total * 1000.0 * 1000.0 / orders
        } else {
            0.0
        },
        profile_building_cpu_seconds: 0.0,
        profile_handler_cpu_seconds: 0.0,
        ebpf_run_seconds: Default::default(),
        ebpf_runs: Default::default(),
    }
}

/// Charges the agent's CPU of one window to it (as service `probes`) and records the
/// programs' kernel run time; an "off" window gets `probes` = 0 so both sides list it.
fn add_agent(
    w: &mut Window,
    before: &crate::agent::AgentReading,
    after: &crate::agent::AgentReading,
) {
    let cpu = match (before.cpu_seconds, after.cpu_seconds) {
        (Some(b), Some(a)) if a >= b => {
            let live = match (before.cpu_live_threads, after.cpu_live_threads) {
                (Some(lb), Some(la)) => Some(la - lb),
                _ => None,
            };
            window_cpu(a - b, live)
        }
        _ => 0.0,
    };
    w.cpu_seconds.insert("probes".into(), cpu);
    w.cpu_seconds_total += cpu;
    if w.orders > 0.0 {
        w.cpu_ms_per_1000_orders = w.cpu_seconds_total * 1e6 / w.orders;
    }
    let delta = |after: &std::collections::BTreeMap<String, f64>,
                 before: &std::collections::BTreeMap<String, f64>| {
        after
            .iter()
            .map(|(p, a)| {
                let b = before.get(p).copied().unwrap_or(0.0);
                (p.clone(), (a - b).max(0.0))
            })
            .collect()
    };
    w.ebpf_run_seconds = delta(&after.programs, &before.programs);
    w.ebpf_runs = delta(&after.runs, &before.runs);
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

fn stddev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

fn side(windows: &[&Window]) -> Side {
    let per_k: Vec<f64> = windows.iter().map(|w| w.cpu_ms_per_1000_orders).collect();
    let mut by_service = std::collections::BTreeMap::new();
    if let Some(first) = windows.first() {
        for name in first.cpu_seconds.keys() {
            let v: Vec<f64> = windows
                .iter()
                .map(|w| {
                    let cpu = w.cpu_seconds.get(name).copied().unwrap_or(0.0);
                    if w.orders > 0.0 {
                        cpu * 1e6 / w.orders
                    } else {
                        0.0
                    }
                })
                .collect();
            by_service.insert(name.clone(), round3(mean(&v)));
        }
    }
    Side {
        windows: windows.len(),
        throughput_per_sec: round3(mean(
            &windows
                .iter()
                .map(|w| w.throughput_per_sec)
                .collect::<Vec<_>>(),
        )),
        cpu_ms_per_1000_orders: round3(mean(&per_k)),
        cpu_ms_per_1000_orders_by_service: by_service,
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Turns the windows into the report (pure, so it is tested on made-up windows).
pub fn summarize(
    opts: &OverheadOptions,
    services: Vec<String>,
    cpu_source: &str,
    orders_source: &str,
    windows: Vec<Window>,
    steady: Option<Steady>,
    stats_window: Option<Window>,
) -> Report {
    let off_w: Vec<&Window> = windows.iter().filter(|w| !w.profiling).collect();
    let on_w: Vec<&Window> = windows.iter().filter(|w| w.profiling).collect();
    let off = side(&off_w);
    let on = side(&on_w);
    let rel = |on: f64, off: f64| {
        if off > 0.0 {
            (on - off) / off * 100.0
        } else {
            0.0
        }
    };
    let cpu_overhead = rel(on.cpu_ms_per_1000_orders, off.cpu_ms_per_1000_orders);
    // Consecutive windows form the (off, on) pairs: ABBA keeps each pair adjacent in time.
    let pair_diffs: Vec<f64> = windows
        .chunks(2)
        .filter_map(|p| {
            let off = p.iter().find(|w| !w.profiling)?;
            let on = p.iter().find(|w| w.profiling)?;
            Some(rel(on.cpu_ms_per_1000_orders, off.cpu_ms_per_1000_orders))
        })
        .collect();
    let pair_mean = mean(&pair_diffs);
    let pair_median = median(&pair_diffs);
    let pair_sd = stddev(&pair_diffs);
    let off_noise = {
        let v: Vec<f64> = off_w.iter().map(|w| w.cpu_ms_per_1000_orders).collect();
        if mean(&v) > 0.0 {
            stddev(&v) / mean(&v) * 100.0
        } else {
            0.0
        }
    };
    let throughput_loss = -rel(on.throughput_per_sec, off.throughput_per_sec);
    let off_cpu = mean(
        &off_w
            .iter()
            .map(|w| w.cpu_seconds_total)
            .collect::<Vec<_>>(),
    );
    // A per-"on"-window amount relative to the services' CPU in an "off" window, in percent.
    let pct_of_off = |v: f64| {
        if off_cpu > 0.0 {
            v / off_cpu * 100.0
        } else {
            0.0
        }
    };
    let on_mean = |f: fn(&Window) -> f64| mean(&on_w.iter().map(|w| f(w)).collect::<Vec<_>>());
    let building_pct = pct_of_off(on_mean(|w| w.profile_building_cpu_seconds));
    let handler_pct = pct_of_off(on_mean(|w| w.profile_handler_cpu_seconds));
    // Half-width of a rough 95 % interval of the pair mean.
    let half = if pair_diffs.len() >= 2 {
        2.0 * pair_sd / (pair_diffs.len() as f64).sqrt()
    } else {
        f64::INFINITY
    };
    let target = opts.subject.target_pct();
    let what = opts.subject.describe(opts.hz);
    // The agent's own CPU and its programs' kernel run time, per "on" window.
    let agent_cpu = on_mean(|w| w.cpu_seconds.get("probes").copied().unwrap_or(0.0));
    // The programs' run time: from the window with the kernel's statistics on (reports
    // written before it existed had them on in every "on" window).
    let ebpf_w: Vec<&Window> = match &stats_window {
        Some(w) => vec![w],
        None => on_w.clone(),
    };
    let ebpf_run = mean(
        &ebpf_w
            .iter()
            .map(|w| w.ebpf_run_seconds.values().sum::<f64>())
            .collect::<Vec<_>>(),
    );
    let ebpf_seconds = mean(&ebpf_w.iter().map(|w| w.seconds).collect::<Vec<_>>());
    let mut by_program = std::collections::BTreeMap::new();
    // Per program: (run seconds, runs, window seconds) summed over those windows.
    let mut totals: std::collections::BTreeMap<String, (f64, f64, f64)> = Default::default();
    for w in &ebpf_w {
        for (p, v) in &w.ebpf_run_seconds {
            let per_sec = if w.seconds > 0.0 { v / w.seconds } else { 0.0 };
            *by_program.entry(p.clone()).or_insert(0.0) += per_sec * 1e3 / ebpf_w.len() as f64;
            let t = totals.entry(p.clone()).or_default();
            t.0 += v;
            t.1 += w.ebpf_runs.get(p).copied().unwrap_or(0.0);
            t.2 += w.seconds;
        }
    }
    let runs_per_sec = totals
        .iter()
        .filter(|(_, t)| t.1 > 0.0 && t.2 > 0.0)
        .map(|(p, t)| (p.clone(), round3(t.1 / t.2)))
        .collect();
    let ns_per_run = totals
        .iter()
        .filter(|(_, t)| t.1 > 0.0)
        .map(|(p, t)| (p.clone(), round3(t.0 / t.1 * 1e9)))
        .collect();
    // The steady state, relative to the services' CPU over as long without profiling.
    let off_seconds = mean(&off_w.iter().map(|w| w.seconds).collect::<Vec<_>>());
    let steady_share = |v: f64| match steady {
        Some(st) if off_cpu > 0.0 && off_seconds > 0.0 && st.seconds > 0.0 => {
            v / (off_cpu / off_seconds * st.seconds) * 100.0
        }
        _ => 0.0,
    };
    let steady_pct = steady_share(steady.map_or(0.0, |st| st.building_cpu_seconds));
    let steady_handler_pct = steady_share(steady.map_or(0.0, |st| st.handler_cpu_seconds));
    // What was measured directly (free of the host's noise).
    let direct_pct = match opts.subject {
        Subject::Profiling if steady.is_some() => steady_pct + steady_handler_pct,
        Subject::Profiling => building_pct + handler_pct,
        Subject::ProbesAgent => pct_of_off(agent_cpu) + pct_of_off(ebpf_run),
    };
    // The same cost against the three services' CPU alone (equal to `direct_pct` when the
    // windows count no backend).
    let services_off_cpu = mean(
        &off_w
            .iter()
            .map(|w| {
                services
                    .iter()
                    .filter_map(|s| w.cpu_seconds.get(s))
                    .sum::<f64>()
            })
            .collect::<Vec<_>>(),
    );
    let services_direct_pct = if services_off_cpu > 0.0 && off_cpu > 0.0 {
        direct_pct * off_cpu / services_off_cpu
    } else {
        direct_pct
    };
    let backends: Vec<String> = windows
        .first()
        .map(|w| {
            w.cpu_seconds
                .keys()
                .filter(|k| !services.contains(k) && *k != "probes")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let of_what = if backends.is_empty() {
        "of the services' CPU".to_string()
    } else {
        format!(
            "of the exchange's CPU (the services, {}; {services_direct_pct:.2} % of the three services alone)",
            backends.join(", ")
        )
    };
    let end_to_end = format!("end to end {cpu_overhead:+.2} % ± {half:.2} % CPU per 1,000 orders");
    let verdict = if direct_pct > target {
        format!(
            "above target: measured directly, {what} costs {direct_pct:.2} % {of_what} (target <= {target} %; {end_to_end}, off-window noise {off_noise:.2} %)"
        )
    } else if cpu_overhead <= target {
        format!(
            "within target: {end_to_end} {what}, {direct_pct:.2} % {of_what} measured directly (target <= {target} %)"
        )
    } else if cpu_overhead - half <= target {
        format!(
            "inconclusive: {end_to_end} {what} covers the {target} % target ({direct_pct:.2} % {of_what} measured directly); run with more --pairs or a longer --window on a quieter machine"
        )
    } else {
        format!("above target: {end_to_end} {what}, target <= {target} %")
    };
    Report {
        schema: "profiler.overhead/2".into(),
        subject: opts.subject.name().into(),
        rate_per_sec: opts.rate,
        window_s: opts.window.as_secs_f64(),
        settle_s: match opts.subject {
            Subject::ProbesAgent => opts.settle.as_secs_f64(),
            Subject::Profiling => 0.0,
        },
        pairs: opts.pairs,
        hz: opts.hz,
        profile_s: opts.profile_seconds,
        services,
        cpu_source: cpu_source.into(),
        orders_source: orders_source.into(),
        windows,
        off,
        on,
        cpu_overhead_pct: round3(cpu_overhead),
        cpu_overhead_pct_pair_mean: round3(pair_mean),
        cpu_overhead_pct_pair_median: round3(pair_median),
        cpu_overhead_pct_pair_stddev: round3(pair_sd),
        throughput_loss_pct: round3(throughput_loss),
        profile_building_pct: round3(building_pct),
        profile_handler_pct: round3(handler_pct),
        direct_pct: round3(direct_pct),
        services_direct_pct: round3(services_direct_pct),
        backends,
        steady,
        steady_building_pct: round3(steady_pct),
        steady_handler_pct: round3(steady_handler_pct),
        warmup_building_cpu_seconds: 0.0,
        off_noise_pct: round3(off_noise),
        agent_cpu_pct: round3(pct_of_off(agent_cpu)),
        ebpf_run_pct: round3(pct_of_off(ebpf_run)),
        ebpf_stats_window: stats_window,
        ebpf_run_cpu_share_pct: if ebpf_seconds > 0.0 {
            round3(ebpf_run / ebpf_seconds * 100.0)
        } else {
            0.0
        },
        ebpf_run_ms_per_sec_by_program: by_program
            .into_iter()
            .map(|(p, v)| (p, round3(v)))
            .collect(),
        ebpf_runs_per_sec_by_program: runs_per_sec,
        ebpf_ns_per_run_by_program: ns_per_run,
        target_pct: target,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(index: usize, profiling: bool, orders: f64, cpu: f64) -> Window {
        Window {
            index,
            profiling,
            seconds: 10.0,
            orders,
            throughput_per_sec: orders / 10.0,
            cpu_seconds: [("order-gateway".to_string(), cpu)].into_iter().collect(),
            cpu_seconds_total: cpu,
            cpu_ms_per_1000_orders: cpu * 1e6 / orders,
            profile_building_cpu_seconds: if profiling { 0.004 } else { 0.0 },
            profile_handler_cpu_seconds: if profiling { 0.001 } else { 0.0 },
            ebpf_run_seconds: Default::default(),
            ebpf_runs: Default::default(),
        }
    }

    /// `summarize` for one service's windows read from `/proc` and the gateway's counters.
    fn summarize_gateway(
        o: &OverheadOptions,
        windows: Vec<Window>,
        steady: Option<Steady>,
    ) -> Report {
        summarize(
            o,
            vec!["order-gateway".into()],
            "proc",
            "gateway_metrics",
            windows,
            steady,
            None,
        )
    }

    fn opts() -> OverheadOptions {
        OverheadOptions {
            subject: Subject::Profiling,
            rate: 100.0,
            window: Duration::from_secs(10),
            pairs: 2,
            hz: 99,
            profile_seconds: 10,
            warmup: Duration::from_secs(5),
            settle: Duration::ZERO,
            steady: Duration::ZERO,
            json: PathBuf::from("x.json"),
            seed: 1,
        }
    }

    #[test]
    fn overhead_arithmetic() {
        let windows = vec![
            w(0, false, 1000.0, 1.000),
            w(1, true, 1000.0, 1.005),
            w(2, true, 1000.0, 1.006),
            w(3, false, 1000.0, 1.001),
        ];
        let r = summarize_gateway(&opts(), windows, None);
        assert_eq!(r.off.windows, 2);
        assert_eq!(r.on.windows, 2);
        assert!((r.off.cpu_ms_per_1000_orders - 1000.5).abs() < 1e-6);
        assert!(
            (r.cpu_overhead_pct - 0.5).abs() < 0.01,
            "{}",
            r.cpu_overhead_pct
        );
        assert!(r.verdict.starts_with("within target"), "{}", r.verdict);
        assert_eq!(r.throughput_loss_pct, 0.0);
        assert!(
            (r.profile_building_pct - 0.4).abs() < 0.01,
            "{}",
            r.profile_building_pct
        );
        let heavy = vec![w(0, false, 1000.0, 1.0), w(1, true, 1000.0, 1.10)];
        let r = summarize_gateway(&opts(), heavy, None);
        assert!(
            r.verdict.starts_with("inconclusive"),
            "one pair: {}",
            r.verdict
        );
        // No end-to-end difference, but building the profiles measurably costs 5 % (and the
        // handler 0.1 %): the direct measurement decides.
        let mut costly = vec![
            w(0, false, 1000.0, 1.0),
            w(1, true, 1000.0, 1.0),
            w(2, true, 1000.0, 1.0),
            w(3, false, 1000.0, 1.0),
        ];
        for x in costly.iter_mut().filter(|x| x.profiling) {
            x.profile_building_cpu_seconds = 0.05;
        }
        let r = summarize_gateway(&opts(), costly, None);
        assert_eq!(r.cpu_overhead_pct, 0.0);
        assert!((r.direct_pct - 5.1).abs() < 1e-6, "{}", r.direct_pct);
        assert!(r.verdict.starts_with("above target"), "{}", r.verdict);
    }

    /// The steady-state phase, when it ran, is the direct measure: its building CPU over the
    /// services' CPU in as long an "off" stretch.
    #[test]
    fn the_steady_state_is_the_direct_measure_when_it_ran() {
        let windows = vec![
            w(0, false, 1000.0, 1.0),
            w(1, true, 1000.0, 1.0),
            w(2, true, 1000.0, 1.0),
            w(3, false, 1000.0, 1.0),
        ];
        // Off windows: 1 CPU-second per 10 s. 200 s of steady state, 0.3 s of building: 1.5 %,
        // and 0.1 s in the signal handler: 0.5 %.
        let steady = Steady {
            seconds: 200.0,
            profiles: 19,
            building_cpu_seconds: 0.3,
            handler_cpu_seconds: 0.1,
        };
        let r = summarize_gateway(&opts(), windows.clone(), Some(steady));
        assert!((r.steady_building_pct - 1.5).abs() < 1e-6, "{r:?}");
        assert!((r.steady_handler_pct - 0.5).abs() < 1e-6, "{r:?}");
        assert!(
            (r.direct_pct - 2.0).abs() < 1e-6,
            "building + handler: {r:?}"
        );
        // The windows alone (4 ms of building and 1 ms of handler per "on" window of 1
        // CPU-second) say 0.4 % + 0.1 %.
        assert!((r.profile_building_pct - 0.4).abs() < 1e-6);
        assert!((r.profile_handler_pct - 0.1).abs() < 1e-6);
        assert!(r.verdict.starts_with("above target"), "{}", r.verdict);
        let without = summarize_gateway(&opts(), windows, None);
        assert!(
            (without.direct_pct - without.profile_building_pct - without.profile_handler_pct).abs()
                < 1e-9
        );
        assert_eq!(without.steady, None);
    }

    #[test]
    fn probes_agent_arithmetic() {
        use crate::agent::AgentReading;
        let mut o = opts();
        o.subject = Subject::ProbesAgent;
        let reading = |cpu: Option<f64>, run: f64| AgentReading {
            cpu_seconds: cpu,
            cpu_live_threads: None,
            programs: [("sched_switch".to_string(), run)].into_iter().collect(),
            // 1 µs per run.
            runs: [("sched_switch".to_string(), run * 1e6)]
                .into_iter()
                .collect(),
        };
        let mut windows = Vec::new();
        for (i, on) in [false, true, true, false].into_iter().enumerate() {
            let mut x = w(i, on, 1000.0, 1.0);
            x.profile_building_cpu_seconds = 0.0;
            if on {
                // 2 ms of agent CPU and 1 ms of eBPF run time in a 10 s window.
                add_agent(
                    &mut x,
                    &reading(Some(5.0), 0.5),
                    &reading(Some(5.002), 0.501),
                );
            } else {
                add_agent(&mut x, &AgentReading::default(), &AgentReading::default());
            }
            windows.push(x);
        }
        assert_eq!(windows[0].cpu_seconds["probes"], 0.0);
        assert!((windows[1].cpu_seconds_total - 1.002).abs() < 1e-9);
        let r = summarize_gateway(&o, windows, None);
        assert_eq!(r.subject, "probes");
        assert_eq!(r.target_pct, PROBES_TARGET_PCT);
        assert!(
            (r.cpu_overhead_pct - 0.2).abs() < 0.01,
            "{}",
            r.cpu_overhead_pct
        );
        assert!((r.agent_cpu_pct - 0.2).abs() < 0.01, "{}", r.agent_cpu_pct);
        assert!((r.ebpf_run_pct - 0.1).abs() < 0.01, "{}", r.ebpf_run_pct);
        assert!((r.ebpf_run_cpu_share_pct - 0.01).abs() < 0.001);
        assert!((r.ebpf_run_ms_per_sec_by_program["sched_switch"] - 0.1).abs() < 1e-6);
        assert!((r.ebpf_ns_per_run_by_program["sched_switch"] - 1000.0).abs() < 1e-3);
        assert!((r.ebpf_runs_per_sec_by_program["sched_switch"] - 100.0).abs() < 1e-3);
        assert!(r.verdict.starts_with("within target"), "{}", r.verdict);
        assert!(r.verdict.contains("eBPF agent"), "{}", r.verdict);
        // Today's runs: the statistics are off in the on/off windows (the programs' counters
        // stand still there) and on in one window after them, which the run time comes from.
        let mut quiet = Vec::new();
        for (i, on) in [false, true, true, false].into_iter().enumerate() {
            let mut x = w(i, on, 1000.0, 1.0);
            x.profile_building_cpu_seconds = 0.0;
            if on {
                add_agent(&mut x, &reading(Some(5.0), 0.5), &reading(Some(5.002), 0.5));
            } else {
                add_agent(&mut x, &AgentReading::default(), &AgentReading::default());
            }
            quiet.push(x);
        }
        let mut stats = w(4, true, 1000.0, 1.0);
        // 3 ms of run time in the statistics window: 0.3 % of an off window's CPU.
        add_agent(
            &mut stats,
            &reading(Some(5.0), 0.5),
            &reading(Some(5.002), 0.503),
        );
        let r = summarize(
            &o,
            vec!["order-gateway".into()],
            "proc",
            "gateway_metrics",
            quiet,
            None,
            Some(stats),
        );
        assert!((r.agent_cpu_pct - 0.2).abs() < 0.01, "{}", r.agent_cpu_pct);
        assert!((r.ebpf_run_pct - 0.3).abs() < 0.01, "{}", r.ebpf_run_pct);
        assert!((r.direct_pct - 0.5).abs() < 0.01, "{}", r.direct_pct);
        assert!((r.ebpf_run_ms_per_sec_by_program["sched_switch"] - 0.3).abs() < 1e-6);
        assert!(r.backends.is_empty());
        assert_eq!(r.services_direct_pct, r.direct_pct);
        assert!(r.verdict.contains("of the services' CPU"), "{}", r.verdict);
        // With PostgreSQL counted (half of every window's CPU), the same cost is half the
        // share of the exchange's CPU that it is of the services' alone.
        let halve = |mut x: Window| {
            let g = x.cpu_seconds["order-gateway"];
            x.cpu_seconds.insert("order-gateway".into(), g / 2.0);
            x.cpu_seconds.insert("postgres".into(), g / 2.0);
            x
        };
        let r2 = summarize(
            &o,
            vec!["order-gateway".into()],
            "proc",
            "gateway_metrics",
            r.windows.iter().cloned().map(halve).collect(),
            None,
            r.ebpf_stats_window.clone().map(halve),
        );
        assert_eq!(r2.backends, vec!["postgres".to_string()]);
        assert!((r2.direct_pct - 0.5).abs() < 0.01, "{}", r2.direct_pct);
        assert!(
            (r2.services_direct_pct - 1.0).abs() < 0.02,
            "{}",
            r2.services_direct_pct
        );
        assert!(
            r2.verdict.contains(
                "of the exchange's CPU (the services, postgres; 1.00 % of the three services alone)"
            ),
            "{}",
            r2.verdict
        );
        assert!(r.ebpf_stats_window.is_some());
        assert_eq!(r.on.windows, 2, "the statistics window is not an on window");
        // The threads' clocks win over the ticks when they agree within the ticks' rounding:
        // 2.5 ms that the ticks saw as 0 or 10 ms.
        for ticks_after in [5.0, 5.01] {
            let mut x = w(8, true, 1000.0, 1.0);
            let mut b = reading(Some(5.0), 0.5);
            let mut a = reading(Some(ticks_after), 0.5);
            b.cpu_live_threads = Some(4.9);
            a.cpu_live_threads = Some(4.9025);
            add_agent(&mut x, &b, &a);
            assert!((x.cpu_seconds["probes"] - 0.0025).abs() < 1e-9);
        }
        // A backend's window: a process that exited is left out, one that started counts whole.
        let before = [(10, 5.0), (11, 100.0)].into_iter().collect();
        let after = [(10, 5.5), (12, 0.25)].into_iter().collect();
        assert!((backend_window_cpu(&before, &after) - 0.75).abs() < 1e-9);
        // A stopped agent (no pid) or a restarted one (counter went down) charges nothing.
        let mut x = w(9, true, 1000.0, 1.0);
        add_agent(&mut x, &reading(Some(5.0), 0.5), &reading(None, 0.2));
        assert_eq!(x.cpu_seconds["probes"], 0.0);
        assert_eq!(x.ebpf_run_seconds["sched_switch"], 0.0);
    }

    #[test]
    fn metric_sums() {
        let text = "# TYPE http_server_requests_total counter\n\
            http_server_requests_total{route=\"/v1/orders\",method=\"POST\",status=\"201\"} 10\n\
            http_server_requests_total{route=\"/v1/orders\",method=\"POST\",status=\"400\"} 2\n\
            http_server_requests_total{route=\"/v1/orders/{order_id}\",method=\"DELETE\",status=\"200\"} 5\n\
            http_server_requests_total_other 100\n\
            process_cpu_seconds_total 1.25\n";
        assert_eq!(
            metric_sum(
                text,
                "http_server_requests_total",
                &["route=\"/v1/orders\"", "method=\"POST\""]
            ),
            Some(12.0)
        );
        assert_eq!(
            metric_sum(text, "process_cpu_seconds_total", &[]),
            Some(1.25)
        );
        assert_eq!(metric_sum(text, "nope", &[]), None);
    }

    #[test]
    fn proc_cpu_of_this_process() {
        let me = std::process::id() as i32;
        let ticks = cpu_seconds_proc(me).expect("ticks");
        // Burn ~50 ms so that both clocks move.
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let live = live_threads_cpu_seconds(me).expect("schedstat of this process");
        let ticks_after = cpu_seconds_proc(me).expect("ticks");
        assert!(live > 0.04, "{live}");
        // The test harness's other threads may have exited: the live sum is at most the total
        // (plus one tick of rounding per field).
        assert!(
            live <= ticks_after + 0.021,
            "live {live}, ticks {ticks_after}"
        );
        assert!(ticks_after >= ticks);
    }

    #[test]
    fn window_cpu_trusts_the_precise_clock_only_when_it_agrees_with_the_ticks() {
        // The agent's 25 ms in a window, read as 2 or 3 ticks: the precise value wins.
        assert_eq!(window_cpu(0.02, Some(0.0254)), 0.0254);
        assert_eq!(window_cpu(0.03, Some(0.0254)), 0.0254);
        // A thread exited with 2 s of CPU: the live sum fell behind, the ticks are right.
        assert_eq!(window_cpu(4.7, Some(2.7)), 4.7);
        assert_eq!(window_cpu(4.7, Some(-0.3)), 4.7);
        assert_eq!(window_cpu(4.7, None), 4.7);
        assert_eq!(window_cpu(-0.01, None), 0.0);
    }
}
