//! The gateway against a fake matching engine (and a fake persistence read API), served for
//! real on port 0: answers, idempotency, the retry queue, load shedding, restarts.

use crate::support::{
    FakeEngine, FakePersistence, TestGateway, closed_port, config, eventually, order,
};
use axum::http::StatusCode;
use domain::{Command, OrderId, Price};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn id_of(v: &Value) -> u64 {
    v["order_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no order_id in {v}"))
}

#[tokio::test]
async fn an_executed_order_is_201_with_fills_on_the_symbols_grid() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;

    let idx = json!({"client_order_id": "c-idx", "symbol": "IDX", "side": "buy", "type": "limit", "price": "101.25", "quantity": 20});
    let (status, body) = gw.post_order(&idx).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["client_order_id"], "c-idx");
    assert_eq!(body["status"], "filled");
    assert_eq!(body["filled_quantity"], 20);
    assert_eq!(
        body["fills"],
        json!([{"price": "101.25", "quantity": 20, "trade_seq": 2, "counterparty_order_id": 7, "liquidity": "taker"}])
    );
    let id = id_of(&body);
    assert!((1 << 32..1 << 53).contains(&id), "{id}");
    // The engine got integer ticks of IDX's 0.05 grid, and the gateway's order id.
    match &engine.state.received.lock().unwrap()[0] {
        Command::NewOrder(o) => {
            assert_eq!(o.price, Some(Price(2025)));
            assert_eq!(o.order_id, OrderId(id));
        }
        other => panic!("{other:?}"),
    }

    let (status, body) = gw.post_order(&order("c-aapl")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["fills"][0]["price"], "101.25");
    assert!(id_of(&body) > id);

    let market = json!({"client_order_id": "c-mkt", "symbol": "AAPL", "side": "sell", "type": "market", "quantity": 5});
    let (status, body) = gw.post_order(&market).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The fake fills market orders at 2025 ticks: 20.25 on AAPL's 0.01 grid.
    assert_eq!(body["fills"][0]["price"], "20.25");
    gw.stop().await;
}

#[tokio::test]
async fn the_same_client_order_id_gets_the_same_answer_or_409() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;

    let (s1, b1) = gw.post_raw(&order("c-idem")).await;
    assert_eq!(s1, StatusCode::CREATED);
    let (s2, b2) = gw.post_raw(&order("c-idem")).await;
    assert_eq!((s2, &b2), (StatusCode::CREATED, &b1), "identical answer");
    // Same content, spelled differently: same answer.
    let mut respelled = order("c-idem");
    respelled["price"] = json!("101.250");
    let (s3, b3) = gw.post_raw(&respelled).await;
    assert_eq!((s3, &b3), (StatusCode::CREATED, &b1));
    // Other content: 409 naming the key.
    let mut other = order("c-idem");
    other["quantity"] = json!(11);
    let (s4, b4) = gw.post_order(&other).await;
    assert_eq!(s4, StatusCode::CONFLICT, "{b4}");
    assert_eq!(b4["error"]["field"], "client_order_id");
    assert_eq!(b4["error"]["code"], "conflict");
    assert_eq!(engine.state.executed_len(), 1, "executed once");
    assert_eq!(engine.state.received.lock().unwrap().len(), 1, "sent once");
    gw.stop().await;
}

#[tokio::test]
async fn after_eviction_the_engine_is_the_backstop() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), engine.addr, closed_port());
    c.idempotency.max_entries = 1;
    let gw = TestGateway::start(c).await;

    let (s, first) = gw.post_order(&order("c-evict")).await;
    assert_eq!(s, StatusCode::CREATED);
    // Pushes c-evict out of the gateway's memory.
    let (s, _) = gw.post_order(&order("c-other")).await;
    assert_eq!(s, StatusCode::CREATED);
    // Other content: the engine's 409 passes through.
    let mut other = order("c-evict");
    other["side"] = json!("sell");
    let (s, b) = gw.post_order(&other).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["error"]["field"], "client_order_id");
    // Same content: the engine's original outcome, with the original order id.
    let (s, again) = gw.post_order(&order("c-evict")).await;
    assert_eq!(s, StatusCode::CREATED, "{again}");
    assert_eq!(id_of(&again), id_of(&first));
    assert_eq!(again["fills"], first["fills"]);
    assert_eq!(engine.state.executed_new_orders().len(), 2);
    gw.stop().await;
}

/// `POST /v1/orders/batch`: each order answered as `POST /v1/orders` would answer it alone,
/// in request order; one order's error leaves the others alone; replays are idempotent; with
/// the engine down the orders are queued; a body that is not a batch is refused as a whole.
#[tokio::test]
async fn a_batch_answers_each_order_as_if_sent_alone() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;

    let mut off_grid = order("c-b2");
    off_grid["price"] = json!("101.255");
    let mut reused = order("c-b1");
    reused["quantity"] = json!(11);
    let batch = json!({"orders": [order("c-b1"), off_grid, order("c-b3"), reused]});
    let (status, body) = gw.post_batch(&batch).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "{body}");
    assert_eq!(results[0]["http_status"], 201, "{body}");
    assert_eq!(results[0]["answer"]["client_order_id"], "c-b1");
    assert_eq!(results[1]["http_status"], 422, "{body}");
    assert_eq!(results[1]["answer"]["error"]["field"], "price");
    assert_eq!(results[1]["answer"]["error"]["code"], "off_tick_grid");
    assert_eq!(results[2]["http_status"], 201, "{body}");
    assert_eq!(results[2]["answer"]["client_order_id"], "c-b3");
    // The same client_order_id with other content, in the same batch: 409 (or, if it was
    // looked at first, c-b1 is the 409 and this one the 201: exactly one of each).
    let statuses = [&results[0]["http_status"], &results[3]["http_status"]];
    assert!(
        statuses.contains(&&json!(201)) && statuses.contains(&&json!(409)),
        "{body}"
    );
    let b1 = id_of(&results[0]["answer"]);
    assert_ne!(b1, id_of(&results[2]["answer"]));
    assert_eq!(
        engine.state.received.lock().unwrap().len(),
        2,
        "c-b1 and c-b3"
    );

    // The same batch again: the same answers, nothing new reaches the engine.
    let (status, again) = gw.post_batch(&batch).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["results"][0], results[0]);
    assert_eq!(again["results"][2], results[2]);
    assert_eq!(engine.state.received.lock().unwrap().len(), 2);

    // The batch as a whole: what it must look like.
    let too_many: Vec<Value> = (0..101).map(|i| order(&format!("c-m{i}"))).collect();
    for (body, status, field, code) in [
        (json!({"orders": []}), 422, "orders", "out_of_range"),
        (json!({"orders": too_many}), 422, "orders", "out_of_range"),
        (json!({}), 422, "orders", "missing"),
        (json!({"orders": {}}), 422, "orders", "malformed"),
        (
            json!({"orders": [order("c-x")], "x": 1}),
            422,
            "x",
            "unknown_field",
        ),
        (json!([order("c-y")]), 400, "body", "malformed"),
    ] {
        let (got, answer) = gw.post_batch(&body).await;
        assert_eq!(got.as_u16(), status, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
    }
    assert_eq!(engine.state.received.lock().unwrap().len(), 2);
    gw.stop().await;

    // With the engine down, a batch's orders are queued (202), each with its own id.
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), closed_port(), closed_port())).await;
    let (status, body) = gw
        .post_batch(&json!({"orders": [order("c-q1"), order("c-q2")]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (i, r) in body["results"]
        .as_array()
        .expect("results")
        .iter()
        .enumerate()
    {
        assert_eq!(r["http_status"], 202, "{body}");
        assert_eq!(r["answer"]["status"], "queued");
        assert_eq!(r["answer"]["client_order_id"], format!("c-q{}", i + 1));
    }
    gw.stop().await;
}

#[tokio::test]
async fn engine_down_queues_then_delivers_in_order_exactly_once() {
    let engine_addr = closed_port();
    let persistence = FakePersistence::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine_addr, persistence.addr)).await;

    let mut ids = Vec::new();
    for i in 0..5 {
        let (s, b) = gw.post_order(&order(&format!("c-q{i}"))).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
        assert_eq!(b["status"], "queued");
        assert_eq!(b["client_order_id"], format!("c-q{i}"));
        ids.push(id_of(&b));
    }
    // A resting order's cancel, queued behind it.
    let mut resting = order("c-rest");
    resting["quantity"] = json!(100);
    let (s, b) = gw.post_order(&resting).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let rest_id = id_of(&b);
    let (s, b) = gw.cancel(&json!(rest_id)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(b, json!({"order_id": rest_id, "status": "queued"}));
    // Status of a queued order: from the gateway, since persistence cannot have it.
    let (s, b) = gw.get(&format!("/v1/orders/{}", ids[0])).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "queued");
    assert_eq!(b["price"], "101.25");
    assert_eq!(b["source"], "gateway");
    // Readiness does not depend on the engine.
    let (s, _) = gw.get("/readyz").await;
    assert_eq!(s, StatusCode::OK);

    let engine = FakeEngine::start_on(engine_addr).await;
    eventually("the queue to drain into the engine", || {
        engine.state.executed_len() == 7
    })
    .await;
    let executed = engine.state.executed.lock().unwrap().clone();
    let mut want: Vec<u64> = ids.clone();
    want.push(rest_id);
    let got: Vec<u64> = engine
        .state
        .executed_new_orders()
        .iter()
        .map(|o| o.0)
        .collect();
    assert_eq!(got, want, "new orders in order");
    assert!(
        matches!(executed.last(), Some(Command::Cancel(c)) if c.order_id == OrderId(rest_id)),
        "the cancel came after its order: {executed:?}"
    );
    assert_eq!(
        engine.state.received.lock().unwrap().len(),
        7,
        "each delivered exactly once"
    );
    // Delivered: the gateway knows the outcome while persistence does not have it yet...
    let (s, b) = gw.get(&format!("/v1/orders/{}", ids[0])).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "filled");
    assert_eq!(b["source"], "gateway");
    // ...and persistence's record wins once it has it.
    persistence.known.lock().unwrap().insert(ids[0]);
    let (s, b) = gw.get(&format!("/v1/orders/{}", ids[0])).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.get("source").is_none(), "{b}");
    let (s, b) = gw.get("/v1/orders/12345").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["error"]["field"], "order_id");
    // With the queue empty, new orders go straight to the engine again.
    let (s, b) = gw.post_order(&order("c-after")).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    let (s, metrics) = {
        let r = crate::support::client()
            .get(format!("{}/metrics", gw.url()))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert_eq!(s, StatusCode::OK);
    for name in [
        "gateway_orders_total{outcome=\"queued\"}",
        "gateway_engine_errors_total{kind=\"connect\"}",
        "dependency_request_duration_seconds_bucket{dependency=\"engine\"",
        "dependency_up{dependency=\"engine\"}",
        "spool_delivered_total",
        "http_server_requests_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_full_queue_sheds_load_with_503_and_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), closed_port(), closed_port());
    c.spool.max_entries = 2;
    let gw = TestGateway::start(c).await;
    for i in 0..2 {
        let (s, b) = gw.post_order(&order(&format!("c-full{i}"))).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    }
    let r = crate::support::client()
        .post(format!("{}/v1/orders", gw.url()))
        .json(&order("c-full2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "overloaded");
    // An order already queued is still answered as it was.
    let (s, b) = gw.post_order(&order("c-full0")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    // A cancel is shed too.
    let (s, b) = gw.cancel(&json!(1)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    gw.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_the_queue_and_its_answers() {
    let engine_addr = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), engine_addr, closed_port());

    let first = TestGateway::start(c.clone()).await;
    let (s, a1) = first.post_raw(&order("c-r1")).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, a2) = first.post_order(&order("c-r2")).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    first.stop().await;

    let second = TestGateway::start(c).await;
    let (s, again) = second.post_raw(&order("c-r1")).await;
    assert_eq!(
        (s, &again),
        (StatusCode::ACCEPTED, &a1),
        "same answer after a restart"
    );
    let mut other = order("c-r1");
    other["price"] = json!("99.00");
    let (s, b) = second.post_order(&other).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, a3) = second.post_order(&order("c-r3")).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let a1: Value = serde_json::from_slice(&a1).unwrap();
    assert_eq!(id_of(&a3) >> 32, (id_of(&a1) >> 32) + 1, "next generation");

    let engine = FakeEngine::start_on(engine_addr).await;
    eventually("the queue to drain", || engine.state.executed_len() == 3).await;
    let got: Vec<u64> = engine
        .state
        .executed_new_orders()
        .iter()
        .map(|o| o.0)
        .collect();
    assert_eq!(got, vec![id_of(&a1), id_of(&a2), id_of(&a3)]);
    assert_eq!(engine.state.received.lock().unwrap().len(), 3);
    second.stop().await;
}

#[tokio::test]
async fn order_ids_are_unique_across_restarts() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut generations = Vec::new();
    for run in 0..3 {
        let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;
        for i in 0..3 {
            let (s, b) = gw.post_order(&order(&format!("c-u{run}-{i}"))).await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
            let id = id_of(&b);
            assert!(id < 1 << 53);
            generations.push(id >> 32);
            assert!(seen.insert(id), "id {id} handed out twice");
        }
        gw.stop().await;
    }
    assert_eq!(seen.len(), 9);
    // Each restart starts a new generation, one more than the last.
    generations.dedup();
    assert_eq!(generations.len(), 3, "{generations:?}");
    assert!(
        generations.windows(2).all(|w| w[1] == w[0] + 1),
        "{generations:?}"
    );
}

#[tokio::test]
async fn a_stalled_engine_times_out_into_the_queue() {
    let engine = FakeEngine::start().await;
    engine
        .state
        .stall
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), engine.addr, closed_port());
    c.engine.connect_timeout_ms = 300;
    c.engine.request_timeout_ms = 300;
    let gw = TestGateway::start(c).await;

    let started = Instant::now();
    let (s, b) = gw.post_order(&order("c-stall")).await;
    let took = started.elapsed();
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(3_000),
        "answered after {took:?}, want about the 300 ms engine timeout"
    );
    engine
        .state
        .stall
        .store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("the stalled order to be delivered", || {
        engine.state.executed_len() == 1
    })
    .await;
    assert_eq!(engine.state.executed_new_orders(), vec![OrderId(id_of(&b))]);
    gw.stop().await;
}

#[tokio::test]
async fn an_engine_answering_503_is_treated_as_unreachable() {
    let engine = FakeEngine::start().await;
    engine
        .state
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;
    let (s, b) = gw.post_order(&order("c-drain")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    engine
        .state
        .draining
        .store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("delivery after the drain", || {
        engine.state.executed_len() == 1
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn cancels_map_the_engines_answers() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;
    let mut resting = order("c-cancel");
    resting["quantity"] = json!(100);
    let (s, b) = gw.post_order(&resting).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["status"], "new");
    assert_eq!(b["resting_quantity"], 100);
    let id = json!(id_of(&b));

    let (s, b) = gw.cancel(&id).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "cancelled");
    assert_eq!(b["client_order_id"], "c-cancel");
    let (s, b) = gw.cancel(&id).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(
        (b["error"]["code"].as_str(), b["error"]["field"].as_str()),
        (Some("order_not_open"), Some("order_id"))
    );
    let (s, b) = gw.cancel(&json!(424242)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(
        (b["error"]["code"].as_str(), b["error"]["field"].as_str()),
        (Some("unknown_order"), Some("order_id"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_book_comes_from_the_engine() {
    let engine = FakeEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = TestGateway::start(config(dir.path(), engine.addr, closed_port())).await;
    let (s, b) = gw.get("/v1/book/AAPL?depth=3").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["bids"][0]["price"], "101.25");
    assert_eq!(*engine.state.book_depths.lock().unwrap(), vec!["depth=3"]);
    engine
        .state
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Engine draining: 503; persistence unreachable: status of an unknown order is 503.
    let (s, b) = gw.get("/v1/book/AAPL").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let (s, b) = gw.get("/v1/orders/77").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(b["error"]["code"], "unavailable");
    gw.stop().await;
}

#[tokio::test]
async fn a_second_gateway_cannot_share_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), closed_port(), closed_port());
    let gw = TestGateway::start(c.clone()).await;
    let e = order_gateway::Gateway::open(c).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_travel_together_and_each_gets_its_own_answer() {
    let engine = FakeEngine::start().await;
    // A slow engine (50 ms a call) and one call slot: whatever arrives during a call waits
    // and leaves with the next one.
    engine
        .state
        .delay_ms
        .store(50, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), engine.addr, closed_port());
    cfg.batching.in_flight = 1;
    let gw = std::sync::Arc::new(TestGateway::start(cfg).await);

    let n = 100;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let gw = gw.clone();
        tasks.spawn(async move {
            let id = format!("c-batch-{i}");
            let (status, body) = gw.post_order(&order(&id)).await;
            (id, status, body)
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(done) = tasks.join_next().await {
        let (id, status, body) = done.expect("task");
        assert_eq!(status, StatusCode::CREATED, "{id}: {body}");
        assert_eq!(body["client_order_id"], id.as_str(), "its own answer");
        assert!(ids.insert(id_of(&body)), "order ids are distinct");
    }
    let st = &engine.state;
    assert_eq!(st.executed_len(), n, "every order executed once");
    let batches = st.batch_calls.load(std::sync::atomic::Ordering::SeqCst);
    let batched = st
        .batched_commands
        .load(std::sync::atomic::Ordering::SeqCst) as usize;
    let singles = st.received.lock().unwrap().len() - batched;
    assert!(batches >= 1, "some orders were batched");
    assert!(
        batches as usize + singles < n / 2,
        "{n} orders took {batches} batch calls and {singles} single calls"
    );
    match std::sync::Arc::try_unwrap(gw) {
        Ok(gw) => gw.stop().await,
        Err(_) => panic!("the gateway is still shared"),
    }
}
