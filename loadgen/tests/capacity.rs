//! The capacity search against a small gateway written here (axum on port 0) whose latency
//! depends on the arrival rate: it answers at once below a known rate and 100 ms late above it,
//! and can stall once, as a shared host sometimes does.

mod common;

use loadgen::capacity::{CapacityReport, CapacitySpec, search};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests per [`WINDOW`] above which every request is answered [`SLOW`] late: 650 a second.
const LIMIT: usize = 130;
const WINDOW: Duration = Duration::from_millis(200);
const SLOW: Duration = Duration::from_millis(100);

/// A one-off stall: once `after` requests have arrived, every request of the next `length` is
/// answered `delay` late.
#[derive(Clone, Copy)]
struct Stall {
    after: u64,
    length: Duration,
    delay: Duration,
}

#[derive(Default)]
struct State {
    arrivals: Mutex<VecDeque<Instant>>,
    count: AtomicU64,
    stall_started: Mutex<Option<Instant>>,
}

impl State {
    /// How late to answer a request arriving now.
    fn delay(&self, stall: Option<Stall>) -> Duration {
        let now = Instant::now();
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(st) = stall {
            let mut started = self.stall_started.lock().unwrap();
            if n >= st.after && started.is_none() {
                *started = Some(now);
            }
            if started.is_some_and(|s| now.duration_since(s) < st.length) {
                return st.delay;
            }
        }
        let mut arrivals = self.arrivals.lock().unwrap();
        arrivals.push_back(now);
        while arrivals
            .front()
            .is_some_and(|t| now.duration_since(*t) > WINDOW)
        {
            arrivals.pop_front();
        }
        if arrivals.len() > LIMIT {
            SLOW
        } else {
            Duration::ZERO
        }
    }
}

/// The gateway's URL.
async fn gateway(stall: Option<Stall>) -> String {
    let state = Arc::new(State::default());
    let delay: common::Delay = Arc::new(move || Some(state.delay(stall)));
    common::fake_gateway(delay.clone(), delay).await
}

fn spec(target: String, refine: u32, confirm: u32) -> CapacitySpec {
    CapacitySpec {
        target,
        start_rate: 100.0,
        factor: 2.0,
        max_rate: 10_000.0,
        step: Duration::from_secs(1),
        max_p99: Duration::from_millis(50),
        max_error_rate: 0.01,
        baseline_rate: 100.0,
        refine,
        confirm,
        symbols: vec!["AAPL".into(), "MSFT".into()],
        seed: 5,
        request_timeout: Duration::from_secs(5),
        max_in_flight: 10_000,
        batch: 1,
        client_id_prefix: "cap-test".into(),
    }
}

fn rates(r: &CapacityReport) -> Vec<(u64, u32, bool)> {
    r.steps
        .iter()
        .map(|s| (s.rate_per_sec.round() as u64, s.attempt, s.sustained))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_the_rate_where_the_service_level_breaks() {
    let url = gateway(None).await;
    let report = search(&spec(url, 1, 0), |_| {}).await.unwrap();
    let steps = rates(&report);
    // 100, 200, 400 hold; 800 breaks (every request 100 ms late); the bisection tries 566.
    assert_eq!(
        steps.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>(),
        vec![
            (100, true),
            (200, true),
            (400, true),
            (800, false),
            (566, true)
        ],
        "{}",
        report.table()
    );
    assert_eq!(report.sustainable_rate_per_sec, 566.0);
    assert_eq!(report.headroom, 5.7);
    assert!(!report.capped);
    let broke = &report.steps[3];
    assert!(broke.ack_p99_ms >= 100.0, "{broke:?}");
    assert!(
        broke.reason.as_deref().unwrap_or("").starts_with("p99"),
        "{broke:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_stall_is_tried_again() {
    // 300 requests arrive in the 100/s and 200/s steps; the stall hits the 400/s step's first
    // 150 ms: 60 of its ~400 requests answered 300 ms late.
    let stall = Stall {
        after: 350,
        length: Duration::from_millis(150),
        delay: Duration::from_millis(300),
    };

    // Without a second try the stall ends the search below 400/s.
    let once = search(&spec(gateway(Some(stall)).await, 1, 0), |_| {})
        .await
        .unwrap();
    let steps = rates(&once);
    assert_eq!(
        &steps[..3],
        &[(100, 1, true), (200, 1, true), (400, 1, false)],
        "{}",
        once.table()
    );
    assert!(once.sustainable_rate_per_sec < 400.0, "{}", once.table());

    // With one, 400/s holds on its second attempt, and 800/s breaks twice: the rate's real limit.
    let mut seen = Vec::new();
    let twice = search(&spec(gateway(Some(stall)).await, 1, 1), |s| {
        seen.push(s.verdict())
    })
    .await
    .unwrap();
    let steps = rates(&twice);
    assert_eq!(
        steps,
        vec![
            (100, 1, true),
            (200, 1, true),
            (400, 1, false),
            (400, 2, true),
            (800, 1, false),
            (800, 2, false),
            (566, 1, true)
        ],
        "{}",
        twice.table()
    );
    assert_eq!(twice.sustainable_rate_per_sec, 566.0);
    assert_eq!(seen.len(), steps.len());
    assert_eq!(seen[3], "ok (attempt 2)");
    assert!(seen[5].starts_with("broke: p99"), "{seen:?}");
    assert!(seen[5].ends_with("(attempt 2)"), "{seen:?}");
    assert!(
        twice.table().contains("ok (attempt 2)"),
        "{}",
        twice.table()
    );
}

#[tokio::test]
async fn a_confirm_beyond_the_bound_is_refused() {
    let mut s = spec("http://127.0.0.1:9".into(), 1, u32::MAX);
    let err = search(&s, |_| {}).await.unwrap_err().to_string();
    assert!(err.contains("--confirm must be at most 10"), "{err}");
    s.confirm = 10;
    s.start_rate = 0.0;
    let err = search(&s, |_| {}).await.unwrap_err().to_string();
    assert!(err.contains("--start-rate"), "{err}");
}
