//! `loadgen run`: open-model load with latency measured from each order's intended send time.
//!
//! Order `i` is due at `start + i / rate`, whatever happened to order `i - 1` (the arrival
//! rate never slows down when the exchange does, as in wrk2 and k6's arrival-rate executors).
//! Latency runs from that intended time to the answer, so a stall of the exchange shows up in
//! every order that should have been sent during it (no coordinated omission). When the
//! generator itself falls behind, it says so: sends more than 10 ms after their intended time
//! are counted as `late_sends`, and orders it could not send because `max_in_flight` requests
//! were already outstanding are recorded as `dropped`.

use crate::flow::{Flow, FlowCommand, FlowSpec};
use crate::ledger::{LedgerEntry, LedgerHeader, LedgerWriter, Outcome};
use crate::stats::{Recorder, Summary};
use anyhow::Context;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Gateway base URL, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    pub rate_per_sec: f64,
    pub duration: Duration,
    pub flow: FlowSpec,
    pub ledger: Option<PathBuf>,
    pub summary: Option<PathBuf>,
    pub request_timeout: Duration,
    pub max_in_flight: usize,
    /// Show a live progress bar on stderr.
    pub progress: bool,
}

impl RunSpec {
    /// Checks the numbers, naming the flag at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.rate_per_sec > 0.0 && self.rate_per_sec <= 1_000_000.0,
            "--rate must be between 0 and 1000000 orders/s, got {}",
            self.rate_per_sec
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        anyhow::ensure!(
            self.target.starts_with("http://") || self.target.starts_with("https://"),
            "--target must be an http:// URL, got {:?}",
            self.target
        );
        anyhow::ensure!(self.max_in_flight > 0, "--max-in-flight must be positive");
        Ok(())
    }
}

pub(crate) fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Counters a caller can watch while a run goes on (the chaos runner's abort conditions).
#[derive(Debug, Default)]
pub struct Live {
    /// Requests answered (or given up on).
    pub done: AtomicU64,
    /// Of those, acknowledged (201/202).
    pub acknowledged: AtomicU64,
    /// Of those, queued (202).
    pub queued: AtomicU64,
    /// Of those, errors (5xx, 503 shed, timeouts, transport errors, dropped).
    pub errors: AtomicU64,
}

struct Shared {
    recorder: Recorder,
    live: Arc<Live>,
    ledger: Option<LedgerWriter>,
    /// Requests sent and not answered yet, by sequence number, for the interrupted entries.
    in_flight: HashMap<u64, LedgerEntry>,
    resting: Vec<u64>,
}

impl Shared {
    fn finish(&mut self, entry: LedgerEntry, second: usize) {
        self.recorder.record(&entry, second);
        self.live.done.fetch_add(1, Ordering::Relaxed);
        if entry.outcome.acknowledged() {
            self.live.acknowledged.fetch_add(1, Ordering::Relaxed);
        }
        if entry.outcome == Outcome::Queued {
            self.live.queued.fetch_add(1, Ordering::Relaxed);
        }
        if entry.outcome.is_error() {
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(l) = self.ledger.as_mut()
            && let Err(e) = l.write(&entry)
        {
            tracing::error!(error = %e, "writing the ledger failed");
        }
    }
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave the counters half-updated in a way that
    // matters more than losing the whole run; keep going with what is there.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the load until `duration` has elapsed or `stop` resolves, then writes the ledger and
/// summary and returns the summary.
pub async fn run(
    spec: RunSpec,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Summary> {
    run_watched(spec, stop, Arc::default()).await
}

/// [`run`], updating `live` as answers come in.
pub async fn run_watched(
    spec: RunSpec,
    stop: impl std::future::Future<Output = ()>,
    live: Arc<Live>,
) -> anyhow::Result<Summary> {
    spec.validate()?;
    let catalog = domain::Catalog::lab();
    let mut flow = Flow::new(spec.flow.clone(), &catalog).map_err(anyhow::Error::msg)?;
    let client = reqwest::Client::builder()
        .timeout(spec.request_timeout)
        .connect_timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(spec.max_in_flight.min(1024))
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let started_wall = SystemTime::now();
    let header = LedgerHeader {
        kind: "run".into(),
        client_id_prefix: spec.flow.client_id_prefix.clone(),
        target: spec.target.clone(),
        rate_per_sec: spec.rate_per_sec,
        duration_ms: spec.duration.as_millis() as u64,
        seed: spec.flow.seed,
        started_unix_us: unix_us(started_wall),
    };
    let ledger = match &spec.ledger {
        Some(p) => Some(
            LedgerWriter::create(p, &header)
                .with_context(|| format!("creating ledger {}", p.display()))?,
        ),
        None => None,
    };
    let planned = (spec.rate_per_sec * spec.duration.as_secs_f64()).round() as u64;
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        recorder: Recorder::new(spec.duration.as_secs() as usize + 1),
        live,
        ledger,
        in_flight: HashMap::new(),
        resting: Vec::new(),
    }));
    let progress = crate::stats::Progress::start(spec.progress, planned, shared_progress(&shared));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut interrupted = false;
    tokio::pin!(stop);
    // Parsed once: parsing a URL per request (host validation, IDNA) is measurable at
    // thousands of requests per second on the same cores as the exchange.
    let orders_url =
        reqwest::Url::parse(&format!("{}/v1/orders", spec.target.trim_end_matches('/')))
            .with_context(|| format!("target {:?} is not a URL", spec.target))?;
    let pacer = Pacer::start(start, spec.rate_per_sec, planned);
    let mut ticks = pacer.ticks;
    loop {
        let (i, due) = tokio::select! {
            biased;
            _ = &mut stop => { interrupted = true; break; }
            tick = ticks.recv() => match tick {
                Some(tick) => tick,
                None => break,
            },
        };
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let intended_us = header.started_unix_us + (due - start).as_micros() as u64;
        let second = (due - start).as_secs() as usize;
        let command = {
            let mut s = lock(&shared);
            flow.next(&mut s.resting)
        };
        if tasks.len() >= spec.max_in_flight {
            let entry = entry_for(&command, intended_us, 0, Outcome::Dropped);
            lock(&shared).finish(entry, second);
            continue;
        }
        let now = Instant::now();
        let sent_us = header.started_unix_us + (now - start).as_micros() as u64;
        let late = now.saturating_duration_since(due) > Duration::from_millis(10);
        {
            let mut s = lock(&shared);
            s.recorder.sent(late);
            s.in_flight.insert(
                i,
                entry_for(&command, intended_us, sent_us, Outcome::Interrupted),
            );
        }
        tasks.spawn(send(
            client.clone(),
            orders_url.clone(),
            command,
            i,
            due,
            second,
            shared.clone(),
        ));
    }
    // Closing the channel stops the pacer.
    drop(ticks);
    pacer.thread.await.context("the pacing thread failed")?;
    // Let what is in flight finish (bounded by the request timeout), unless told to stop.
    let drain_deadline = tokio::time::sleep(spec.request_timeout + Duration::from_secs(1));
    tokio::pin!(drain_deadline);
    while !tasks.is_empty() && !interrupted {
        tokio::select! {
            _ = tasks.join_next() => {}
            _ = &mut drain_deadline => break,
            _ = &mut stop => { interrupted = true; }
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    progress.finish();
    let mut s = lock(&shared);
    let leftovers: Vec<(u64, LedgerEntry)> = s.in_flight.drain().collect();
    for (_, mut e) in leftovers {
        e.latency_us = unix_us(SystemTime::now()).saturating_sub(e.intended_us);
        let second = ((e.intended_us - header.started_unix_us) / 1_000_000) as usize;
        s.finish(e, second);
    }
    if let Some(l) = s.ledger.as_mut() {
        l.flush().context("flushing the ledger")?;
    }
    let summary = s.recorder.summary(
        &header,
        planned,
        elapsed,
        interrupted,
        spec.ledger.as_deref(),
    );
    if let Some(p) = &spec.summary {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(p, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing summary {}", p.display()))?;
    }
    Ok(summary)
}

/// Paces the sends on a thread of its own. The runtime's timers have a resolution of one
/// millisecond and round up, so `sleep_until(due)` fired 0.5–2 ms late (p50 1.4 ms at 30
/// orders/s), and that lateness, charged to each order as it must be (latency runs from the
/// intended time), was up to 40 % of the latency reported at the demo load. A thread sleeping
/// on the kernel's high-resolution timer wakes within a few hundred microseconds of the due
/// time. Each wake costs a context switch, so it wakes at most once per
/// [`Pacer::MIN_WAKE_INTERVAL`]: while orders are further apart than that each one leaves on
/// time; above 1,000 orders/s each wake sends every order that has come due (late by less than
/// the interval, as the runtime's timers were). It hands the orders to the runtime through a
/// bounded channel; when the runtime falls behind, the pacer waits and the sends count as late.
/// It never sends early. It stops when the receiving side drops the channel.
struct Pacer {
    ticks: tokio::sync::mpsc::Receiver<(u64, Instant)>,
    thread: tokio::task::JoinHandle<()>,
}

impl Pacer {
    /// The longest single sleep, so that a stop is noticed at low rates too.
    const MAX_SLEEP: Duration = Duration::from_millis(50);
    /// The least time between two wakes: above 1,000 orders/s one wake sends several.
    const MIN_WAKE_INTERVAL: Duration = Duration::from_millis(1);

    fn start(start: Instant, rate_per_sec: f64, planned: u64) -> Pacer {
        let (tx, ticks) = tokio::sync::mpsc::channel(4096);
        let thread = tokio::task::spawn_blocking(move || {
            let mut earliest_wake = Instant::now();
            for i in 0..planned {
                let due = start + Duration::from_secs_f64(i as f64 / rate_per_sec);
                if due > Instant::now() {
                    let wake = due.max(earliest_wake);
                    loop {
                        if tx.is_closed() {
                            return;
                        }
                        let left = wake.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(Self::MAX_SLEEP));
                    }
                    earliest_wake = Instant::now() + Self::MIN_WAKE_INTERVAL;
                }
                if tx.blocking_send((i, due)).is_err() {
                    return;
                }
            }
        });
        Pacer { ticks, thread }
    }
}

fn shared_progress(shared: &SharedRef) -> impl Fn() -> crate::stats::Snapshot + Send + 'static {
    let shared = shared.clone();
    move || lock(&shared).recorder.snapshot()
}

fn entry_for(
    command: &FlowCommand,
    intended_us: u64,
    sent_us: u64,
    outcome: Outcome,
) -> LedgerEntry {
    let (kind, client_order_id, order_id, symbol) = match command {
        FlowCommand::New {
            client_order_id,
            symbol,
            ..
        } => (
            "new",
            Some(client_order_id.clone()),
            None,
            Some(symbol.clone()),
        ),
        FlowCommand::Cancel { order_id } => ("cancel", None, Some(*order_id), None),
    };
    LedgerEntry {
        kind: kind.into(),
        client_order_id,
        order_id,
        symbol,
        intended_us,
        sent_us,
        outcome,
        http_status: None,
        status: None,
        latency_us: 0,
        detail: None,
    }
}

/// The parts of the gateway's answer the ledger keeps (the rest is skipped unparsed).
#[derive(Default, serde::Deserialize)]
struct Answer {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    order_id: Option<u64>,
    #[serde(default)]
    error: Option<AnswerError>,
}

#[derive(serde::Deserialize)]
struct AnswerError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    field: Option<String>,
}

async fn send(
    client: reqwest::Client,
    orders_url: reqwest::Url,
    command: FlowCommand,
    i: u64,
    due: Instant,
    second: usize,
    shared: SharedRef,
) {
    let request = match &command {
        FlowCommand::New { body, .. } => client.post(orders_url).json(body),
        FlowCommand::Cancel { order_id } => {
            let mut url = orders_url;
            let path = format!("{}/{order_id}", url.path());
            url.set_path(&path);
            client.delete(url)
        }
    };
    let result = request.send().await;
    let (outcome, http_status, body) = match result {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let body: Answer = match resp.bytes().await {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
                Err(_) => Answer::default(),
            };
            let outcome = match code {
                200 | 201 => Outcome::Accepted,
                202 => Outcome::Queued,
                503 => Outcome::Shed,
                400..=499 => Outcome::Rejected,
                _ => Outcome::ServerError,
            };
            (outcome, Some(code), body)
        }
        Err(e) if e.is_timeout() => (Outcome::Timeout, None, Answer::default()),
        Err(e) if e.is_connect() => (Outcome::ConnectError, None, Answer::default()),
        Err(_) => (Outcome::TransportError, None, Answer::default()),
    };
    let latency_us = due.elapsed().as_micros() as u64;
    let mut s = lock(&shared);
    let Some(mut entry) = s.in_flight.remove(&i) else {
        return;
    };
    entry.outcome = outcome;
    entry.http_status = http_status;
    entry.latency_us = latency_us;
    entry.status = body.status;
    if let Some(id) = body.order_id {
        entry.order_id = Some(id);
        if entry.kind == "new"
            && matches!(entry.status.as_deref(), Some("new" | "partially_filled"))
        {
            s.resting.push(id);
        }
    }
    entry.detail = body.error.and_then(|e| {
        e.code.map(|code| match e.field {
            Some(f) => format!("{code}:{f}"),
            None => code,
        })
    });
    s.finish(entry, second);
}
