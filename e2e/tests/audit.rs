//! The zero-loss audit against real PostgreSQL: it passes on a clean run and catches a deleted
//! row (lost), a duplicated row (duplicated) and a row nobody acknowledged (unexpected).

use e2e::start_exchange;
use lab::Component;
use loadgen::audit::audit;
use loadgen::flow::FlowSpec;
use loadgen::run::RunSpec;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_catches_lost_duplicated_and_unexpected_orders() {
    let lab = start_exchange("audit").await.expect("lab starts");
    let database = lab.url(Component::Postgres).unwrap();
    let dir = lab.root().join("loadgen");
    let ledger = dir.join("audit.ledger.jsonl");
    let prefix = format!("audit-{}", std::process::id());
    let summary = loadgen::run::run(
        RunSpec {
            target: lab.url(Component::OrderGateway).unwrap(),
            rate_per_sec: 100.0,
            duration: Duration::from_secs(3),
            flow: FlowSpec {
                seed: 9,
                symbols: vec!["AAPL".into(), "MSFT".into()],
                cancel_share: 0.0,
                accounts: 10,
                client_id_prefix: prefix.clone(),
            },
            ledger: Some(ledger.clone()),
            summary: None,
            request_timeout: Duration::from_secs(10),
            max_in_flight: 1_000,
            batch: 1,
            progress: false,
        },
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(summary.sent, 300);

    let clean = audit(&ledger, &database, Duration::from_secs(60))
        .await
        .unwrap();
    eprint!("{}", clean.table());
    assert!(clean.passed, "a clean run passes:\n{}", clean.table());
    assert_eq!(clean.acknowledged, 300);

    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let first = format!("{prefix}-1");
    let second = format!("{prefix}-2");

    // Lost: an acknowledged order's row disappears.
    let saved: (i64,) = sqlx::query_as("SELECT order_id FROM orders WHERE client_order_id = $1")
        .bind(&first)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TEMP TABLE keep AS SELECT * FROM orders WHERE client_order_id = $1")
        .bind(&first)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM orders WHERE order_id = $1")
        .bind(saved.0)
        .execute(&pool)
        .await
        .unwrap();
    let r = audit(&ledger, &database, Duration::from_secs(2))
        .await
        .unwrap();
    eprint!("{}", r.table());
    assert!(!r.passed);
    assert_eq!(r.lost.count, 1);
    assert_eq!(r.lost.sample, vec![first.clone()]);
    assert!(
        !r.drained,
        "a lost order never arrives, so the pipeline never looks drained"
    );

    // Duplicated: the same client order persisted twice (a retry executed twice).
    sqlx::query("INSERT INTO orders SELECT * FROM keep")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO orders SELECT (order_id + 1000000000000), client_order_id, account, symbol, side, type, \
         price_ticks, price, quantity, time_in_force, status, 0, 0, 0, reject_reason, expire_reason, \
         accepted_seq, last_seq, created_at, updated_at FROM orders WHERE client_order_id = $1",
    )
    .bind(&second)
    .execute(&pool)
    .await
    .unwrap();
    let r = audit(&ledger, &database, Duration::from_secs(2))
        .await
        .unwrap();
    eprint!("{}", r.table());
    assert!(!r.passed);
    assert_eq!((r.lost.count, r.duplicated.count), (0, 1));
    assert!(
        r.duplicated.sample[0].starts_with(&second),
        "{:?}",
        r.duplicated.sample
    );

    // Unexpected: an order of this run that nobody was ever told about.
    sqlx::query(
        "INSERT INTO orders SELECT (order_id + 2000000000000), $2, account, symbol, side, type, \
         price_ticks, price, quantity, time_in_force, status, 0, 0, 0, reject_reason, expire_reason, \
         accepted_seq, last_seq, created_at, updated_at FROM orders WHERE client_order_id = $1",
    )
    .bind(&first)
    .bind(format!("{prefix}-999999"))
    .execute(&pool)
    .await
    .unwrap();
    let r = audit(&ledger, &database, Duration::from_secs(2))
        .await
        .unwrap();
    eprint!("{}", r.table());
    assert!(!r.passed);
    assert_eq!(r.unexpected.count, 1, "{:?}", r.unexpected.sample);
    assert!(r.unexpected.sample[0].contains("not in ledger"));
    pool.close().await;
    lab.shutdown().await.unwrap();
}
