//! Test support: a small fake matching engine and a fake persistence read API (axum servers on
//! port 0, following the engine's documented HTTP contract), a gateway started on port 0, and
//! polling with deadlines.

use axum::Json;
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use domain::{
    Command, Fill, NewOrder, OrderId, OrderOutcome, OrderStatus, Price, Quantity, RejectReason,
};
use kit::shutdown::Shutdown;
use order_gateway::{Gateway, GatewayConfig};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

/// How long any test waits for something before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sockets bound to a port but not listening: connecting to one is refused at once (a closed
/// port), and nobody else can take the port meanwhile. Kept for the life of the test process,
/// or until [`FakeEngine::start_on`] starts listening on one.
static CLOSED: Mutex<Vec<(SocketAddr, TcpSocket)>> = Mutex::new(Vec::new());

/// An address on which nothing listens, reserved so no other test's server can get it.
pub fn closed_port() -> SocketAddr {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind port 0");
    let addr = socket.local_addr().expect("local addr");
    CLOSED.lock().unwrap().push((addr, socket));
    addr
}

pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A gateway configuration for tests: its own data dir, fast timeouts and backoff.
pub fn config(dir: &FsPath, engine: SocketAddr, persistence: SocketAddr) -> GatewayConfig {
    let mut c = GatewayConfig::default();
    c.data.dir = dir.to_path_buf();
    c.engine.url = url(engine);
    c.engine.connect_timeout_ms = 500;
    c.engine.request_timeout_ms = 1_000;
    c.engine.probe_interval_ms = 200;
    c.persistence.url = url(persistence);
    c.persistence.connect_timeout_ms = 500;
    c.persistence.request_timeout_ms = 1_000;
    c.persistence.probe_interval_ms = 200;
    c.delivery.backoff_initial_ms = 10;
    c.delivery.backoff_max_ms = 100;
    c.http.request_timeout_ms = 5_000;
    c
}

/// A gateway served on port 0 by [`order_gateway::run`].
pub struct TestGateway {
    pub addr: SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), order_gateway::StartError>>,
}

impl TestGateway {
    pub async fn start(config: GatewayConfig) -> TestGateway {
        let listener = kit::http::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = Shutdown::new();
        let task = tokio::spawn(order_gateway::run(config, listener, shutdown.clone()));
        let gw = TestGateway {
            addr,
            shutdown,
            task,
        };
        let client = client();
        let ready = format!("{}/readyz", gw.url());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = client.get(&ready).send().await
                && r.status() == StatusCode::OK
            {
                break;
            }
            assert!(
                !gw.task.is_finished(),
                "gateway stopped while starting: {:?}",
                gw.task.is_finished()
            );
            assert!(Instant::now() < deadline, "gateway did not become ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gw
    }

    pub fn url(&self) -> String {
        url(self.addr)
    }

    /// Drains and stops the gateway, releasing its data directory.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.task
            .await
            .expect("gateway task")
            .expect("gateway ran cleanly");
    }

    pub async fn post_order(&self, body: &Value) -> (StatusCode, Value) {
        self.post_json("/v1/orders", body).await
    }

    pub async fn post_batch(&self, body: &Value) -> (StatusCode, Value) {
        self.post_json("/v1/orders/batch", body).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = client()
            .post(format!("{}{path}", self.url()))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        answer(r).await
    }

    pub async fn post_raw(&self, body: &Value) -> (StatusCode, bytes::Bytes) {
        let r = client()
            .post(format!("{}/v1/orders", self.url()))
            .json(body)
            .send()
            .await
            .expect("POST /v1/orders");
        let status = r.status();
        (status, r.bytes().await.expect("body"))
    }

    pub async fn cancel(&self, id: &Value) -> (StatusCode, Value) {
        let r = client()
            .delete(format!("{}/v1/orders/{id}", self.url()))
            .send()
            .await
            .expect("DELETE");
        answer(r).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = client()
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .expect("GET");
        answer(r).await
    }
}

/// Opens a gateway without serving it (for `app().oneshot`). Its background work is not
/// started.
pub fn open(config: GatewayConfig) -> Gateway {
    Gateway::open(config).expect("gateway opens")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn answer(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let bytes = r.bytes().await.expect("body");
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("answer {status} is not JSON ({e}): {bytes:?}"));
    (status, v)
}

/// A valid limit order body.
pub fn order(client_order_id: &str) -> Value {
    json!({
        "client_order_id": client_order_id,
        "account": "acct-1",
        "symbol": "AAPL",
        "side": "buy",
        "type": "limit",
        "price": "101.25",
        "quantity": 10,
        "time_in_force": "gtc",
    })
}

/// A fake matching engine that follows the engine's HTTP contract: orders of quantity 100 or
/// more rest (status `new`), smaller ones fill at once against order 7; ids are idempotent
/// (same content → original outcome, other content → 409).
#[derive(Default)]
pub struct EngineState {
    /// Every command received, in arrival order (retries included).
    pub received: Mutex<Vec<Command>>,
    /// Commands executed for the first time, in order.
    pub executed: Mutex<Vec<Command>>,
    /// `depth` of every book request.
    pub book_depths: Mutex<Vec<String>>,
    by_order_id: Mutex<HashMap<OrderId, (NewOrder, OrderOutcome)>>,
    by_client_id: Mutex<HashMap<String, OrderId>>,
    open: Mutex<HashSet<OrderId>>,
    seq: AtomicU64,
    /// Requests hang without answering while set.
    pub stall: AtomicBool,
    /// Requests are answered 503 while set.
    pub draining: AtomicBool,
    /// Every request takes this long to answer (a slow engine).
    pub delay_ms: AtomicU64,
    /// Calls to `POST /v1/commands`, and the commands they carried.
    pub batch_calls: AtomicU64,
    pub batched_commands: AtomicU64,
}

impl EngineState {
    pub fn executed_new_orders(&self) -> Vec<OrderId> {
        self.executed
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match c {
                Command::NewOrder(o) => Some(o.order_id),
                Command::Cancel(_) => None,
            })
            .collect()
    }

    pub fn executed_len(&self) -> usize {
        self.executed.lock().unwrap().len()
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }
}

pub struct FakeEngine {
    pub addr: SocketAddr,
    pub state: Arc<EngineState>,
    task: JoinHandle<()>,
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEngine {
    pub async fn start() -> FakeEngine {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake engine");
        FakeEngine::serve(listener)
    }

    /// Starts listening on `addr`, a port reserved by [`closed_port`]: the engine "comes back".
    pub async fn start_on(addr: SocketAddr) -> FakeEngine {
        let socket = {
            let mut closed = CLOSED.lock().unwrap();
            let i = closed
                .iter()
                .position(|(a, _)| *a == addr)
                .expect("a port from closed_port()");
            closed.swap_remove(i).1
        };
        FakeEngine::serve(socket.listen(1024).expect("listen"))
    }

    fn serve(listener: TcpListener) -> FakeEngine {
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(EngineState::default());
        let app = Router::new()
            .route("/v1/orders", post(engine_new_order))
            .route("/v1/orders/{id}/cancel", post(engine_cancel))
            .route("/v1/commands", post(engine_commands))
            .route("/v1/book/{symbol}", get(engine_book))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeEngine { addr, state, task }
    }
}

fn conflict(field: &str) -> Response {
    (
        StatusCode::CONFLICT,
        Json(json!({"error": {"code": "conflict", "field": field, "message": format!("{field} reused with different content")}})),
    )
        .into_response()
}

fn same_content(a: &NewOrder, b: &NewOrder) -> bool {
    let mut b = b.clone();
    b.order_id = a.order_id;
    *a == b
}

async fn gate(s: &EngineState) -> Option<Response> {
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if s.stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if s.draining.load(Ordering::SeqCst) {
        return Some(StatusCode::SERVICE_UNAVAILABLE.into_response());
    }
    None
}

async fn engine_new_order(State(s): State<Arc<EngineState>>, body: bytes::Bytes) -> Response {
    if let Some(r) = gate(&s).await {
        return r;
    }
    new_order(&s, body)
}

fn new_order(s: &Arc<EngineState>, body: bytes::Bytes) -> Response {
    let order: NewOrder = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": {"code": "malformed", "field": "body", "message": e.to_string()}})),
            )
                .into_response();
        }
    };
    s.received
        .lock()
        .unwrap()
        .push(Command::NewOrder(order.clone()));
    if let Some((known, outcome)) = s.by_order_id.lock().unwrap().get(&order.order_id) {
        return if *known == order {
            Json(outcome.clone()).into_response()
        } else {
            conflict("order_id")
        };
    }
    let original = s
        .by_client_id
        .lock()
        .unwrap()
        .get(order.client_order_id.as_str())
        .copied();
    if let Some(id) = original {
        let by_id = s.by_order_id.lock().unwrap();
        let (known, outcome) = &by_id[&id];
        return if same_content(known, &order) {
            Json(outcome.clone()).into_response()
        } else {
            conflict("client_order_id")
        };
    }
    let rests = order.quantity.0 >= 100;
    let first_seq = s.next_seq();
    let outcome = if rests {
        s.open.lock().unwrap().insert(order.order_id);
        OrderOutcome {
            order_id: order.order_id,
            status: OrderStatus::New,
            filled_quantity: Quantity(0),
            resting_quantity: order.quantity,
            fills: vec![],
            reject_reason: None,
            expire_reason: None,
            first_seq,
            last_seq: first_seq,
        }
    } else {
        let trade_seq = s.next_seq();
        OrderOutcome {
            order_id: order.order_id,
            status: OrderStatus::Filled,
            filled_quantity: order.quantity,
            resting_quantity: Quantity(0),
            fills: vec![Fill {
                trade_seq,
                price: order.price.unwrap_or(Price(2025)),
                quantity: order.quantity,
                counterparty_order_id: OrderId(7),
                maker: false,
            }],
            reject_reason: None,
            expire_reason: None,
            first_seq,
            last_seq: trade_seq,
        }
    };
    s.by_client_id
        .lock()
        .unwrap()
        .insert(order.client_order_id.as_str().to_owned(), order.order_id);
    s.by_order_id
        .lock()
        .unwrap()
        .insert(order.order_id, (order.clone(), outcome.clone()));
    s.executed.lock().unwrap().push(Command::NewOrder(order));
    Json(outcome).into_response()
}

/// `POST /v1/commands`: each command through the single-command handlers, in order.
async fn engine_commands(State(s): State<Arc<EngineState>>, body: bytes::Bytes) -> Response {
    if let Some(r) = gate(&s).await {
        return r;
    }
    let commands: Vec<Command> = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"error": {"code": "malformed", "field": "body", "message": e.to_string()}})),
            )
                .into_response();
        }
    };
    s.batch_calls.fetch_add(1, Ordering::SeqCst);
    s.batched_commands
        .fetch_add(commands.len() as u64, Ordering::SeqCst);
    let mut results = Vec::new();
    for command in commands {
        let resp = match command {
            Command::NewOrder(o) => {
                let body = bytes::Bytes::from(serde_json::to_vec(&o).expect("serializes"));
                new_order(&s, body)
            }
            Command::Cancel(c) => cancel(&s, c.order_id.0),
        };
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("in-memory body");
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        results.push(if status == 200 {
            json!({"status": 200, "outcome": v, "replayed": false})
        } else {
            json!({"status": status, "error": v["error"]})
        });
    }
    Json(results).into_response()
}

async fn engine_cancel(State(s): State<Arc<EngineState>>, Path(id): Path<u64>) -> Response {
    if let Some(r) = gate(&s).await {
        return r;
    }
    cancel(&s, id)
}

fn cancel(s: &Arc<EngineState>, id: u64) -> Response {
    let id = OrderId(id);
    let cancel = Command::Cancel(domain::CancelOrder { order_id: id });
    s.received.lock().unwrap().push(cancel.clone());
    let seq = s.next_seq();
    let known = s.by_order_id.lock().unwrap().get(&id).cloned();
    let rejected = |reason| OrderOutcome {
        order_id: id,
        status: OrderStatus::Rejected,
        filled_quantity: Quantity(0),
        resting_quantity: Quantity(0),
        fills: vec![],
        reject_reason: Some(reason),
        expire_reason: None,
        first_seq: seq,
        last_seq: seq,
    };
    let outcome = match known {
        None => rejected(RejectReason::UnknownOrder),
        // Like the engine: a refused cancel of a known order carries the order's own status.
        Some((_, o)) if !s.open.lock().unwrap().remove(&id) => OrderOutcome {
            status: if o.status == OrderStatus::New {
                OrderStatus::Cancelled
            } else {
                o.status
            },
            ..rejected(RejectReason::OrderNotOpen)
        },
        Some((_, o)) => OrderOutcome {
            status: OrderStatus::Cancelled,
            resting_quantity: Quantity(0),
            first_seq: seq,
            last_seq: seq,
            fills: vec![],
            ..o
        },
    };
    s.executed.lock().unwrap().push(cancel);
    Json(outcome).into_response()
}

async fn engine_book(
    State(s): State<Arc<EngineState>>,
    Path(symbol): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    if let Some(r) = gate(&s).await {
        return r;
    }
    s.book_depths.lock().unwrap().push(q.unwrap_or_default());
    Json(json!({
        "symbol": symbol,
        "seq": 42,
        "bids": [{"price": "101.25", "quantity": 10, "orders": 1}],
        "asks": [],
    }))
    .into_response()
}

/// A fake persistence read API that knows the orders in `known`.
pub struct FakePersistence {
    pub addr: SocketAddr,
    pub known: Arc<Mutex<HashSet<u64>>>,
    task: JoinHandle<()>,
}

impl Drop for FakePersistence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePersistence {
    pub async fn start() -> FakePersistence {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let known: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let app = Router::new()
            .route(
                "/v1/orders/{id}",
                get(
                    |State(k): State<Arc<Mutex<HashSet<u64>>>>, Path(id): Path<u64>| async move {
                        if k.lock().unwrap().contains(&id) {
                            Json(json!({"order_id": id, "status": "filled", "filled_quantity": 10}))
                                .into_response()
                        } else {
                            (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "field": "order_id", "message": "no such order"}})))
                                .into_response()
                        }
                    },
                ),
            )
            .with_state(known.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakePersistence { addr, known, task }
    }
}
