//! `loadgen capacity`: finds the highest arrival rate the exchange sustains within a service
//! level, the original demo's "capacity finding" done automatically.
//!
//! It holds each rate for `step` (open model, as `loadgen run`), starting at `start_rate` and
//! multiplying by `factor` until a step breaks the service level — acknowledged-order p99 above
//! `max_p99`, or errors (anything but 201/202/4xx) above `max_error_rate`, or the generator
//! itself dropping sends — then bisects between the last good and the first bad rate for
//! `refine` more steps. It reports the highest sustainable rate and its ratio to a baseline
//! ("sustains 3.2× the 30 orders/s demo load").
//!
//! A rate that breaks the service level is held again, up to `confirm` more times, before the
//! search takes it as broken: on a shared machine one stall of the host (a noisy neighbour, a
//! checkpoint of PostgreSQL) can put a short step's p99 above the bound, and without a second
//! try that one event, not the exchange, would decide the result. Every attempt is reported.

use crate::flow::FlowSpec;
use crate::run::{RunSpec, run};
use crate::stats::Summary;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Most repeats of a broken rate (`confirm`): each is a whole step.
pub const MAX_CONFIRM: u32 = 10;

/// Schema name and version of the capacity JSON.
pub const CAPACITY_SCHEMA: &str = "loadgen.capacity/v1";

/// How to search.
#[derive(Debug, Clone)]
pub struct CapacitySpec {
    pub target: String,
    pub start_rate: f64,
    pub factor: f64,
    pub max_rate: f64,
    pub step: Duration,
    pub max_p99: Duration,
    pub max_error_rate: f64,
    pub baseline_rate: f64,
    /// Bisection steps after the first failing rate.
    pub refine: u32,
    /// How many more times a rate that broke the service level is held before it counts as
    /// broken (0: the first break decides).
    pub confirm: u32,
    pub symbols: Vec<String>,
    pub seed: u64,
    pub request_timeout: Duration,
    pub max_in_flight: usize,
    /// Most new orders per request (see [`RunSpec::batch`]).
    pub batch: usize,
    /// Prefix for each step's client order ids (`<prefix>-<rate>`).
    pub client_id_prefix: String,
}

/// One step of the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub rate_per_sec: f64,
    pub achieved_rate_per_sec: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub error_rate: f64,
    pub dropped: u64,
    pub late_sends: u64,
    pub sustained: bool,
    /// Why it was not sustained.
    pub reason: Option<String>,
    /// Which attempt at this rate (1 for the first; more when an earlier attempt broke).
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

/// The result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    pub schema: String,
    pub target: String,
    pub max_p99_ms: f64,
    pub max_error_rate: f64,
    pub step_s: f64,
    pub steps: Vec<Step>,
    /// Highest rate that held the service level (0 if none did).
    pub sustainable_rate_per_sec: f64,
    pub baseline_rate_per_sec: f64,
    /// `sustainable / baseline`.
    pub headroom: f64,
    /// Whether the search stopped at `max_rate` without breaking the service level.
    pub capped: bool,
}

impl CapacityReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "capacity of {} (service level: ack p99 <= {} ms, errors <= {:.2}%)\n",
            self.target,
            self.max_p99_ms,
            self.max_error_rate * 100.0
        );
        t.push_str("      rate/s   achieved/s   p50 ms   p99 ms   errors   verdict\n");
        for s in &self.steps {
            t.push_str(&format!(
                "  {:>10.0} {:>12.1} {:>8.2} {:>8.2} {:>7.2}%   {}\n",
                s.rate_per_sec,
                s.achieved_rate_per_sec,
                s.ack_p50_ms,
                s.ack_p99_ms,
                s.error_rate * 100.0,
                s.verdict()
            ));
        }
        t.push_str(&format!(
            "  sustainable: {:.0} orders/s = {:.1}x the {} orders/s baseline{}\n",
            self.sustainable_rate_per_sec,
            self.headroom,
            self.baseline_rate_per_sec,
            if self.capped {
                " (search capped at --max-rate)"
            } else {
                ""
            }
        ));
        t
    }
}

impl Step {
    /// `ok` or `broke: <reason>`, with the attempt when it was not the first.
    pub fn verdict(&self) -> String {
        let v = if self.sustained {
            "ok".to_string()
        } else {
            format!("broke: {}", self.reason.clone().unwrap_or_default())
        };
        if self.attempt > 1 {
            format!("{v} (attempt {})", self.attempt)
        } else {
            v
        }
    }
}

fn judge(spec: &CapacitySpec, rate: f64, s: &Summary) -> Step {
    let max_p99_ms = spec.max_p99.as_secs_f64() * 1000.0;
    let reason = if s.dropped > 0 {
        Some(format!("generator dropped {} sends", s.dropped))
    } else if s.error_rate > spec.max_error_rate {
        Some(format!("error rate {:.2}%", s.error_rate * 100.0))
    } else if s.ack_latency.p99_ms > max_p99_ms {
        Some(format!("p99 {:.1} ms", s.ack_latency.p99_ms))
    } else if s.ack_latency.count == 0 {
        Some("nothing acknowledged".into())
    } else {
        None
    };
    Step {
        rate_per_sec: rate,
        achieved_rate_per_sec: s.achieved_rate_per_sec,
        ack_p50_ms: s.ack_latency.p50_ms,
        ack_p99_ms: s.ack_latency.p99_ms,
        error_rate: s.error_rate,
        dropped: s.dropped,
        late_sends: s.late_sends,
        sustained: reason.is_none(),
        reason,
        attempt: 1,
    }
}

async fn step(spec: &CapacitySpec, rate: f64, n: usize) -> anyhow::Result<Step> {
    let run_spec = RunSpec {
        target: spec.target.clone(),
        rate_per_sec: rate,
        duration: spec.step,
        flow: FlowSpec {
            seed: spec.seed + n as u64,
            symbols: spec.symbols.clone(),
            cancel_share: 0.1,
            accounts: 50,
            client_id_prefix: format!("{}-s{n}", spec.client_id_prefix),
        },
        ledger: None,
        summary: None,
        request_timeout: spec.request_timeout,
        max_in_flight: spec.max_in_flight,
        batch: spec.batch,
        progress: false,
    };
    let summary = run(run_spec, std::future::pending()).await?;
    let s = judge(spec, rate, &summary);
    tracing::info!(
        rate,
        sustained = s.sustained,
        p99_ms = s.ack_p99_ms,
        "capacity step"
    );
    Ok(s)
}

/// Holds `rate` until an attempt keeps the service level, at most `1 + confirm` times; true if
/// one did. Every attempt goes to `steps` and `on_step`.
async fn trial(
    spec: &CapacitySpec,
    rate: f64,
    steps: &mut Vec<Step>,
    on_step: &mut impl FnMut(&Step),
) -> anyhow::Result<bool> {
    for attempt in 1..=1 + spec.confirm {
        let mut s = step(spec, rate, steps.len()).await?;
        s.attempt = attempt;
        on_step(&s);
        let sustained = s.sustained;
        steps.push(s);
        if sustained {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs the search; `on_step` sees each step as it completes (for live output).
pub async fn search(
    spec: &CapacitySpec,
    mut on_step: impl FnMut(&Step),
) -> anyhow::Result<CapacityReport> {
    anyhow::ensure!(spec.start_rate > 0.0, "--start-rate must be positive");
    anyhow::ensure!(spec.factor > 1.0, "--factor must be above 1");
    anyhow::ensure!(
        spec.max_rate >= spec.start_rate,
        "--max-rate must be at least --start-rate"
    );
    anyhow::ensure!(spec.baseline_rate > 0.0, "--baseline-rate must be positive");
    anyhow::ensure!(
        spec.confirm <= MAX_CONFIRM,
        "--confirm must be at most {MAX_CONFIRM} (got {})",
        spec.confirm
    );
    let mut steps = Vec::new();
    let mut good = 0.0f64;
    let mut bad: Option<f64> = None;
    let mut rate = spec.start_rate;
    loop {
        if trial(spec, rate, &mut steps, &mut on_step).await? {
            good = rate;
            if rate >= spec.max_rate {
                break;
            }
            rate = (rate * spec.factor).min(spec.max_rate);
        } else {
            bad = Some(rate);
            break;
        }
    }
    if let Some(mut hi) = bad {
        let mut lo = good;
        for _ in 0..spec.refine {
            if lo == 0.0 || hi / lo < 1.05 {
                break;
            }
            let mid = (lo * hi).sqrt();
            if trial(spec, mid, &mut steps, &mut on_step).await? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        good = lo;
    }
    Ok(CapacityReport {
        schema: CAPACITY_SCHEMA.into(),
        target: spec.target.clone(),
        max_p99_ms: spec.max_p99.as_secs_f64() * 1000.0,
        max_error_rate: spec.max_error_rate,
        step_s: spec.step.as_secs_f64(),
        steps,
        sustainable_rate_per_sec: good.round(),
        baseline_rate_per_sec: spec.baseline_rate,
        headroom: (good / spec.baseline_rate * 10.0).round() / 10.0,
        capped: bad.is_none(),
    })
}
