//! The generator against small gateways written here (axum on port 0): rate accuracy, no
//! coordinated omission, and a complete ledger after an interruption. The audit is tested
//! against real PostgreSQL in the end-to-end suite.

mod common;

use loadgen::flow::FlowSpec;
use loadgen::ledger::{self, Outcome};
use loadgen::run::{RunSpec, run};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the fake gateway does with each order, given the time since it started.
type Behaviour = Arc<dyn Fn(Duration) -> Option<Duration> + Send + Sync>;

struct Fake {
    url: String,
    received: Arc<AtomicU64>,
}

/// A gateway that answers 201 at once, or first waits until the delay `behaviour` returns
/// (`None`: never answers); it counts the orders it received.
async fn fake_gateway(behaviour: Behaviour) -> Fake {
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let r = received.clone();
    let url = common::fake_gateway(
        Arc::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
            behaviour(started.elapsed())
        }),
        Arc::new(|| Some(Duration::ZERO)),
    )
    .await;
    Fake { url, received }
}

fn spec(target: &str, rate: f64, duration: Duration, dir: &std::path::Path) -> RunSpec {
    RunSpec {
        target: target.into(),
        rate_per_sec: rate,
        duration,
        flow: FlowSpec {
            seed: 3,
            symbols: vec!["AAPL".into(), "MSFT".into()],
            cancel_share: 0.0,
            accounts: 5,
            client_id_prefix: "t".into(),
        },
        ledger: Some(dir.join("ledger.jsonl")),
        summary: Some(dir.join("summary.json")),
        request_timeout: Duration::from_secs(5),
        max_in_flight: 10_000,
        batch: 1,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_planned_rate() {
    let fake = fake_gateway(Arc::new(|_| Some(Duration::ZERO))).await;
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        spec(&fake.url, 1000.0, Duration::from_secs(5), dir.path()),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(s.planned, 5000);
    assert_eq!(s.sent, 5000, "{}", s.table());
    assert_eq!(fake.received.load(Ordering::SeqCst), 5000);
    assert_eq!(s.outcomes.get("accepted"), Some(&5000));
    // The sends spread over the 5 s the open model planned (within 1 %).
    let l = ledger::read(&dir.path().join("ledger.jsonl")).unwrap();
    let first = l.entries.iter().map(|e| e.sent_us).min().unwrap();
    let last = l.entries.iter().map(|e| e.sent_us).max().unwrap();
    let span_s = (last - first) as f64 / 1e6;
    assert!(
        (span_s - 4.999).abs() / 4.999 < 0.01,
        "sends spanned {span_s} s"
    );
    // Late is counted; early never happens (it would understate latency).
    let early = l
        .entries
        .iter()
        .filter(|e| e.sent_us < e.intended_us)
        .count();
    assert_eq!(early, 0, "{early} orders left before their intended time");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["schema"], "loadgen.summary/v1");
    assert_eq!(summary["per_second"].as_array().unwrap().len(), 5);
}

/// `--batch 20` at 5,000 orders/s: the orders that come due together leave as one request
/// (the pacer wakes once a millisecond, so ~5 per request), every order has its own ledger
/// entry with the id the gateway gave it, and none left early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_due_together_go_as_one_batch() {
    let fake = fake_gateway(Arc::new(|_| Some(Duration::ZERO))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(&fake.url, 5000.0, Duration::from_secs(2), dir.path());
    spec.batch = 20;
    let s = run(spec, std::future::pending()).await.unwrap();
    assert_eq!(s.sent, 10_000, "{}", s.table());
    assert_eq!(s.outcomes.get("accepted"), Some(&10_000), "{}", s.table());
    assert_eq!(fake.received.load(Ordering::SeqCst), 10_000);
    let batches = common::BATCH_REQUESTS.load(Ordering::SeqCst);
    assert!(
        (500..=5_000).contains(&batches),
        "{batches} batch requests for 10,000 orders at most 20 each, due ~5 a millisecond"
    );
    let l = ledger::read(&dir.path().join("ledger.jsonl")).unwrap();
    assert_eq!(l.entries.len(), 10_000);
    let mut ids: Vec<u64> = l.entries.iter().filter_map(|e| e.order_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10_000, "every order has its own id");
    assert!(l.entries.iter().all(|e| e.sent_us >= e.intended_us));

    let mut bad = spec_with_batch(&fake.url, dir.path(), 101);
    assert!(
        run(bad.clone(), std::future::pending())
            .await
            .unwrap_err()
            .to_string()
            .contains("--batch must be between 1 and 100")
    );
    bad.batch = 0;
    assert!(run(bad, std::future::pending()).await.is_err());
}

fn spec_with_batch(target: &str, dir: &std::path::Path, batch: usize) -> RunSpec {
    let mut s = spec(target, 10.0, Duration::from_secs(1), dir);
    s.batch = batch;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_in_the_percentiles() {
    // The gateway stalls from 1 s to 2 s: everything that arrives meanwhile is answered at 2 s.
    let fake = fake_gateway(Arc::new(|t| {
        let (from, to) = (Duration::from_secs(1), Duration::from_secs(2));
        Some(if t >= from && t < to {
            to - t
        } else {
            Duration::ZERO
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        spec(&fake.url, 200.0, Duration::from_secs(3), dir.path()),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(s.sent, 600);
    // A third of the orders were due during the stall, with latencies spread from ~1 s down to
    // 0: measured from their intended send times, the tail shows the stall. (A closed-model
    // client would have sent one request during the stall and reported a p99 of ~1 ms.)
    assert!(s.latency.max_ms >= 900.0, "{}", s.table());
    assert!(s.latency.p99_ms >= 800.0, "{}", s.table());
    assert!(s.latency.p90_ms >= 400.0, "{}", s.table());
    assert!(s.latency.p50_ms < 400.0, "{}", s.table());
    let stalled_second = &s.per_second[1];
    assert!(stalled_second.max_ms >= 900.0, "{stalled_second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_is_complete_after_an_interruption() {
    // Answers the first 100 orders, then hangs.
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let fake = fake_gateway(Arc::new(move |_| {
        (c.fetch_add(1, Ordering::SeqCst) < 100).then_some(Duration::ZERO)
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let received = fake.received.clone();
    // Interrupt once 150 orders reached the gateway (polled, with a deadline).
    let stop = async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.load(Ordering::SeqCst) < 150 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let s = run(
        spec(&fake.url, 500.0, Duration::from_secs(30), dir.path()),
        stop,
    )
    .await
    .unwrap();
    assert!(s.interrupted);
    let l = ledger::read(&dir.path().join("ledger.jsonl")).unwrap();
    assert_eq!(
        l.entries.len() as u64,
        s.sent + s.dropped,
        "one line per order sent"
    );
    let interrupted = l
        .entries
        .iter()
        .filter(|e| e.outcome == Outcome::Interrupted)
        .count();
    let accepted = l
        .entries
        .iter()
        .filter(|e| e.outcome == Outcome::Accepted)
        .count();
    assert_eq!(accepted, 100);
    assert!(interrupted >= 50, "{interrupted} interrupted");
    let mut ids: Vec<_> = l
        .entries
        .iter()
        .filter_map(|e| e.client_order_id.clone())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "client order ids are unique");
}
