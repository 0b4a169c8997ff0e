//! Decoding of what the eBPF programs write: map keys and values and ring buffer events, read
//! from plain bytes at the offsets `bpf/shared.h` asserts (a unit test compares the two).
//!
//! Keys and values cross the map API as byte arrays, so the agent needs no `unsafe` `Pod`
//! implementations; everything is little-endian (x86_64).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Components the kernel side can tell apart; index 0 is "unknown".
pub const MAX_COMPONENTS: u32 = 64;
/// log2 histogram slots: slot k counts values in `[2^k, 2^(k+1))` ns; the last one also
/// takes everything larger.
pub const HIST_SLOTS: usize = 40;
/// Per-CPU `counters` indices.
pub const CTR_RINGBUF_FULL: u32 = 0;
pub const CTR_MAP_FULL: u32 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Byte offsets, mirroring the `LAYOUT` and `SIZE` lines of `bpf/shared.h`.
pub mod off {
    pub const SETTINGS_SIZE: usize = 8;
    pub const SETTINGS_TRACK_ALL: usize = 0;
    pub const SETTINGS_GENERATION: usize = 4;

    pub const FLOW_KEY_SIZE: usize = 40;
    pub const FLOW_SADDR: usize = 0;
    pub const FLOW_DADDR: usize = 16;
    pub const FLOW_SPORT: usize = 32;
    pub const FLOW_DPORT: usize = 34;
    pub const FLOW_FAMILY: usize = 36;
    pub const FLOW_STATE: usize = 38;

    pub const RETRANS_VAL_SIZE: usize = 24;
    pub const RETRANS_COUNT: usize = 0;
    pub const RETRANS_LAST_NS: usize = 8;
    pub const RETRANS_TGID: usize = 16;

    pub const RUNQ_VAL_SIZE: usize = 360;
    pub const RUNQ_SLOTS: usize = 0;
    pub const RUNQ_SUM_NS: usize = 320;
    pub const RUNQ_COUNT: usize = 328;
    pub const RUNQ_VOLUNTARY: usize = 336;
    pub const RUNQ_INVOLUNTARY: usize = 344;
    pub const RUNQ_SWITCH_INS: usize = 352;

    pub const BLK_KEY_SIZE: usize = 8;
    pub const BLK_DEV: usize = 0;
    pub const BLK_OP: usize = 4;

    pub const BLK_VAL_SIZE: usize = 352;
    pub const BLK_SLOTS: usize = 0;
    pub const BLK_SUM_NS: usize = 320;
    pub const BLK_COUNT: usize = 328;
    pub const BLK_BYTES: usize = 336;
    pub const BLK_ERRORS: usize = 344;

    pub const EVENT_SIZE: usize = 144;
    pub const EV_TS_NS: usize = 0;
    pub const EV_DURATION_NS: usize = 8;
    pub const EV_KIND: usize = 16;
    pub const EV_TGID: usize = 20;
    pub const EV_PID: usize = 24;
    pub const EV_COMP: usize = 28;
    pub const EV_COMM: usize = 32;
    pub const EV_SADDR: usize = 48;
    pub const EV_DADDR: usize = 64;
    pub const EV_SPORT: usize = 80;
    pub const EV_DPORT: usize = 82;
    pub const EV_FAMILY: usize = 84;
    pub const EV_OLDSTATE: usize = 86;
    pub const EV_NEWSTATE: usize = 87;
    pub const EV_TOTAL_VM: usize = 88;
    pub const EV_ANON_RSS: usize = 96;
    pub const EV_FILE_RSS: usize = 104;
    pub const EV_SHMEM_RSS: usize = 112;
    pub const EV_PGTABLES: usize = 120;
    pub const EV_UID: usize = 128;
    pub const EV_OOM_SCORE_ADJ: usize = 132;
    pub const EV_REASON: usize = 136;

    pub const OFFCPU_START_SIZE: usize = 40;
    pub const OFFCPU_START_TS: usize = 0;
    pub const OFFCPU_START_KEY: usize = 8;

    pub const OFFCPU_KEY_SIZE: usize = 32;
    pub const OFFCPU_KEY_TGID: usize = 0;
    pub const OFFCPU_KEY_USER_STACK: usize = 4;
    pub const OFFCPU_KEY_KERNEL_STACK: usize = 8;
    pub const OFFCPU_KEY_COMM: usize = 16;

    pub const OFFCPU_VAL_SIZE: usize = 16;
    pub const OFFCPU_VAL_NS: usize = 0;
    pub const OFFCPU_VAL_COUNT: usize = 8;
}

pub type FlowKeyBytes = [u8; off::FLOW_KEY_SIZE];
pub type RetransValBytes = [u8; off::RETRANS_VAL_SIZE];
pub type RunqValBytes = [u8; off::RUNQ_VAL_SIZE];
pub type BlkKeyBytes = [u8; off::BLK_KEY_SIZE];
pub type BlkValBytes = [u8; off::BLK_VAL_SIZE];
pub type SettingsBytes = [u8; off::SETTINGS_SIZE];
pub type OffCpuStartBytes = [u8; off::OFFCPU_START_SIZE];
pub type OffCpuKeyBytes = [u8; off::OFFCPU_KEY_SIZE];
pub type OffCpuValBytes = [u8; off::OFFCPU_VAL_SIZE];

/// `OFFCPU_NO_STACK`: the stack could not be stored.
pub const OFFCPU_NO_STACK: i32 = -1;
/// `OFFCPU_STACK_DEPTH`: frames per stored stack.
pub const OFFCPU_STACK_DEPTH: usize = 127;

/// Where a thread waited: its process, thread name and stacks (`offcpu_key`, or the stamp of
/// a thread still off the CPU, `offcpu_start`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OffCpuKey {
    pub tgid: u32,
    pub user_stack: i32,
    pub kernel_stack: i32,
    pub comm: String,
}

impl OffCpuKey {
    pub fn decode(b: &OffCpuKeyBytes) -> OffCpuKey {
        OffCpuKey::decode_at(b, 0)
    }

    fn decode_at(b: &[u8], at: usize) -> OffCpuKey {
        let comm = at + off::OFFCPU_KEY_COMM;
        OffCpuKey {
            tgid: u32_at(b, at + off::OFFCPU_KEY_TGID),
            user_stack: i32_at(b, at + off::OFFCPU_KEY_USER_STACK),
            kernel_stack: i32_at(b, at + off::OFFCPU_KEY_KERNEL_STACK),
            comm: cstr(&b[comm..comm + 16]),
        }
    }
}

/// (time off the CPU in ns, number of waits) of one `offcpu_ns` entry.
pub fn decode_offcpu_val(b: &OffCpuValBytes) -> (u64, u64) {
    (
        u64_at(b, off::OFFCPU_VAL_NS),
        u64_at(b, off::OFFCPU_VAL_COUNT),
    )
}

/// A thread still off the CPU: (since, in CLOCK_MONOTONIC ns; where it waits).
pub fn decode_offcpu_start(b: &OffCpuStartBytes) -> (u64, OffCpuKey) {
    (
        u64_at(b, off::OFFCPU_START_TS),
        OffCpuKey::decode_at(b, off::OFFCPU_START_KEY),
    )
}

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {len} bytes, expected at least {want}")]
pub struct ShortBuffer {
    pub what: &'static str,
    pub len: usize,
    pub want: usize,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn addr_at(b: &[u8], at: usize, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            b[at],
            b[at + 1],
            b[at + 2],
            b[at + 3],
        ))),
        AF_INET6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[at..at + 16]);
            let v6 = Ipv6Addr::from(a);
            // An IPv4 peer of a dual-stack socket: show it as IPv4.
            Some(
                v6.to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
            )
        }
        _ => None,
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// TCP states as the kernel numbers them.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// An address and port as `ip:port` (`[v6]:port`).
pub fn endpoint(addr: Option<IpAddr>, port: u16) -> String {
    host_and(addr, port)
}

/// `addr` with any port, `10.0.0.1:*`: an endpoint label that does not grow with ephemeral
/// ports.
pub fn endpoint_any_port(addr: Option<IpAddr>) -> String {
    host_and(addr, '*')
}

/// `host:port`, IPv6 hosts in brackets, `?` for an unknown host.
fn host_and(addr: Option<IpAddr>, port: impl std::fmt::Display) -> String {
    match addr {
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
        Some(IpAddr::V4(a)) => format!("{a}:{port}"),
        None => format!("?:{port}"),
    }
}

/// A TCP flow seen by the retransmit probe; `src` is the local (sending) side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Option<IpAddr>,
    pub sport: u16,
    pub dst: Option<IpAddr>,
    pub dport: u16,
    pub state: u8,
}

impl FlowKey {
    pub fn decode(b: &FlowKeyBytes) -> FlowKey {
        let family = u16_at(b, off::FLOW_FAMILY);
        FlowKey {
            src: addr_at(b, off::FLOW_SADDR, family),
            sport: u16_at(b, off::FLOW_SPORT),
            dst: addr_at(b, off::FLOW_DADDR, family),
            dport: u16_at(b, off::FLOW_DPORT),
            state: b[off::FLOW_STATE],
        }
    }
}

/// The counter of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransVal {
    pub count: u64,
    pub last_ns: u64,
    /// The process that opened the socket, if the agent saw it connect.
    pub tgid: u32,
}

impl RetransVal {
    pub fn decode(b: &RetransValBytes) -> RetransVal {
        RetransVal {
            count: u64_at(b, off::RETRANS_COUNT),
            last_ns: u64_at(b, off::RETRANS_LAST_NS),
            tgid: u32_at(b, off::RETRANS_TGID),
        }
    }
}

/// A log2 histogram over nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log2Hist {
    pub slots: [u64; HIST_SLOTS],
    pub sum_ns: u64,
    pub count: u64,
}

impl Default for Log2Hist {
    fn default() -> Self {
        Log2Hist {
            slots: [0; HIST_SLOTS],
            sum_ns: 0,
            count: 0,
        }
    }
}

impl Log2Hist {
    fn decode(b: &[u8], slots_at: usize, sum_at: usize, count_at: usize) -> Log2Hist {
        let mut h = Log2Hist::default();
        for (i, s) in h.slots.iter_mut().enumerate() {
            *s = u64_at(b, slots_at + i * 8);
        }
        h.sum_ns = u64_at(b, sum_at);
        h.count = u64_at(b, count_at);
        h
    }

    pub fn add(&mut self, other: &Log2Hist) {
        for (a, b) in self.slots.iter_mut().zip(other.slots.iter()) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
        self.count += other.count;
    }

    /// `self - earlier`, slot by slot (saturating: a reset map starts again from zero).
    pub fn since(&self, earlier: &Log2Hist) -> Log2Hist {
        let mut h = Log2Hist::default();
        for (i, s) in h.slots.iter_mut().enumerate() {
            *s = self.slots[i].saturating_sub(earlier.slots[i]);
        }
        h.sum_ns = self.sum_ns.saturating_sub(earlier.sum_ns);
        h.count = self.count.saturating_sub(earlier.count);
        h
    }

    /// Observations at or above `ns` (by slot: those whose slot starts at or above it).
    pub fn count_at_least(&self, ns: u64) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(k, _)| (1u64 << k) >= ns)
            .map(|(_, c)| c)
            .sum()
    }

    /// The slot index holding the q-quantile (0..=1) of the observations, if any.
    pub fn quantile_slot(&self, q: f64) -> Option<usize> {
        let total: u64 = self.slots.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (k, c) in self.slots.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(k);
            }
        }
        Some(HIST_SLOTS - 1)
    }
}

/// One component's run-queue statistics (one CPU's, or summed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunqVal {
    pub hist: Log2Hist,
    /// Counted by the classic programs; the `tp_btf` one counts `switch_ins` instead (see
    /// [`RunqVal::voluntary`]).
    pub voluntary: u64,
    pub involuntary: u64,
    pub switch_ins: u64,
}

impl RunqVal {
    pub fn decode(b: &RunqValBytes) -> RunqVal {
        RunqVal {
            hist: Log2Hist::decode(b, off::RUNQ_SLOTS, off::RUNQ_SUM_NS, off::RUNQ_COUNT),
            voluntary: u64_at(b, off::RUNQ_VOLUNTARY),
            involuntary: u64_at(b, off::RUNQ_INVOLUNTARY),
            switch_ins: u64_at(b, off::RUNQ_SWITCH_INS),
        }
    }

    pub fn add(&mut self, other: &RunqVal) {
        self.hist.add(&other.hist);
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
        self.switch_ins += other.switch_ins;
    }

    /// Switches away while blocked. The `tp_btf` program does not look at the task it switches
    /// away from unless that task is still runnable (an involuntary switch, the rare kind), so
    /// it counts switches *to* the component's tasks instead: every one ends exactly one switch
    /// away, voluntary or involuntary, hence voluntary = switch-ins - involuntary. The classic
    /// programs count voluntary switches directly.
    pub fn voluntary(&self) -> u64 {
        if self.switch_ins > 0 {
            self.switch_ins.saturating_sub(self.involuntary)
        } else {
            self.voluntary
        }
    }
}

/// Block operation classes (`OP_*` in shared.h).
pub fn block_op_name(op: u32) -> &'static str {
    match op {
        0 => "read",
        1 => "write",
        2 => "flush",
        3 => "discard",
        _ => "other",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlkKey {
    /// Kernel `dev_t`: major << 20 | minor.
    pub dev: u32,
    pub op: u32,
}

impl BlkKey {
    pub fn decode(b: &BlkKeyBytes) -> BlkKey {
        BlkKey {
            dev: u32_at(b, off::BLK_DEV),
            op: u32_at(b, off::BLK_OP),
        }
    }

    pub fn major_minor(&self) -> (u32, u32) {
        (self.dev >> 20, self.dev & ((1 << 20) - 1))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkVal {
    pub hist: Log2Hist,
    pub bytes: u64,
    pub errors: u64,
}

impl BlkVal {
    pub fn decode(b: &BlkValBytes) -> BlkVal {
        BlkVal {
            hist: Log2Hist::decode(b, off::BLK_SLOTS, off::BLK_SUM_NS, off::BLK_COUNT),
            bytes: u64_at(b, off::BLK_BYTES),
            errors: u64_at(b, off::BLK_ERRORS),
        }
    }
}

/// Encodes the `settings` value.
pub fn encode_settings(track_all: bool, generation: u32) -> SettingsBytes {
    let mut b = [0u8; off::SETTINGS_SIZE];
    b[off::SETTINGS_TRACK_ALL..off::SETTINGS_TRACK_ALL + 4]
        .copy_from_slice(&u32::from(track_all).to_le_bytes());
    b[off::SETTINGS_GENERATION..off::SETTINGS_GENERATION + 4]
        .copy_from_slice(&generation.to_le_bytes());
    b
}

/// Ring buffer event kinds (`EV_*` in shared.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connect,
    Established,
    ConnectFailed,
    Closed,
    ResetReceived,
    ResetSent,
    Oom,
}

impl EventKind {
    fn from_raw(v: u32) -> Option<EventKind> {
        Some(match v {
            1 => EventKind::Connect,
            2 => EventKind::Established,
            3 => EventKind::ConnectFailed,
            4 => EventKind::Closed,
            5 => EventKind::ResetReceived,
            6 => EventKind::ResetSent,
            7 => EventKind::Oom,
            _ => return None,
        })
    }
}

/// The fields `oom:mark_victim` provides (sizes in kB, as the kernel reports them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OomFields {
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub uid: u32,
    pub oom_score_adj: i32,
}

/// A decoded ring buffer event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub kind: EventKind,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub duration_ns: u64,
    /// Process (thread group) the event belongs to, 0 when unknown.
    pub tgid: u32,
    pub pid: u32,
    /// Kernel-side component index, 0 when unknown.
    pub comp: u32,
    pub comm: String,
    pub src: Option<IpAddr>,
    pub sport: u16,
    pub dst: Option<IpAddr>,
    pub dport: u16,
    pub oldstate: u8,
    pub newstate: u8,
    pub oom: OomFields,
    pub reason: u32,
}

/// Why a ring buffer record was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Short(#[from] ShortBuffer),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
}

impl RawEvent {
    pub fn decode(b: &[u8]) -> Result<RawEvent, EventError> {
        if b.len() < off::EVENT_SIZE {
            return Err(ShortBuffer {
                what: "ring buffer event",
                len: b.len(),
                want: off::EVENT_SIZE,
            }
            .into());
        }
        let raw_kind = u32_at(b, off::EV_KIND);
        let kind = EventKind::from_raw(raw_kind).ok_or(EventError::UnknownKind(raw_kind))?;
        let family = u16_at(b, off::EV_FAMILY);
        let tcp = kind != EventKind::Oom;
        Ok(RawEvent {
            kind,
            ts_ns: u64_at(b, off::EV_TS_NS),
            duration_ns: u64_at(b, off::EV_DURATION_NS),
            tgid: u32_at(b, off::EV_TGID),
            pid: u32_at(b, off::EV_PID),
            comp: u32_at(b, off::EV_COMP),
            comm: cstr(&b[off::EV_COMM..off::EV_COMM + 16]),
            src: if tcp {
                addr_at(b, off::EV_SADDR, family)
            } else {
                None
            },
            sport: u16_at(b, off::EV_SPORT),
            dst: if tcp {
                addr_at(b, off::EV_DADDR, family)
            } else {
                None
            },
            dport: u16_at(b, off::EV_DPORT),
            oldstate: b[off::EV_OLDSTATE],
            newstate: b[off::EV_NEWSTATE],
            oom: OomFields {
                total_vm_kb: u64_at(b, off::EV_TOTAL_VM),
                anon_rss_kb: u64_at(b, off::EV_ANON_RSS),
                file_rss_kb: u64_at(b, off::EV_FILE_RSS),
                shmem_rss_kb: u64_at(b, off::EV_SHMEM_RSS),
                pgtables_kb: u64_at(b, off::EV_PGTABLES),
                uid: u32_at(b, off::EV_UID),
                oom_score_adj: i32_at(b, off::EV_OOM_SCORE_ADJ),
            },
            reason: u32_at(b, off::EV_REASON),
        })
    }
}

/// `enum sk_rst_reason` names for `tcp_send_reset` (6.10+).
pub fn reset_reason_name(reason: u32) -> &'static str {
    match reason {
        0 => "NOT_SPECIFIED",
        1 => "NO_SOCKET",
        2 => "TCP_INVALID_ACK_SEQUENCE",
        3 => "TCP_RFC7323_PAWS",
        4 => "TCP_TOO_OLD_ACK",
        5 => "TCP_ACK_UNSENT_DATA",
        6 => "TCP_FLAGS",
        7 => "TCP_OLD_ACK",
        8 => "TCP_ABORT_ON_DATA",
        9 => "TCP_TIMEWAIT_SOCKET",
        10 => "INVALID_SYN",
        11 => "TCP_ABORT_ON_CLOSE",
        12 => "TCP_ABORT_ON_LINGER",
        13 => "TCP_ABORT_ON_MEMORY",
        14 => "TCP_STATE",
        15 => "TCP_KEEPALIVE_TIMEOUT",
        16 => "TCP_DISCONNECT_WITH_DATA",
        _ => "OTHER",
    }
}

/// The shared layout as (struct, field, offset, size), for the consistency test.
#[cfg(test)]
const SHARED_LAYOUT: &[(&str, &str, usize, usize)] = &[
    ("settings", "track_all", off::SETTINGS_TRACK_ALL, 4),
    ("settings", "generation", off::SETTINGS_GENERATION, 4),
    ("flow_key", "saddr", off::FLOW_SADDR, 16),
    ("flow_key", "daddr", off::FLOW_DADDR, 16),
    ("flow_key", "sport", off::FLOW_SPORT, 2),
    ("flow_key", "dport", off::FLOW_DPORT, 2),
    ("flow_key", "family", off::FLOW_FAMILY, 2),
    ("flow_key", "state", off::FLOW_STATE, 1),
    ("retrans_val", "count", off::RETRANS_COUNT, 8),
    ("retrans_val", "last_ns", off::RETRANS_LAST_NS, 8),
    ("retrans_val", "tgid", off::RETRANS_TGID, 4),
    ("runq_val", "slots", off::RUNQ_SLOTS, HIST_SLOTS * 8),
    ("runq_val", "sum_ns", off::RUNQ_SUM_NS, 8),
    ("runq_val", "count", off::RUNQ_COUNT, 8),
    ("runq_val", "voluntary", off::RUNQ_VOLUNTARY, 8),
    ("runq_val", "involuntary", off::RUNQ_INVOLUNTARY, 8),
    ("runq_val", "switch_ins", off::RUNQ_SWITCH_INS, 8),
    ("blk_key", "dev", off::BLK_DEV, 4),
    ("blk_key", "op", off::BLK_OP, 4),
    ("blk_val", "slots", off::BLK_SLOTS, HIST_SLOTS * 8),
    ("blk_val", "sum_ns", off::BLK_SUM_NS, 8),
    ("blk_val", "count", off::BLK_COUNT, 8),
    ("blk_val", "bytes", off::BLK_BYTES, 8),
    ("blk_val", "errors", off::BLK_ERRORS, 8),
    ("event", "ts_ns", off::EV_TS_NS, 8),
    ("event", "duration_ns", off::EV_DURATION_NS, 8),
    ("event", "kind", off::EV_KIND, 4),
    ("event", "tgid", off::EV_TGID, 4),
    ("event", "pid", off::EV_PID, 4),
    ("event", "comp", off::EV_COMP, 4),
    ("event", "comm", off::EV_COMM, 16),
    ("event", "saddr", off::EV_SADDR, 16),
    ("event", "daddr", off::EV_DADDR, 16),
    ("event", "sport", off::EV_SPORT, 2),
    ("event", "dport", off::EV_DPORT, 2),
    ("event", "family", off::EV_FAMILY, 2),
    ("event", "oldstate", off::EV_OLDSTATE, 1),
    ("event", "newstate", off::EV_NEWSTATE, 1),
    ("event", "total_vm", off::EV_TOTAL_VM, 8),
    ("event", "anon_rss", off::EV_ANON_RSS, 8),
    ("event", "file_rss", off::EV_FILE_RSS, 8),
    ("event", "shmem_rss", off::EV_SHMEM_RSS, 8),
    ("event", "pgtables", off::EV_PGTABLES, 8),
    ("event", "uid", off::EV_UID, 4),
    ("event", "oom_score_adj", off::EV_OOM_SCORE_ADJ, 4),
    ("event", "reason", off::EV_REASON, 4),
    ("offcpu_start", "ts", off::OFFCPU_START_TS, 8),
    (
        "offcpu_start",
        "key",
        off::OFFCPU_START_KEY,
        off::OFFCPU_KEY_SIZE,
    ),
    ("offcpu_key", "tgid", off::OFFCPU_KEY_TGID, 4),
    ("offcpu_key", "user_stack", off::OFFCPU_KEY_USER_STACK, 4),
    (
        "offcpu_key",
        "kernel_stack",
        off::OFFCPU_KEY_KERNEL_STACK,
        4,
    ),
    ("offcpu_key", "comm", off::OFFCPU_KEY_COMM, 16),
    ("offcpu_val", "ns", off::OFFCPU_VAL_NS, 8),
    ("offcpu_val", "count", off::OFFCPU_VAL_COUNT, 8),
];

#[cfg(test)]
const SHARED_SIZES: &[(&str, usize)] = &[
    ("settings", off::SETTINGS_SIZE),
    ("flow_key", off::FLOW_KEY_SIZE),
    ("retrans_val", off::RETRANS_VAL_SIZE),
    ("runq_val", off::RUNQ_VAL_SIZE),
    ("blk_key", off::BLK_KEY_SIZE),
    ("blk_val", off::BLK_VAL_SIZE),
    ("event", off::EVENT_SIZE),
    ("offcpu_start", off::OFFCPU_START_SIZE),
    ("offcpu_key", off::OFFCPU_KEY_SIZE),
    ("offcpu_val", off::OFFCPU_VAL_SIZE),
];

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = include_str!("../bpf/shared.h");

    fn c_define(name: &str) -> u64 {
        HEADER
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("#define") && it.next() == Some(name))
                    .then(|| it.next().and_then(|v| v.parse().ok()))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("#define {name} not found in shared.h"))
    }

    #[test]
    fn offsets_match_the_c_header() {
        let mut layout = Vec::new();
        let mut sizes = Vec::new();
        for line in HEADER.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("LAYOUT(") {
                let a: Vec<&str> = rest
                    .trim_end_matches(')')
                    .split(',')
                    .map(str::trim)
                    .collect();
                layout.push((
                    a[0].to_string(),
                    a[1].to_string(),
                    a[2].parse::<usize>().unwrap(),
                    a[3].parse::<usize>().unwrap(),
                ));
            } else if let Some(rest) = line.strip_prefix("SIZE(") {
                let a: Vec<&str> = rest
                    .trim_end_matches(')')
                    .split(',')
                    .map(str::trim)
                    .collect();
                sizes.push((a[0].to_string(), a[1].parse::<usize>().unwrap()));
            }
        }
        let mut want: Vec<_> = SHARED_LAYOUT
            .iter()
            .map(|(s, f, o, z)| (s.to_string(), f.to_string(), *o, *z))
            .collect();
        layout.sort();
        want.sort();
        assert_eq!(layout, want);
        let mut want_sizes: Vec<_> = SHARED_SIZES
            .iter()
            .map(|(s, z)| (s.to_string(), *z))
            .collect();
        sizes.sort();
        want_sizes.sort();
        assert_eq!(sizes, want_sizes);
        assert_eq!(c_define("MAX_COMPONENTS"), u64::from(MAX_COMPONENTS));
        assert_eq!(c_define("HIST_SLOTS"), HIST_SLOTS as u64);
        assert_eq!(c_define("CTR_RINGBUF_FULL"), u64::from(CTR_RINGBUF_FULL));
        assert_eq!(c_define("CTR_MAP_FULL"), u64::from(CTR_MAP_FULL));
        assert_eq!(c_define("EV_OOM"), 7);
        assert_eq!(c_define("OFFCPU_STACK_DEPTH"), OFFCPU_STACK_DEPTH as u64);
        assert!(
            HEADER.contains(&format!("#define OFFCPU_NO_STACK {OFFCPU_NO_STACK}\n")),
            "OFFCPU_NO_STACK differs from shared.h"
        );
    }

    #[test]
    fn decodes_a_connect_failure_event() {
        let mut b = [0u8; off::EVENT_SIZE];
        b[off::EV_TS_NS..off::EV_TS_NS + 8].copy_from_slice(&123u64.to_le_bytes());
        b[off::EV_DURATION_NS..off::EV_DURATION_NS + 8]
            .copy_from_slice(&3_000_000_000u64.to_le_bytes());
        b[off::EV_KIND..off::EV_KIND + 4].copy_from_slice(&3u32.to_le_bytes());
        b[off::EV_TGID..off::EV_TGID + 4].copy_from_slice(&42u32.to_le_bytes());
        b[off::EV_COMM..off::EV_COMM + 4].copy_from_slice(b"curl");
        b[off::EV_SADDR..off::EV_SADDR + 4].copy_from_slice(&[198, 18, 0, 241]);
        b[off::EV_DADDR..off::EV_DADDR + 4].copy_from_slice(&[198, 18, 0, 242]);
        b[off::EV_SPORT..off::EV_SPORT + 2].copy_from_slice(&40000u16.to_le_bytes());
        b[off::EV_DPORT..off::EV_DPORT + 2].copy_from_slice(&5432u16.to_le_bytes());
        b[off::EV_FAMILY..off::EV_FAMILY + 2].copy_from_slice(&AF_INET.to_le_bytes());
        b[off::EV_OLDSTATE] = 2;
        b[off::EV_NEWSTATE] = 7;
        let e = RawEvent::decode(&b).unwrap();
        assert_eq!(e.kind, EventKind::ConnectFailed);
        assert_eq!(e.tgid, 42);
        assert_eq!(e.comm, "curl");
        assert_eq!(endpoint(e.dst, e.dport), "198.18.0.242:5432");
        assert_eq!(endpoint(e.src, e.sport), "198.18.0.241:40000");
        assert_eq!(tcp_state_name(e.oldstate), "SYN_SENT");
        assert!(RawEvent::decode(&b[..10]).is_err());
        b[off::EV_KIND] = 99;
        assert_eq!(RawEvent::decode(&b), Err(EventError::UnknownKind(99)));
    }

    #[test]
    fn v4_mapped_v6_addresses_show_as_v4() {
        let mut b: FlowKeyBytes = [0; off::FLOW_KEY_SIZE];
        b[off::FLOW_FAMILY..off::FLOW_FAMILY + 2].copy_from_slice(&AF_INET6.to_le_bytes());
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..16].copy_from_slice(&[127, 0, 0, 1]);
        let k = FlowKey::decode(&b);
        assert_eq!(endpoint(k.src, 80), "127.0.0.1:80");
        assert_eq!(endpoint(k.dst, 1), "[::]:1");
    }

    #[test]
    fn histogram_helpers() {
        let mut h = Log2Hist::default();
        h.slots[10] = 3; // ~1 µs
        h.slots[24] = 1; // ~16 ms
        h.count = 4;
        assert_eq!(h.count_at_least(1_000_000), 1);
        assert_eq!(h.quantile_slot(0.5), Some(10));
        assert_eq!(h.quantile_slot(1.0), Some(24));
        let d = h.since(&Log2Hist::default());
        assert_eq!(d, h);
    }
}
