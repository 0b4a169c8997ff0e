//! The outbox against a broker that accepts connections and never answers: every attempt must
//! be given up within `amqp.connect_timeout_ms` and made again, never waited on forever (the
//! hang that once left a whole broker restart's events in the journal).
//!
//! lapin runs each connection's I/O on a thread of its own, and an abandoned handshake's thread
//! lives as long as its socket: while the peer holds it open, every attempt leaves one behind;
//! once the peer lets go they end. The test checks both halves.

use kit::health::Readiness;
use kit::shutdown::Shutdown;
use matching_engine::config::AmqpConfig;
use matching_engine::matcher::Durable;
use matching_engine::outbox::Outbox;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[tokio::test]
async fn a_broker_that_never_answers_is_dropped_and_tried_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let journal_path = dir.path().join("journal");
    std::fs::write(&journal_path, b"").unwrap();
    let (_durable_tx, durable) = watch::channel(Durable::default());
    let readiness = Readiness::with_optional(&["journal"], &["rabbitmq"]);
    let shutdown = Shutdown::new();
    let outbox = Outbox {
        config: AmqpConfig {
            url: format!("amqp://guest:guest@{addr}/%2f"),
            connect_timeout_ms: 200,
            reconnect_max_ms: 50,
            ..AmqpConfig::default()
        },
        journal_path,
        checkpoint_path: dir.path().join("outbox.checkpoint"),
        durable,
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
    };
    let threads = || std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    let threads_before = threads();
    let run = tokio::spawn(outbox.run());

    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "the outbox made {} connection(s) in 20 s to a broker that never answers: it waits \
             on a hung connect instead of giving up after 200 ms",
            accepted.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        readiness.snapshot().get("rabbitmq"),
        Some(&false),
        "a broker that never finished the handshake is not ready"
    );

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the outbox stops on shutdown while the broker hangs")
        .unwrap()
        .unwrap();
    silent.abort(); // closes every socket it held

    let deadline = Instant::now() + Duration::from_secs(10);
    while threads() > threads_before + 2 {
        assert!(
            Instant::now() < deadline,
            "{} threads 10 s after the silent peer closed its sockets (started with {threads_before}): \
             the abandoned handshakes' threads did not end",
            threads()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
