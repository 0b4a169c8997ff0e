//! The consume → batch → commit → ack loop.
//!
//! * **Start**: wait for PostgreSQL (migrations, then the sequence tracker), retrying with
//!   backoff; then connect to RabbitMQ, declare the topology (so persistence may start before
//!   the engine), set `basic.qos(prefetch)` and consume [`kit::amqp::EVENTS_QUEUE`] with manual
//!   acks as the queue's *exclusive* consumer: a second instance waits (retrying) instead of
//!   interleaving batches, because order rows must be updated in seq order.
//! * **Batch**: after the first delivery, take more until `batch_max_events` events or
//!   `batch_max_wait_ms`, whichever comes first; decode each message (poison is kept aside to be
//!   stored, not dropped).
//! * **Commit**: one transaction ([`store::write_batch`]). While PostgreSQL is away the same
//!   batch is retried with capped exponential backoff; nothing is acked, the prefetch bound
//!   keeps the backlog in RabbitMQ, readiness `postgres` is false. A batch the database
//!   *refuses* is retried a few times, then split message by message; a message refused on its
//!   own is stored as poison.
//! * **Ack**: only after commit, once, `multiple` up to the batch's last delivery tag.
//! * **RabbitMQ lost**: readiness `rabbitmq` false, reconnect with backoff; unacked deliveries
//!   come back from the broker and are no-ops thanks to idempotency on `seq`. Every RabbitMQ
//!   step is bounded in time, and an idle session checks every 5 s that its channel answers
//!   and that the queue holds nothing it should have received (ready messages at two checks
//!   in a row: the session is stalled and made again).
//! * **Shutdown**: stop taking deliveries, commit the batch in hand (retrying for at most
//!   `shutdown_flush_timeout_ms`), ack, close the channel and connection.

use crate::config::{Config, SERVICE};
use crate::decode::{self, Poison, PoisonReason};
use crate::error::{Error, StoreError};
use crate::obs::{self, Dependency};
use crate::seq::SeqTracker;
use crate::store::{self, PoisonRow, WriteOutcome};
use domain::{Catalog, Event, EventBatch, WIRE_VERSION};
use futures_lite::StreamExt;
use kit::shutdown::Shutdown;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Capped exponential backoff (bounded delay; the caller bounds the attempts).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min_ms: u64, max_ms: u64) -> Backoff {
        let min = Duration::from_millis(min_ms.max(1));
        Backoff {
            min,
            max: Duration::from_millis(max_ms).max(min),
            next: min,
        }
    }

    /// The delay to wait now; the following one doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// One delivery, decoded.
#[derive(Debug)]
struct Message {
    delivery_tag: u64,
    redelivered: bool,
    content: Content,
    /// AMQP `timestamp` property (seconds), when the publisher set one.
    timestamp: Option<u64>,
}

#[derive(Debug)]
enum Content {
    Events(Vec<Event>),
    Poison { poison: Poison, body: Vec<u8> },
}

impl Message {
    fn from_delivery(d: lapin::message::Delivery) -> Message {
        let content = match decode::decode(&d.data) {
            Ok(events) => Content::Events(events),
            Err(poison) => {
                tracing::warn!(
                    delivery_tag = d.delivery_tag,
                    redelivered = d.redelivered,
                    reason = poison.reason.as_str(),
                    error = %poison.error,
                    body_bytes = d.data.len(),
                    "poison message: storing it in poison_messages"
                );
                Content::Poison {
                    poison,
                    body: d.data,
                }
            }
        };
        Message {
            delivery_tag: d.delivery_tag,
            redelivered: d.redelivered,
            content,
            timestamp: *d.properties.timestamp(),
        }
    }

    /// Size in the batch budget: its events, at least 1.
    fn weight(&self) -> usize {
        match &self.content {
            Content::Events(e) => e.len().max(1),
            Content::Poison { .. } => 1,
        }
    }
}

/// How a batch ended.
enum Flush {
    Committed,
    /// Shutdown came while the database was unavailable: nothing acked, the broker keeps the
    /// messages.
    Abandoned,
}

/// How one transaction's retries ended.
enum Attempts {
    Committed,
    /// See [`Flush::Abandoned`].
    Abandoned,
    /// The database refused it more times than allowed (not an outage).
    Refused(StoreError),
}

/// How a RabbitMQ session ended without error.
enum SessionEnd {
    Shutdown,
}

/// A RabbitMQ session failed.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0} timed out after {1} ms")]
    Timeout(&'static str, u64),
    #[error("the broker ended the consumer")]
    ConsumerEnded,
    #[error(
        "{0} messages stayed ready in the queue for {1:?} while this consumer, with nothing \
         unacked, received none"
    )]
    Stalled(u32, Duration),
}

/// While no delivery arrives, the session checks this often that the channel still answers
/// and that the queue holds nothing it should have delivered.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Consecutive idle checks that may find ready messages before the session is called stalled
/// and made again: with everything acked and the prefetch window open, the broker delivers
/// ready messages at once, so messages still ready at two checks in a row mean the broker or
/// the client lost track of this consumer (a hung connection).
const STALLED_CHECKS: u32 = 2;

/// The consumer and writer.
pub struct Pipeline {
    config: Arc<Config>,
    pool: PgPool,
    catalog: Arc<Catalog>,
    postgres: Dependency,
    rabbitmq: Dependency,
    shutdown: Shutdown,
}

impl Pipeline {
    pub fn new(
        config: Arc<Config>,
        pool: PgPool,
        catalog: Arc<Catalog>,
        postgres: Dependency,
        rabbitmq: Dependency,
        shutdown: Shutdown,
    ) -> Pipeline {
        Pipeline {
            config,
            pool,
            catalog,
            postgres,
            rabbitmq,
            shutdown,
        }
    }

    /// Runs until shutdown. Fails only on what retrying cannot fix (migrations that do not
    /// apply).
    pub async fn run(self) -> Result<(), Error> {
        let Some(mut tracker) = self.init_database().await? else {
            return Ok(());
        };
        tracing::info!(
            contiguous_seq = tracker.contiguous(),
            last_seq = tracker.last(),
            open_gaps = tracker.open_gaps(),
            "database ready"
        );
        metrics::gauge!(obs::LAST_SEQ).set(tracker.last() as f64);
        metrics::gauge!(obs::CONTIGUOUS_SEQ).set(tracker.contiguous() as f64);

        let monitor = tokio::spawn(monitor_postgres(
            self.pool.clone(),
            self.postgres.clone(),
            self.shutdown.clone(),
            Duration::from_millis(self.config.database.acquire_timeout_ms),
        ));

        let amqp = &self.config.amqp;
        let mut backoff =
            Backoff::new(amqp.reconnect_backoff_min_ms, amqp.reconnect_backoff_max_ms);
        while !self.shutdown.is_triggered() {
            match self.session(&mut tracker, &mut backoff).await {
                Ok(SessionEnd::Shutdown) => break,
                Err(e) => {
                    self.rabbitmq.down();
                    metrics::counter!(obs::AMQP_ERRORS).increment(1);
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "rabbitmq session lost; unacked deliveries will be redelivered"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.wait() => {}
                    }
                }
            }
        }
        self.rabbitmq.down();
        // The monitor ends with the shutdown signal; its result carries nothing.
        let _ = monitor.await;
        tracing::info!(
            contiguous_seq = tracker.contiguous(),
            last_seq = tracker.last(),
            "pipeline stopped"
        );
        Ok(())
    }

    /// Migrations and the tracker, retried while the database is away. `None` on shutdown.
    async fn init_database(&self) -> Result<Option<SeqTracker>, Error> {
        let db = &self.config.database;
        let mut backoff = Backoff::new(db.retry_backoff_min_ms, db.retry_backoff_max_ms);
        let budget = Duration::from_millis(db.transaction_timeout_ms.max(30_000));
        loop {
            let attempt = async {
                store::migrate(&self.pool).await?;
                store::load_tracker(&self.pool).await
            };
            let result = match tokio::time::timeout(budget, attempt).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout(budget.as_millis() as u64)),
            };
            match result {
                Ok(tracker) => {
                    self.postgres.up();
                    return Ok(Some(tracker));
                }
                Err(e) if e.is_transient() => {
                    self.postgres.down();
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "postgres not available at start; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.wait() => return Ok(None),
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "database initialisation failed");
                    return Err(e.into());
                }
            }
        }
    }

    /// One RabbitMQ connection: consume and commit batches until shutdown or failure.
    async fn session(
        &self,
        tracker: &mut SeqTracker,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, SessionError> {
        let amqp = &self.config.amqp;
        let connection = self
            .bounded("connecting", kit::amqp::connect(&amqp.url, SERVICE))
            .await?;
        let result = self.consume(&connection, tracker, backoff).await;
        // Closing returns every unacked delivery to the queue. Errors here mean the
        // connection is already gone, which has the same effect.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            connection.close(200, "persistence stopping".into()),
        )
        .await;
        result
    }

    /// Runs one step with the broker within `amqp.connect_timeout_ms`: a step that does not
    /// end is a hung session, made again like a failed one.
    async fn bounded<T>(
        &self,
        what: &'static str,
        step: impl std::future::Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, SessionError> {
        let ms = self.config.amqp.connect_timeout_ms;
        tokio::time::timeout(Duration::from_millis(ms), step)
            .await
            .map_err(|_| SessionError::Timeout(what, ms))?
            .map_err(SessionError::from)
    }

    async fn consume(
        &self,
        connection: &Connection,
        tracker: &mut SeqTracker,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, SessionError> {
        let amqp = &self.config.amqp;
        let db = &self.config.database;
        let setup = async {
            let channel = connection.create_channel().await?;
            kit::amqp::declare_topology(&channel).await?;
            channel
                .basic_qos(amqp.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    kit::amqp::EVENTS_QUEUE.into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: false,
                        // One consumer at a time: a second instance waits as a standby.
                        exclusive: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, consumer))
        };
        let (channel, mut consumer) = self.bounded("setting up the consumer", setup).await?;
        self.rabbitmq.up();
        backoff.reset();
        tracing::info!(
            queue = kit::amqp::EVENTS_QUEUE,
            prefetch = amqp.prefetch,
            "consuming"
        );

        loop {
            // Wait for the first delivery of the next batch, checking the session while idle.
            let mut stalled = 0;
            let first = loop {
                tokio::select! {
                    d = consumer.next() => break d,
                    _ = tokio::time::sleep(IDLE_CHECK) => {
                        let ready = self
                            .bounded("checking the queue", ready_messages(&channel))
                            .await?;
                        stalled = if ready > 0 { stalled + 1 } else { 0 };
                        if stalled >= STALLED_CHECKS {
                            return Err(SessionError::Stalled(ready, IDLE_CHECK * stalled));
                        }
                    }
                    _ = self.shutdown.wait() => {
                        close_channel(&channel).await;
                        return Ok(SessionEnd::Shutdown);
                    }
                }
            };
            let first = match first {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SessionError::ConsumerEnded),
            };
            let first = Message::from_delivery(first);
            let mut weight = first.weight();
            let mut messages = vec![first];
            let deadline = tokio::time::Instant::now() + db.batch_max_wait();
            let mut lost: Option<SessionError> = None;
            while weight < db.batch_max_events && !self.shutdown.is_triggered() {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(d))) => {
                        let m = Message::from_delivery(d);
                        weight += m.weight();
                        messages.push(m);
                    }
                    Ok(Some(Err(e))) => {
                        lost = Some(e.into());
                        break;
                    }
                    Ok(None) => {
                        lost = Some(SessionError::ConsumerEnded);
                        break;
                    }
                }
            }

            // Commit (even if the session is gone: the work is not wasted, and the
            // redelivery will be a no-op).
            match self.flush(&messages, tracker).await {
                Flush::Committed => {}
                Flush::Abandoned => {
                    close_channel(&channel).await;
                    return Ok(SessionEnd::Shutdown);
                }
            }
            if let Some(e) = lost {
                return Err(e);
            }
            self.bounded("acking", ack(&channel, &messages)).await?;
        }
    }

    /// Commits `messages`, splitting and quarantining if the database refuses them.
    async fn flush(&self, messages: &[Message], tracker: &mut SeqTracker) -> Flush {
        let limit = Some(self.config.database.permanent_error_retries_max);
        let e = match self.write_with_retry(messages, tracker, limit).await {
            Attempts::Committed => return Flush::Committed,
            Attempts::Abandoned => return Flush::Abandoned,
            Attempts::Refused(e) => e,
        };
        tracing::error!(
            error = %e,
            messages = messages.len(),
            "database refused the batch; writing its messages one by one"
        );
        for message in messages {
            let one = std::slice::from_ref(message);
            let e = match self.write_with_retry(one, tracker, limit).await {
                Attempts::Committed => continue,
                Attempts::Abandoned => return Flush::Abandoned,
                Attempts::Refused(e) => e,
            };
            tracing::error!(
                error = %e,
                delivery_tag = message.delivery_tag,
                "database refused a message on its own; storing it as poison"
            );
            // Storing a poison row can only fail for outage reasons: no refusal limit (the
            // delay between attempts stays bounded).
            match self
                .write_with_retry(&[quarantine(message, &e)], tracker, None)
                .await
            {
                Attempts::Committed | Attempts::Refused(_) => {}
                Attempts::Abandoned => return Flush::Abandoned,
            }
        }
        Flush::Committed
    }

    /// Retries one transaction until it commits, the shutdown budget runs out, or (with a
    /// `permanent_limit`) the database refused it more than that many times.
    async fn write_with_retry(
        &self,
        messages: &[Message],
        tracker: &mut SeqTracker,
        permanent_limit: Option<u32>,
    ) -> Attempts {
        let db = &self.config.database;
        let mut backoff = Backoff::new(db.retry_backoff_min_ms, db.retry_backoff_max_ms);
        let mut refusals: u32 = 0;
        let mut failures: u32 = 0;
        let mut give_up_at: Option<Instant> = None;

        // Events of all messages, in seq order, each seq once.
        let mut events: Vec<&Event> = messages
            .iter()
            .filter_map(|m| match &m.content {
                Content::Events(e) => Some(e),
                Content::Poison { .. } => None,
            })
            .flatten()
            .collect();
        events.sort_by_key(|e| e.seq);
        events.dedup_by_key(|e| e.seq);
        let poison: Vec<PoisonRow<'_>> = messages
            .iter()
            .filter_map(|m| match &m.content {
                Content::Poison { poison, body } => Some(PoisonRow {
                    body,
                    reason: poison.reason.as_str(),
                    error: poison.error.clone(),
                    redelivered: m.redelivered,
                }),
                Content::Events(_) => None,
            })
            .collect();

        loop {
            let started = Instant::now();
            match self.try_write(&events, &poison, tracker).await {
                Ok(outcome) => {
                    kit::metrics::observe_dependency_call(
                        obs::POSTGRES,
                        "write_batch",
                        kit::metrics::RESULT_OK,
                        started.elapsed(),
                    );
                    self.postgres.up();
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "batch committed after retries");
                    }
                    self.record(outcome, started.elapsed(), messages, tracker);
                    return Attempts::Committed;
                }
                Err(e) => {
                    failures += 1;
                    kit::metrics::observe_dependency_call(
                        obs::POSTGRES,
                        "write_batch",
                        e.kind(),
                        started.elapsed(),
                    );
                    metrics::counter!(obs::DB_ERRORS, "kind" => e.kind()).increment(1);
                    if e.is_transient() {
                        self.postgres.down();
                    } else {
                        refusals += 1;
                        if permanent_limit.is_some_and(|limit| refusals > limit) {
                            return Attempts::Refused(e);
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e,
                        kind = e.kind(),
                        attempt = failures,
                        events = events.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        "batch not committed; retrying, nothing acked"
                    );
                    if self.shutdown.is_triggered() {
                        let deadline = *give_up_at.get_or_insert_with(|| {
                            Instant::now() + Duration::from_millis(db.shutdown_flush_timeout_ms)
                        });
                        if Instant::now() + delay > deadline {
                            tracing::warn!(
                                events = events.len(),
                                "shutting down with the batch uncommitted; the broker keeps it"
                            );
                            return Attempts::Abandoned;
                        }
                        tokio::time::sleep(delay).await;
                    } else {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.shutdown.wait() => {}
                        }
                    }
                }
            }
        }
    }

    /// One attempt: a pooled connection, one transaction, a time budget. A connection that
    /// failed or timed out is detached and dropped, never returned to the pool.
    async fn try_write(
        &self,
        events: &[&Event],
        poison: &[PoisonRow<'_>],
        tracker: &SeqTracker,
    ) -> Result<WriteOutcome, StoreError> {
        let db = &self.config.database;
        let mut conn = self.pool.acquire().await?;
        let budget = Duration::from_millis(db.transaction_timeout_ms);
        let result = tokio::time::timeout(
            budget,
            store::write_batch(&mut conn, &self.catalog, events, poison, tracker),
        )
        .await;
        match result {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => {
                if e.is_transient() {
                    drop(conn.detach());
                }
                Err(e)
            }
            Err(_) => {
                drop(conn.detach());
                Err(StoreError::Timeout(db.transaction_timeout_ms))
            }
        }
    }

    /// Metrics and logs of a committed batch; the tracker moves forward.
    fn record(
        &self,
        outcome: WriteOutcome,
        took: Duration,
        messages: &[Message],
        tracker: &mut SeqTracker,
    ) {
        metrics::histogram!(obs::TRANSACTION_DURATION).record(took.as_secs_f64());
        metrics::histogram!(obs::BATCH_SIZE).record(outcome.events_in as f64);
        metrics::counter!(obs::EVENTS_PERSISTED).increment(outcome.new_seqs.len() as u64);
        metrics::counter!(obs::TRADES_PERSISTED).increment(outcome.trades_written as u64);
        let duplicates = outcome.duplicates();
        if duplicates > 0 {
            metrics::counter!(obs::REDELIVERED).increment(duplicates as u64);
            tracing::info!(
                duplicates,
                new = outcome.new_seqs.len(),
                "redelivered events already stored; skipped"
            );
        }
        for reason in &outcome.poison_written {
            metrics::counter!(obs::POISON_MESSAGES, "reason" => *reason).increment(1);
        }
        for gap in &outcome.gaps {
            metrics::counter!(obs::SEQUENCE_GAPS).increment(1);
            metrics::counter!(obs::MISSING_EVENTS).increment(gap.missing());
            tracing::warn!(
                from_seq = gap.from,
                to_seq = gap.to,
                missing = gap.missing(),
                contiguous_seq = outcome.tracker.contiguous(),
                "sequence gap: events missing before this batch"
            );
        }
        for a in &outcome.anomalies {
            metrics::counter!(obs::ANOMALIES, "kind" => a.kind).increment(1);
            tracing::warn!(
                kind = a.kind,
                seq = a.seq,
                order_id = a.order_id,
                message = %a.message,
                "event could not be applied to orders"
            );
        }
        if outcome.tracker.contiguous() > tracker.contiguous() && tracker.open_gaps() > 0 {
            tracing::info!(
                contiguous_seq = outcome.tracker.contiguous(),
                open_gaps = outcome.tracker.open_gaps(),
                "late events filled a sequence gap"
            );
        }
        *tracker = outcome.tracker;
        metrics::gauge!(obs::LAST_SEQ).set(tracker.last() as f64);
        metrics::gauge!(obs::CONTIGUOUS_SEQ).set(tracker.contiguous() as f64);
        if let Some(ts) = messages.iter().rev().find_map(|m| m.timestamp) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            metrics::gauge!(obs::CONSUMER_LAG).set(now.saturating_sub(ts) as f64);
        }
        tracing::debug!(
            events = outcome.events_in,
            new = outcome.new_seqs.len(),
            orders = outcome.orders_written,
            trades = outcome.trades_written,
            took_ms = took.as_millis() as u64,
            "batch committed"
        );
    }
}

/// Closes the channel (its unacked deliveries go back to the queue), bounded in time: a
/// broken connection has the same effect.
async fn close_channel(channel: &Channel) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        channel.close(200, "shutdown".into()),
    )
    .await;
}

/// Messages ready for delivery in the events queue (a passive declare: also proves the channel
/// still answers).
async fn ready_messages(channel: &Channel) -> Result<u32, lapin::Error> {
    let queue = channel
        .queue_declare(
            kit::amqp::EVENTS_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue.message_count())
}

/// Acks everything up to the batch's last delivery tag.
async fn ack(channel: &Channel, messages: &[Message]) -> Result<(), lapin::Error> {
    let Some(last) = messages.iter().map(|m| m.delivery_tag).max() else {
        return Ok(());
    };
    channel
        .basic_ack(last, BasicAckOptions { multiple: true })
        .await?;
    metrics::counter!(obs::MESSAGES_ACKED).increment(messages.len() as u64);
    Ok(())
}

/// A message the database refused, turned into a poison row (its events re-serialized).
fn quarantine(m: &Message, e: &StoreError) -> Message {
    let body = match &m.content {
        Content::Events(events) => serde_json::to_vec(&EventBatch {
            v: WIRE_VERSION,
            events: events.clone(),
        })
        .unwrap_or_default(),
        Content::Poison { body, .. } => body.clone(),
    };
    Message {
        delivery_tag: m.delivery_tag,
        redelivered: m.redelivered,
        content: Content::Poison {
            poison: Poison {
                reason: PoisonReason::Refused,
                error: format!("database refused the message: {e}"),
            },
            body,
        },
        timestamp: m.timestamp,
    }
}

/// Keeps readiness `postgres` true to the facts while the writer is idle.
async fn monitor_postgres(
    pool: PgPool,
    postgres: Dependency,
    shutdown: Shutdown,
    budget: Duration,
) {
    let interval = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => return,
        }
        match tokio::time::timeout(budget, store::ping(&pool)).await {
            Ok(Ok(())) => postgres.up(),
            Ok(Err(e)) => {
                if e.is_transient() {
                    tracing::debug!(error = %e, "postgres ping failed");
                    postgres.down();
                }
            }
            Err(_) => postgres.down(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new(50, 2_000);
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, vec![50, 100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }
}
