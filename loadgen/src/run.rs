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
    /// Most new orders per request: orders that come due together (above 1,000 orders/s the
    /// pacer hands them over in groups, once a millisecond) go to the gateway as one
    /// `POST /v1/orders/batch` of up to this many. 1: one `POST /v1/orders` per order.
    pub batch: usize,
    /// Show a live progress bar on stderr.
    pub progress: bool,
}

/// The most orders the gateway takes in one `POST /v1/orders/batch`.
pub const MAX_BATCH: usize = 100;

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
        anyhow::ensure!(
            (1..=MAX_BATCH).contains(&self.batch),
            "--batch must be between 1 and {MAX_BATCH} (the gateway's limit per request), got {}",
            self.batch
        );
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
    let batch_url = orders_url
        .join("orders/batch")
        .context("building the batch URL")?;
    let pacer = Pacer::start(start, spec.rate_per_sec, planned);
    let mut ticks = pacer.ticks;
    let spawn_one = |tasks: &mut JoinSet<()>, command: FlowCommand, sent: Sent| {
        tasks.spawn(send(
            client.clone(),
            orders_url.clone(),
            command,
            sent,
            shared.clone(),
        ));
    };
    loop {
        // Everything that came due at one wake of the pacer: up to `batch` orders go together.
        let due_group = tokio::select! {
            biased;
            _ = &mut stop => { interrupted = true; break; }
            group = ticks.recv() => match group {
                Some(group) => group,
                None => break,
            },
        };
        for due_now in due_group.chunks(spec.batch) {
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
            let mut news = Vec::new();
            for &(i, due) in due_now {
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
                let sent = Sent { i, due, second };
                match command {
                    FlowCommand::New { .. } if spec.batch > 1 => news.push((sent, command)),
                    command => spawn_one(&mut tasks, command, sent),
                }
            }
            if news.len() == 1 {
                let (sent, command) = news.remove(0);
                spawn_one(&mut tasks, command, sent);
            } else if !news.is_empty() {
                tasks.spawn(send_batch(
                    client.clone(),
                    batch_url.clone(),
                    news,
                    shared.clone(),
                ));
            }
        }
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
/// bounded channel, everything that came due at one wake as one message (one wake-up of the
/// runtime per wake, however many orders); when the runtime falls behind, the pacer waits and
/// the sends count as late. It never sends early. It stops when the receiving side drops the
/// channel.
struct Pacer {
    ticks: tokio::sync::mpsc::Receiver<Vec<(u64, Instant)>>,
    thread: tokio::task::JoinHandle<()>,
}

impl Pacer {
    /// The longest single sleep, so that a stop is noticed at low rates too.
    const MAX_SLEEP: Duration = Duration::from_millis(50);
    /// The least time between two wakes: above 1,000 orders/s one wake sends several.
    const MIN_WAKE_INTERVAL: Duration = Duration::from_millis(1);
    /// The most orders in one message (when the runtime is far behind, the rest follow).
    const MAX_GROUP: usize = 1024;

    fn start(start: Instant, rate_per_sec: f64, planned: u64) -> Pacer {
        let (tx, ticks) = tokio::sync::mpsc::channel(4096);
        let due_of = move |i: u64| start + Duration::from_secs_f64(i as f64 / rate_per_sec);
        let thread = tokio::task::spawn_blocking(move || {
            let mut earliest_wake = Instant::now();
            let mut i = 0;
            while i < planned {
                let due = due_of(i);
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
                let now = Instant::now();
                let mut group = vec![(i, due)];
                i += 1;
                while i < planned && group.len() < Self::MAX_GROUP && due_of(i) <= now {
                    group.push((i, due_of(i)));
                    i += 1;
                }
                if tx.blocking_send(group).is_err() {
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
#[derive(Clone, Default, serde::Deserialize)]
struct Answer {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    order_id: Option<u64>,
    #[serde(default)]
    error: Option<AnswerError>,
}

#[derive(Clone, serde::Deserialize)]
struct AnswerError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    field: Option<String>,
}

/// Which order a request carries: its sequence number, due time and second of the run.
#[derive(Clone, Copy)]
struct Sent {
    i: u64,
    due: Instant,
    second: usize,
}

/// The body of an answer as `T`; empty (default) when it cannot be read or is not what the
/// gateway sends: the status alone then says what happened.
async fn read_json<T: serde::de::DeserializeOwned + Default>(resp: reqwest::Response) -> T {
    match resp.bytes().await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(_) => T::default(),
    }
}

/// The outcome a response's HTTP status means for the order(s) it answers.
fn outcome_of(code: u16) -> Outcome {
    match code {
        200 | 201 => Outcome::Accepted,
        202 => Outcome::Queued,
        503 => Outcome::Shed,
        400..=499 => Outcome::Rejected,
        _ => Outcome::ServerError,
    }
}

/// The outcome of a request that got no answer.
fn failure_of(e: &reqwest::Error) -> Outcome {
    if e.is_timeout() {
        Outcome::Timeout
    } else if e.is_connect() {
        Outcome::ConnectError
    } else {
        Outcome::TransportError
    }
}

/// `POST /v1/orders/batch` with these orders; each is answered in the ledger as if sent
/// alone. When the batch as a whole is refused (4xx, 503) or fails, every order in it gets
/// that outcome.
async fn send_batch(
    client: reqwest::Client,
    batch_url: reqwest::Url,
    orders: Vec<(Sent, FlowCommand)>,
    shared: SharedRef,
) {
    #[derive(serde::Serialize)]
    struct Batch<'a> {
        orders: Vec<&'a serde_json::Value>,
    }
    #[derive(Default, serde::Deserialize)]
    struct BatchAnswer {
        #[serde(default)]
        results: Vec<BatchResult>,
    }
    #[derive(serde::Deserialize)]
    struct BatchResult {
        http_status: u16,
        #[serde(default)]
        answer: Answer,
    }
    // Only new orders are batched (cancels go alone).
    let body = Batch {
        orders: orders
            .iter()
            .filter_map(|(_, command)| match command {
                FlowCommand::New { body, .. } => Some(body),
                FlowCommand::Cancel { .. } => None,
            })
            .collect(),
    };
    let result = client.post(batch_url).json(&body).send().await;
    let mut answers: Vec<(Outcome, Option<u16>, Answer)> = match result {
        Ok(resp) if resp.status().as_u16() == 200 => read_json::<BatchAnswer>(resp)
            .await
            .results
            .into_iter()
            .map(|r| (outcome_of(r.http_status), Some(r.http_status), r.answer))
            .collect(),
        Ok(resp) => {
            let code = resp.status().as_u16();
            let answer: Answer = read_json(resp).await;
            orders
                .iter()
                .map(|_| (outcome_of(code), Some(code), answer.clone()))
                .collect()
        }
        Err(e) => orders
            .iter()
            .map(|_| (failure_of(&e), None, Answer::default()))
            .collect(),
    };
    // An answer without a result for every order is the gateway's fault: a server error for
    // the orders it left out.
    answers.resize_with(orders.len(), || {
        (Outcome::ServerError, Some(200), Answer::default())
    });
    let mut s = lock(&shared);
    for ((sent, _), (outcome, http_status, answer)) in orders.into_iter().zip(answers) {
        settle(&mut s, sent, outcome, http_status, answer);
    }
}

async fn send(
    client: reqwest::Client,
    orders_url: reqwest::Url,
    command: FlowCommand,
    sent: Sent,
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
            (outcome_of(code), Some(code), read_json(resp).await)
        }
        Err(e) => (failure_of(&e), None, Answer::default()),
    };
    settle(&mut lock(&shared), sent, outcome, http_status, body);
}

/// Records an order's answer: its ledger entry leaves `in_flight`, with the latency from its
/// intended send time to now.
fn settle(s: &mut Shared, sent: Sent, outcome: Outcome, http_status: Option<u16>, body: Answer) {
    let latency_us = sent.due.elapsed().as_micros() as u64;
    let Some(mut entry) = s.in_flight.remove(&sent.i) else {
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
    s.finish(entry, sent.second);
}
