//! Counting and summarising a run: HDR histograms overall and per second, outcome counts,
//! the live progress bar and the JSON summary (`docs/loadgen.md` documents its schema).

use crate::ledger::{LedgerEntry, LedgerHeader, Outcome};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Schema name and version of the summary JSON.
pub const SUMMARY_SCHEMA: &str = "loadgen.summary/v1";

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits; the bounds are constants that are valid.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: (h.mean() / 10.0).round() / 100.0,
        }
    }
}

/// One second of the run (by intended send time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecondStats {
    pub second: usize,
    pub sent: u64,
    pub accepted: u64,
    pub queued: u64,
    pub rejected: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The JSON summary of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub schema: String,
    pub target: String,
    pub seed: u64,
    pub client_id_prefix: String,
    pub rate_per_sec: f64,
    pub duration_s: f64,
    /// Orders the open model scheduled.
    pub planned: u64,
    /// Requests actually sent.
    pub sent: u64,
    /// Scheduled but not sent because `max_in_flight` requests were outstanding.
    pub dropped: u64,
    /// Sent more than 10 ms after their intended time (the generator fell behind).
    pub late_sends: u64,
    pub achieved_rate_per_sec: f64,
    pub interrupted: bool,
    pub outcomes: BTreeMap<String, u64>,
    pub http_status: BTreeMap<String, u64>,
    /// Every answered request (and timeouts), from intended send time.
    pub latency: Percentiles,
    /// Acknowledged orders only (201/202), from intended send time.
    pub ack_latency: Percentiles,
    pub error_rate: f64,
    pub per_second: Vec<SecondStats>,
    pub ledger: Option<String>,
}

/// A live view for the progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub done: u64,
    pub sent: u64,
    pub errors: u64,
    pub queued: u64,
    pub p99_ms: f64,
}

#[derive(Debug)]
struct Second {
    stats: SecondStats,
    hist: Histogram<u64>,
}

/// Accumulates a run's measurements.
#[derive(Debug)]
pub struct Recorder {
    all: Histogram<u64>,
    ack: Histogram<u64>,
    /// The last few seconds, for the progress bar's p99.
    recent: Histogram<u64>,
    recent_count: u64,
    seconds: Vec<Second>,
    outcomes: BTreeMap<Outcome, u64>,
    http: BTreeMap<u16, u64>,
    sent: u64,
    late: u64,
    done: u64,
}

impl Recorder {
    pub fn new(expected_seconds: usize) -> Recorder {
        Recorder {
            all: histogram(),
            ack: histogram(),
            recent: histogram(),
            recent_count: 0,
            seconds: Vec::with_capacity(expected_seconds),
            outcomes: BTreeMap::new(),
            http: BTreeMap::new(),
            sent: 0,
            late: 0,
            done: 0,
        }
    }

    pub fn sent(&mut self, late: bool) {
        self.sent += 1;
        self.late += u64::from(late);
    }

    pub fn record(&mut self, e: &LedgerEntry, second: usize) {
        self.done += 1;
        *self.outcomes.entry(e.outcome).or_default() += 1;
        if let Some(code) = e.http_status {
            *self.http.entry(code).or_default() += 1;
        }
        while self.seconds.len() <= second {
            let n = self.seconds.len();
            self.seconds.push(Second {
                stats: SecondStats {
                    second: n,
                    ..SecondStats::default()
                },
                hist: histogram(),
            });
        }
        let s = &mut self.seconds[second];
        if e.outcome != Outcome::Dropped {
            s.stats.sent += 1;
        }
        match e.outcome {
            Outcome::Accepted => s.stats.accepted += 1,
            Outcome::Queued => s.stats.queued += 1,
            Outcome::Rejected => s.stats.rejected += 1,
            _ => s.stats.errors += 1,
        }
        let answered = e.http_status.is_some() || e.outcome == Outcome::Timeout;
        if answered {
            let us = e.latency_us.max(1);
            self.all.saturating_record(us);
            s.hist.saturating_record(us);
            if e.outcome.acknowledged() {
                self.ack.saturating_record(us);
            }
            if self.recent_count >= 5_000 {
                self.recent.reset();
                self.recent_count = 0;
            }
            self.recent.saturating_record(us);
            self.recent_count += 1;
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let count = |o| self.outcomes.get(&o).copied().unwrap_or(0);
        Snapshot {
            done: self.done,
            sent: self.sent,
            errors: self
                .outcomes
                .iter()
                .filter(|(o, _)| o.is_error())
                .map(|(_, n)| n)
                .sum(),
            queued: count(Outcome::Queued),
            p99_ms: if self.recent.is_empty() {
                0.0
            } else {
                self.recent.value_at_quantile(0.99) as f64 / 1000.0
            },
        }
    }

    pub fn summary(
        &self,
        header: &LedgerHeader,
        planned: u64,
        elapsed: Duration,
        interrupted: bool,
        ledger: Option<&Path>,
    ) -> Summary {
        let errors: u64 = self
            .outcomes
            .iter()
            .filter(|(o, _)| o.is_error())
            .map(|(_, n)| n)
            .sum();
        let total: u64 = self.outcomes.values().sum();
        Summary {
            schema: SUMMARY_SCHEMA.into(),
            target: header.target.clone(),
            seed: header.seed,
            client_id_prefix: header.client_id_prefix.clone(),
            rate_per_sec: header.rate_per_sec,
            duration_s: elapsed.as_secs_f64(),
            planned,
            sent: self.sent,
            dropped: self.outcomes.get(&Outcome::Dropped).copied().unwrap_or(0),
            late_sends: self.late,
            achieved_rate_per_sec: if elapsed.is_zero() {
                0.0
            } else {
                (self.sent as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0
            },
            interrupted,
            outcomes: self
                .outcomes
                .iter()
                .map(|(o, n)| (o.as_str().to_owned(), *n))
                .collect(),
            http_status: self.http.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            latency: Percentiles::of(&self.all),
            ack_latency: Percentiles::of(&self.ack),
            error_rate: if total == 0 {
                0.0
            } else {
                errors as f64 / total as f64
            },
            per_second: self
                .seconds
                .iter()
                .map(|s| {
                    let p = Percentiles::of(&s.hist);
                    SecondStats {
                        p50_ms: p.p50_ms,
                        p99_ms: p.p99_ms,
                        max_ms: p.max_ms,
                        ..s.stats.clone()
                    }
                })
                .collect(),
            ledger: ledger.map(|p| p.display().to_string()),
        }
    }
}

/// The live progress bar: elapsed time, current rate, p99 and errors, refreshed 4 times a
/// second from a snapshot function. Hidden when stderr is not a terminal or when disabled.
pub struct Progress {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
}

impl Progress {
    pub fn start(
        enabled: bool,
        planned: u64,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> Progress {
        let bar = if enabled {
            ProgressBar::with_draw_target(Some(planned), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bar.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = Snapshot::default();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = snapshot();
                let rate = (now.sent - last.sent) as f64 * 4.0;
                b.set_position(now.done);
                b.set_message(format!(
                    "{rate:>7.0}/s  p99 {:>8.2} ms  errors {}  queued {}",
                    now.p99_ms, now.errors, now.queued
                ));
                last = now;
            }
        });
        Progress { bar, stop }
    }

    pub fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.bar.finish_and_clear();
    }
}

impl Summary {
    /// The final table, for people.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let p = |name: &str, x: &Percentiles| {
            format!(
                "  {name:<12} p50 {:>9.3}  p90 {:>9.3}  p99 {:>9.3}  p99.9 {:>9.3}  max {:>9.3} ms  (n={})\n",
                x.p50_ms, x.p90_ms, x.p99_ms, x.p999_ms, x.max_ms, x.count
            )
        };
        t.push_str(&format!(
            "loadgen: {} orders planned at {}/s for {:.1}s against {}\n",
            self.planned, self.rate_per_sec, self.duration_s, self.target
        ));
        t.push_str(&format!(
            "  sent {}  achieved {:.1}/s  late sends {}  dropped {}{}\n",
            self.sent,
            self.achieved_rate_per_sec,
            self.late_sends,
            self.dropped,
            if self.interrupted {
                "  (interrupted)"
            } else {
                ""
            }
        ));
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        t.push_str(&format!("  outcomes: {}\n", outcomes.join(", ")));
        t.push_str(&p("latency", &self.latency));
        t.push_str(&p("ack latency", &self.ack_latency));
        t.push_str(&format!("  error rate {:.4}%\n", self.error_rate * 100.0));
        if let Some(l) = &self.ledger {
            t.push_str(&format!("  ledger: {l}\n"));
        }
        t
    }
}
