//! The process-wide Prometheus recorder, with real histogram buckets (the exporter would
//! otherwise render summaries), and the standard `process_*` metrics read from `/proc/self`.
//!
//! Naming follows Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` on
//! counters. Histograms are bucketed by suffix: `_seconds` for latencies, `_bytes` for sizes,
//! `_batch_size` for counts per batch.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::sync::OnceLock;

/// Latency buckets: 50 µs to 30 s, dense where the exchange lives (sub-millisecond to tens of
/// milliseconds) and wide enough to show a 25 s kernel connect timeout.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];
/// Size buckets: 64 B to 64 MiB by powers of four.
pub const BYTES_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// Batch-size buckets: 1 to 5,000 items.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are non-empty constants");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first, which nothing here does.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Renders every metric plus the `process_*` family, in the Prometheus text format.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    render_process(&mut out);
    out
}

/// Appends `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_threads` and
/// `process_start_time_seconds`, as the Prometheus client libraries name them.
fn render_process(out: &mut String) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // With `rest` starting at field 3 (state): utime=14, stime=15, threads=20, starttime=22,
    // vsize=23, rss=24 in proc(5) numbering.
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let ticks = clock_ticks_per_second();
    let page = 4096.0;
    let cpu = (field(14) + field(15)) / ticks;
    let boot = boot_time_seconds();
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let mut line = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    line(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent in seconds.",
        cpu,
    );
    line(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        field(24) * page,
    );
    line(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        field(23),
    );
    line(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        fds as f64,
    );
    line(
        "process_threads",
        "gauge",
        "Number of OS threads.",
        field(20),
    );
    if let Some(boot) = boot {
        line(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + field(22) / ticks,
        );
    }
}

fn clock_ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux architecture this lab runs on.
    100.0
}

fn boot_time_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_have_buckets_and_process_metrics_render() {
        let h = install();
        metrics::histogram!("kit_test_latency_seconds").record(0.003);
        let text = render(&h);
        assert!(
            text.contains("kit_test_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        assert!(text.contains("process_resident_memory_bytes "));
    }
}
