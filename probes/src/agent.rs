//! The agent: the loaded probes, the lab view, and the numbers and events built from them.
//!
//! Four activities, each also callable directly (tests drive them by hand):
//!
//! * [`Agent::drain_events`]: decode the ring buffer (connects, failures, resets, closes, OOM
//!   kills) into counters, histograms and `/events`; on every poll, and when the ring's fd
//!   wakes the agent (the programs wake it only when the ring is a quarter full, or for an
//!   OOM kill: an event per connection would otherwise cost a wake-up each).
//! * [`Agent::poll`]: drain the ring, then read the aggregating maps (retransmits, run queue,
//!   block I/O, kernel counters, program statistics): before every `/metrics` and `/events`
//!   answer, and by itself when none came for `poll_interval` (20 s), so what a reader gets
//!   is current while an idle agent does little; a flow whose retransmit count grew since the
//!   previous poll becomes a `retransmit_burst` event.
//! * the sampling cycle: attaches the hot-path programs (run queue, block I/O) for
//!   `sample_window` out of every `sample_period`, and keeps them attached while a hold
//!   ([`Agent::hold_sampling`]) lasts.
//! * [`Agent::refresh`]: re-read the lab state, rescan `/proc`, and sync the kernel's
//!   `tracked` map: when the lab state file changed (a component started, restarted or
//!   stopped: inotify on its directory wakes the agent, [`crate::watch`]; where that cannot be
//!   watched, the file is checked every `refresh_interval`), else every `rescan_interval`
//!   (threads and children created in between are already followed by the kernel: they
//!   inherit their parent's component at `sched_wakeup_new`, a program that is never
//!   sampled).
//!
//! Lock order: `kernel` before `inner`; neither is held across a `/proc` scan; `sampling`,
//! `found_state` and `last_poll` are taken alone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::attribution::{Attribution, Registry, UNKNOWN};
use crate::events::{Event, EventRing};
use crate::kernel::{Kernel, LoadError, ProbeStatus};
use crate::lab::{self, LabState};
use crate::metrics::{Aggregates, RetransLabels};
use crate::procfs;
use crate::selfcost::{Activity, SelfCost};
use crate::watch::{Change, StateWatch};
use crate::wire::{self, EventKind, FlowKey, RawEvent, RunqVal, endpoint, tcp_state_name};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The lab's state file; `None` searches [`lab::default_paths`].
    pub lab_state: Option<PathBuf>,
    /// Turn on BPF run-time statistics while running (`probes_program_run_seconds_total`).
    pub bpf_stats: bool,
    /// Capacity of the `/events` ring.
    pub events_capacity: usize,
    pub poll_interval: Duration,
    /// How often the lab state file is checked for changes (a change triggers a refresh) when
    /// its directory cannot be watched with inotify.
    pub refresh_interval: Duration,
    /// Longest time between two refreshes when the lab state file does not change.
    pub rescan_interval: Duration,
    /// Attach only these probes (all when `None`).
    pub probes: Option<Vec<String>>,
    /// Attribute sockets through `/proc/PID/fd` (costs a directory read per lab process).
    pub scan_sockets: bool,
    /// How often the socket scan runs (it reads each network namespace's `/proc/net/tcp`,
    /// which walks the kernel's whole established-socket hash table: milliseconds per read).
    /// Between scans the last scan's sockets are kept. The scan is for connections the agent
    /// did not see being opened (before it started, or evicted from the kernel's `socks` map):
    /// every connect made while it runs is attributed in the kernel at SYN_SENT, and an
    /// accepted connection by its listening port, so after the first scan a rare one is
    /// enough.
    pub socket_scan_interval: Duration,
    /// Where cgroup v1 hierarchies are mounted (relative lab cgroup paths resolve under it).
    pub cgroup_root: PathBuf,
    /// Fewest retransmits of one flow within a poll interval that make a `retransmit_burst`.
    pub burst_min: u64,
    /// Time block requests from the kernel's own issue stamp where the queue keeps one (no
    /// map entry per request); `false`: the programs time every request themselves.
    pub kernel_block_stamps: bool,
    /// Sampling of the hot-path probes (run queue: a program on every context switch; block
    /// I/O: two on every request): their programs are attached for `sample_window` out of
    /// every `sample_period`, and continuously while someone holds them
    /// ([`Agent::hold_sampling`]: the chaos experiments do). A zero period, or a window as long
    /// as the period, keeps them attached. Only [`Agent::run_background`] cycles them; an agent
    /// driven by hand keeps them attached.
    pub sample_window: Duration,
    pub sample_period: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            lab_state: None,
            bpf_stats: false,
            events_capacity: crate::events::DEFAULT_CAPACITY,
            // Longer than the lab's 15 s scrape interval: while Prometheus scrapes, the agent
            // never polls by itself.
            poll_interval: Duration::from_secs(20),
            refresh_interval: Duration::from_secs(2),
            rescan_interval: Duration::from_secs(120),
            probes: None,
            scan_sockets: true,
            socket_scan_interval: Duration::from_secs(300),
            cgroup_root: PathBuf::from(procfs::CGROUP_ROOT),
            burst_min: 1,
            kernel_block_stamps: true,
            sample_window: DEFAULT_SAMPLE_WINDOW,
            sample_period: DEFAULT_SAMPLE_PERIOD,
        }
    }
}

/// The default sampling: the hot-path programs attached 3 s out of every 30 (a tenth of the
/// time: at 10,000 context switches a second that is still 30,000 run-queue waits a window).
/// Each switch patches a tracepoint's call site with cross-CPU calls (~1–1.5 ms of the agent's
/// CPU here), so few, longer windows cost less than many short ones. A rate window of 30 s or
/// a multiple of it holds the same share of open time wherever it starts; the kernel panels'
/// is 60 s (four of the agent's 15 s scrapes).
pub const DEFAULT_SAMPLE_WINDOW: Duration = Duration::from_secs(3);
pub const DEFAULT_SAMPLE_PERIOD: Duration = Duration::from_secs(30);

/// The longest single hold of the sampled probes ([`Agent::hold_sampling`]).
pub const MAX_SAMPLING_HOLD: Duration = Duration::from_secs(3600);

/// Where the sampling cycle stands.
#[derive(Debug)]
struct Sampling {
    /// Attached now (mirrors the kernel's state, which is the truth).
    open: bool,
    /// When the current open or closed stretch began.
    since: std::time::Instant,
    /// Time attached before the current stretch.
    open_before: Duration,
    /// Held open until then.
    held_until: Option<std::time::Instant>,
    /// The last failure to attach or detach, for `/debug/sampling`.
    last_error: Option<String>,
}

/// What `/debug/sampling` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingStatus {
    /// The probes whose hot-path programs are sampled (attached ones only).
    pub probes: Vec<&'static str>,
    /// `false`: always attached (a zero period, or a window as long as it).
    pub cycling: bool,
    pub window_s: f64,
    pub period_s: f64,
    /// Whether the programs are attached now.
    pub open: bool,
    /// Seconds attached since the agent started.
    pub open_seconds_total: f64,
    /// Seconds a hold keeps them attached from now; 0 without a hold.
    pub held_for_s: f64,
    pub last_error: Option<String>,
}

impl Sampling {
    /// Time attached up to `now`.
    fn open_seconds(&self, now: std::time::Instant) -> Duration {
        if self.open {
            self.open_before + now.saturating_duration_since(self.since)
        } else {
            self.open_before
        }
    }
}

/// Userspace state behind one lock.
struct Inner {
    registry: Registry,
    view: Attribution,
    /// Last kernel count seen per flow, to turn cumulative counters into deltas.
    flow_counts: HashMap<FlowKey, u64>,
    aggregates: Aggregates,
    events: EventRing,
    block_names: HashMap<u32, String>,
    last_lab_problem: Option<String>,
    undecodable: u64,
    /// When the programs' miss counts were last read (every [`MISSES_EVERY`]).
    misses_read_at: Option<std::time::Instant>,
}

/// How often [`Agent::poll`] reads the programs' miss counts: a file per program (most of a
/// poll's cost when it is read every time), for a counter that should stay 0 and is judged
/// over minutes (the dashboard over 5, the alert over 10).
const MISSES_EVERY: Duration = Duration::from_secs(60);

/// A running set of probes.
pub struct Agent {
    options: AgentOptions,
    kernel: Mutex<Kernel>,
    inner: Mutex<Inner>,
    /// Serialises refreshes (the background task and tests may both call it); holds when the
    /// sockets were last scanned.
    refresh_lock: Mutex<Option<std::time::Instant>>,
    /// The last refresh: when, and the lab state file's (modified time, length) then.
    last_refresh: Mutex<Option<(std::time::Instant, Option<Fingerprint>)>>,
    /// Where the lab state file was found last (`options.lab_state` when it says).
    found_state: Mutex<Option<PathBuf>>,
    /// The agent's own CPU time by activity.
    cost: SelfCost,
    /// When the maps were last read.
    last_poll: Mutex<Option<std::time::Instant>>,
    /// An off-CPU capture (`GET /debug/offcpu`) is running: one at a time, each attaches a
    /// program to every context switch of the host.
    offcpu_busy: Arc<AtomicBool>,
    sampling: Mutex<Sampling>,
    /// Woken when a hold is taken or released, so the cycle reacts at once.
    sampling_changed: tokio::sync::Notify,
}

/// A file's (modified time, length): changes when the lab rewrites its state.
type Fingerprint = (SystemTime, u64);

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("options", &self.options)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kernel monotonic nanoseconds to Unix milliseconds.
fn unix_ms_of(ts_ns: u64) -> u64 {
    let now_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let now_mono_ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(ts_ns);
    now_unix_ms.saturating_sub(now_mono_ns.saturating_sub(ts_ns) / 1_000_000)
}

fn secs(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / 1e9)
}

impl Agent {
    /// Loads and attaches the probes, reads the lab state once and polls once.
    pub fn start(options: AgentOptions) -> Result<Agent, LoadError> {
        let kernel = Kernel::load(
            options.probes.as_deref(),
            options.bpf_stats,
            options.kernel_block_stamps,
        )?;
        for s in kernel.status() {
            if s.attached {
                tracing::info!(probe = s.probe, tracepoints = %s.detail, "probe attached");
            } else {
                tracing::error!(probe = s.probe, reason = %s.detail, "probe not attached");
            }
        }
        let aggregates = Aggregates {
            probes: kernel.status().to_vec(),
            ..Aggregates::default()
        };
        let agent = Agent {
            kernel: Mutex::new(kernel),
            inner: Mutex::new(Inner {
                registry: Registry::default(),
                view: Attribution::default(),
                flow_counts: HashMap::new(),
                aggregates,
                events: EventRing::new(options.events_capacity.max(1)),
                block_names: HashMap::new(),
                last_lab_problem: None,
                undecodable: 0,
                misses_read_at: None,
            }),
            refresh_lock: Mutex::new(None),
            last_refresh: Mutex::new(None),
            found_state: Mutex::new(None),
            cost: SelfCost::default(),
            last_poll: Mutex::new(None),
            offcpu_busy: Arc::new(AtomicBool::new(false)),
            sampling: Mutex::new(Sampling {
                open: true,
                since: std::time::Instant::now(),
                open_before: Duration::ZERO,
                held_until: None,
                last_error: None,
            }),
            sampling_changed: tokio::sync::Notify::new(),
            options,
        };
        agent.refresh().map_err(LoadError::Other)?;
        agent.poll();
        Ok(agent)
    }

    pub fn options(&self) -> &AgentOptions {
        &self.options
    }

    /// Which probes are attached, and why not.
    /// Each loaded program's miss count, read now (the metrics refresh it every
    /// [`MISSES_EVERY`]).
    pub fn program_misses(&self) -> Vec<(String, u64)> {
        lock(&self.kernel).program_misses()
    }

    pub fn probe_status(&self) -> Vec<ProbeStatus> {
        lock(&self.kernel).status().to_vec()
    }

    fn lab_state_path(&self) -> Option<PathBuf> {
        let found = match &self.options.lab_state {
            Some(p) => Some(p.clone()),
            None => lab::default_paths().into_iter().find(|p| p.is_file()),
        };
        lock(&self.found_state).clone_from(&found);
        found
    }

    /// The lab state file's (modified time, length), if it exists: one `stat` of the file
    /// found last (the search of [`lab::default_paths`] only when it is gone).
    fn lab_state_fingerprint(&self) -> Option<Fingerprint> {
        let known = lock(&self.found_state).clone();
        let meta = known
            .and_then(|p| std::fs::metadata(p).ok())
            .or_else(|| std::fs::metadata(self.lab_state_path()?).ok())?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Refreshes when the lab state file changed since the last refresh or `rescan_interval`
    /// passed; returns whether it did. A rescan reads `/proc` for every process on the host
    /// (the process tree), so it is not repeated when nothing says the lab changed.
    pub fn refresh_if_due(&self) -> anyhow::Result<bool> {
        let due = self.refresh_due();
        if due {
            self.refresh()?;
        }
        Ok(due)
    }

    /// Whether [`Agent::refresh_if_due`] would refresh now: one `stat` of the state file.
    pub fn refresh_due(&self) -> bool {
        let fingerprint = self.lab_state_fingerprint();
        lock(&self.last_refresh).is_none_or(|(at, seen)| {
            seen != fingerprint || at.elapsed() >= self.options.rescan_interval
        })
    }

    /// Re-reads the lab state, rebuilds attribution and syncs the kernel's task filter.
    pub fn refresh(&self) -> anyhow::Result<()> {
        // Taken before reading the state: a change made while this refresh runs is seen by
        // the next check.
        let fingerprint = self.lab_state_fingerprint();
        let result = self.cost.time(Activity::Refresh, || self.rebuild());
        *lock(&self.last_refresh) = Some((std::time::Instant::now(), fingerprint));
        result
    }

    fn rebuild(&self) -> anyhow::Result<()> {
        let mut last_scan = lock(&self.refresh_lock);
        let scan_now = self.options.scan_sockets
            && last_scan.is_none_or(|t| t.elapsed() >= self.options.socket_scan_interval);
        let path = self.lab_state_path();
        let state = match &path {
            None => Err(format!(
                "no lab state file ({}); every component is \"unknown\" and the run-queue probe tracks all tasks",
                self.options
                    .lab_state
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "looked for .lab/state.json and ../state.json".into())
            )),
            Some(p) => LabState::read(p).map_err(|e| e.to_string()),
        };
        let (mut registry, previous_sockets) = {
            let inner = lock(&self.inner);
            (inner.registry.clone(), inner.view.by_socket.clone())
        };
        let (view, problem, components) = match state {
            Ok(s) => {
                let mut view =
                    Attribution::build(&s, &mut registry, &self.options.cgroup_root, scan_now);
                if scan_now {
                    *last_scan = Some(std::time::Instant::now());
                } else {
                    view.by_socket = previous_sockets;
                }
                (view, None, s.components.len())
            }
            Err(why) => (Attribution::default(), Some(why), 0),
        };
        let track_all = !view.has_lab;
        let desired = view.by_tid.clone();
        let lab_tgids = view.tgids();
        {
            let mut inner = lock(&self.inner);
            if problem != inner.last_lab_problem {
                match &problem {
                    Some(why) => tracing::warn!(reason = %why, "lab state unavailable"),
                    None => tracing::info!(
                        path = %path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                        components,
                        "lab state loaded"
                    ),
                }
                inner.last_lab_problem = problem;
            }
            inner.registry = registry;
            inner.view = view;
            inner.aggregates.lab_components = components as u64;
            inner.aggregates.track_all = track_all;
            inner.aggregates.tracked_tasks = desired.len() as u64;
        }

        let mut kernel = lock(&self.kernel);
        if !kernel.attached("runqueue") && !kernel.attached("oom") {
            return Ok(());
        }
        kernel.set_track_all(track_all);
        let current = kernel.tracked();
        let mut full = false;
        for (&tid, &comp) in &desired {
            if current.get(&tid) != Some(&comp) && kernel.track(tid, comp).is_err() {
                full = true;
            }
        }
        if full {
            tracing::warn!(
                tasks = desired.len(),
                "the tracked-task map is full; some lab threads are not filtered in"
            );
        }
        for tid in current.keys().filter(|t| !desired.contains_key(t)) {
            // Keep threads and children created since the scan (the kernel inherited them).
            let keep = procfs::tgid_of(*tid).is_some_and(|tgid| {
                lab_tgids.contains(&tgid)
                    || procfs::read_ppid(tgid).is_some_and(|pp| lab_tgids.contains(&pp))
            });
            if !keep {
                kernel.untrack(*tid);
            }
        }
        kernel
            .commit_filter()
            .context("switching the run-queue filter")
    }

    /// Decodes and applies every event waiting in the ring buffer.
    pub fn drain_events(&self) {
        self.cost.time(Activity::Drain, || self.drain_ring());
    }

    fn drain_ring(&self) {
        let mut batch = Vec::new();
        let bad = lock(&self.kernel).drain_ring(|e| batch.push(e));
        let mut inner = lock(&self.inner);
        inner.undecodable += bad;
        for e in batch {
            inner.apply(e);
        }
    }

    /// Reads the aggregating maps (and drains the ring buffer first).
    pub fn poll(&self) {
        self.cost.time(Activity::Poll, || self.read_maps());
    }

    fn read_maps(&self) {
        *lock(&self.last_poll) = Some(std::time::Instant::now());
        self.drain_ring();
        let misses_due = lock(&self.inner)
            .misses_read_at
            .is_none_or(|t| t.elapsed() >= MISSES_EVERY);
        let (flows, runq, blk, ringbuf_full, map_full, stats, misses) = {
            let kernel = lock(&self.kernel);
            let comps: Vec<u32> = if kernel.attached("runqueue") {
                lock(&self.inner).registry.all().map(|(i, _)| i).collect()
            } else {
                Vec::new()
            };
            let runq: Vec<(u32, RunqVal)> = comps
                .into_iter()
                .filter_map(|i| kernel.runqueue(i).ok().map(|v| (i, v)))
                .collect();
            let stats = if kernel.stats_enabled() {
                kernel.program_stats()
            } else {
                Vec::new()
            };
            (
                kernel.retransmits(),
                runq,
                kernel.block_io(),
                kernel.counter(wire::CTR_RINGBUF_FULL),
                kernel.counter(wire::CTR_MAP_FULL),
                stats,
                misses_due.then(|| kernel.program_misses()),
            )
        };
        let mut inner = lock(&self.inner);
        inner.apply_retransmits(flows, self.options.burst_min);
        let Inner {
            registry,
            view,
            aggregates,
            ..
        } = &mut *inner;
        for (idx, val) in runq {
            let name = registry.name(idx).to_string();
            let lab_component = view.has_lab && idx != 0;
            if lab_component || val.hist.count > 0 || val.voluntary() + val.involuntary > 0 {
                aggregates.runqueue.insert(name, val);
            }
        }
        for (key, val) in blk {
            let name = inner
                .block_names
                .entry(key.dev)
                .or_insert_with(|| {
                    let (major, minor) = key.major_minor();
                    procfs::block_device_name(major, minor)
                })
                .clone();
            inner
                .aggregates
                .block_io
                .insert((name, wire::block_op_name(key.op)), val);
        }
        let a = &mut inner.aggregates;
        a.ringbuf_full = ringbuf_full;
        a.map_full = map_full;
        a.program_stats = stats
            .into_iter()
            .map(|(n, t, r)| (n, t.as_nanos() as u64, r))
            .collect();
        if let Some(misses) = misses {
            a.program_misses = misses;
            inner.misses_read_at = Some(std::time::Instant::now());
        }
        inner.aggregates.undecodable_events = inner.undecodable;
        inner.aggregates.events_dropped = inner.events.dropped;
    }

    /// A copy of the current numbers.
    pub fn aggregates(&self) -> Aggregates {
        lock(&self.inner).aggregates.clone()
    }

    /// The Prometheus text of every probe metric.
    /// Whether the sampling cycle runs (see [`AgentOptions::sample_period`]).
    fn sampling_cycles(&self) -> bool {
        let o = &self.options;
        !o.sample_period.is_zero() && o.sample_window < o.sample_period
    }

    /// Keeps the sampled probes' programs attached for `for_` from now (at most
    /// [`MAX_SAMPLING_HOLD`]; a longer hold already taken is kept). Returns how long the hold
    /// now lasts. The background cycle attaches them at once.
    pub fn hold_sampling(&self, for_: Duration) -> Duration {
        let now = std::time::Instant::now();
        let until = now + for_.min(MAX_SAMPLING_HOLD);
        let held = {
            let mut s = lock(&self.sampling);
            let until = s.held_until.filter(|t| *t > until).unwrap_or(until);
            s.held_until = Some(until);
            until - now
        };
        if !lock(&self.sampling).open {
            self.set_sampling(true);
        }
        self.sampling_changed.notify_one();
        held
    }

    /// Ends any hold: the cycle goes on from where it is (an open window that has lasted long
    /// enough closes at once).
    pub fn release_sampling(&self) {
        lock(&self.sampling).held_until = None;
        self.sampling_changed.notify_one();
    }

    /// Where sampling stands.
    pub fn sampling_status(&self) -> SamplingStatus {
        let probes = lock(&self.kernel).sampled_probes();
        let now = std::time::Instant::now();
        let s = lock(&self.sampling);
        SamplingStatus {
            probes,
            cycling: self.sampling_cycles(),
            window_s: self.options.sample_window.as_secs_f64(),
            period_s: self.options.sample_period.as_secs_f64(),
            open: s.open,
            open_seconds_total: s.open_seconds(now).as_secs_f64(),
            held_for_s: s
                .held_until
                .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64()),
            last_error: s.last_error.clone(),
        }
    }

    /// Attaches or detaches the sampled programs and records it.
    fn set_sampling(&self, open: bool) {
        let (result, actual) = self.cost.time(Activity::Sampling, || {
            let mut kernel = lock(&self.kernel);
            let result = kernel.set_sampling_open(open);
            (result, kernel.sampling_open())
        });
        let now = std::time::Instant::now();
        let mut s = lock(&self.sampling);
        if actual != s.open {
            if s.open {
                let stretch = now - s.since;
                s.open_before += stretch;
            }
            s.open = actual;
            s.since = now;
        }
        match result {
            Ok(()) => s.last_error = None,
            Err(e) => {
                let why = format!("{e:#}");
                if s.last_error.as_ref() != Some(&why) {
                    tracing::warn!(error = %why, open, "switching the sampled probes");
                }
                s.last_error = Some(why);
            }
        }
    }

    /// One step of the sampling cycle: opens or closes the window when due, and says when
    /// the next step is due.
    fn sampling_step(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        let far = now + Duration::from_secs(3600);
        if !lock(&self.kernel).has_sampled_probes() {
            return far;
        }
        let (open, since, held_until) = {
            let s = lock(&self.sampling);
            (s.open, s.since, s.held_until.filter(|t| *t > now))
        };
        let window = self.options.sample_window;
        let closed_for = self.options.sample_period.saturating_sub(window);
        let (want_open, next) = if !self.sampling_cycles() {
            (true, far)
        } else if let Some(until) = held_until {
            (true, until)
        } else if open {
            if now >= since + window {
                (false, now + closed_for)
            } else {
                (true, since + window)
            }
        } else if now >= since + closed_for {
            (true, now + window)
        } else {
            (false, since + closed_for)
        };
        if want_open != open {
            self.set_sampling(want_open);
        }
        // A failed switch is retried a period later, not in a tight loop.
        next.max(now + Duration::from_millis(100))
    }

    pub fn render_metrics(&self) -> String {
        let mut out = self.cost.time(Activity::Render, || self.render_probes());
        self.cost.render(&mut out);
        out
    }

    /// The agent's own CPU by activity so far.
    pub fn self_cost(&self) -> &SelfCost {
        &self.cost
    }

    fn render_probes(&self) -> String {
        let mut out = lock(&self.inner).aggregates.render();
        let probes = lock(&self.kernel).sampled_probes();
        if !probes.is_empty() {
            let (open, seconds) = {
                let s = lock(&self.sampling);
                (s.open, s.open_seconds(std::time::Instant::now()))
            };
            out.push_str(
                "# HELP probes_sampled_seconds_total Seconds the probe's hot-path programs were attached. The run-queue and block I/O probes are sampled (attached a window out of every period, and continuously while held, as during a chaos experiment): divide a rate of their counters by the rate of this to get the rate while observed.\n\
                 # TYPE probes_sampled_seconds_total counter\n",
            );
            for p in &probes {
                out.push_str(&format!(
                    "probes_sampled_seconds_total{{probe=\"{p}\"}} {:.3}\n",
                    seconds.as_secs_f64()
                ));
            }
            out.push_str(
                "# HELP probes_sampling_open 1 while the probe's hot-path programs are attached.\n\
                 # TYPE probes_sampling_open gauge\n",
            );
            for p in &probes {
                out.push_str(&format!(
                    "probes_sampling_open{{probe=\"{p}\"}} {}\n",
                    u8::from(open)
                ));
            }
        }
        out.push_str(
            "# HELP probes_offcpu_capture_running 1 while an off-CPU capture (GET /debug/offcpu) runs: its program runs on every context switch of the host.\n\
             # TYPE probes_offcpu_capture_running gauge\n",
        );
        let running = u8::from(self.offcpu_capture_running());
        out.push_str(&format!("probes_offcpu_capture_running {running}\n"));
        out
    }

    /// Whether an off-CPU capture is running now.
    pub fn offcpu_capture_running(&self) -> bool {
        self.offcpu_busy.load(Ordering::Acquire)
    }

    /// The flag the off-CPU endpoint holds while a capture runs.
    pub(crate) fn offcpu_busy(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.offcpu_busy)
    }

    /// Events with `ts_ms >= since_ms`.
    pub fn events_since(&self, since_ms: u64) -> Vec<Event> {
        lock(&self.inner).events.since(since_ms)
    }

    /// The component a process is attributed to in the current view.
    pub fn component_of_pid(&self, pid: u32) -> Option<String> {
        let inner = lock(&self.inner);
        inner
            .view
            .component_of_tgid(pid)
            .map(|i| inner.registry.name(i).to_string())
    }

    /// The processes the current view attributes to component `name`, lowest pid first;
    /// `Err` lists the components the view knows when `name` is none of them.
    pub fn tgids_of_component(&self, name: &str) -> Result<Vec<u32>, Vec<String>> {
        let inner = lock(&self.inner);
        let index = inner
            .registry
            .all()
            .find(|(i, n)| *n == name && *i != 0)
            .map(|(i, _)| i);
        let Some(index) = index else {
            let mut known: Vec<String> = inner
                .registry
                .all()
                .filter(|(i, _)| *i != 0)
                .map(|(_, n)| n.to_string())
                .collect();
            known.sort();
            return Err(known);
        };
        let mut pids: Vec<u32> = inner
            .view
            .by_tgid
            .iter()
            .filter(|(_, c)| **c == index)
            .map(|(t, _)| *t)
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Waits on the ring buffer and runs the poll and refresh timers until `shutdown`.
    pub async fn run_background(
        self: Arc<Self>,
        shutdown: kit::shutdown::Shutdown,
    ) -> anyhow::Result<()> {
        let fd = lock(&self.kernel).ring_fd()?;
        // The `register_*` replacements are `unsafe` (the caller must keep the fd open while it
        // is registered); an `OwnedFd` moved into the `AsyncFd` does exactly that.
        #[allow(deprecated)]
        let ring = AsyncFd::with_interest(fd, Interest::READABLE)
            .context("registering the ring buffer with the runtime")?;
        let mut refresh_tick = tokio::time::interval(self.options.refresh_interval);
        refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_sampling_step = tokio::time::Instant::from_std(self.sampling_step());
        // The state file's directory is watched when it can be: then a change wakes the agent,
        // and otherwise only the rescan interval does; without a watch, the file is checked
        // every refresh interval.
        let mut watch = StateWatch::new(&self.lab_state_candidates());
        loop {
            let rescan_at = tokio::time::Instant::from_std(self.next_rescan());
            // A poll for a reader (a scrape) pushes the next one of the agent's own out.
            let poll_at = tokio::time::Instant::from_std(self.next_poll());
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                _ = tokio::time::sleep_until(next_sampling_step) => {
                    next_sampling_step = tokio::time::Instant::from_std(self.sampling_step());
                }
                _ = self.sampling_changed.notified() => {
                    next_sampling_step = tokio::time::Instant::from_std(self.sampling_step());
                }
                ready = ring.readable() => {
                    let mut guard = ready.context("waiting on the ring buffer")?;
                    // Clear first: data arriving while we drain raises readiness again.
                    guard.clear_ready();
                    self.drain_events();
                }
                _ = tokio::time::sleep_until(poll_at) => {
                    // A reader may have polled while this waited.
                    if self.poll_due() {
                        self.poll();
                    }
                }
                change = async {
                    match watch.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                } => match change {
                    Change::StateFile => self.refresh_if_due_in_background().await,
                    Change::Other => {}
                    Change::Gone => {
                        tracing::info!("the lab state file's directory went away: checking the file every refresh interval");
                        watch = None;
                        refresh_tick.reset();
                    }
                },
                _ = tokio::time::sleep_until(rescan_at), if watch.is_some() => {
                    self.refresh_if_due_in_background().await;
                }
                _ = refresh_tick.tick(), if watch.is_none() => {
                    self.refresh_if_due_in_background().await;
                }
            }
        }
    }

    /// The check is one `stat`, done here; only a due rescan (a `/proc` walk) goes to the
    /// blocking pool.
    async fn refresh_if_due_in_background(self: &Arc<Self>) {
        if !self.refresh_due() {
            return;
        }
        let agent = Arc::clone(self);
        match tokio::task::spawn_blocking(move || agent.refresh()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "refreshing the lab view"),
            Err(e) => tracing::warn!(error = %e, "refresh task failed"),
        }
    }

    /// Where the lab state file may be.
    fn lab_state_candidates(&self) -> Vec<PathBuf> {
        match &self.options.lab_state {
            Some(p) => vec![p.clone()],
            None => lab::default_paths(),
        }
    }

    /// `poll_interval` after the last poll, whoever asked for it (`None`: no poll yet).
    fn poll_deadline(&self) -> Option<std::time::Instant> {
        lock(&self.last_poll).map(|at| at + self.options.poll_interval)
    }

    /// Whether the agent's own poll is due.
    fn poll_due(&self) -> bool {
        self.poll_deadline()
            .is_none_or(|d| d <= std::time::Instant::now())
    }

    /// When the agent polls by itself (now when it never polled).
    fn next_poll(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.poll_deadline()
            .map_or(now, |d| d.max(now + Duration::from_millis(10)))
    }

    /// When the next rescan is due if the lab state file does not change: `rescan_interval`
    /// after the last refresh (now when there was none).
    fn next_rescan(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        lock(&self.last_refresh).map_or(now, |(at, _)| {
            (at + self.options.rescan_interval).max(now + Duration::from_millis(100))
        })
    }
}

impl Inner {
    fn name(&self, idx: u32) -> String {
        self.registry.name(idx).to_string()
    }

    fn apply(&mut self, e: RawEvent) {
        let src = endpoint(e.src, e.sport);
        let dst = endpoint(e.dst, e.dport);
        let pid = (e.tgid != 0).then_some(e.tgid);
        let comm = (!e.comm.is_empty()).then(|| e.comm.clone());
        let other = || (UNKNOWN.to_string(), "other".to_string());
        match e.kind {
            EventKind::Connect => {
                // Local address and port are not assigned yet: the connecting task decides.
                let comp = self.name(self.view.component_of_tgid(e.tgid).unwrap_or(0));
                self.aggregates.connect_attempts.add((comp, dst), 1, other);
            }
            EventKind::Established => {
                let comp = self.name(self.view.tcp(e.tgid, e.src, e.sport));
                self.aggregates
                    .connect_duration
                    .entry((comp, "established"))
                    .or_default()
                    .record(e.duration_ns);
            }
            EventKind::ConnectFailed => {
                let comp = self.name(self.view.tcp(e.tgid, e.src, e.sport));
                self.aggregates
                    .connect_failures
                    .add((comp.clone(), dst.clone()), 1, other);
                self.aggregates
                    .connect_duration
                    .entry((comp.clone(), "failed"))
                    .or_default()
                    .record(e.duration_ns);
                let detail = if e.duration_ns == 0 {
                    format!("connect to {dst} failed (SYN_SENT -> CLOSE)")
                } else {
                    format!(
                        "connect to {dst} failed after {} (SYN_SENT -> CLOSE)",
                        secs(e.duration_ns)
                    )
                };
                self.push(
                    "connect_failed",
                    e.ts_ns,
                    comp,
                    pid,
                    comm,
                    Some(src),
                    Some(dst),
                    detail,
                );
            }
            EventKind::Closed => {
                let comp = self.name(self.view.tcp(e.tgid, e.src, e.sport));
                self.aggregates
                    .connection_lifetime
                    .entry(comp)
                    .or_default()
                    .record(e.duration_ns);
            }
            EventKind::ResetReceived | EventKind::ResetSent => {
                let comp = self.name(self.view.tcp(e.tgid, e.src, e.sport));
                // A reset received names the server that refused or dropped us: its port says
                // which service. A reset sent goes to a client, mostly a refused connect to a
                // port nobody listens on, whose port is ephemeral: a new series per connect
                // attempt. The metric keeps only its address; `/events` has the port.
                let peer = if e.kind == EventKind::ResetSent {
                    wire::endpoint_any_port(e.dst)
                } else {
                    dst.clone()
                };
                self.aggregates.resets.add((comp.clone(), peer), 1, other);
                let detail = if e.kind == EventKind::ResetReceived {
                    format!("reset received from {dst}")
                } else {
                    let state = if e.oldstate == 0 {
                        "no socket".to_string()
                    } else {
                        format!("in {}", tcp_state_name(e.oldstate))
                    };
                    format!(
                        "reset sent to {dst} ({state}, reason {})",
                        wire::reset_reason_name(e.reason)
                    )
                };
                self.push(
                    "reset",
                    e.ts_ns,
                    comp,
                    pid,
                    comm,
                    Some(src),
                    Some(dst),
                    detail,
                );
            }
            EventKind::Oom => {
                let idx = if e.comp != 0 {
                    e.comp
                } else {
                    self.view
                        .component_of_tgid(e.pid)
                        .or_else(|| self.view.by_tid.get(&e.pid).copied())
                        .unwrap_or(0)
                };
                let comp = self.name(idx);
                self.aggregates
                    .oom_kills
                    .add(comp.clone(), 1, || UNKNOWN.to_string());
                let o = &e.oom;
                let detail = format!(
                    "OOM killer chose pid {} ({}): total_vm={} kB anon_rss={} kB file_rss={} kB shmem_rss={} kB pgtables={} kB uid={} oom_score_adj={}",
                    e.pid,
                    e.comm,
                    o.total_vm_kb,
                    o.anon_rss_kb,
                    o.file_rss_kb,
                    o.shmem_rss_kb,
                    o.pgtables_kb,
                    o.uid,
                    o.oom_score_adj
                );
                self.push(
                    "oom_kill",
                    e.ts_ns,
                    comp,
                    Some(e.pid),
                    comm,
                    None,
                    None,
                    detail,
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // one call site per event kind; a struct adds nothing
    fn push(
        &mut self,
        kind: &'static str,
        ts_ns: u64,
        component: String,
        pid: Option<u32>,
        comm: Option<String>,
        src: Option<String>,
        dst: Option<String>,
        detail: String,
    ) {
        self.events.push(Event {
            ts_ms: unix_ms_of(ts_ns),
            kind,
            component,
            pid,
            comm,
            src,
            dst,
            detail,
        });
    }

    fn apply_retransmits(&mut self, flows: Vec<(FlowKey, wire::RetransVal)>, burst_min: u64) {
        let mut seen = HashSet::with_capacity(flows.len());
        for (key, val) in flows {
            seen.insert(key);
            let last = self.flow_counts.insert(key, val.count).unwrap_or(0);
            // An LRU-evicted flow that came back starts from zero again.
            let delta = if val.count >= last {
                val.count - last
            } else {
                val.count
            };
            if delta == 0 {
                continue;
            }
            let comp = self.name(self.view.tcp(val.tgid, key.src, key.sport));
            let src = endpoint(key.src, key.sport);
            let dst = endpoint(key.dst, key.dport);
            let state = tcp_state_name(key.state);
            self.aggregates.retransmits.add(
                RetransLabels {
                    component: comp.clone(),
                    src: src.clone(),
                    dst: dst.clone(),
                    state,
                },
                delta,
                || RetransLabels {
                    component: UNKNOWN.to_string(),
                    src: "other".into(),
                    dst: "other".into(),
                    state: "other",
                },
            );
            if delta >= burst_min {
                let pid = (val.tgid != 0).then_some(val.tgid);
                let comm = pid.and_then(procfs::comm);
                let detail = format!(
                    "{delta} retransmit(s) in {state} since the previous poll, {} on this flow",
                    val.count
                );
                self.push(
                    "retransmit_burst",
                    val.last_ns,
                    comp,
                    pid,
                    comm,
                    Some(src),
                    Some(dst),
                    detail,
                );
            }
        }
        self.flow_counts.retain(|k, _| seen.contains(k));
    }
}
