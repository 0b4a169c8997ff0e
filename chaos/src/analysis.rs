//! From what the client saw (the loadgen ledger) and what the monitor sampled, the numbers of
//! an experiment: latency before / during / after, time to detect, time to first success, time
//! to full recovery, peak queue depths, and the per-second series the charts draw.

use crate::monitor::Sample;
use loadgen::ledger::{LedgerEntry, Outcome};
use serde::{Deserialize, Serialize};

/// Phase boundaries (unix ms) the analysis needs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Marks {
    pub load_start_ms: u64,
    pub inject_ms: u64,
    /// When the last fault stopped acting (healed, or an instantaneous fault such as a
    /// SIGKILL: the injection itself; an OOM squeeze: the kill).
    pub fault_end_ms: u64,
    /// When the hold phase ended (the heal): the end of the "during" window.
    pub heal_ms: u64,
    pub load_end_ms: u64,
}

/// Latency and outcomes of the orders sent in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub orders: u64,
    pub accepted: u64,
    pub queued: u64,
    pub refused: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One second of the run, for the charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the load started.
    pub t_s: f64,
    pub sent: u64,
    pub accepted: u64,
    pub queued: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One monitor sample, for the charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueuePoint {
    pub t_s: f64,
    pub spool: Option<f64>,
    pub outbox_lag: Option<f64>,
    pub persistence_lag: Option<f64>,
    /// Kernel: TCP retransmits per second (all lab flows) in the interval ending here.
    pub retransmits_per_s: Option<f64>,
    /// Kernel: failed connects per second.
    pub connect_failures_per_s: Option<f64>,
}

/// The measured numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    pub baseline: Window,
    pub during: Window,
    pub after: Window,
    pub overall: Window,
    /// Injection → first order a client saw fail, queue, or slow down.
    pub detection_s: Option<f64>,
    /// Injection → first order the gateway answered 202 (it noticed and switched to its queue).
    pub system_detection_s: Option<f64>,
    /// Fault end → first order answered 201 again.
    pub first_success_s: Option<f64>,
    /// Fault end → the moment from which the retry queue, the outbox and persistence stay
    /// caught up and the next [`RECOVERY_WINDOW_S`] seconds of orders are all answered 201 with
    /// p99 within `recovery_bound_ms`.
    pub full_recovery_s: Option<f64>,
    /// `max(1.2 × baseline p99, baseline p99 + 2 ms, baseline max)`: "back to normal". A few
    /// seconds of orders have a p99 close to their maximum; the baseline's own maximum and the
    /// 2 ms floor keep the machine's noise from reading as an unrecovered system.
    pub recovery_bound_ms: f64,
    /// `during.p99 / baseline.p99`.
    pub latency_inflation: f64,
    pub peak_spool: f64,
    pub peak_outbox_lag: f64,
    pub peak_persistence_lag: f64,
    pub shed: u64,
    pub per_second: Vec<Point>,
    pub queues: Vec<QueuePoint>,
}

/// Seconds of normal service that make a recovery.
pub const RECOVERY_WINDOW_S: f64 = 1.0;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn window<'a>(entries: impl Iterator<Item = &'a LedgerEntry>) -> Window {
    let mut w = Window::default();
    let mut lat = Vec::new();
    for e in entries {
        w.orders += 1;
        match e.outcome {
            Outcome::Accepted => w.accepted += 1,
            Outcome::Queued => w.queued += 1,
            Outcome::Rejected => w.refused += 1,
            _ => w.errors += 1,
        }
        if e.outcome.acknowledged() {
            lat.push(e.latency_us as f64 / 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    w.p50_ms = round3(percentile(&lat, 0.50));
    w.p99_ms = round3(percentile(&lat, 0.99));
    w.max_ms = round3(lat.last().copied().unwrap_or(0.0));
    w.error_rate = if w.orders == 0 {
        0.0
    } else {
        w.errors as f64 / w.orders as f64
    };
    w
}

fn intended_ms(e: &LedgerEntry) -> f64 {
    e.intended_us as f64 / 1000.0
}

fn answered_ms(e: &LedgerEntry) -> f64 {
    (e.intended_us + e.latency_us) as f64 / 1000.0
}

/// Computes the measurements; `rate` is the load's orders/s.
pub fn analyse(
    entries: &[LedgerEntry],
    samples: &[Sample],
    marks: &Marks,
    rate: f64,
) -> Measurements {
    let mut entries: Vec<&LedgerEntry> = entries.iter().collect();
    entries.sort_by_key(|e| e.intended_us);
    let inject = marks.inject_ms as f64;
    let fault_end = marks.fault_end_ms as f64;
    let in_range = |lo: f64, hi: f64| {
        let entries = &entries;
        move || {
            entries
                .iter()
                .copied()
                .filter(move |e| intended_ms(e) >= lo && intended_ms(e) < hi)
        }
    };
    let baseline = window(in_range(marks.load_start_ms as f64, inject)());
    let heal = (marks.heal_ms as f64).max(fault_end);
    let during = window(in_range(inject, heal)());
    let after = window(in_range(heal, f64::MAX)());
    let overall = window(entries.iter().copied());

    let slow_ms = (3.0 * baseline.p99_ms).max(baseline.p99_ms + 50.0);
    let detection = entries
        .iter()
        .filter(|e| intended_ms(e) >= inject)
        .filter_map(|e| {
            // A client notices a failure when the answer arrives, and a slow answer as soon as
            // it is late.
            let failed = e.outcome != Outcome::Accepted && e.outcome != Outcome::Rejected;
            let slow = e.latency_us as f64 / 1000.0 > slow_ms;
            match (failed, slow) {
                (_, true) => Some(intended_ms(e) + slow_ms),
                (true, false) => Some(answered_ms(e)),
                (false, false) => None,
            }
        })
        .fold(None, |acc: Option<f64>, t| {
            Some(acc.map_or(t, |a| a.min(t)))
        });
    let system_detection = entries
        .iter()
        .filter(|e| intended_ms(e) >= inject && e.outcome == Outcome::Queued)
        .map(|e| answered_ms(e))
        .fold(None, |acc: Option<f64>, t| {
            Some(acc.map_or(t, |a| a.min(t)))
        });
    let first_success = entries
        .iter()
        .filter(|e| intended_ms(e) >= fault_end && e.outcome == Outcome::Accepted)
        .map(|e| answered_ms(e))
        .fold(None, |acc: Option<f64>, t| {
            Some(acc.map_or(t, |a| a.min(t)))
        });

    // A one-second window holds ~30 orders at demo rates, so its p99 is its maximum:
    // latency is back to normal when that is within 1.2x the baseline p99, or no worse than
    // the worst the baseline itself saw (the machine's own noise), or within 2 ms of it.
    let bound = (1.2 * baseline.p99_ms)
        .max(baseline.p99_ms + 2.0)
        .max(baseline.max_ms);
    // The retry queue is empty in normal operation; the outbox and persistence always have a
    // few events in flight, so "drained" means back under about a second's worth.
    let lag_ok = (rate * 1.0).max(20.0);
    let queues_ok = |s: &Sample| {
        s.spool.is_some_and(|v| v == 0.0)
            && s.outbox_lag.is_some_and(|v| v <= lag_ok)
            && s.persistence_lag().is_some_and(|v| v <= lag_ok)
    };
    let samples_after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t_ms as f64 >= fault_end)
        .collect();
    let mut candidates: Vec<f64> = vec![fault_end];
    candidates.extend(samples_after.iter().map(|s| s.t_ms as f64));
    // Back to normal at `t`: the queues stay drained from `t` on, and the orders of the next
    // second are all answered 201 with p99 within the bound. (Later latency blips on a
    // busy machine do not undo a recovery that happened.)
    let settle_ms = RECOVERY_WINDOW_S * 1000.0;
    // The queues' state at `t` is what the last sample at or before `t` saw: a queue that was
    // full just before the fault ended is not known to be drained until a sample shows it, so
    // the recovery is never earlier than the first sample that does (the sampling interval is
    // the measurement's resolution).
    let known_at = |t: f64| {
        samples
            .iter()
            .map(|s| s.t_ms as f64)
            .filter(|&st| st <= t)
            .reduce(f64::max)
            .unwrap_or(t)
    };
    let full_recovery = candidates.into_iter().find(|&t| {
        let since = known_at(t);
        let queues = samples
            .iter()
            .filter(|s| s.t_ms as f64 >= since)
            .all(&queues_ok)
            && samples_after.iter().any(|s| s.t_ms as f64 >= t);
        let window_end = (t + settle_ms).min(marks.load_end_ms as f64);
        let next: Vec<&&LedgerEntry> = entries
            .iter()
            .filter(|e| e.kind == "new" && intended_ms(e) >= t && intended_ms(e) < window_end)
            .collect();
        let normal = !next.is_empty()
            && next
                .iter()
                .all(|e| e.outcome == Outcome::Accepted || e.outcome == Outcome::Rejected)
            && window(next.iter().map(|e| **e)).p99_ms <= bound;
        queues && normal
    });

    let start = marks.load_start_ms as f64;
    let seconds = ((marks.load_end_ms.saturating_sub(marks.load_start_ms)) as f64 / 1000.0).ceil()
        as usize
        + 1;
    let mut per_second = Vec::with_capacity(seconds);
    for i in 0..seconds {
        let lo = start + i as f64 * 1000.0;
        let w = window(in_range(lo, lo + 1000.0)());
        per_second.push(Point {
            t_s: i as f64,
            sent: w.orders,
            accepted: w.accepted,
            queued: w.queued,
            errors: w.errors,
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
        });
    }
    // The load's last, partial second and the drain after it have no orders to show.
    while per_second.last().is_some_and(|p| p.sent == 0) {
        per_second.pop();
    }
    let family = |s: &Sample, prefix: &str| -> Option<f64> {
        let v: Vec<f64> = s
            .kernel
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    let mut queues = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let rate_of = |prefix: &str| -> Option<f64> {
            let prev = samples.get(i.checked_sub(1)?)?;
            let dt = (s.t_ms.saturating_sub(prev.t_ms)) as f64 / 1000.0;
            (dt > 0.0).then_some(((family(s, prefix)? - family(prev, prefix)?) / dt).max(0.0))
        };
        queues.push(QueuePoint {
            t_s: (s.t_ms as f64 - start) / 1000.0,
            spool: s.spool,
            outbox_lag: s.outbox_lag,
            persistence_lag: s.persistence_lag(),
            retransmits_per_s: rate_of("probes_tcp_retransmits_total"),
            connect_failures_per_s: rate_of("probes_tcp_connect_failures_total"),
        });
    }
    let peak =
        |f: &dyn Fn(&Sample) -> Option<f64>| samples.iter().filter_map(f).fold(0.0, f64::max);
    Measurements {
        latency_inflation: if baseline.p99_ms > 0.0 {
            round3(during.p99_ms / baseline.p99_ms)
        } else {
            0.0
        },
        detection_s: detection.map(|t| round3((t - inject).max(0.0) / 1000.0)),
        system_detection_s: system_detection.map(|t| round3((t - inject).max(0.0) / 1000.0)),
        first_success_s: first_success.map(|t| round3((t - fault_end).max(0.0) / 1000.0)),
        full_recovery_s: full_recovery.map(|t| round3((t - fault_end).max(0.0) / 1000.0)),
        recovery_bound_ms: round3(bound),
        peak_spool: peak(&|s| s.spool),
        peak_outbox_lag: peak(&|s| s.outbox_lag),
        peak_persistence_lag: peak(&|s| s.persistence_lag()),
        shed: entries
            .iter()
            .filter(|e| e.outcome == Outcome::Shed)
            .count() as u64,
        baseline,
        during,
        after,
        overall,
        per_second,
        queues,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(t_ms: u64, latency_ms: u64, outcome: Outcome) -> LedgerEntry {
        LedgerEntry {
            kind: "new".into(),
            client_order_id: Some(format!("c{t_ms}")),
            order_id: None,
            symbol: None,
            intended_us: t_ms * 1000,
            sent_us: t_ms * 1000,
            outcome,
            http_status: None,
            status: None,
            latency_us: latency_ms * 1000,
            detail: None,
        }
    }

    fn sample(t_ms: u64, spool: f64) -> Sample {
        Sample {
            t_ms,
            spool: Some(spool),
            outbox_lag: Some(0.0),
            engine_seq: Some(100.0),
            persisted_seq: Some(100.0),
            ..Sample::default()
        }
    }

    /// One order every 100 ms through each phase: (time range in ms, latency in ms, outcome).
    fn every_100ms(phases: &[(std::ops::Range<u64>, u64, Outcome)]) -> Vec<LedgerEntry> {
        phases
            .iter()
            .flat_map(|(range, latency_ms, outcome)| {
                range
                    .clone()
                    .step_by(100)
                    .map(move |t| e(t, *latency_ms, *outcome))
            })
            .collect()
    }

    #[test]
    fn a_partition_story() {
        // Baseline 0-10 s at 2 ms; cut at 10 s: orders wait for the gateway's 800 ms timeout
        // and are queued, and once its queue holds something, new orders are queued at once;
        // heal at 20 s; the queue drains by 20.3 s.
        let ledger = every_100ms(&[
            (0..10_000, 2, Outcome::Accepted),
            (10_000..10_800, 800, Outcome::Queued),
            (10_800..20_300, 1, Outcome::Queued),
            (20_300..30_000, 2, Outcome::Accepted),
        ]);
        let mut samples = Vec::new();
        for t in (0..30_000).step_by(200) {
            samples.push(sample(
                t,
                if (10_000..20_300).contains(&t) {
                    5.0
                } else {
                    0.0
                },
            ));
        }
        let m = analyse(
            &ledger,
            &samples,
            &Marks {
                load_start_ms: 0,
                inject_ms: 10_000,
                fault_end_ms: 20_000,
                heal_ms: 20_000,
                load_end_ms: 30_000,
            },
            10.0,
        );
        assert_eq!(m.baseline.p99_ms, 2.0);
        assert_eq!(m.system_detection_s, Some(0.8));
        assert_eq!(
            m.detection_s,
            Some(0.052),
            "2 ms p99: an answer is late after 52 ms"
        );
        assert_eq!(m.first_success_s, Some(0.302));
        assert_eq!(
            m.full_recovery_s,
            Some(0.4),
            "first sample with an empty queue and 201s after"
        );
        assert_eq!(m.peak_spool, 5.0);
        assert_eq!(m.during.queued, 100);
        assert_eq!(m.per_second.len(), 30);
    }

    #[test]
    fn recovery_waits_for_a_sample_that_shows_the_queue_drained() {
        // The fault ends at 20.0 s, between two samples: the one at 19.9 s still sees the
        // queue full, the one at 20.1 s sees it empty, and the orders after 20.0 s are all
        // fast 201s. The queue is not known to be drained before 20.1 s.
        let ledger = every_100ms(&[
            (0..10_000, 2, Outcome::Accepted),
            (10_000..20_000, 1, Outcome::Queued),
            (20_000..30_000, 2, Outcome::Accepted),
        ]);
        let samples: Vec<Sample> = (0..150)
            .map(|i| 100 + i * 200)
            .map(|t| {
                sample(
                    t,
                    if (10_000..20_000).contains(&t) {
                        905.0
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        let marks = Marks {
            load_start_ms: 0,
            inject_ms: 10_000,
            fault_end_ms: 20_000,
            heal_ms: 20_000,
            load_end_ms: 30_000,
        };
        let m = analyse(&ledger, &samples, &marks, 10.0);
        assert_eq!(m.full_recovery_s, Some(0.1));
        // With the queue already empty in the last sample before the fault ended, the
        // recovery is immediate.
        let calm: Vec<Sample> = samples.iter().map(|s| sample(s.t_ms, 0.0)).collect();
        let m = analyse(&ledger, &calm, &marks, 10.0);
        assert_eq!(m.full_recovery_s, Some(0.0));
    }
}
