//! End-to-end tests of the persistence service against a real PostgreSQL and a real RabbitMQ,
//! both started privately by the test ([`support`]). The service runs in-process on port 0.
//!
//! One test function walks through the scenarios in order (they share the two servers, each
//! scenario with its own database): rows and read API, duplicates, gaps, poison, restart,
//! PostgreSQL outage, broker connection loss. Every wait is a poll with a deadline.
//!
//! `TEST_LOG=1` shows the service's logs. The ignored `throughput` test prints events/s.

mod support;

use domain::{
    Catalog, Event, EventBatch, EventKind, ExpireReason, NewOrderRequest, OrderId, Price, Quantity,
    RejectReason, Side, Symbol, WIRE_VERSION,
};
use kit::shutdown::Shutdown;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use persistence::Config;
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{Postgres, Rabbit};

// ---------------------------------------------------------------------------------------
// Helpers.

const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns `Some`, failing after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        kit::telemetry::init(
            "persistence-test",
            &kit::config::LogConfig {
                format: kit::config::LogFormat::Human,
                level: "info,persistence=debug,sqlx=warn".into(),
            },
        );
    }
}

/// The service running in-process.
struct Service {
    addr: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), persistence::Error>>,
    http: reqwest::Client,
}

impl Service {
    async fn start(db_url: &str, amqp_url: &str) -> Service {
        let svc = Service::spawn(db_url, amqp_url).await;
        svc.wait_ready(true).await;
        svc
    }

    /// Starts the service without waiting for readiness.
    async fn spawn(db_url: &str, amqp_url: &str) -> Service {
        let mut config = Config::default();
        config.database.url = db_url.into();
        config.amqp.url = amqp_url.into();
        // Faster recovery in tests; the same code paths.
        config.database.retry_backoff_max_ms = 300;
        config.database.acquire_timeout_ms = 500;
        config.amqp.reconnect_backoff_max_ms = 300;
        config.database.shutdown_flush_timeout_ms = 1_000;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(persistence::run(config, listener, shutdown.clone()));
        Service {
            addr,
            shutdown,
            task,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    async fn readyz(&self) -> Value {
        self.get("/readyz").await.1
    }

    /// Waits until `/readyz` says ready (`true`) or until postgres is reported down.
    async fn wait_ready(&self, ready: bool) {
        eventually("readiness", DEADLINE, || async {
            let r = self.http.get(self.url("/readyz")).send().await.ok()?;
            let up = r.status().is_success();
            (up == ready).then_some(())
        })
        .await;
    }

    async fn stats(&self) -> Option<Value> {
        let (status, body) = self.get("/v1/stats").await;
        (status == 200).then_some(body)
    }

    /// Waits until `/v1/stats` shows `last_seq` and `events` both equal to `n`.
    async fn wait_events(&self, n: i64) -> Value {
        eventually(&format!("{n} events persisted"), DEADLINE, || async {
            let s = self.stats().await?;
            (s["events"] == n && s["last_seq"] == n).then_some(s)
        })
        .await
    }

    /// Waits until `metric_with(name, label)` equals `expected` (metrics are recorded just
    /// after the commit that the stats already show).
    async fn wait_metric(&self, name: &str, label: &str, expected: f64) {
        let what = format!("{name}{{{label}}} == {expected}");
        eventually(&what, DEADLINE, || async {
            (self.metric_with(name, label).await == expected).then_some(())
        })
        .await;
    }

    /// Sum of the samples of `name` (all label sets) on `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        self.metric_with(name, "").await
    }

    /// Sum of the samples of `name` whose labels contain `label` (e.g. `dependency="postgres"`).
    async fn metric_with(&self, name: &str, label: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                    && l.contains(label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("service stops within the deadline")
            .expect("service task does not panic");
        result.expect("service stops cleanly");
    }
}

/// Publishes to the events exchange with confirms, as the engine does.
struct Publisher {
    conn: Connection,
    channel: Channel,
}

impl Publisher {
    async fn connect(url: &str) -> Publisher {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        kit::amqp::declare_topology(&channel).await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Publisher { conn, channel }
    }

    async fn raw(&self, body: &[u8]) {
        self.publish_many(&[body.to_vec()]).await;
    }

    async fn batch(&self, events: &[Event]) {
        self.publish_many(&[body(events)]).await;
    }

    /// Publishes every body, then waits for all confirms.
    async fn publish_many(&self, bodies: &[Vec<u8>]) {
        let mut confirms = Vec::with_capacity(bodies.len());
        for b in bodies {
            confirms.push(
                self.channel
                    .basic_publish(
                        kit::amqp::EVENTS_EXCHANGE.into(),
                        kit::amqp::EVENTS_ROUTING_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        b,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            let confirmation = c.await.unwrap();
            assert!(confirmation.is_ack(), "{confirmation:?}");
        }
    }

    async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

fn body(events: &[Event]) -> Vec<u8> {
    serde_json::to_vec(&EventBatch {
        v: WIRE_VERSION,
        events: events.to_vec(),
    })
    .unwrap()
}

fn sym(s: &str) -> Symbol {
    Symbol::parse("symbol", s).unwrap()
}

/// An accepted order from a compact spec: `"ACCOUNT SYMBOL SIDE TYPE PRICE QTY TIF"`, with
/// `-` as the price of a market order; the client order id is `c-{id}`.
fn accepted(seq: u64, id: u64, spec: &str) -> Event {
    let f: Vec<&str> = spec.split_whitespace().collect();
    assert_eq!(f.len(), 7, "spec {spec:?}");
    let order = NewOrderRequest {
        client_order_id: Some(format!("c-{id}")),
        account: Some(f[0].into()),
        symbol: Some(f[1].into()),
        side: Some(f[2].into()),
        order_type: Some(f[3].into()),
        price: (f[4] != "-").then(|| f[4].to_owned()),
        quantity: Some(f[5].parse().unwrap()),
        time_in_force: Some(f[6].into()),
    }
    .validate(&Catalog::lab(), OrderId(id))
    .unwrap();
    Event {
        seq,
        kind: EventKind::Accepted { order },
    }
}

fn trade(
    seq: u64,
    symbol: &str,
    maker: u64,
    taker: u64,
    side: Side,
    ticks: i64,
    qty: u64,
) -> Event {
    Event {
        seq,
        kind: EventKind::Trade {
            symbol: sym(symbol),
            maker_order_id: OrderId(maker),
            taker_order_id: OrderId(taker),
            taker_side: side,
            price: Price(ticks),
            quantity: Quantity(qty),
        },
    }
}

fn rejected(seq: u64, id: u64, client: Option<&str>, reason: RejectReason) -> Event {
    Event {
        seq,
        kind: EventKind::Rejected {
            order_id: OrderId(id),
            client_order_id: client.map(|c| domain::ClientOrderId::parse("c", c).unwrap()),
            reason,
        },
    }
}

/// A crossing pair of orders and their trade: 3 events from `seq`, orders `id`, `id + 1`.
fn pair(seq: u64, id: u64) -> Vec<Event> {
    vec![
        accepted(seq, id, "acct-a NVDA sell limit 120.00 10 gtc"),
        accepted(seq + 1, id + 1, "acct-b NVDA buy limit 120.00 10 gtc"),
        trade(seq + 2, "NVDA", id, id + 1, Side::Buy, 12_000, 10),
    ]
}

async fn query_json(pool: &sqlx::PgPool, sql: &'static str) -> Vec<Value> {
    let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
    rows.iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// The worked example of docs/persistence.md: every order status, exact rows, the read API,
/// a duplicate batch, a gap, poison, a restart.
async fn rows_api_duplicates_gaps_poison(pg: &Postgres, rabbit: &Rabbit) {
    pg.create_database("basic");
    let svc = Service::start(&pg.url("basic"), &rabbit.url()).await;
    let publisher = Publisher::connect(&rabbit.url()).await;

    let batch_a = vec![
        accepted(1, 1, "acct-1 AAPL sell limit 101.25 100 gtc"),
        accepted(2, 2, "acct-2 AAPL buy limit 101.30 60 gtc"),
        trade(3, "AAPL", 1, 2, Side::Buy, 10125, 60),
    ];
    let batch_b = vec![
        accepted(4, 3, "acct-2 AAPL buy market - 50 ioc"),
        trade(5, "AAPL", 1, 3, Side::Buy, 10125, 40),
        Event {
            seq: 6,
            kind: EventKind::Expired {
                symbol: sym("AAPL"),
                order_id: OrderId(3),
                quantity: Quantity(10),
                reason: ExpireReason::NoLiquidity,
            },
        },
    ];
    let batch_c = vec![
        accepted(7, 4, "acct-1 MSFT sell limit 300 10 gtc"),
        Event {
            seq: 8,
            kind: EventKind::Cancelled {
                symbol: sym("MSFT"),
                order_id: OrderId(4),
                quantity: Quantity(10),
            },
        },
        rejected(9, 5, Some("c-5"), RejectReason::UnknownSymbol),
        rejected(10, 4, None, RejectReason::OrderNotOpen),
        accepted(11, 6, "acct-3 IDX buy limit 10.05 10 fok"),
        Event {
            seq: 12,
            kind: EventKind::Expired {
                symbol: sym("IDX"),
                order_id: OrderId(6),
                quantity: Quantity(10),
                reason: ExpireReason::FillOrKill,
            },
        },
        rejected(13, 1, Some("c-1"), RejectReason::DuplicateOrderId),
    ];
    publisher.batch(&batch_a).await;
    publisher.batch(&batch_b).await;
    publisher.batch(&batch_c).await;
    svc.wait_events(13).await;

    let pool = sqlx::PgPool::connect(&pg.url("basic")).await.unwrap();
    let orders = query_json(
        &pool,
        "SELECT (to_jsonb(o) - 'created_at' - 'updated_at')::text FROM orders o ORDER BY order_id",
    )
    .await;
    let base = |id: i64| {
        json!({
            "order_id": id, "client_order_id": format!("c-{id}"), "account": null,
            "symbol": null, "side": null, "type": null, "price_ticks": null, "price": null,
            "quantity": 0, "time_in_force": null, "status": null, "filled_quantity": 0,
            "cancelled_quantity": 0, "expired_quantity": 0, "reject_reason": null,
            "expire_reason": null, "accepted_seq": null, "last_seq": null,
        })
    };
    let with = |id: i64, fields: Value| {
        let mut o = base(id);
        for (k, v) in fields.as_object().unwrap() {
            o[k] = v.clone();
        }
        o
    };
    let expected = vec![
        with(
            1,
            json!({"account": "acct-1", "symbol": "AAPL", "side": "sell", "type": "limit",
            "price_ticks": 10125, "price": 101.25, "quantity": 100, "time_in_force": "gtc",
            "status": "filled", "filled_quantity": 100, "accepted_seq": 1, "last_seq": 5}),
        ),
        with(
            2,
            json!({"account": "acct-2", "symbol": "AAPL", "side": "buy", "type": "limit",
            "price_ticks": 10130, "price": 101.30, "quantity": 60, "time_in_force": "gtc",
            "status": "filled", "filled_quantity": 60, "accepted_seq": 2, "last_seq": 3}),
        ),
        with(
            3,
            json!({"account": "acct-2", "symbol": "AAPL", "side": "buy", "type": "market",
            "quantity": 50, "time_in_force": "ioc", "status": "expired", "filled_quantity": 40,
            "expired_quantity": 10, "expire_reason": "no_liquidity", "accepted_seq": 4,
            "last_seq": 6}),
        ),
        with(
            4,
            json!({"account": "acct-1", "symbol": "MSFT", "side": "sell", "type": "limit",
            "price_ticks": 30000, "price": 300.00, "quantity": 10, "time_in_force": "gtc",
            "status": "cancelled", "cancelled_quantity": 10, "accepted_seq": 7, "last_seq": 8}),
        ),
        with(
            5,
            json!({"status": "rejected", "reject_reason": "unknown_symbol", "last_seq": 9}),
        ),
        with(
            6,
            json!({"account": "acct-3", "symbol": "IDX", "side": "buy", "type": "limit",
            "price_ticks": 201, "price": 10.05, "quantity": 10, "time_in_force": "fok",
            "status": "expired", "expired_quantity": 10, "expire_reason": "fill_or_kill",
            "accepted_seq": 11, "last_seq": 12}),
        ),
    ];
    assert_eq!(orders, expected);

    let trades = query_json(
        &pool,
        "SELECT (to_jsonb(t) - 'created_at')::text FROM trades t ORDER BY seq",
    )
    .await;
    assert_eq!(
        trades,
        vec![
            json!({"seq": 3, "symbol": "AAPL", "maker_order_id": 1, "taker_order_id": 2,
                   "taker_side": "buy", "price_ticks": 10125, "price": 101.25, "quantity": 60}),
            json!({"seq": 5, "symbol": "AAPL", "maker_order_id": 1, "taker_order_id": 3,
                   "taker_side": "buy", "price_ticks": 10125, "price": 101.25, "quantity": 40}),
        ]
    );
    let events = query_json(
        &pool,
        "SELECT json_build_array(seq, type, symbol, order_id)::text FROM events ORDER BY seq",
    )
    .await;
    assert_eq!(
        events,
        vec![
            json!([1, "accepted", "AAPL", 1]),
            json!([2, "accepted", "AAPL", 2]),
            json!([3, "trade", "AAPL", 2]),
            json!([4, "accepted", "AAPL", 3]),
            json!([5, "trade", "AAPL", 3]),
            json!([6, "expired", "AAPL", 3]),
            json!([7, "accepted", "MSFT", 4]),
            json!([8, "cancelled", "MSFT", 4]),
            json!([9, "rejected", null, 5]),
            json!([10, "rejected", null, 4]),
            json!([11, "accepted", "IDX", 6]),
            json!([12, "expired", "IDX", 6]),
            json!([13, "rejected", null, 1]),
        ]
    );
    let payload: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events WHERE seq = 3")
        .fetch_all(&pool)
        .await
        .unwrap();
    let payload: Event = serde_json::from_str(&payload[0]).unwrap();
    assert_eq!(payload, batch_a[2], "the payload is the event itself");

    // --- Read API.
    let (status, o1) = svc.get("/v1/orders/1").await;
    assert_eq!(status, 200, "{o1}");
    assert_eq!(
        o1,
        json!({
            "order_id": 1, "client_order_id": "c-1", "account": "acct-1", "symbol": "AAPL",
            "side": "sell", "type": "limit", "price": "101.25", "quantity": 100,
            "time_in_force": "gtc", "status": "filled", "filled_quantity": 100,
            "cancelled_quantity": 0, "expired_quantity": 0, "reject_reason": null,
            "expire_reason": null,
            "fills": [
                {"trade_seq": 3, "price": "101.25", "quantity": 60, "counterparty_order_id": 2, "maker": true},
                {"trade_seq": 5, "price": "101.25", "quantity": 40, "counterparty_order_id": 3, "maker": true},
            ],
        })
    );
    let (status, o3) = svc.get("/v1/orders?client_order_id=c-3").await;
    assert_eq!(status, 200, "{o3}");
    assert_eq!(o3["order_id"], 3);
    assert_eq!(o3["price"], Value::Null);
    assert_eq!(o3["status"], "expired");
    assert_eq!(o3["expire_reason"], "no_liquidity");
    assert_eq!(
        o3["fills"],
        json!([{"trade_seq": 5, "price": "101.25", "quantity": 40, "counterparty_order_id": 1, "maker": false}])
    );
    let (status, o5) = svc.get("/v1/orders/5").await;
    assert_eq!(
        (status, &o5["status"], &o5["reject_reason"]),
        (200, &json!("rejected"), &json!("unknown_symbol"))
    );
    let (status, o6) = svc.get("/v1/orders/6").await;
    assert_eq!((status, &o6["price"]), (200, &json!("10.05")));
    let (status, missing) = svc.get("/v1/orders/999").await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "not_found");
    assert_eq!(missing["error"]["field"], "order_id");
    assert!(missing["error"]["message"].is_string());
    let (status, missing) = svc.get("/v1/orders?client_order_id=nope").await;
    assert_eq!(
        (status, &missing["error"]["field"]),
        (404, &json!("client_order_id"))
    );
    let (status, bad) = svc.get("/v1/orders/abc").await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["field"], "order_id");
    let (status, t) = svc.get("/v1/trades?symbol=AAPL&limit=1").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["symbol"], "AAPL");
    assert_eq!(t["trades"].as_array().map(Vec::len), Some(1));
    assert_eq!(t["trades"][0]["seq"], 5, "newest first");
    assert_eq!(t["trades"][0]["price"], "101.25");
    assert!(
        t["trades"][0]["created_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
    );
    let (_, t) = svc.get("/v1/trades?symbol=AAPL").await;
    assert_eq!(t["trades"].as_array().map(Vec::len), Some(2));
    let (status, t) = svc.get("/v1/trades?symbol=MSFT").await;
    assert_eq!(
        (status, t["trades"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, bad) = svc.get("/v1/trades?symbol=ZZZZ").await;
    assert_eq!(status, 422);
    assert_eq!(bad["error"]["field"], "symbol");
    let (status, bad) = svc.get("/v1/trades?symbol=AAPL&limit=5000").await;
    assert_eq!((status, &bad["error"]["field"]), (422, &json!("limit")));
    let (status, stats) = svc.get("/v1/stats").await;
    assert_eq!(status, 200);
    assert_eq!(
        stats,
        json!({"last_seq": 13, "contiguous_seq": 13, "events": 13, "orders": 6, "trades": 2, "poison_messages": 0})
    );
    let ready = svc.readyz().await;
    assert_eq!(
        ready["dependencies"],
        json!({"postgres": true, "rabbitmq": true})
    );

    // --- A duplicate batch changes nothing (not even updated_at); a batch that overlaps old
    // and new seqs only applies the new ones.
    let snapshot = "SELECT to_jsonb(o)::text FROM orders o ORDER BY order_id";
    let before = query_json(&pool, snapshot).await;
    let redelivered_before = svc.metric("persistence_redelivered_total").await;
    publisher.batch(&batch_a).await;
    eventually("duplicate batch processed", DEADLINE, || async {
        (svc.metric("persistence_redelivered_total").await >= redelivered_before + 3.0)
            .then_some(())
    })
    .await;
    assert_eq!(query_json(&pool, snapshot).await, before);
    let mut overlap = batch_c[4..].to_vec(); // seqs 11, 12, 13 again ...
    overlap.push(accepted(14, 7, "acct-4 GOOG sell limit 2800.50 5 gtc"));
    publisher.batch(&overlap).await;
    let stats = svc.wait_events(14).await;
    assert_eq!(stats["orders"], 7);
    svc.wait_metric(
        "persistence_redelivered_total",
        "",
        redelivered_before + 6.0,
    )
    .await;
    let after = query_json(&pool, snapshot).await;
    assert_eq!(
        after[..6],
        before[..],
        "old rows untouched by the overlapping batch"
    );
    assert_eq!(after[6]["status"], "new");
    assert_eq!(after[6]["price"], json!(2800.50));

    // --- A gap: seqs 15..=17 never arrive before 18 and 19.
    let gaps_before = svc.metric("persistence_sequence_gaps_total").await;
    let missing_before = svc.metric("persistence_sequence_gap_events_total").await;
    publisher
        .batch(&[
            accepted(18, 11, "acct-5 TSLA buy limit 250.00 1 gtc"),
            accepted(19, 12, "acct-5 TSLA buy limit 250.01 1 gtc"),
        ])
        .await;
    let stats = eventually("seq 19", DEADLINE, || async {
        let s = svc.stats().await?;
        (s["last_seq"] == 19).then_some(s)
    })
    .await;
    assert_eq!(stats["contiguous_seq"], 14);
    assert_eq!(stats["events"], 16);
    svc.wait_metric("persistence_sequence_gaps_total", "", gaps_before + 1.0)
        .await;
    svc.wait_metric(
        "persistence_sequence_gap_events_total",
        "",
        missing_before + 3.0,
    )
    .await;
    svc.wait_metric("persistence_contiguous_seq", "", 14.0)
        .await;
    svc.wait_metric("persistence_last_seq", "", 19.0).await;
    // The late events fill the hole: no new gap, contiguous catches up.
    publisher
        .batch(&[
            accepted(15, 8, "acct-5 AMZN buy limit 180.00 1 gtc"),
            accepted(16, 9, "acct-5 AMZN buy limit 180.01 1 gtc"),
            accepted(17, 10, "acct-5 AMZN buy limit 180.02 1 gtc"),
        ])
        .await;
    let stats = svc.wait_events(19).await;
    assert_eq!(stats["contiguous_seq"], 19);
    // The gauge is set after the gap counters of the same batch: no new gap was counted.
    svc.wait_metric("persistence_contiguous_seq", "", 19.0)
        .await;
    assert_eq!(
        svc.metric("persistence_sequence_gaps_total").await,
        gaps_before + 1.0
    );

    // --- Poison: stored, counted, acked; good messages behind them still land.
    let poison_before = svc.metric("persistence_poison_messages_total").await;
    publisher.raw(b"this is not json").await;
    publisher.raw(br#"{"v":99,"events":[]}"#).await;
    publisher
        .batch(&[accepted(20, 13, "acct-6 AAPL buy limit 1.00 1 gtc")])
        .await;
    let stats = svc.wait_events(20).await;
    assert_eq!(stats["poison_messages"], 2);
    svc.wait_metric("persistence_poison_messages_total", "", poison_before + 2.0)
        .await;
    let poison: Vec<(String, String)> = sqlx::query_as(
        "SELECT reason, convert_from(body, 'UTF8') FROM poison_messages ORDER BY reason",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        poison,
        vec![
            ("not_json".to_owned(), "this is not json".to_owned()),
            (
                "unsupported_version".to_owned(),
                r#"{"v":99,"events":[]}"#.to_owned()
            ),
        ]
    );
    let (ready, unacked) = eventually("queue drained", DEADLINE, || async {
        rabbit
            .queue_depth(kit::amqp::EVENTS_QUEUE)
            .filter(|d| *d == (0, 0))
    })
    .await;
    assert_eq!((ready, unacked), (0, 0));

    // --- Graceful stop, then a restart that rebuilds its seq state from the database.
    svc.stop().await;
    let svc = Service::start(&pg.url("basic"), &rabbit.url()).await;
    svc.wait_metric("persistence_contiguous_seq", "", 20.0)
        .await;
    let gaps_before = svc.metric("persistence_sequence_gaps_total").await;
    publisher
        .batch(&[accepted(21, 14, "acct-6 AAPL buy limit 1.01 1 gtc")])
        .await;
    let stats = svc.wait_events(21).await;
    assert_eq!(stats["contiguous_seq"], 21);
    svc.wait_metric("persistence_contiguous_seq", "", 21.0)
        .await;
    assert_eq!(
        svc.metric("persistence_sequence_gaps_total").await,
        gaps_before
    );

    // --- A second instance is a standby: the queue has one exclusive consumer, so two
    // instances never interleave batches; the standby takes over when the first stops.
    let standby = Service::spawn(&pg.url("basic"), &rabbit.url()).await;
    let r = eventually("standby connected to postgres", DEADLINE, || async {
        let r = standby.readyz().await;
        (r["dependencies"]["postgres"] == true).then_some(r)
    })
    .await;
    assert_eq!(r["dependencies"]["rabbitmq"], false, "{r}");
    svc.stop().await;
    standby.wait_ready(true).await;
    publisher
        .batch(&[accepted(22, 15, "acct-6 AAPL buy limit 1.02 1 gtc")])
        .await;
    let stats = standby.wait_events(22).await;
    assert_eq!(stats["contiguous_seq"], 22);
    publisher.close().await;
    pool.close().await;
    standby.stop().await;
}

/// A message the database refuses on its own (here: a CHECK constraint added by the test)
/// does not block the others: the batch is split, the message is stored as poison.
async fn refused_message_is_quarantined(pg: &Postgres, rabbit: &Rabbit) {
    pg.create_database("refused");
    let svc = Service::start(&pg.url("refused"), &rabbit.url()).await;
    let pool = sqlx::PgPool::connect(&pg.url("refused")).await.unwrap();
    sqlx::query("ALTER TABLE events ADD CONSTRAINT test_refuse_seq_5 CHECK (seq <> 5)")
        .execute(&pool)
        .await
        .unwrap();
    let refused = r#"reason="refused""#;
    let refused_before = svc
        .metric_with("persistence_poison_messages_total", refused)
        .await;
    let publisher = Publisher::connect(&rabbit.url()).await;
    publisher
        .publish_many(&[body(&pair(1, 1)), body(&pair(4, 3)), body(&pair(7, 5))])
        .await;
    let stats = eventually(
        "good messages stored, bad one quarantined",
        DEADLINE,
        || async {
            let s = svc.stats().await?;
            (s["last_seq"] == 9 && s["poison_messages"] == 1).then_some(s)
        },
    )
    .await;
    assert_eq!(
        stats,
        json!({"last_seq": 9, "contiguous_seq": 3, "events": 6, "orders": 4, "trades": 2, "poison_messages": 1})
    );
    let (reason, error): (String, String) =
        sqlx::query_as("SELECT reason, error FROM poison_messages")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(reason, "refused");
    assert!(error.contains("test_refuse_seq_5"), "{error}");
    svc.wait_metric(
        "persistence_poison_messages_total",
        refused,
        refused_before + 1.0,
    )
    .await;
    eventually("queue drained", DEADLINE, || async {
        rabbit
            .queue_depth(kit::amqp::EVENTS_QUEUE)
            .filter(|d| *d == (0, 0))
    })
    .await;
    publisher.close().await;
    pool.close().await;
    svc.stop().await;
}

/// PostgreSQL stops: nothing is acked, RabbitMQ holds the messages, readiness says so; when
/// it returns, everything lands exactly once. Then the broker drops every connection: the
/// consumer reconnects and goes on.
async fn postgres_outage_and_broker_disconnect(pg: &Postgres, rabbit: &Rabbit) {
    pg.create_database("outage");
    let svc = Service::start(&pg.url("outage"), &rabbit.url()).await;
    let publisher = Publisher::connect(&rabbit.url()).await;

    // 5 messages of 3 events: seqs 1..=15, orders 1..=10.
    let before: Vec<Vec<u8>> = (0..5u64)
        .map(|k| body(&pair(1 + 3 * k, 1 + 2 * k)))
        .collect();
    publisher.publish_many(&before).await;
    svc.wait_events(15).await;

    pg.stop_fast();
    eventually("readiness postgres=false", DEADLINE, || async {
        let r = svc.readyz().await;
        (r["dependencies"]["postgres"] == false && r["ready"] == false).then_some(())
    })
    .await;
    let (status, body503) = svc.get("/v1/stats").await;
    assert_eq!(status, 503, "{body503}");
    assert_eq!(body503["error"]["code"], "unavailable");

    // 20 more messages (seqs 16..=75, orders 11..=50) while the database is down.
    let during: Vec<Vec<u8>> = (5..25u64)
        .map(|k| body(&pair(1 + 3 * k, 1 + 2 * k)))
        .collect();
    publisher.publish_many(&during).await;
    let depth = eventually("all 20 messages held unacked", DEADLINE, || async {
        rabbit
            .queue_depth(kit::amqp::EVENTS_QUEUE)
            .filter(|(ready, unacked)| *ready + *unacked == 20 && *unacked > 0)
    })
    .await;
    assert!(depth.1 <= 20, "{depth:?}");
    eventually("a failed batch attempt counted", DEADLINE, || async {
        let n = svc
            .metric_with("persistence_db_errors_total", r#"kind="transient""#)
            .await;
        (n >= 1.0).then_some(())
    })
    .await;
    assert_eq!(svc.readyz().await["dependencies"]["postgres"], false);

    let reconnects_before = svc
        .metric_with("persistence_reconnects_total", "dependency=\"postgres\"")
        .await;
    pg.start_again();
    let stats = svc.wait_events(75).await;
    assert_eq!(
        stats,
        json!({"last_seq": 75, "contiguous_seq": 75, "events": 75, "orders": 50, "trades": 25, "poison_messages": 0})
    );
    svc.wait_ready(true).await;
    assert!(
        svc.metric_with("persistence_reconnects_total", "dependency=\"postgres\"")
            .await
            > reconnects_before
    );
    let pool = sqlx::PgPool::connect(&pg.url("outage")).await.unwrap();
    let (filled, sum_filled): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'filled'), sum(filled_quantity)::bigint FROM orders",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (filled, sum_filled),
        (50, Some(500)),
        "every fill applied exactly once"
    );
    eventually("queue drained after the outage", DEADLINE, || async {
        rabbit
            .queue_depth(kit::amqp::EVENTS_QUEUE)
            .filter(|d| *d == (0, 0))
    })
    .await;

    // The broker closes every connection (the publisher's too).
    publisher.close().await;
    let amqp_reconnects = svc
        .metric_with("persistence_reconnects_total", "dependency=\"rabbitmq\"")
        .await;
    rabbit.ctl(&["close_all_connections", "test: broker connection loss"]);
    eventually("consumer reconnected", DEADLINE, || async {
        let n = svc
            .metric_with("persistence_reconnects_total", "dependency=\"rabbitmq\"")
            .await;
        (n > amqp_reconnects && svc.readyz().await["ready"] == true).then_some(())
    })
    .await;
    let publisher = Publisher::connect(&rabbit.url()).await;
    publisher.batch(&pair(76, 51)).await;
    let stats = svc.wait_events(78).await;
    assert_eq!(stats["contiguous_seq"], 78);

    // Shutdown while PostgreSQL is away: the batch in hand is abandoned unacked (after the
    // flush budget), the broker keeps every message, and the next instance stores them.
    pg.stop_fast();
    svc.wait_ready(false).await;
    let held: Vec<Vec<u8>> = (26..31u64)
        .map(|k| body(&pair(1 + 3 * k, 1 + 2 * k)))
        .collect();
    publisher.publish_many(&held).await;
    eventually("5 messages held unacked", DEADLINE, || async {
        rabbit
            .queue_depth(kit::amqp::EVENTS_QUEUE)
            .filter(|d| *d == (0, 5))
    })
    .await;
    svc.stop().await;
    eventually("messages back in the queue", DEADLINE, || async {
        rabbit
            .queue_depth(kit::amqp::EVENTS_QUEUE)
            .filter(|d| *d == (5, 0))
    })
    .await;
    pg.start_again();
    let svc = Service::start(&pg.url("outage"), &rabbit.url()).await;
    let stats = svc.wait_events(93).await;
    assert_eq!(stats["contiguous_seq"], 93);
    assert_eq!(stats["orders"], 62);
    publisher.close().await;
    pool.close().await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_against_real_postgres_and_rabbitmq() {
    init_logs();
    let pg = match Postgres::start() {
        Ok(pg) => pg,
        Err(why) => {
            return support::skipped("persistence_against_real_postgres_and_rabbitmq", &why);
        }
    };
    let rabbit = match Rabbit::start().await {
        Ok(r) => r,
        Err(why) => {
            return support::skipped("persistence_against_real_postgres_and_rabbitmq", &why);
        }
    };
    rows_api_duplicates_gaps_poison(&pg, &rabbit).await;
    refused_message_is_quarantined(&pg, &rabbit).await;
    postgres_outage_and_broker_disconnect(&pg, &rabbit).await;
    a_hung_broker_connection_is_dropped_and_made_again(&pg, &rabbit).await;
    lookups_follow_the_table_as_it_grows(&pg, &rabbit).await;
}

/// The broker connection goes silent (a relay stops moving bytes, both sockets stay open):
/// no error ever arrives, so only heartbeats can tell. Both ends miss them after about 20 s
/// (`kit::amqp::HEARTBEAT_S`, 10 s): the service drops the connection and connects again, the
/// broker frees the silent connection's exclusive consumer, and the messages published
/// meanwhile are stored (measured: 30 s after the freeze). With the broker's default heartbeat
/// (60 s) this phase fails its 60 s deadline.
async fn a_hung_broker_connection_is_dropped_and_made_again(pg: &Postgres, rabbit: &Rabbit) {
    pg.create_database("hung");
    let relay = support::Relay::start(([127, 0, 0, 1], rabbit.port).into()).await;
    let svc = Service::start(
        &pg.url("hung"),
        &format!("amqp://guest:guest@{}/%2f", relay.addr),
    )
    .await;
    let publisher = Publisher::connect(&rabbit.url()).await;
    publisher.batch(&pair(1, 1)).await;
    svc.wait_events(3).await;
    let connections = relay.accepted();

    relay.freeze_current();
    let frozen = Instant::now();
    publisher.batch(&pair(4, 3)).await;
    publisher.batch(&pair(7, 5)).await;
    let stats = svc.wait_events(9).await;
    eprintln!(
        "hung connection: stored again {:.1} s after the freeze",
        frozen.elapsed().as_secs_f64()
    );
    assert_eq!(stats["contiguous_seq"], 9);
    assert!(
        relay.accepted() > connections,
        "the service made a new connection"
    );
    assert!(
        svc.metric_with("persistence_reconnects_total", "dependency=\"rabbitmq\"")
            .await
            >= 1.0
    );
    publisher.close().await;
    svc.stop().await;
}

/// A fresh database has no statistics until autovacuum's first `ANALYZE`. The per-batch
/// lookup of the orders a batch touches must use the primary key once `orders` has grown,
/// not a plan made while it was tiny (a prepared statement's cached generic plan: a
/// sequential scan that then reads the whole table in every batch).
async fn lookups_follow_the_table_as_it_grows(pg: &Postgres, rabbit: &Rabbit) {
    pg.create_database("plans");
    let svc = Service::start(&pg.url("plans"), &rabbit.url()).await;
    let publisher = Publisher::connect(&rabbit.url()).await;
    let (mut seq, mut id) = (1, 1);
    let mut one_batch = |pairs: usize| {
        let mut events = Vec::new();
        for _ in 0..pairs {
            events.extend(pair(seq, id));
            seq += 3;
            id += 2;
        }
        events
    };
    // Waits on /metrics, not /v1/stats: the stats count rows with sequential scans.
    let wait = |n: i64| svc.wait_metric("persistence_contiguous_seq", "", n as f64);
    let mut persisted = 0;
    // Small batches one at a time while the table is tiny: past the five executions after
    // which PostgreSQL may switch a prepared statement to a generic plan.
    for _ in 0..10 {
        let events = one_batch(1);
        persisted += events.len() as i64;
        publisher.batch(&events).await;
        wait(persisted).await;
    }
    // The table grows...
    let events = one_batch(3_000);
    persisted += events.len() as i64;
    publisher.batch(&events).await;
    wait(persisted).await;
    // ...and small batches go on.
    for _ in 0..20 {
        let events = one_batch(1);
        persisted += events.len() as i64;
        publisher.batch(&events).await;
        wait(persisted).await;
    }
    publisher.close().await;
    svc.stop().await;

    // A backend's table statistics are flushed when it exits: wait for the service's.
    let pool = sqlx::PgPool::connect(&pg.url("plans")).await.unwrap();
    eventually("the service's sessions ended", DEADLINE, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'persistence'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (n == 0).then_some(())
    })
    .await;
    let (rows, seq_tup_read): (i64, i64) = sqlx::query_as(
        "SELECT n_live_tup, seq_tup_read FROM pg_stat_user_tables WHERE relname = 'orders'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(rows, (id - 1) as i64, "every order has its row");
    // Twenty sequential scans of the grown table would read over 120,000 rows; lookups by key
    // read none, and the scans of the tiny table read a few dozen.
    assert!(
        seq_tup_read < rows,
        "batch lookups scanned the whole orders table: {seq_tup_read} rows read \
         sequentially for {rows} rows"
    );
    pool.close().await;
}

/// Bad configuration: exit code 64 and a message naming the key, before binding.
#[test]
fn bad_config_exits_64_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persistence"))
        .env("APP__DATABASE__URL", "mysql://nope")
        .env("APP__HTTP__ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("database.url"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persistence"))
        .env("APP__AMQP__PREFETCH", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.prefetch"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persistence"))
        .env("APP__DATABASE__NOPE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

/// Throughput: publishes `PERSISTENCE_BENCH_EVENTS` events (default 200,000) in messages of
/// `PERSISTENCE_BENCH_PER_MESSAGE` events (default 100) and prints events/s persisted
/// (PostgreSQL with `fsync=on`; the backlog is published first, then the service drains it).
/// `cargo test -p persistence --release --test persistence -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints events/s"]
async fn throughput() {
    init_logs();
    let env_u64 = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let total = env_u64("PERSISTENCE_BENCH_EVENTS", 200_000) / 3 * 3;
    let per_message = (env_u64("PERSISTENCE_BENCH_PER_MESSAGE", 100) / 3).max(1) * 3;
    let pg = match Postgres::start_durable() {
        Ok(pg) => pg,
        Err(why) => return support::skipped("throughput", &why),
    };
    let rabbit = match Rabbit::start().await {
        Ok(r) => r,
        Err(why) => return support::skipped("throughput", &why),
    };
    pg.create_database("bench");
    let publisher = Publisher::connect(&rabbit.url()).await;
    // Publish the whole backlog first, then start the service: measures the drain rate.
    let mut bodies = Vec::new();
    let mut seq = 1;
    let mut id = 1;
    while seq <= total {
        let mut events = Vec::new();
        while events.len() < per_message as usize && seq <= total {
            events.extend(pair(seq, id));
            seq += 3;
            id += 2;
        }
        bodies.push(body(&events));
    }
    for chunk in bodies.chunks(500) {
        publisher.publish_many(chunk).await;
    }
    let start = Instant::now();
    let svc = Service::start(&pg.url("bench"), &rabbit.url()).await;
    let stats = eventually("backlog drained", Duration::from_secs(600), || async {
        let s = svc.stats().await?;
        (s["events"] == total).then_some(s)
    })
    .await;
    let took = start.elapsed();
    let batch_sum = svc.metric("persistence_batch_size_sum").await;
    let batch_count = svc.metric("persistence_batch_size_count").await;
    println!(
        "persistence throughput: {total} events in {} messages ({per_message} events/message) \
         persisted in {:.2} s = {:.0} events/s; {} orders, {} trades; mean batch {:.0} events \
         over {batch_count} transactions",
        bodies.len(),
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        stats["orders"],
        stats["trades"],
        batch_sum / batch_count.max(1.0),
    );
    publisher.close().await;
    svc.stop().await;
}
