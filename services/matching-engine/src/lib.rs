//! The matching engine: one price-time order book per symbol ([`book`]), and around it what
//! makes it crash-safe and idempotent.
//!
//! * [`exchange`]: the deterministic state machine (books + memory of every order) turning
//!   commands into numbered events and outcomes; retries get the original outcome.
//! * [`journal`]: the write-ahead log; every command is journaled (fsync, group commit) before
//!   it is answered, and replayed on start to rebuild identical books.
//! * [`matcher`]: the single thread that owns the books, batches commands and syncs them.
//! * [`outbox`]: publishes journaled events to RabbitMQ with confirms from a checkpoint.
//! * [`api`]: the internal HTTP API the gateway calls.
//! * [`obs`]: help texts of the engine's metrics.
//! * [`workload`]: the seeded command stream of `make bench-engine`.

pub mod api;
pub mod book;
pub mod config;
pub mod exchange;
pub mod journal;
pub mod matcher;
pub mod obs;
pub mod outbox;
pub mod workload;

use config::EngineConfig;
use exchange::Exchange;
use journal::Journal;
use kit::health::Readiness;
use kit::shutdown::Shutdown;
use matcher::{Durable, Matcher};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why the engine could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Io { context, source }
}

/// Replays the journal, starts the matching thread and the outbox, and serves the API on
/// `listener` until `shutdown`; then drains: stops accepting, answers what is in flight, lets
/// the matching thread finish its last sync, and stops the outbox.
pub async fn run(
    config: EngineConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let metrics = kit::metrics::install();
    obs::describe();
    let readiness = Readiness::with_optional(&["journal"], &["rabbitmq"]);
    let started = Instant::now();
    let dir = config.data.dir.clone();
    let preallocate = config.journal.preallocate_kb << 10;
    let (exchange, journal, stats) = tokio::task::spawn_blocking(move || {
        let mut exchange = Exchange::new(&domain::Catalog::lab());
        Journal::open_and_replay(&dir, &mut exchange, preallocate).map(|(j, s)| (exchange, j, s))
    })
    .await
    .map_err(|e| RunError::Io {
        context: "replaying the journal",
        source: std::io::Error::other(e),
    })??;
    for (spec, book) in exchange.books() {
        if !book.is_empty() {
            tracing::info!(symbol = %spec.symbol, resting_orders = book.len(), hash = %book.hash(), "book rebuilt");
        }
    }
    tracing::info!(
        records = stats.records,
        events = stats.events,
        last_seq = exchange.last_seq(),
        truncated_bytes = stats.truncated_bytes,
        replay_ms = started.elapsed().as_millis() as u64,
        "journal replayed"
    );
    readiness.set("journal", true);
    let journal_path = journal.path().to_owned();
    let (durable_tx, durable_rx) = watch::channel(Durable {
        offset: journal.end(),
        last_seq: exchange.last_seq(),
    });
    let (matcher, thread) = Matcher::spawn(
        exchange,
        journal,
        config.journal.group_commit_max,
        config.journal.queue_max,
        durable_tx,
    )
    .map_err(io("starting the matching thread"))?;
    let outbox = outbox::Outbox {
        config: config.amqp.clone(),
        journal_path,
        checkpoint_path: config.data.dir.join(outbox::CHECKPOINT_FILE),
        durable: durable_rx,
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
    };
    let outbox_task = tokio::spawn(outbox.run());
    let app = kit::http::with_standard_layers(
        api::routes(matcher).merge(kit::http::admin_routes(metrics, readiness)),
        &config.http,
    );
    // Outside the layers: a 30 s profile must not meet the request timeout.
    let app = kit::debug::with_debug_routes(app, "matching-engine", &config.debug);
    kit::http::serve(listener, app, shutdown.clone())
        .await
        .map_err(io("serving HTTP"))?;
    // Every handler is done and the router (with its matcher handles) is gone, so the matching
    // thread sees its channel close after its last sync.
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .ok();
    shutdown.trigger();
    match outbox_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "outbox stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "outbox task failed"),
        Ok(Ok(())) => {}
    }
    tracing::info!("matching-engine stopped");
    Ok(())
}
