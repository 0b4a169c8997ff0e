//! The kernel side as the agent sees it: the embedded eBPF object, which probes were attached
//! (and why not), and typed access to the maps and the ring buffer.
//!
//! A probe is a group of programs that only make sense together (the run-queue probe needs all
//! three scheduler tracepoints). Before attaching a probe, the layout of each of its
//! tracepoints is checked against the running kernel; a probe that fails is reported and the
//! others still run. Lacking privileges is not a per-probe problem: it stops everything with
//! [`LoadError::Permission`].

use std::collections::HashMap;
use std::os::fd::{AsFd as _, OwnedFd};
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::programs::trace_point::TracePointLinkId;
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};

use crate::layout::{self, Tracepoint};
use crate::tracefs::Tracefs;
use crate::wire::{
    self, BlkKey, BlkKeyBytes, BlkVal, BlkValBytes, FlowKey, FlowKeyBytes, RawEvent, RetransVal,
    RetransValBytes, RunqVal, RunqValBytes, SettingsBytes,
};

/// The kernel's own BTF, used to relocate the programs' one access into `struct sk_buff`.
pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The object `build.rs` compiled from `bpf/probes.bpf.c`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probes.bpf.o"));

/// A group of programs attached together.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Name in metrics (`probe` label), `probes check` and `/readyz`.
    pub name: &'static str,
    /// What it shows, for `probes check`.
    pub what: &'static str,
    /// (program symbol in the object, tracepoint).
    pub programs: &'static [(&'static str, Tracepoint)],
    /// The same work as BTF-enabled raw tracepoints (program symbol, tracepoint name), attached
    /// instead of `programs` when the kernel has BTF (and accepts them): no trace record is
    /// formatted for them, which matters on the scheduler's hot path, and the kernel does not
    /// skip them while another eBPF program runs on the CPU, as it skips classic tracepoint
    /// programs (it counts those skips as the program's misses). Empty: classic tracepoints
    /// only.
    pub btf_programs: &'static [(&'static str, &'static str)],
    /// The programs (of either kind) that run on the hot path — every context switch, every
    /// block request — and that the agent may attach only part of the time (sampling, see
    /// [`Kernel::set_sampling_open`]). Empty: always attached.
    pub sampled: &'static [&'static str],
}

/// Every probe, in attach order.
pub const PROBES: &[Probe] = &[
    Probe {
        name: "tcp_retransmit",
        what: "TCP retransmits per flow and state",
        programs: &[("tcp_retransmit_skb", layout::TCP_RETRANSMIT_SKB)],
        btf_programs: &[("tcp_retransmit_skb_btf", "tcp_retransmit_skb")],
        sampled: &[],
    },
    Probe {
        name: "tcp_lifecycle",
        what: "connect attempts, time to establish, failed connects, connection lifetime",
        programs: &[("inet_sock_set_state", layout::INET_SOCK_SET_STATE)],
        btf_programs: &[("inet_sock_set_state_btf", "inet_sock_set_state")],
        sampled: &[],
    },
    Probe {
        name: "tcp_resets",
        what: "TCP resets received and sent",
        programs: &[
            ("tcp_receive_reset", layout::TCP_RECEIVE_RESET),
            ("tcp_send_reset", layout::TCP_SEND_RESET),
        ],
        btf_programs: &[],
        sampled: &[],
    },
    Probe {
        name: "runqueue",
        what: "run-queue latency and context switches per component",
        programs: &[
            ("sched_wakeup", layout::SCHED_WAKEUP),
            ("sched_wakeup_new", layout::SCHED_WAKEUP_NEW),
            ("sched_switch", layout::SCHED_SWITCH),
        ],
        btf_programs: &[
            ("sched_wakeup_new_btf", "sched_wakeup_new"),
            ("sched_switch_btf", "sched_switch"),
        ],
        // Not `sched_wakeup_new`: it runs once per new task, and a thread's component is
        // inherited there, also while the switch program is detached.
        sampled: &["sched_switch_btf", "sched_switch", "sched_wakeup"],
    },
    Probe {
        name: "block_io",
        what: "block I/O latency and bytes per device and operation",
        programs: &[
            ("block_rq_issue", layout::BLOCK_RQ_ISSUE),
            ("block_rq_complete", layout::BLOCK_RQ_COMPLETE),
        ],
        btf_programs: &[
            ("block_rq_issue_btf", "block_rq_issue"),
            ("block_rq_complete_btf", "block_rq_complete"),
        ],
        sampled: &[
            "block_rq_issue_btf",
            "block_rq_complete_btf",
            "block_rq_issue",
            "block_rq_complete",
        ],
    },
    Probe {
        name: "oom",
        what: "OOM kills with the victim's pid, command and memory",
        programs: &[("oom_mark_victim", layout::MARK_VICTIM)],
        btf_programs: &[],
        sampled: &[],
    },
];

/// Whether a probe runs, and if not why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub attached: bool,
    pub detail: String,
}

/// Why the kernel side could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not allowed to load eBPF (not root, or missing CAP_BPF/CAP_PERFMON).
    #[error("{0}")]
    Permission(String),
    /// Anything else: missing tracefs, no probe could attach, a broken object.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// True when an error chain contains EPERM. (EACCES from `BPF_PROG_LOAD` is the verifier
/// rejecting a program, not a lack of privileges.)
pub fn is_permission_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn describe_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// What the scheduler programs filter on, as last published to the `settings` map.
struct Filter {
    track_all: bool,
    generation: u32,
    /// `tracked` or `track_all` changed since the last publish.
    dirty: bool,
}

/// The loaded object, its maps, and what got attached.
pub struct Kernel {
    filter: Filter,
    ebpf: Ebpf,
    tracked: BpfHashMap<MapData, u32, u32>,
    settings: Array<MapData, SettingsBytes>,
    counters: PerCpuArray<MapData, u64>,
    runq: PerCpuArray<MapData, RunqValBytes>,
    retrans: BpfHashMap<MapData, FlowKeyBytes, RetransValBytes>,
    blk: BpfHashMap<MapData, BlkKeyBytes, BlkValBytes>,
    ring: RingBuf<MapData>,
    status: Vec<ProbeStatus>,
    /// The attached probes' hot-path programs (see [`Probe::sampled`]), by probe.
    sampled: Vec<(&'static str, Vec<Sampled>)>,
    /// Whether they are attached now (they are after loading).
    sampling_open: bool,
    /// Holds `BPF_ENABLE_STATS` on while the agent runs (closed on drop).
    stats_fd: Option<OwnedFd>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("status", &self.status)
            .finish()
    }
}

/// Takes map `name` out of a loaded object as its typed wrapper.
pub(crate) fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map `{name}` is missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("opening map `{name}`"))
}

impl Kernel {
    /// Loads the object and attaches the probes named in `only` (all when `None`).
    /// `kernel_block_stamps`: time block requests from the kernel's own issue stamp where the
    /// queue keeps one (else the programs time every request themselves).
    pub fn load(
        only: Option<&[String]>,
        bpf_stats: bool,
        kernel_block_stamps: bool,
    ) -> Result<Kernel, LoadError> {
        let tracefs = Tracefs::find_or_mount().map_err(|e| {
            if nix::unistd::geteuid().is_root() {
                LoadError::Other(anyhow::anyhow!(e))
            } else {
                LoadError::Permission(e)
            }
        })?;
        let wanted: Vec<&Probe> = PROBES
            .iter()
            .filter(|p| only.is_none_or(|o| o.iter().any(|n| n == p.name)))
            .collect();

        // Check every tracepoint's layout before loading anything.
        let mut status = Vec::new();
        let mut ok_probes = Vec::new();
        let mut retrans_has_err = 1u32;
        for probe in &wanted {
            let mut problem = None;
            for (_, tp) in probe.programs {
                match tracefs.verify(tp) {
                    Ok(found) => {
                        if tp.name == layout::TCP_RETRANSMIT_SKB.name
                            && found.absent_optional.contains(&"err")
                        {
                            retrans_has_err = 0;
                        }
                    }
                    Err(e) => {
                        problem = Some(e.to_string());
                        break;
                    }
                }
            }
            match problem {
                Some(why) => status.push(ProbeStatus {
                    probe: probe.name,
                    attached: false,
                    detail: why,
                }),
                None => ok_probes.push(*probe),
            }
        }

        // Without kernel BTF the one CO-RE access (sk_buff.cb) cannot be relocated: the
        // program then counts each retransmitted skb as one segment.
        let have_btf = u32::from(std::path::Path::new(BTF_PATH).is_file());
        // Where the kernel keeps "this queue stamps each request's issue time" (block I/O):
        // known, the issue program leaves those requests to the kernel's own stamp. Read from
        // the kernel's BTF (megabytes) only when the block I/O probe is attached.
        let queue_flag_stats_bit =
            if kernel_block_stamps && ok_probes.iter().any(|p| p.name == "block_io") {
                queue_flag_stats_bit()
            } else {
                u32::MAX
            };
        let mut ebpf = EbpfLoader::new()
            // `task_infos` (task-local storage) has no typed API in aya; only the programs use it.
            .allow_unsupported_maps()
            .override_global("retrans_has_err", &retrans_has_err, true)
            .override_global("have_btf", &have_btf, true)
            .override_global("queue_flag_stats_bit", &queue_flag_stats_bit, true)
            .load(OBJECT)
            .map_err(|e| {
                if is_permission_error(&e) {
                    LoadError::Permission(format!(
                        "not allowed to load eBPF programs ({}): run as root or grant CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH",
                        describe_chain(&e)
                    ))
                } else {
                    LoadError::Other(anyhow::Error::new(e).context("loading the eBPF object"))
                }
            })?;

        let mut sampled = Vec::new();
        for probe in ok_probes {
            match attach_probe(&mut ebpf, probe) {
                Ok((detail, programs)) => {
                    if !programs.is_empty() {
                        sampled.push((probe.name, programs));
                    }
                    status.push(ProbeStatus {
                        probe: probe.name,
                        attached: true,
                        detail,
                    })
                }
                Err(e) => {
                    if is_permission_error(e.as_ref()) {
                        return Err(LoadError::Permission(format!(
                            "not allowed to attach eBPF programs ({e:#}): run as root or grant CAP_BPF and CAP_PERFMON"
                        )));
                    }
                    tracing::debug!(probe = probe.name, error = %format!("{e:#}"), "attach failed");
                    status.push(ProbeStatus {
                        probe: probe.name,
                        attached: false,
                        detail: shorten_verifier_log(&format!("{e:#}")),
                    });
                }
            }
        }
        status.sort_by_key(|s| PROBES.iter().position(|p| p.name == s.probe));
        if !status.iter().any(|s| s.attached) {
            let why: Vec<String> = status
                .iter()
                .map(|s| format!("{}: {}", s.probe, s.detail))
                .collect();
            return Err(LoadError::Other(anyhow::anyhow!(
                "no probe could be attached ({})",
                why.join("; ")
            )));
        }

        let stats_fd = if bpf_stats {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(error = %e, "could not enable BPF run-time statistics");
                    None
                }
            }
        } else {
            None
        };

        Ok(Kernel {
            tracked: take(&mut ebpf, "tracked")?,
            settings: take(&mut ebpf, "settings")?,
            counters: take(&mut ebpf, "counters")?,
            runq: take(&mut ebpf, "runq")?,
            retrans: take(&mut ebpf, "retrans")?,
            blk: take(&mut ebpf, "blk")?,
            ring: take(&mut ebpf, "events")?,
            ebpf,
            status,
            sampled,
            sampling_open: true,
            stats_fd,
            filter: Filter {
                track_all: false,
                generation: 0,
                dirty: true,
            },
        })
    }

    /// What got attached and what did not.
    pub fn status(&self) -> &[ProbeStatus] {
        &self.status
    }

    /// The attached probes whose hot-path programs can be attached part of the time.
    pub fn sampled_probes(&self) -> Vec<&'static str> {
        self.sampled.iter().map(|(p, _)| *p).collect()
    }

    /// Whether any attached probe is sampled.
    pub fn has_sampled_probes(&self) -> bool {
        !self.sampled.is_empty()
    }

    /// Whether the sampled probes' programs are attached now.
    pub fn sampling_open(&self) -> bool {
        self.sampling_open
    }

    /// Attaches (`open`) or detaches the hot-path programs of every sampled probe. Their maps,
    /// and everything the other programs keep (a task's component, a socket's start), stay as
    /// they are: the histograms and counters just stop growing while detached. On an error
    /// the programs that could be switched are, and the state says "open" if any is attached.
    pub fn set_sampling_open(&mut self, open: bool) -> anyhow::Result<()> {
        if open == self.sampling_open {
            return Ok(());
        }
        let mut first_error = None;
        for (_, programs) in &mut self.sampled {
            for p in programs.iter_mut() {
                let r = if open {
                    p.attach(&mut self.ebpf)
                } else {
                    p.detach(&mut self.ebpf)
                };
                if let Err(e) = r {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.sampling_open = self
            .sampled
            .iter()
            .any(|(_, ps)| ps.iter().any(|p| p.link.is_some()));
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn attached(&self, probe: &str) -> bool {
        self.status.iter().any(|s| s.probe == probe && s.attached)
    }

    /// A duplicate of the ring buffer's fd, for waiting on it (epoll) without holding `self`.
    pub fn ring_fd(&self) -> anyhow::Result<OwnedFd> {
        self.ring
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the ring buffer fd")
    }

    /// Decodes every event waiting in the ring buffer; returns how many were unreadable.
    pub fn drain_ring(&mut self, mut on_event: impl FnMut(RawEvent)) -> u64 {
        let mut bad = 0;
        while let Some(item) = self.ring.next() {
            match RawEvent::decode(&item) {
                Ok(e) => on_event(e),
                Err(e) => {
                    bad += 1;
                    tracing::debug!(error = %e, "undecodable ring buffer record");
                }
            }
        }
        bad
    }

    /// Every retransmit counter.
    pub fn retransmits(&self) -> Vec<(FlowKey, RetransVal)> {
        self.retrans
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (FlowKey::decode(&k), RetransVal::decode(&v)))
            .collect()
    }

    /// Run-queue statistics of component `index`, summed over CPUs.
    pub fn runqueue(&self, index: u32) -> anyhow::Result<RunqVal> {
        let per_cpu = self
            .runq
            .get(&index, 0)
            .with_context(|| format!("reading runq[{index}]"))?;
        let mut total = RunqVal::default();
        for v in per_cpu.iter() {
            total.add(&RunqVal::decode(v));
        }
        Ok(total)
    }

    /// Block I/O histograms per device and operation.
    pub fn block_io(&self) -> Vec<(BlkKey, BlkVal)> {
        self.blk
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (BlkKey::decode(&k), BlkVal::decode(&v)))
            .collect()
    }

    /// A kernel-side counter (`wire::CTR_*`), summed over CPUs.
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Makes the scheduler probes track every task (no lab state) or only `tracked` ones
    /// (from the next [`Kernel::commit_filter`]).
    pub fn set_track_all(&mut self, on: bool) {
        if self.filter.track_all != on {
            self.filter.track_all = on;
            self.filter.dirty = true;
        }
    }

    /// Publishes the filter: when `tracked` or track-all changed since the last commit, bumps
    /// the generation the programs compare with the one cached per task, so every task's
    /// component is looked up again.
    pub fn commit_filter(&mut self) -> anyhow::Result<()> {
        if !self.filter.dirty {
            return Ok(());
        }
        self.filter.generation = self.filter.generation.wrapping_add(1);
        self.settings
            .set(
                0,
                wire::encode_settings(self.filter.track_all, self.filter.generation),
                0,
            )
            .context("writing the settings map")?;
        self.filter.dirty = false;
        Ok(())
    }

    /// Current `tracked` entries (tid -> component index).
    pub fn tracked(&self) -> HashMap<u32, u32> {
        self.tracked.iter().filter_map(Result::ok).collect()
    }

    pub fn track(&mut self, tid: u32, component: u32) -> anyhow::Result<()> {
        self.filter.dirty = true;
        self.tracked
            .insert(tid, component, 0)
            .with_context(|| format!("tracking tid {tid}"))
    }

    pub fn untrack(&mut self, tid: u32) {
        self.filter.dirty = true;
        // Already gone is fine: the entry may have been removed concurrently.
        let _ = self.tracked.remove(&tid);
    }

    /// Per-program (name, run time, runs) when BPF statistics are on.
    pub fn program_stats(&self) -> Vec<(String, Duration, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((name.to_string(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Per loaded program (name, runs the kernel skipped): a kprobe or classic tracepoint
    /// program is skipped while another such program (or a map syscall) holds the CPU's
    /// `bpf_prog_active` flag, a BTF raw tracepoint only while the same program is already
    /// running on that CPU. Every skip is an event the probe did not see.
    pub fn program_misses(&self) -> Vec<(String, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let fd = p.fd().ok()?;
                let misses = recursion_misses(fd.as_fd())
                    .inspect_err(
                        |e| tracing::debug!(program = name, error = %e, "reading program info"),
                    )
                    .ok()?;
                Some((name.to_string(), misses))
            })
            .collect()
    }

    /// Whether run-time statistics are being collected (by us or system-wide).
    pub fn stats_enabled(&self) -> bool {
        self.stats_fd.is_some()
            || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .map(|s| s.trim() == "1")
                .unwrap_or(false)
    }
}

/// `recursion_misses` of a loaded program, from its descriptor's `/proc/self/fdinfo` entry
/// (Linux 5.12+; aya 0.14 does not expose it). Absent: 0.
fn recursion_misses(prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", prog.as_raw_fd()))?;
    Ok(fdinfo_value(&text, "recursion_misses").unwrap_or(0))
}

/// The value of `key` in an fdinfo text (`key:\tvalue` lines).
fn fdinfo_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// Loads every program of the object into this kernel without attaching any, the fallbacks
/// it would never attach included (the classic tracepoints, on a kernel with BTF): (program,
/// `Ok`, or why it did not load). A test runs it so that no variant rots unnoticed.
pub fn load_every_program() -> anyhow::Result<Vec<(String, Result<(), String>)>> {
    let have_btf = u32::from(std::path::Path::new(BTF_PATH).is_file());
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .override_global("have_btf", &have_btf, true)
        .load(OBJECT)
        .context("loading the eBPF object")?;
    let btf = aya::Btf::from_sys_fs().ok();
    let mut results = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let outcome = match program {
            aya::programs::Program::TracePoint(p) => p.load().map_err(|e| format!("{e:#}")),
            aya::programs::Program::BtfTracePoint(p) => {
                let tp = PROBES
                    .iter()
                    .flat_map(|probe| probe.btf_programs)
                    .find(|(symbol, _)| *symbol == name)
                    .map(|(_, tp)| *tp);
                match (tp, &btf) {
                    (Some(tp), Some(btf)) => p.load(tp, btf).map_err(|e| format!("{e:#}")),
                    (None, _) => Err(format!("`{name}` is in no probe's btf_programs")),
                    (_, None) => Err("the kernel has no BTF".to_string()),
                }
            }
            other => Err(format!("unexpected program type {:?}", other.prog_type())),
        };
        results.push((
            name.to_string(),
            outcome.map_err(|e| shorten_verifier_log(&e)),
        ));
    }
    results.sort();
    Ok(results)
}

/// A verifier rejection carries the whole verifier log; keep its verdict (the last lines
/// before the statistics) so the reason fits on a line.
pub fn shorten_verifier_log(message: &str) -> String {
    let Some((head, log)) = message.split_once("Verifier output:") else {
        return message.to_string();
    };
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take_while(|l| !l.starts_with("verification time"))
        .collect();
    let tail = lines[lines.len().saturating_sub(2)..].join(" / ");
    format!("{} verifier: {tail}", head.trim_end())
}

/// The program `symbol` of the object as a `kind` program.
fn program<'a, T>(ebpf: &'a mut Ebpf, symbol: &str, kind: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    <&'a mut T as TryFrom<&'a mut aya::programs::Program>>::Error:
        std::error::Error + Send + Sync + 'static,
{
    ebpf.program_mut(symbol)
        .with_context(|| format!("program `{symbol}` is missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program `{symbol}` is not a {kind} program"))
}

/// The bit of `QUEUE_FLAG_STATS` in `request_queue.queue_flags` from the kernel's BTF, or
/// `u32::MAX` (unknown: the block I/O programs time every request themselves).
fn queue_flag_stats_bit() -> u32 {
    crate::btf::kernel_enumerator("QUEUE_FLAG_STATS")
        .and_then(|b| u32::try_from(b).ok())
        .filter(|b| *b < 64)
        .unwrap_or(u32::MAX)
}

/// How a sampled program is attached: kept so that it can be detached and attached again.
enum Link {
    Btf(BtfTracePointLinkId),
    Classic(TracePointLinkId),
}

/// A program of [`Probe::sampled`] that got attached.
struct Sampled {
    symbol: &'static str,
    /// (category, name) of a classic tracepoint; `None`: a BTF raw tracepoint.
    classic: Option<(&'static str, &'static str)>,
    /// `Some` while attached.
    link: Option<Link>,
}

impl Sampled {
    fn attach(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        if self.link.is_some() {
            return Ok(());
        }
        let link = match self.classic {
            None => {
                let p: &mut BtfTracePoint = program(ebpf, self.symbol, "tp_btf")?;
                Link::Btf(
                    p.attach()
                        .with_context(|| format!("attaching `{}`", self.symbol))?,
                )
            }
            Some((category, name)) => {
                let p: &mut TracePoint = program(ebpf, self.symbol, "tracepoint")?;
                Link::Classic(
                    p.attach(category, name)
                        .with_context(|| format!("attaching `{}`", self.symbol))?,
                )
            }
        };
        self.link = Some(link);
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let result = match self.link.take() {
            None => return Ok(()),
            Some(Link::Btf(id)) => {
                program::<BtfTracePoint>(ebpf, self.symbol, "tp_btf")?.detach(id)
            }
            Some(Link::Classic(id)) => {
                program::<TracePoint>(ebpf, self.symbol, "tracepoint")?.detach(id)
            }
        };
        result.with_context(|| format!("detaching `{}`", self.symbol))
    }
}

/// Attaches a probe's programs: its BTF raw tracepoints when it has them and the kernel takes
/// them, else its classic tracepoints. Returns what got attached, and the attached programs
/// of [`Probe::sampled`].
fn attach_probe(ebpf: &mut Ebpf, probe: &Probe) -> anyhow::Result<(String, Vec<Sampled>)> {
    let mut refused = None;
    if !probe.btf_programs.is_empty() {
        match attach_btf(ebpf, probe) {
            Ok(links) => {
                let sampled = links
                    .into_iter()
                    .filter(|(symbol, _)| probe.sampled.contains(symbol))
                    .map(|(symbol, link)| Sampled {
                        symbol,
                        classic: None,
                        link: Some(Link::Btf(link)),
                    })
                    .collect();
                let detail = probe
                    .btf_programs
                    .iter()
                    .map(|(_, tp)| format!("tp_btf/{tp}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Ok((detail, sampled));
            }
            Err(e) => {
                if is_permission_error(e.as_ref()) {
                    return Err(e);
                }
                tracing::info!(probe = probe.name, error = %format!("{e:#}"), "BTF raw tracepoints unavailable; attaching classic tracepoints");
                refused = Some(shorten_verifier_log(&format!("{e:#}")));
            }
        }
    }
    let mut sampled = Vec::new();
    for (symbol, tp) in probe.programs {
        let what = format!("attaching {}", tp.id());
        let program: &mut TracePoint = program(ebpf, symbol, "tracepoint")?;
        program
            .load()
            .with_context(|| format!("loading program `{symbol}` (verifier)"))
            .with_context(|| what.clone())?;
        let link = program
            .attach(tp.category, tp.name)
            .with_context(|| what.clone())?;
        if probe.sampled.contains(symbol) {
            sampled.push(Sampled {
                symbol,
                classic: Some((tp.category, tp.name)),
                link: Some(Link::Classic(link)),
            });
        }
    }
    let attached = probe
        .programs
        .iter()
        .map(|(_, tp)| tp.id())
        .collect::<Vec<_>>()
        .join(", ");
    // Say why a kernel with BTF got the classic programs: they are skipped while any other
    // classic tracepoint or kprobe program runs on the CPU, so the numbers can differ.
    let detail = match refused {
        Some(why) => format!("{attached} (BTF raw tracepoints refused: {why})"),
        None => attached,
    };
    Ok((detail, sampled))
}

/// Loads and attaches all of a probe's BTF raw tracepoints, or none (what got attached before
/// a failure is detached again). Returns each program's link.
fn attach_btf(
    ebpf: &mut Ebpf,
    probe: &Probe,
) -> anyhow::Result<Vec<(&'static str, BtfTracePointLinkId)>> {
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let mut attached = Vec::new();
    for (symbol, tp) in probe.btf_programs {
        let step = (|| -> anyhow::Result<_> {
            let program: &mut BtfTracePoint = program(ebpf, symbol, "tp_btf")?;
            program
                .load(tp, &btf)
                .with_context(|| format!("loading program `{symbol}` for tp_btf/{tp}"))?;
            program
                .attach()
                .with_context(|| format!("attaching tp_btf/{tp}"))
        })();
        match step {
            Ok(link) => attached.push((*symbol, link)),
            Err(e) => {
                for (symbol, link) in attached {
                    if let Some(Ok(program)) =
                        ebpf.program_mut(symbol).map(<&mut BtfTracePoint>::try_from)
                    {
                        let _ = program.detach(link);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(attached)
}

#[cfg(test)]
mod tests {
    use super::{fdinfo_value, shorten_verifier_log};

    #[test]
    fn a_verifier_rejection_keeps_its_verdict_on_one_line() {
        let message = "loading program `x`: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: (bf) r6 = r1\n23: (79) r1 = *(u64 *)(r3 +9000)\ninvalid bpf_context access off=9000 size=8\nverification time 41 usec\nstack depth 0\n";
        assert_eq!(
            shorten_verifier_log(message),
            "loading program `x`: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: 23: (79) r1 = *(u64 *)(r3 +9000) / invalid bpf_context access off=9000 size=8"
        );
        assert_eq!(shorten_verifier_log("no log here"), "no log here");
    }

    #[test]
    fn fdinfo_values_are_read_by_key() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nrun_time_ns:\t0\nrecursion_misses:\t17\nverified_insns:\t120\n";
        assert_eq!(fdinfo_value(text, "recursion_misses"), Some(17));
        assert_eq!(fdinfo_value(text, "verified_insns"), Some(120));
        assert_eq!(fdinfo_value(text, "missing"), None);
        assert_eq!(
            fdinfo_value("recursion_misses:\tlots\n", "recursion_misses"),
            None
        );
    }
}
