//! Self-validation of the analyzer: a synthetic workload with a known CPU split — about 40 %
//! in a JSON-heavy function (serde_json), 15 % in an order-validation function, the rest in
//! plain arithmetic — is profiled for real, in this process, with the same code the services
//! use (`kit::debug::cpu_profile`, pprof-rs); the analyzer, with the shipped
//! `profiler/categories.toml`, must find each share within ±5 percentage points of the truth.
//!
//! The truth is measured, not assumed: the workload thread cycles through the three phases
//! (on average 4 ms, 1.5 ms, 4.5 ms of wall time, each drawn at random so that the cycle cannot
//! alias with the kernel tick at which SIGPROF is delivered: 4 ms at HZ=250) and adds up the *CPU time* of the thread in each
//! (`CLOCK_THREAD_CPUTIME_ID`), so time the thread spends preempted on a busy machine — which
//! the profiler rightly never samples — does not distort the truth.

use profiler::analyze::{Rules, analyze_profile, markdown};
use serde::Serialize;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest allowed difference between a measured and a true share, in percentage points.
const TOLERANCE_PP: f64 = 5.0;

#[derive(Serialize)]
struct SyntheticOrder {
    client_order_id: String,
    account: String,
    symbol: &'static str,
    side: &'static str,
    price: String,
    quantity: u64,
    time_in_force: &'static str,
    tags: Vec<u32>,
}

fn orders() -> Vec<SyntheticOrder> {
    (0..16)
        .map(|i| SyntheticOrder {
            client_order_id: format!("selfcheck-{i:08}-\"quoted\"-\\escaped"),
            account: format!("acct-{}", i % 7),
            symbol: ["AAPL", "MSFT", "GOOG", "AMZN"][i % 4],
            side: if i % 2 == 0 { "buy" } else { "sell" },
            price: format!("{}.{:02}", 100 + i, i * 3 % 100),
            quantity: 100 + i as u64 * 7,
            time_in_force: "gtc",
            tags: (0..8).map(|t| t * 1_000_003 + i as u32).collect(),
        })
        .collect()
}

/// The JSON-heavy function: serializes a batch into a reused buffer (no allocation, so the
/// samples are serde_json's, not the allocator's).
#[inline(never)]
fn encode_orders_json(buf: &mut Vec<u8>, orders: &[SyntheticOrder]) -> usize {
    let mut n = 0;
    for o in orders {
        buf.clear();
        serde_json::to_writer(&mut *buf, o).expect("serializing into a Vec cannot fail");
        n += buf.len();
    }
    n
}

/// The validation function: field checks of the kind the gateway does, without allocating.
#[inline(never)]
fn validate_order(o: &SyntheticOrder) -> bool {
    let id_ok = o.client_order_id.len() <= 64
        && o.client_order_id
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ');
    let symbol_ok = ["AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "IDX"].contains(&o.symbol);
    let mut ticks: u64 = 0;
    let mut decimals = None;
    for b in o.price.bytes() {
        match b {
            b'0'..=b'9' => {
                ticks = ticks.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
                decimals = decimals.map(|d: u32| d + 1);
            }
            b'.' => decimals = Some(0),
            _ => return false,
        }
    }
    let price_ok = decimals.is_none_or(|d| d <= 2) && ticks > 0;
    let quantity_ok =
        (1..=1_000_000_000).contains(&o.quantity) && o.quantity.is_multiple_of(black_box(1));
    let account_ok = o.account.starts_with("acct-") && o.account.len() < 32;
    id_ok && symbol_ok && price_ok && quantity_ok && account_ok
}

/// Everything else: arithmetic that belongs to no category.
#[inline(never)]
fn unrelated_arithmetic(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..2_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// CPU time this thread has used so far.
#[allow(unsafe_code)]
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time actually spent per phase: JSON, validation, other.
#[derive(Default, Clone, Copy)]
struct Spent {
    json: Duration,
    validation: Duration,
    other: Duration,
}

fn workload(stop: &AtomicBool, spent: &Mutex<Spent>) {
    let orders = orders();
    let mut buf = Vec::with_capacity(4096);
    let mut local = Spent::default();
    let mut sink = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    // Uniform in [mean/2, 3*mean/2] microseconds.
    let mut draw = |mean_us: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Duration::from_micros(mean_us / 2 + rng % (mean_us + 1))
    };
    while !stop.load(Ordering::Relaxed) {
        let c0 = thread_cpu();
        let until = Instant::now() + draw(4_000);
        while Instant::now() < until {
            sink = sink.wrapping_add(encode_orders_json(&mut buf, &orders) as u64);
        }
        let c1 = thread_cpu();
        let until = Instant::now() + draw(1_500);
        while Instant::now() < until {
            for o in &orders {
                sink = sink.wrapping_add(u64::from(validate_order(black_box(o))));
            }
        }
        let c2 = thread_cpu();
        let until = Instant::now() + draw(4_500);
        while Instant::now() < until {
            sink = sink.wrapping_add(unrelated_arithmetic(black_box(sink)));
        }
        let c3 = thread_cpu();
        local.json += c1 - c0;
        local.validation += c2 - c1;
        local.other += c3 - c2;
    }
    black_box(sink);
    *spent.lock().unwrap_or_else(|p| p.into_inner()) = local;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyzer_shares_match_a_known_workload() {
    let stop = Arc::new(AtomicBool::new(false));
    let spent = Arc::new(Mutex::new(Spent::default()));
    let worker = {
        let (stop, spent) = (stop.clone(), spent.clone());
        std::thread::Builder::new()
            .name("selfcheck-work".into())
            .spawn(move || workload(&stop, &spent))
            .expect("spawn the workload")
    };
    // Let the workload settle, then profile it for real.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let profile = kit::debug::cpu_profile(Duration::from_secs(8), 250)
        .await
        .expect("a CPU profile");
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("the workload thread");
    let spent = *spent.lock().unwrap_or_else(|p| p.into_inner());

    let total = (spent.json + spent.validation + spent.other).as_secs_f64();
    let truth = [
        ("json", 100.0 * spent.json.as_secs_f64() / total),
        ("validation", 100.0 * spent.validation.as_secs_f64() / total),
        ("other", 100.0 * spent.other.as_secs_f64() / total),
    ];
    let rules =
        Rules::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("categories.toml"))
            .expect("the shipped rules");
    let analysis = analyze_profile(&profile, &rules, "selfcheck", "in-process profile");
    let report = markdown(&analysis);
    eprintln!("truth: {truth:?}\n{report}");
    assert!(
        analysis.samples >= 500,
        "too few samples to judge ({}):\n{report}",
        analysis.samples
    );
    for (category, want) in truth {
        let got = analysis.share(category);
        assert!(
            (got - want).abs() <= TOLERANCE_PP,
            "{category}: analyzer says {got:.1} %, truth is {want:.1} % (±{TOLERANCE_PP} pp)\n{report}"
        );
    }
    // The functions that decided the categories are the ones the workload ran.
    let top = |id: &str| {
        analysis
            .categories
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.top_functions.first())
            .map(|f| f.function.clone())
            .unwrap_or_default()
    };
    assert!(top("json").contains("serde_json"), "{report}");
    assert!(top("validation").ends_with("validate_order"), "{report}");
    assert_eq!(analysis.dominant.as_deref(), Some("json"), "{report}");
}
