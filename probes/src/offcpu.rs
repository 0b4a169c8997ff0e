//! Off-CPU profiles: where the threads of chosen processes wait, and for how long, as stacks
//! weighted by time (`bpf/offcpu.bpf.c`).
//!
//! A CPU profile shows what a process does while it runs; an off-CPU profile shows what it is
//! waiting for the rest of the time: a futex (a lock, a channel, a parked runtime worker),
//! `epoll_wait` (the network), `fdatasync` (a journal), a sleep, or the run queue after a
//! preemption. Each stack is the thread's user stack (walked through frame pointers, which
//! every build of this workspace keeps) under the kernel stack at the moment it left the CPU
//! (kernel frames carry the `_[k]` suffix flamegraph tools colour as kernel code).
//!
//! The program is loaded and attached for the capture only, then detached and freed: no cost
//! outside a capture. During one, every context switch of the host runs it (a lookup for
//! threads outside the chosen processes), and each switch of theirs walks two stacks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, StackTraceMap};
use aya::programs::BtfTracePoint;
use aya::{Btf, EbpfLoader};
use blazesym::symbolize::source::{Kernel as KernelSource, Process, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use blazesym::{MaybeDefault, Pid};
use kit::debug::Stack;

use crate::kernel::{BTF_PATH, is_permission_error, take};
use crate::wire::{
    self, OFFCPU_NO_STACK, OffCpuKey, OffCpuKeyBytes, OffCpuStartBytes, OffCpuValBytes,
};

/// The object `build.rs` compiled from `bpf/offcpu.bpf.c`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/offcpu.bpf.o"));

/// Longest capture.
pub const MAX_SECONDS: u64 = 120;
/// Most processes in one capture (`offcpu_targets`).
pub const MAX_PIDS: usize = 1024;
/// Shortest wait counted by default.
pub const DEFAULT_MIN: Duration = Duration::from_micros(1);

/// Frame shown for a stack the kernel could not store or walk.
const NO_STACK: &str = "[stack not recorded]";

/// What to capture.
#[derive(Debug, Clone)]
pub struct OffCpuOptions {
    /// Processes (thread group ids) whose threads are followed.
    pub pids: Vec<u32>,
    pub duration: Duration,
    /// Waits shorter than this are not counted.
    pub min: Duration,
}

impl OffCpuOptions {
    /// Checks the options; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.pids.is_empty() {
            return Err("no process to follow: give at least one pid".into());
        }
        if self.pids.len() > MAX_PIDS {
            return Err(format!(
                "{} processes: at most {MAX_PIDS} per capture",
                self.pids.len()
            ));
        }
        if let Some(p) = self.pids.iter().find(|p| **p == 0) {
            return Err(format!("pid {p} is not a process"));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(MAX_SECONDS) {
            return Err(format!(
                "duration {:?}: between 1 ms and {MAX_SECONDS} s",
                self.duration
            ));
        }
        if self.min > Duration::from_secs(1) {
            return Err(format!(
                "minimum wait {:?}: at most 1 s (shorter waits are dropped)",
                self.min
            ));
        }
        Ok(())
    }
}

/// One distinct place where threads of a process waited.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffCpuStack {
    pub pid: u32,
    /// The thread's name when it left the CPU.
    pub thread: String,
    /// Root first: user frames, then kernel frames (suffix `_[k]`).
    pub frames: Vec<String>,
    /// Microseconds off the CPU.
    pub us: u64,
}

/// A finished capture (`GET /debug/offcpu?format=json`, schema `probes.offcpu/1`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OffCpuProfile {
    pub schema: String,
    pub pids: Vec<u32>,
    pub seconds: f64,
    /// Heaviest first.
    pub stacks: Vec<OffCpuStack>,
    /// Time off the CPU in all counted waits, in nanoseconds.
    pub total_ns: u64,
    /// Counted waits.
    pub waits: u64,
    /// Threads still waiting when the capture ended (counted up to its end).
    pub still_waiting: u64,
    /// Stacks the kernel had no room for (`[stack not recorded]` in the profile) and waits
    /// whose (process, thread, stacks) key did not fit: both mean the profile is partial.
    pub lost: u64,
    /// Stacks the kernel could not walk (same frame in the profile).
    pub unwalkable: u64,
    /// What the capture cost the kernel: times the program ran (every context switch of the
    /// host) and its total run time, in nanoseconds (`None` when run-time statistics could not
    /// be turned on).
    pub program_runs: Option<u64>,
    pub program_ns: Option<u64>,
}

/// The schema name of [`OffCpuProfile`] as JSON.
pub const SCHEMA: &str = "probes.offcpu/1";

impl OffCpuProfile {
    /// The stacks as kit stacks (microseconds), with the thread name as the root frame and,
    /// when the profile covers several processes, `pid N` below it.
    pub fn kit_stacks(&self) -> Vec<Stack> {
        let several = self.pids.len() > 1;
        self.stacks
            .iter()
            .map(|s| {
                let mut frames = Vec::with_capacity(s.frames.len() + 1);
                if several {
                    frames.push(format!("pid {}", s.pid));
                }
                frames.extend(s.frames.iter().cloned());
                Stack {
                    frames,
                    thread: Some(s.thread.clone()),
                    value: s.us.min(i64::MAX as u64) as i64,
                }
            })
            .collect()
    }

    /// Folded stacks (`thread;root;...;leaf microseconds`), for inferno and speedscope.
    pub fn collapsed(&self) -> String {
        kit::debug::collapsed(&self.kit_stacks(), true)
    }

    /// The flamegraph as SVG.
    pub fn svg(&self, title: &str) -> anyhow::Result<Vec<u8>> {
        kit::debug::off_cpu_svg(&self.kit_stacks(), title).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Gzipped pprof protobuf (`go tool pprof` opens it), sample type `off_cpu` in
    /// nanoseconds.
    pub fn pprof(&self) -> Vec<u8> {
        kit::debug::off_cpu_pprof(&self.kit_stacks(), Duration::from_secs_f64(self.seconds))
    }
}

/// Why a capture could not run.
#[derive(Debug, thiserror::Error)]
pub enum OffCpuError {
    /// Bad options; nothing was attached.
    #[error("{0}")]
    Invalid(String),
    /// Not root (or lacking CAP_BPF/CAP_PERFMON), or no kernel BTF.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// Follows `opts.pids` for `opts.duration` (blocking: the caller's thread sleeps through the
/// capture) and returns their symbolized off-CPU stacks.
pub fn capture(opts: &OffCpuOptions) -> Result<OffCpuProfile, OffCpuError> {
    capture_until(opts, &AtomicBool::new(false))
}

/// [`capture`], ended early (within 100 ms) when `cancel` becomes true, for example because
/// the client that asked went away; the profile then covers the shorter window.
pub fn capture_until(
    opts: &OffCpuOptions,
    cancel: &AtomicBool,
) -> Result<OffCpuProfile, OffCpuError> {
    opts.validate().map_err(OffCpuError::Invalid)?;
    for pid in &opts.pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(OffCpuError::Invalid(format!("no process with pid {pid}")));
        }
    }
    let min_ns = opts.min.as_nanos().min(u128::from(u64::MAX)) as u64;
    let mut ebpf = load(min_ns)?;
    let failed = |e: anyhow::Error| OffCpuError::Failed(e);

    let mut targets: BpfHashMap<MapData, u32, u8> =
        take(&mut ebpf, "offcpu_targets").map_err(failed)?;
    for pid in &opts.pids {
        targets
            .insert(pid, 1, 0)
            .with_context(|| format!("following pid {pid}"))
            .map_err(failed)?;
    }
    let program = switch_program(&mut ebpf).map_err(failed)?;
    // Run-time statistics while the capture runs (closed, hence off again, when dropped).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .inspect_err(|e| tracing::debug!(error = %e, "BPF run-time statistics"))
        .ok();
    let started = monotonic_ns();
    let link = program.attach().map_err(|e| {
        if is_permission_error(&e) {
            OffCpuError::Unavailable("not allowed to attach eBPF programs: run as root".into())
        } else {
            OffCpuError::Failed(anyhow::Error::new(e).context("attaching to sched_switch"))
        }
    })?;
    let until = std::time::Instant::now() + opts.duration;
    while !cancel.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
    // Detach before reading, so that the maps hold still.
    let detached = program.detach(link);
    let ended = monotonic_ns();
    detached
        .context("detaching the off-CPU program")
        .map_err(failed)?;
    let (program_runs, program_ns) = match (&stats, program.info()) {
        (Some(_), Ok(info)) => (
            Some(info.run_count()),
            Some(info.run_time().as_nanos().min(u128::from(u64::MAX)) as u64),
        ),
        _ => (None, None),
    };
    drop(stats);

    let counts: BpfHashMap<MapData, OffCpuKeyBytes, OffCpuValBytes> =
        take(&mut ebpf, "offcpu_ns").map_err(failed)?;
    let pending: BpfHashMap<MapData, u32, OffCpuStartBytes> =
        take(&mut ebpf, "offcpu_start").map_err(failed)?;
    let lost_map: PerCpuArray<MapData, u64> = take(&mut ebpf, "offcpu_lost").map_err(failed)?;
    let stack_map: StackTraceMap<MapData> = take(&mut ebpf, "offcpu_stacks").map_err(failed)?;

    let mut waits: HashMap<OffCpuKey, u64> = HashMap::new();
    let (mut total_ns, mut count) = (0u64, 0u64);
    for (k, v) in counts.iter().filter_map(Result::ok) {
        let (ns, n) = wire::decode_offcpu_val(&v);
        *waits.entry(OffCpuKey::decode(&k)).or_default() += ns;
        total_ns += ns;
        count += n;
    }
    let mut still_waiting = 0;
    for (_, v) in pending.iter().filter_map(Result::ok) {
        let (since, key) = wire::decode_offcpu_start(&v);
        let ns = ended.saturating_sub(since.max(started));
        if ns >= min_ns && key.tgid != 0 {
            *waits.entry(key).or_default() += ns;
            total_ns += ns;
            count += 1;
            still_waiting += 1;
        }
    }
    let lost_at = |i: u32| -> u64 { lost_map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    let stacks = symbolize(&waits, &stack_map);
    Ok(OffCpuProfile {
        schema: SCHEMA.to_string(),
        pids: opts.pids.clone(),
        seconds: ended.saturating_sub(started) as f64 / 1e9,
        stacks,
        total_ns,
        waits: count,
        still_waiting,
        lost: lost_at(0),
        unwalkable: lost_at(1),
        program_runs,
        program_ns,
    })
}

/// The object with its program loaded into the kernel (verified), not attached.
fn load(min_ns: u64) -> Result<aya::Ebpf, OffCpuError> {
    if !std::path::Path::new(BTF_PATH).is_file() {
        return Err(OffCpuError::Unavailable(format!(
            "off-CPU stacks need the kernel's BTF ({BTF_PATH} is missing)"
        )));
    }
    let mut ebpf = EbpfLoader::new()
        .override_global("min_ns", &min_ns, true)
        .load(OBJECT)
        .map_err(|e| {
            if is_permission_error(&e) {
                OffCpuError::Unavailable(
                    "not allowed to load eBPF programs: run as root or grant CAP_BPF and CAP_PERFMON"
                        .into(),
                )
            } else {
                OffCpuError::Failed(anyhow::Error::new(e).context("loading the off-CPU program"))
            }
        })?;
    let btf = Btf::from_sys_fs()
        .context("reading the kernel's BTF")
        .map_err(OffCpuError::Failed)?;
    switch_program(&mut ebpf)
        .map_err(OffCpuError::Failed)?
        .load("sched_switch", &btf)
        .map_err(|e| {
            OffCpuError::Failed(anyhow::anyhow!(crate::kernel::shorten_verifier_log(
                &format!("loading offcpu_switch: {e:#}")
            )))
        })?;
    Ok(ebpf)
}

fn switch_program(ebpf: &mut aya::Ebpf) -> anyhow::Result<&mut BtfTracePoint> {
    ebpf.program_mut("offcpu_switch")
        .context("program `offcpu_switch` is missing from the object")?
        .try_into()
        .context("`offcpu_switch` is not a BTF tracepoint program")
}

/// For `probes check`: loads the program into the kernel (the verifier's verdict) without
/// attaching it.
pub fn check() -> Result<(), OffCpuError> {
    load(DEFAULT_MIN.as_nanos() as u64).map(drop)
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The frames of a stored stack, leaf first (`None`: not stored).
fn stack_ips(map: &StackTraceMap<MapData>, id: i32) -> Option<Vec<u64>> {
    if id == OFFCPU_NO_STACK || id < 0 {
        return None;
    }
    let trace = map.get(&(id as u32), 0).ok()?;
    Some(
        trace
            .frames()
            .iter()
            .map(|f| f.ip)
            .filter(|ip| *ip != 0)
            .collect(),
    )
}

/// Names for every frame: user frames through each process's own mappings and debug
/// information, kernel frames through `/proc/kallsyms`. Stacks are returned root first.
fn symbolize(waits: &HashMap<OffCpuKey, u64>, map: &StackTraceMap<MapData>) -> Vec<OffCpuStack> {
    let symbolizer = Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .build();
    // Unique stacks, then unique addresses per process (user) and for the kernel.
    let mut user: HashMap<i32, Option<Vec<u64>>> = HashMap::new();
    let mut kernel: HashMap<i32, Option<Vec<u64>>> = HashMap::new();
    let mut user_addrs: HashMap<u32, HashSet<u64>> = HashMap::new();
    let mut kernel_addrs: HashSet<u64> = HashSet::new();
    for key in waits.keys() {
        let u = user
            .entry(key.user_stack)
            .or_insert_with(|| stack_ips(map, key.user_stack));
        if let Some(ips) = u {
            user_addrs
                .entry(key.tgid)
                .or_default()
                .extend(lookup_addrs(ips));
        }
        let k = kernel
            .entry(key.kernel_stack)
            .or_insert_with(|| stack_ips(map, key.kernel_stack));
        if let Some(ips) = k {
            kernel_addrs.extend(lookup_addrs(ips));
        }
    }
    let mut user_names: HashMap<(u32, u64), Vec<String>> = HashMap::new();
    for (tgid, addrs) in user_addrs {
        let addrs: Vec<u64> = addrs.into_iter().collect();
        let src = Source::Process(Process::new(Pid::from(tgid)));
        let names = resolve(&symbolizer, &src, &addrs);
        for (a, n) in addrs.into_iter().zip(names) {
            user_names.insert((tgid, a), n);
        }
    }
    let kernel_names: HashMap<u64, Vec<String>> = {
        let addrs: Vec<u64> = kernel_addrs.into_iter().collect();
        let k = KernelSource {
            vmlinux: MaybeDefault::None,
            kallsyms: MaybeDefault::Some(PathBuf::from("/proc/kallsyms")),
            ..KernelSource::default()
        };
        let names = resolve(&symbolizer, &Source::Kernel(k), &addrs);
        addrs.into_iter().zip(names).collect()
    };

    let mut merged: BTreeMap<(u32, String, Vec<String>), u64> = BTreeMap::new();
    for (key, ns) in waits {
        let mut frames = Vec::new();
        match user.get(&key.user_stack).and_then(Option::as_ref) {
            Some(ips) => {
                for addr in lookup_addrs(ips).rev() {
                    match user_names.get(&(key.tgid, addr)) {
                        Some(names) => frames.extend(names.iter().cloned()),
                        None => frames.push(format!("{addr:#x}")),
                    }
                }
                dedup_leaf(&mut frames);
            }
            None => frames.push(NO_STACK.to_string()),
        }
        match kernel.get(&key.kernel_stack).and_then(Option::as_ref) {
            Some(ips) => {
                let names: Vec<String> = lookup_addrs(ips)
                    .rev()
                    .flat_map(|a| {
                        kernel_names
                            .get(&a)
                            .cloned()
                            .unwrap_or_else(|| vec![format!("{a:#x}")])
                    })
                    .collect();
                frames.extend(trim_kernel(names).into_iter().map(|n| format!("{n}_[k]")));
            }
            None => frames.push(format!("{NO_STACK}_[k]")),
        }
        *merged
            .entry((key.tgid, key.comm.clone(), frames))
            .or_default() += ns;
    }
    let mut stacks: Vec<OffCpuStack> = merged
        .into_iter()
        .map(|((pid, thread, frames), ns)| OffCpuStack {
            pid,
            thread,
            frames,
            us: ns / 1000,
        })
        .filter(|s| s.us > 0)
        .collect();
    stacks.sort_by(|a, b| b.us.cmp(&a.us).then_with(|| a.frames.cmp(&b.frames)));
    stacks
}

/// The addresses to look up for a leaf-first stack: the leaf as it is, every caller's return
/// address minus one (the call instruction, not the one after it).
fn lookup_addrs(ips: &[u64]) -> impl DoubleEndedIterator<Item = u64> + '_ {
    ips.iter()
        .enumerate()
        .map(|(i, ip)| if i == 0 { *ip } else { ip.saturating_sub(1) })
}

/// Names for `addrs` (outermost function first, inlined calls after it); an address that
/// cannot be resolved becomes its hex value.
fn resolve(symbolizer: &Symbolizer, src: &Source<'_>, addrs: &[u64]) -> Vec<Vec<String>> {
    let hex = |a: &u64| vec![format!("{a:#x}")];
    let results = match symbolizer.symbolize(src, Input::AbsAddr(addrs)) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "symbolizing");
            return addrs.iter().map(hex).collect();
        }
    };
    results
        .into_iter()
        .zip(addrs)
        .map(|(r, a)| match r {
            Symbolized::Sym(sym) => {
                let file = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| {
                    ci.map(|c| c.to_path().to_string_lossy().into_owned())
                        .unwrap_or_default()
                };
                let mut names = vec![display_name(&sym.name, &file(sym.code_info.as_deref()))];
                for f in sym.inlined.iter() {
                    names.push(display_name(&f.name, &file(f.code_info.as_ref())));
                }
                names
            }
            Symbolized::Unknown(_) => hex(a),
        })
        .collect()
}

/// A Rust name qualified with its module where the debug information only has the bare name
/// (as kit does for CPU profiles), its hash suffix dropped.
fn display_name(name: &str, file: &str) -> String {
    let name = kit::debug::strip_hash(name);
    kit::debug::qualify(name, file).unwrap_or_else(|| name.to_string())
}

/// C libraries built without frame pointers (glibc) leave the caller's frame pointer in place
/// in their system call wrappers, so the walk reports the wrapper twice (`__libc_send;
/// __libc_send`): keep one.
fn dedup_leaf(frames: &mut Vec<String>) {
    let n = frames.len();
    if n >= 2 && frames[n - 1] == frames[n - 2] {
        frames.pop();
    }
}

/// Drops the scheduler's own frames from a root-first kernel stack: everything from
/// `__schedule` on (the switch itself, the tracepoint and the program's trampoline) says
/// nothing about why the thread stopped.
fn trim_kernel(mut names: Vec<String>) -> Vec<String> {
    if let Some(i) = names.iter().position(|n| n == "__schedule") {
        names.truncate(i);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let ok = OffCpuOptions {
            pids: vec![1],
            duration: Duration::from_secs(5),
            min: DEFAULT_MIN,
        };
        assert!(ok.validate().is_ok());
        let none = OffCpuOptions {
            pids: vec![],
            ..ok.clone()
        };
        assert!(none.validate().unwrap_err().contains("at least one pid"));
        let zero = OffCpuOptions {
            pids: vec![0],
            ..ok.clone()
        };
        assert!(zero.validate().unwrap_err().contains("pid 0"));
        let long = OffCpuOptions {
            duration: Duration::from_secs(MAX_SECONDS + 1),
            ..ok.clone()
        };
        assert!(long.validate().unwrap_err().contains("120 s"));
        let min = OffCpuOptions {
            min: Duration::from_secs(2),
            ..ok
        };
        assert!(min.validate().unwrap_err().contains("minimum wait"));
    }

    #[test]
    fn scheduler_frames_are_trimmed_and_callers_looked_up_at_the_call() {
        let names: Vec<String> = [
            "do_syscall_64",
            "__x64_sys_futex",
            "futex_wait",
            "schedule",
            "__schedule",
            "__traceiter_sched_switch",
            "bpf_trampoline_6442",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            trim_kernel(names),
            ["do_syscall_64", "__x64_sys_futex", "futex_wait", "schedule"]
        );
        let mut frames = vec!["main".to_string(), "send".to_string(), "send".to_string()];
        dedup_leaf(&mut frames);
        assert_eq!(frames, ["main", "send"]);
        let ips = [0x1000, 0x2005, 0x3009];
        assert_eq!(
            lookup_addrs(&ips).collect::<Vec<_>>(),
            [0x1000, 0x2004, 0x3008]
        );
        assert_eq!(
            display_name(
                "poll_next",
                "/root/.cargo/registry/src/index/tokio-1.54.0/src/sync/mpsc/chan.rs"
            ),
            "tokio::sync::mpsc::chan::poll_next"
        );
    }
}
