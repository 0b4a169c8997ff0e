//! The process-wide Prometheus recorder, with real histogram buckets (the exporter would
//! otherwise render summaries), and the standard `process_*` metrics read from `/proc/self`.
//!
//! Naming follows Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` on
//! counters. Histograms are bucketed by suffix: `_seconds` for latencies, `_bytes` for sizes,
//! `_batch_size` for counts per batch. Every metric carries a help text (`promtool check
//! metrics` refuses a family without one): kit describes the families it owns here
//! (`http_server_*`, `dependency_*`, `spool_*`), each service describes its own.
//!
//! Outbound calls of every service (HTTP to another service, AMQP publishes, SQL
//! transactions) go through [`observe_dependency_call`], so one family,
//! `dependency_request_duration_seconds{dependency,operation,result}`, gives rate, errors and
//! duration of every edge of the system.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

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
            describe_shared();
            metrics::gauge!(crate::debug::SAMPLING_GAUGE).set(0.0);
            handle
        })
        .clone()
}

/// `result` of a successful outbound call in `dependency_request_duration_seconds`.
pub const RESULT_OK: &str = "ok";

/// Records one outbound call: `dependency_request_duration_seconds{dependency,operation,result}`
/// (a histogram, so its `_count` is the call rate and `_count{result!="ok"}` the error rate).
/// `result` is [`RESULT_OK`] or a short, bounded error kind (`timeout`, `connect`,
/// `server_error`, `transient`, ...); `operation` is a route or verb, never an id.
pub fn observe_dependency_call(
    dependency: &'static str,
    operation: &'static str,
    result: &'static str,
    elapsed: Duration,
) {
    metrics::histogram!(
        "dependency_request_duration_seconds",
        "dependency" => dependency,
        "operation" => operation,
        "result" => result
    )
    .record(elapsed.as_secs_f64());
}

/// Help texts of the families kit owns. Descriptions only show for families that have
/// samples; the owners create those (at 0 where a zero matters for `rate()`).
fn describe_shared() {
    describe_counter!(
        "http_server_requests_total",
        Unit::Count,
        "HTTP requests answered, by route template, method and status code."
    );
    describe_histogram!(
        "http_server_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by route template and method."
    );
    describe_gauge!(
        "dependency_up",
        "1 while the dependency is reachable (last call or session succeeded), else 0."
    );
    describe_counter!(
        "dependency_reconnects_total",
        Unit::Count,
        "Times a dependency came back after being lost."
    );
    describe_histogram!(
        "dependency_request_duration_seconds",
        Unit::Seconds,
        "Duration of outbound calls (HTTP, AMQP publish with confirm, SQL transaction), by dependency, operation and result."
    );
    describe_gauge!(
        crate::debug::SAMPLING_GAUGE,
        "1 while the CPU profiler samples this process (a profile runs, or it lingers for the next one), else 0."
    );
    describe_gauge!(
        "spool_entries",
        "Entries waiting in the durable retry queue."
    );
    describe_gauge!(
        "spool_bytes",
        Unit::Bytes,
        "Payload bytes waiting in the durable retry queue."
    );
    describe_gauge!(
        "spool_limit_entries",
        "Most entries the retry queue holds before it sheds load."
    );
    describe_gauge!(
        "spool_limit_bytes",
        Unit::Bytes,
        "Most payload bytes the retry queue holds before it sheds load."
    );
    describe_counter!(
        "spool_appends_total",
        Unit::Count,
        "Entries appended (fsync'ed) to the retry queue."
    );
    describe_counter!(
        "spool_delivered_total",
        Unit::Count,
        "Entries delivered and removed from the retry queue."
    );
    describe_counter!(
        "spool_delivery_failures_total",
        Unit::Count,
        "Failed delivery attempts of queued entries (the dependency is still away)."
    );
    describe_counter!(
        "spool_full_total",
        Unit::Count,
        "Appends refused because the retry queue was full (load shed)."
    );
    describe_counter!(
        "spool_dead_letters_total",
        Unit::Count,
        "Queued entries refused for good by their destination, moved to the dead-letter file."
    );
    describe_histogram!(
        "spool_fsync_seconds",
        Unit::Seconds,
        "Time to write and fsync one group of retry-queue appends."
    );
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
        metrics::describe_histogram!("kit_test_latency_seconds", "A test latency.");
        metrics::histogram!("kit_test_latency_seconds").record(0.003);
        let text = render(&h);
        assert!(
            text.contains("kit_test_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        assert!(text.contains("process_resident_memory_bytes "));
    }

    /// `promtool check metrics` on what kit renders: help texts, names, units, histogram
    /// layout. Other tests of this crate add their families to the same recorder meanwhile;
    /// they must pass too.
    #[test]
    fn shared_families_pass_promtool_check_metrics() {
        let h = install();
        metrics::counter!("http_server_requests_total", "route" => "/v1/x", "method" => "GET", "status" => "200")
            .increment(1);
        metrics::histogram!("http_server_request_duration_seconds", "route" => "/v1/x", "method" => "GET")
            .record(0.001);
        observe_dependency_call(
            "engine",
            "POST /v1/orders",
            RESULT_OK,
            Duration::from_millis(2),
        );
        observe_dependency_call(
            "engine",
            "POST /v1/orders",
            "timeout",
            Duration::from_secs(2),
        );
        let r = crate::health::Readiness::new(&["kit-test-dependency"]);
        r.set("kit-test-dependency", true);
        r.set("kit-test-dependency", false);
        r.set("kit-test-dependency", true);
        let text = render(&h);
        assert!(
            text.contains("dependency_reconnects_total{dependency=\"kit-test-dependency\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dependency_request_duration_seconds_bucket{dependency=\"engine\",operation=\"POST /v1/orders\",result=\"timeout\",le=\"2.5\"} 1"),
            "{text}"
        );
        let Some(promtool) = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        }) else {
            println!(
                "SKIPPED promtool check metrics: promtool not found (install prometheus; `make test` does)"
            );
            return;
        };
        use std::io::Write as _;
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(text.as_bytes())
            .expect("writing to promtool");
        let out = child.wait_with_output().expect("promtool finishes");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
