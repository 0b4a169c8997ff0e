//! The exchange end to end, on real PostgreSQL and RabbitMQ started by the lab: the happy path
//! under load, idempotency, bad input, and every component failing in turn — each phase ends
//! with the zero-loss audit (every acknowledged order in PostgreSQL exactly once, trades
//! conserved, event sequence gap-free). Finally `lab shutdown` must leave no process behind.
//!
//! One lab serves every phase (starting RabbitMQ takes seconds), so the phases run in order in
//! one test; each prints what it checks.

use e2e::{Http, eventually, start_exchange};
use lab::{Component, Lab, Signal};
use loadgen::audit::AuditReport;
use loadgen::flow::FlowSpec;
use loadgen::run::RunSpec;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

struct Ctx {
    lab: Lab,
    http: Http,
    gateway: String,
    engine: String,
    database: String,
    dir: std::path::PathBuf,
}

impl Ctx {
    fn load(&self, name: &str, rate: f64, secs: f64, seed: u64) -> RunSpec {
        RunSpec {
            target: self.gateway.clone(),
            rate_per_sec: rate,
            duration: Duration::from_secs_f64(secs),
            flow: FlowSpec {
                seed,
                symbols: vec![
                    "AAPL".into(),
                    "MSFT".into(),
                    "GOOG".into(),
                    "AMZN".into(),
                    "IDX".into(),
                ],
                cancel_share: 0.1,
                accounts: 20,
                client_id_prefix: format!("e2e-{name}"),
            },
            ledger: Some(self.dir.join(format!("{name}.ledger.jsonl"))),
            summary: Some(self.dir.join(format!("{name}.summary.json"))),
            request_timeout: Duration::from_secs(10),
            max_in_flight: 5_000,
            batch: 1,
            progress: false,
        }
    }

    async fn audit(&self, name: &str) -> AuditReport {
        let report = loadgen::audit::audit(
            &self.dir.join(format!("{name}.ledger.jsonl")),
            &self.database,
            Duration::from_secs(60),
        )
        .await
        .expect("audit runs");
        eprint!("{}", report.table());
        if !report.passed {
            // The lab folder goes with the CI runner: show what the pipeline said.
            eprint!(
                "{}",
                e2e::log_tails(
                    &self.lab,
                    &[
                        Component::MatchingEngine,
                        Component::Persistence,
                        Component::Rabbitmq,
                    ],
                    40,
                )
            );
        }
        assert!(report.passed, "audit of {name} failed:\n{}", report.table());
        report
    }

    async fn engine_state(&self) -> Value {
        let (code, body) = self
            .http
            .get(&format!("{}/v1/state", self.engine))
            .await
            .expect("engine state");
        assert_eq!(code, 200, "{body}");
        body
    }
}

fn order(client_order_id: &str, side: &str, price: Option<&str>, qty: i64) -> Value {
    let mut o = json!({
        "client_order_id": client_order_id, "account": "acct-e2e", "symbol": "AAPL",
        "side": side, "type": if price.is_some() { "limit" } else { "market" },
        "quantity": qty, "time_in_force": if price.is_some() { "gtc" } else { "ioc" },
    });
    if let Some(p) = price {
        o["price"] = json!(p);
    }
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_end_to_end() {
    let lab = start_exchange("pipeline").await.expect("lab starts");
    let ctx = Ctx {
        gateway: lab.url(Component::OrderGateway).unwrap(),
        engine: lab.url(Component::MatchingEngine).unwrap(),
        database: lab.url(Component::Postgres).unwrap(),
        dir: lab.root().join("loadgen"),
        http: Http::new(),
        lab,
    };
    std::fs::create_dir_all(&ctx.dir).unwrap();

    happy_path(&ctx).await;
    batched(&ctx).await;
    idempotency(&ctx).await;
    bad_input(&ctx).await;
    engine_killed_mid_stream(&ctx).await;
    engine_stopped_then_restarted(&ctx).await;
    broker_and_database_outages(&ctx).await;

    eprintln!("== lab shutdown leaves no process behind");
    let pids: Vec<i32> = ctx
        .lab
        .status()
        .components
        .iter()
        .flat_map(|c| c.pid.into_iter().chain(c.aux.values().map(|p| p.pid)))
        .collect();
    assert!(pids.len() >= 5, "{pids:?}");
    ctx.lab.shutdown().await.expect("shutdown");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived lab shutdown"
        );
    }
}

async fn happy_path(ctx: &Ctx) {
    eprintln!("== happy path: 10,000 orders over 5 symbols at 1,000/s");
    let started = Instant::now();
    let s = loadgen::run::run(ctx.load("happy", 1000.0, 10.0, 1), std::future::pending())
        .await
        .unwrap();
    eprint!("{}", s.table());
    assert_eq!(s.sent, 10_000, "{}", s.table());
    assert_eq!(s.error_rate, 0.0, "{}", s.table());
    let acked = s.outcomes.get("accepted").copied().unwrap_or(0)
        + s.outcomes.get("queued").copied().unwrap_or(0);
    let r = ctx.audit("happy").await;
    eprintln!(
        "happy path: {} orders acknowledged, {:.0} orders/s sustained, persisted and audited in {:.1} s",
        acked,
        s.achieved_rate_per_sec,
        started.elapsed().as_secs_f64()
    );
    assert!(
        r.acknowledged >= 9_000,
        "most orders are new orders: {}",
        r.acknowledged
    );
}

async fn batched(ctx: &Ctx) {
    eprintln!(
        "== batched: 9,000 orders at 3,000/s, those due together in one POST /v1/orders/batch"
    );
    let mut spec = ctx.load("batched", 3000.0, 3.0, 5);
    spec.batch = 20;
    let s = loadgen::run::run(spec, std::future::pending())
        .await
        .unwrap();
    eprint!("{}", s.table());
    assert_eq!(s.sent, 9_000, "{}", s.table());
    assert_eq!(s.error_rate, 0.0, "{}", s.table());
    let r = ctx.audit("batched").await;
    assert!(
        r.acknowledged >= 8_000,
        "most orders are new orders: {}",
        r.acknowledged
    );
}

async fn idempotency(ctx: &Ctx) {
    eprintln!("== idempotency: the same client_order_id resent");
    let url = format!("{}/v1/orders", ctx.gateway);
    let o = order("idem-1", "buy", Some("1.00"), 5);
    let (c1, a1) = ctx.http.post(&url, &o).await.unwrap();
    let (c2, a2) = ctx.http.post(&url, &o).await.unwrap();
    assert_eq!(c1, 201, "{a1}");
    assert_eq!((c2, &a2), (c1, &a1), "same body, same answer");
    let mut other = o.clone();
    other["quantity"] = json!(6);
    let (c3, a3) = ctx.http.post(&url, &other).await.unwrap();
    assert_eq!(c3, 409, "{a3}");
    assert_eq!(a3["error"]["field"], "client_order_id");
    // Persisted once.
    let id = a1["order_id"].as_u64().unwrap();
    let got = eventually("idem-1 persisted", Duration::from_secs(20), || async {
        let (code, body) = ctx
            .http
            .get(&format!("{}/v1/orders/{id}", ctx.gateway))
            .await
            .ok()?;
        (code == 200 && body["client_order_id"] == "idem-1" && body.get("source").is_none())
            .then_some(body)
    })
    .await
    .unwrap();
    assert_eq!(got["quantity"], 5);
}

async fn bad_input(ctx: &Ctx) {
    eprintln!("== bad input: each malformed request answered 4xx naming the field");
    let url = format!("{}/v1/orders", ctx.gateway);
    let good = order("bad-base", "buy", Some("101.25"), 10);
    let with = |k: &str, v: Value| {
        let mut o = good.clone();
        o[k] = v;
        o
    };
    let without = |k: &str| {
        let mut o = good.clone();
        o.as_object_mut().unwrap().remove(k);
        o
    };
    let table: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{not json".to_vec(), "body"),
        ("array", b"[1,2]".to_vec(), "body"),
        (
            "oversized",
            format!("{{\"x\":\"{}\"}}", "a".repeat(200_000)).into_bytes(),
            "body",
        ),
        (
            "unknown symbol",
            with("symbol", json!("ZZZZ")).to_string().into_bytes(),
            "symbol",
        ),
        (
            "off tick grid",
            with("price", json!("101.255")).to_string().into_bytes(),
            "price",
        ),
        (
            "zero quantity",
            with("quantity", json!(0)).to_string().into_bytes(),
            "quantity",
        ),
        (
            "negative quantity",
            with("quantity", json!(-5)).to_string().into_bytes(),
            "quantity",
        ),
        (
            "fractional quantity",
            with("quantity", json!(1.5)).to_string().into_bytes(),
            "quantity",
        ),
        (
            "quantity as string",
            with("quantity", json!("10")).to_string().into_bytes(),
            "quantity",
        ),
        (
            "missing side",
            without("side").to_string().into_bytes(),
            "side",
        ),
        (
            "missing client id",
            without("client_order_id").to_string().into_bytes(),
            "client_order_id",
        ),
        (
            "bad side",
            with("side", json!("hold")).to_string().into_bytes(),
            "side",
        ),
        (
            "price as number",
            with("price", json!(101.25)).to_string().into_bytes(),
            "price",
        ),
        (
            "unknown field",
            with("qty", json!(1)).to_string().into_bytes(),
            "qty",
        ),
        (
            "bad tif",
            with("time_in_force", json!("day")).to_string().into_bytes(),
            "time_in_force",
        ),
    ];
    for (name, body, field) in table {
        let (code, answer) = ctx.http.post_raw(&url, body).await.unwrap();
        assert!(
            (400..500).contains(&code),
            "{name}: answered {code} {answer}"
        );
        assert_eq!(answer["error"]["field"], field, "{name}: {answer}");
    }
    let (code, answer) = ctx
        .http
        .delete(&format!("{}/v1/orders/abc", ctx.gateway))
        .await
        .unwrap();
    assert_eq!(
        (code, answer["error"]["field"].as_str()),
        (400, Some("order_id")),
        "{answer}"
    );
}

fn book_hashes(state: &Value) -> Vec<(String, String)> {
    state["books"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["symbol"].as_str().unwrap().to_owned(),
                b["hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_engine_back(ctx: &Ctx, old_pid: Option<i32>) {
    eventually(
        "engine restarted and ready",
        Duration::from_secs(60),
        || async {
            let c = ctx.lab.component(Component::MatchingEngine).ok()?;
            (c.pid.is_some() && c.pid != old_pid && c.status == lab::Status::Ready).then_some(())
        },
    )
    .await
    .unwrap();
}

async fn engine_killed_mid_stream(ctx: &Ctx) {
    eprintln!("== engine SIGKILLed mid-stream, restarted by the lab");
    let spec = ctx.load("kill", 200.0, 6.0, 2);
    let load = tokio::spawn(loadgen::run::run(spec, std::future::pending()));
    // Kill once the run is well under way.
    let engine_pid = ctx.lab.pid(Component::MatchingEngine);
    eventually("orders flowing", Duration::from_secs(10), || async {
        let s = ctx.engine_state().await;
        (s["last_seq"].as_u64()? > 0).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.lab
        .kill(Component::MatchingEngine, Signal::SIGKILL)
        .unwrap();
    wait_engine_back(ctx, engine_pid).await;
    let s = load.await.unwrap().unwrap();
    eprint!("{}", s.table());
    assert_eq!(
        s.error_rate,
        0.0,
        "the gateway queued what the engine could not take: {}",
        s.table()
    );
    ctx.audit("kill").await;

    eprintln!("== book hashes survive a SIGKILL and replay");
    let before = ctx.engine_state().await;
    let engine_pid = ctx.lab.pid(Component::MatchingEngine);
    ctx.lab
        .kill(Component::MatchingEngine, Signal::SIGKILL)
        .unwrap();
    wait_engine_back(ctx, engine_pid).await;
    let after = ctx.engine_state().await;
    assert_eq!(before["last_seq"], after["last_seq"]);
    assert_eq!(book_hashes(&before), book_hashes(&after));
    assert!(
        book_hashes(&after)
            .iter()
            .any(|(_, h)| h != "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        "some book is not empty"
    );
}

async fn engine_stopped_then_restarted(ctx: &Ctx) {
    eprintln!("== engine stopped: orders queued (202), delivered in order when it returns");
    ctx.lab.stop(Component::MatchingEngine).await.unwrap();
    let url = format!("{}/v1/orders", ctx.gateway);
    let mut ids = Vec::new();
    for i in 0..50 {
        let price = format!("{}.00", 50 + i % 7);
        let (code, body) = ctx
            .http
            .post(&url, &order(&format!("queued-{i}"), "buy", Some(&price), 3))
            .await
            .unwrap();
        assert_eq!(code, 202, "{body}");
        assert_eq!(body["status"], "queued");
        ids.push(body["order_id"].as_u64().unwrap());
    }
    ctx.lab
        .start_component(Component::MatchingEngine)
        .await
        .unwrap();
    // Every one persisted, and the engine accepted them in the order the gateway queued them.
    for id in &ids {
        let body = eventually(
            "queued order persisted",
            Duration::from_secs(60),
            || async {
                let (code, body) = ctx
                    .http
                    .get(&format!("{}/v1/orders/{id}", ctx.gateway))
                    .await
                    .ok()?;
                (code == 200 && body.get("source").is_none() && body["status"] != "queued")
                    .then_some(body)
            },
        )
        .await
        .unwrap();
        assert_eq!(body["status"], "new", "{body}");
    }
    let pool = sqlx::PgPool::connect(&ctx.database).await.unwrap();
    let accepted: Vec<(i64,)> = sqlx::query_as(
        "SELECT order_id FROM orders WHERE starts_with(client_order_id, 'queued-') ORDER BY accepted_seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let accepted: Vec<u64> = accepted.into_iter().map(|(id,)| id as u64).collect();
    assert_eq!(
        accepted, ids,
        "the engine accepted the queued orders in the order they were queued"
    );
    pool.close().await;
}

async fn broker_and_database_outages(ctx: &Ctx) {
    for (component, name) in [
        (Component::Rabbitmq, "broker"),
        (Component::Postgres, "database"),
    ] {
        eprintln!("== {name} stopped and restarted under load: orders keep being accepted");
        let load = tokio::spawn(loadgen::run::run(
            ctx.load(name, 100.0, 8.0, 3),
            std::future::pending(),
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        ctx.lab.stop(component).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        ctx.lab.start_component(component).await.unwrap();
        let s = load.await.unwrap().unwrap();
        eprint!("{}", s.table());
        assert_eq!(s.error_rate, 0.0, "{}", s.table());
        assert_eq!(
            s.outcomes.get("queued"),
            None,
            "the engine answered throughout: {}",
            s.table()
        );
        ctx.audit(name).await;
    }
}
