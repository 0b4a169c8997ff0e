//! The agent's numbers and their Prometheus text exposition.
//!
//! Kernel-side histograms are log2 over nanoseconds, so they are rendered here directly with
//! power-of-two buckets (in seconds) rather than re-observed into a client library: each probe
//! gets the bucket range that fits it (microseconds for the run queue, up to minutes for the
//! kernel's connect timeout). Every label set is bounded ([`MAX_SERIES`]); beyond that, new
//! series are folded into one with `other` labels.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::kernel::ProbeStatus;
use crate::wire::{BlkVal, HIST_SLOTS, Log2Hist, RunqVal};

/// Most label sets one metric family keeps.
pub const MAX_SERIES: usize = 4096;

/// Slot of a nanosecond value, as the kernel computes it.
pub fn log2_slot(ns: u64) -> usize {
    let slot = if ns == 0 {
        0
    } else {
        63 - ns.leading_zeros() as usize
    };
    slot.min(HIST_SLOTS - 1)
}

impl Log2Hist {
    /// Adds one observation.
    pub fn record(&mut self, ns: u64) {
        self.slots[log2_slot(ns)] += 1;
        self.sum_ns += ns;
        self.count += 1;
    }
}

/// A counter family keyed by its label values.
#[derive(Debug, Clone)]
pub struct CounterVec<K: Ord> {
    pub values: BTreeMap<K, u64>,
}

impl<K: Ord> Default for CounterVec<K> {
    fn default() -> Self {
        CounterVec {
            values: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> CounterVec<K> {
    /// Adds `n` to `key`, or to `overflow` when the family is full.
    pub fn add(&mut self, key: K, n: u64, overflow: impl FnOnce() -> K) {
        let key = if self.values.len() >= MAX_SERIES && !self.values.contains_key(&key) {
            overflow()
        } else {
            key
        };
        *self.values.entry(key).or_insert(0) += n;
    }

    pub fn get(&self, key: &K) -> u64 {
        self.values.get(key).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.values.values().sum()
    }
}

/// `probes_tcp_retransmits_total` labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetransLabels {
    pub component: String,
    pub src: String,
    pub dst: String,
    pub state: &'static str,
}

/// Everything `/metrics` shows, updated by the agent's poll and event handling.
#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    pub retransmits: CounterVec<RetransLabels>,
    /// (component, dst)
    pub connect_attempts: CounterVec<(String, String)>,
    pub connect_failures: CounterVec<(String, String)>,
    pub resets: CounterVec<(String, String)>,
    /// (component, outcome = established | failed)
    pub connect_duration: BTreeMap<(String, &'static str), Log2Hist>,
    pub connection_lifetime: BTreeMap<String, Log2Hist>,
    /// Cumulative, as read from the kernel, by component.
    pub runqueue: BTreeMap<String, RunqVal>,
    /// Cumulative, as read from the kernel, by (device, op).
    pub block_io: BTreeMap<(String, &'static str), BlkVal>,
    pub oom_kills: CounterVec<String>,
    /// (program, run time ns, runs), when BPF statistics are on.
    pub program_stats: Vec<(String, u64, u64)>,
    /// (program, runs the kernel skipped), for every loaded program.
    pub program_misses: Vec<(String, u64)>,
    pub probes: Vec<ProbeStatus>,
    pub ringbuf_full: u64,
    pub map_full: u64,
    pub undecodable_events: u64,
    pub events_dropped: u64,
    pub lab_components: u64,
    pub tracked_tasks: u64,
    pub track_all: bool,
}

/// Bucket range (first and last slot rendered) per histogram family.
const RUNQ_SLOTS: (usize, usize) = (9, 36); // 1 µs .. 137 s
const BLOCK_SLOTS: (usize, usize) = (11, 35); // 4 µs .. 69 s
const CONNECT_SLOTS: (usize, usize) = (14, 38); // 33 µs .. 550 s (covers a 127 s SYN timeout)
const LIFETIME_SLOTS: (usize, usize) = (16, 38); // 131 µs .. 550 s

/// Appends `v` escaped as a label value.
fn escape_into(out: &mut String, v: &str) {
    if !v.contains(['\\', '"', '\n']) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends `k="v",` for each pair: the inside of a label set, each pair followed by a comma.
fn label_pairs(out: &mut String, pairs: &[(&str, &str)]) {
    for (k, v) in pairs {
        out.push_str(k);
        out.push_str("=\"");
        escape_into(out, v);
        out.push_str("\",");
    }
}

/// `{k="v",...}`, or nothing for no labels.
#[cfg(test)]
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    write_labels(&mut out, pairs);
    out
}

fn write_labels(out: &mut String, pairs: &[(&str, &str)]) {
    if pairs.is_empty() {
        return;
    }
    out.push('{');
    label_pairs(out, pairs);
    out.pop();
    out.push('}');
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, pairs: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    write_labels(out, pairs);
    let _ = writeln!(out, " {value}");
}

/// The `le` of log2 slot `k`: 2^(k+1) ns in seconds, formatted once per process.
fn le_label(k: usize) -> &'static str {
    static LE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    &LE.get_or_init(|| {
        (0..HIST_SLOTS)
            .map(|k| format!("{}", (1u64 << (k + 1)) as f64 / 1e9))
            .collect()
    })[k]
}

/// Renders one log2 histogram series with buckets `le = 2^(k+1) ns` for k in `range`. Written
/// straight into `out` (the labels once per series): Prometheus scrapes the agent every second.
fn histogram(
    out: &mut String,
    name: &str,
    pairs: &[(&str, &str)],
    h: &Log2Hist,
    range: (usize, usize),
) {
    let mut prefix = String::new();
    label_pairs(&mut prefix, pairs);
    let mut cumulative: u64 = 0;
    let total: u64 = h.slots.iter().sum();
    for k in 0..HIST_SLOTS.min(range.1 + 1) {
        cumulative += h.slots[k];
        if k < range.0 {
            continue;
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{prefix}le=\"{}\"}} {cumulative}",
            le_label(k)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{prefix}le=\"+Inf\"}} {total}");
    out.push_str(name);
    out.push_str("_sum");
    write_labels(out, pairs);
    let _ = writeln!(out, " {}", h.sum_ns as f64 / 1e9);
    out.push_str(name);
    out.push_str("_count");
    write_labels(out, pairs);
    let _ = writeln!(out, " {total}");
}

impl Aggregates {
    /// The Prometheus text exposition of every probe metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(128 * 1024);

        let name = "probes_tcp_retransmits_total";
        header(
            &mut out,
            name,
            "counter",
            "TCP segments retransmitted, by local (src) and remote (dst) endpoint and TCP state.",
        );
        for (l, v) in &self.retransmits.values {
            sample(
                &mut out,
                name,
                &[
                    ("component", &l.component),
                    ("src", &l.src),
                    ("dst", &l.dst),
                    ("state", l.state),
                ],
                v,
            );
        }

        for (name, help, family) in [
            (
                "probes_tcp_connect_attempts_total",
                "Active TCP opens (CLOSE -> SYN_SENT), by connecting component and destination.",
                &self.connect_attempts,
            ),
            (
                "probes_tcp_connect_failures_total",
                "Active TCP opens that never established (SYN_SENT -> CLOSE): refused, timed out, or abandoned.",
                &self.connect_failures,
            ),
            (
                "probes_tcp_resets_total",
                "TCP resets received from or sent to dst, by local component.",
                &self.resets,
            ),
        ] {
            header(&mut out, name, "counter", help);
            for ((c, d), v) in &family.values {
                sample(&mut out, name, &[("component", c), ("dst", d)], v);
            }
        }

        let name = "probes_tcp_connect_duration_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time from SYN_SENT to ESTABLISHED (outcome=established) or to CLOSE (outcome=failed: the kernel's connect timeout, a refusal, or the application giving up).",
        );
        for ((c, o), h) in &self.connect_duration {
            histogram(
                &mut out,
                name,
                &[("component", c), ("outcome", o)],
                h,
                CONNECT_SLOTS,
            );
        }

        let name = "probes_tcp_connection_lifetime_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Lifetime of TCP connections from ESTABLISHED to CLOSE.",
        );
        for (c, h) in &self.connection_lifetime {
            histogram(&mut out, name, &[("component", c)], h, LIFETIME_SLOTS);
        }

        let name = "probes_runqueue_latency_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Time tasks spent runnable but waiting for a CPU (wakeup or preemption to running), per component.",
        );
        for (c, r) in &self.runqueue {
            histogram(&mut out, name, &[("component", c)], &r.hist, RUNQ_SLOTS);
        }
        let name = "probes_context_switches_total";
        header(
            &mut out,
            name,
            "counter",
            "Context switches away from the component's tasks: voluntary (blocked) or involuntary (preempted, throttled).",
        );
        for (c, r) in &self.runqueue {
            sample(
                &mut out,
                name,
                &[("component", c), ("kind", "voluntary")],
                r.voluntary(),
            );
            sample(
                &mut out,
                name,
                &[("component", c), ("kind", "involuntary")],
                r.involuntary,
            );
        }

        let name = "probes_block_io_latency_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Block request latency from issue to the device to completion, per device and operation.",
        );
        for ((d, o), b) in &self.block_io {
            histogram(
                &mut out,
                name,
                &[("device", d), ("op", o)],
                &b.hist,
                BLOCK_SLOTS,
            );
        }
        let name = "probes_block_io_bytes_total";
        header(
            &mut out,
            name,
            "counter",
            "Bytes of completed block requests, per device and operation.",
        );
        for ((d, o), b) in &self.block_io {
            sample(&mut out, name, &[("device", d), ("op", o)], b.bytes);
        }
        let name = "probes_block_io_errors_total";
        header(
            &mut out,
            name,
            "counter",
            "Block requests completed with an error.",
        );
        for ((d, o), b) in &self.block_io {
            sample(&mut out, name, &[("device", d), ("op", o)], b.errors);
        }

        let name = "probes_oom_kills_total";
        header(
            &mut out,
            name,
            "counter",
            "Processes chosen by the OOM killer (oom:mark_victim), by component.",
        );
        for (c, v) in &self.oom_kills.values {
            sample(&mut out, name, &[("component", c)], v);
        }

        if !self.program_stats.is_empty() {
            let name = "probes_program_run_seconds_total";
            header(
                &mut out,
                name,
                "counter",
                "CPU time spent in each eBPF program (kernel.bpf_stats_enabled).",
            );
            for (p, ns, _) in &self.program_stats {
                sample(&mut out, name, &[("program", p)], *ns as f64 / 1e9);
            }
            let name = "probes_program_runs_total";
            header(
                &mut out,
                name,
                "counter",
                "Runs of each eBPF program (kernel.bpf_stats_enabled).",
            );
            for (p, _, runs) in &self.program_stats {
                sample(&mut out, name, &[("program", p)], runs);
            }
        }

        if !self.program_misses.is_empty() {
            let name = "probes_program_misses_total";
            header(
                &mut out,
                name,
                "counter",
                "Runs of each eBPF program the kernel skipped because another eBPF program held the CPU (events the probe did not see).",
            );
            for (p, misses) in &self.program_misses {
                sample(&mut out, name, &[("program", p)], misses);
            }
        }

        let name = "probes_probe_attached";
        header(
            &mut out,
            name,
            "gauge",
            "1 when the probe's programs are attached, 0 when it could not be (see probes check).",
        );
        for s in &self.probes {
            sample(&mut out, name, &[("probe", s.probe)], u8::from(s.attached));
        }
        for (name, kind, help, v) in [
            (
                "probes_ringbuf_full_total",
                "counter",
                "Kernel events dropped because the ring buffer was full.",
                self.ringbuf_full,
            ),
            (
                "probes_map_full_total",
                "counter",
                "Kernel updates dropped because a map was full.",
                self.map_full,
            ),
            (
                "probes_undecodable_events_total",
                "counter",
                "Ring buffer records the agent could not decode.",
                self.undecodable_events,
            ),
            (
                "probes_events_dropped_total",
                "counter",
                "Events pushed out of the /events ring.",
                self.events_dropped,
            ),
            (
                "probes_lab_components",
                "gauge",
                "Components in the lab state file (0: no lab state, everything is unknown).",
                self.lab_components,
            ),
            (
                "probes_tracked_tasks",
                "gauge",
                "Threads the run-queue probe filters on (lab tasks).",
                self.tracked_tasks,
            ),
            (
                "probes_track_all_tasks",
                "gauge",
                "1 when the run-queue probe tracks every task (no lab state).",
                u64::from(self.track_all),
            ),
        ] {
            header(&mut out, name, kind, help);
            sample(&mut out, name, &[], v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_kernel() {
        assert_eq!(log2_slot(0), 0);
        assert_eq!(log2_slot(1), 0);
        assert_eq!(log2_slot(1023), 9);
        assert_eq!(log2_slot(1024), 10);
        assert_eq!(log2_slot(u64::MAX), HIST_SLOTS - 1);
    }

    #[test]
    fn renders_histograms_with_cumulative_log2_buckets() {
        let mut a = Aggregates::default();
        let mut h = Log2Hist::default();
        h.record(1_500); // slot 10 -> le 2.048 µs
        h.record(3_000_000); // slot 21 -> le 4.194 ms
        a.runqueue.insert(
            "matching-engine".into(),
            RunqVal {
                hist: h,
                voluntary: 5,
                involuntary: 2,
                switch_ins: 0,
            },
        );
        // The tp_btf program's way: 9 switch-ins, 2 of them after an involuntary switch.
        a.runqueue.insert(
            "persistence".into(),
            RunqVal {
                hist: Log2Hist::default(),
                voluntary: 0,
                involuntary: 2,
                switch_ins: 9,
            },
        );
        let text = a.render();
        assert!(
            text.contains("# TYPE probes_runqueue_latency_seconds histogram"),
            "{text}"
        );
        assert!(text.contains("probes_runqueue_latency_seconds_bucket{component=\"matching-engine\",le=\"0.000001024\"} 0"), "{text}");
        assert!(text.contains("probes_runqueue_latency_seconds_bucket{component=\"matching-engine\",le=\"0.000002048\"} 1"), "{text}");
        assert!(text.contains("probes_runqueue_latency_seconds_bucket{component=\"matching-engine\",le=\"0.004194304\"} 2"), "{text}");
        assert!(text.contains("probes_runqueue_latency_seconds_bucket{component=\"matching-engine\",le=\"+Inf\"} 2"), "{text}");
        assert!(
            text.contains("probes_runqueue_latency_seconds_count{component=\"matching-engine\"} 2"),
            "{text}"
        );
        assert!(text.contains("probes_context_switches_total{component=\"matching-engine\",kind=\"involuntary\"} 2"), "{text}");
        assert!(
            text.contains(
                "probes_context_switches_total{component=\"matching-engine\",kind=\"voluntary\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "probes_context_switches_total{component=\"persistence\",kind=\"voluntary\"} 7"
            ),
            "{text}"
        );
        // Program statistics only appear when enabled.
        assert!(!text.contains("probes_program_runs_total"));
    }

    #[test]
    fn families_are_bounded_and_labels_escaped() {
        let mut c: CounterVec<(String, String)> = CounterVec::default();
        for i in 0..MAX_SERIES + 10 {
            c.add(("x".into(), format!("d{i}")), 1, || {
                ("other".into(), "other".into())
            });
        }
        assert_eq!(c.values.len(), MAX_SERIES + 1);
        assert_eq!(c.get(&("other".into(), "other".into())), 10);
        assert_eq!(labels(&[("a", "q\"\\\n")]), "{a=\"q\\\"\\\\\\n\"}");
    }
}
