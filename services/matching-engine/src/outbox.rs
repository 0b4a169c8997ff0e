//! The outbox publisher: ships journaled events to RabbitMQ, in sequence order, with publisher
//! confirms, and remembers how far the broker confirmed.
//!
//! It reads events straight from the journal between its checkpoint (`outbox.checkpoint`:
//! journal offset and last event sequence confirmed) and the journal's durable end. Each
//! [`domain::EventBatch`] is published persistent and `mandatory` to the events exchange; only
//! an ack without a returned message moves the checkpoint. While the broker is away nothing
//! moves and events wait in the journal; when it returns they go out from the checkpoint.
//! Delivery is at-least-once (a crash between confirm and checkpoint republishes a batch), and
//! persistence is idempotent on event sequence numbers.
//!
//! Its lag — `engine_outbox_lag_events` (last journaled seq minus last confirmed seq) and
//! `engine_outbox_lag_bytes` (journal's durable end minus the confirmed offset) — is kept by a
//! watcher task that follows both positions, so it keeps growing while the broker is away
//! (the publish loop is then not running). Each publish is stamped with the AMQP `timestamp`
//! (seconds) that persistence turns into its consumer lag.

use crate::config::AmqpConfig;
use crate::matcher::Durable;
use kit::checkpoint::Checkpoint;
use kit::health::Readiness;
use kit::shutdown::Shutdown;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// File name of the outbox checkpoint inside the engine's data directory.
pub const CHECKPOINT_FILE: &str = "outbox.checkpoint";

/// The checkpoint is synced at most this often (and when the publisher stops). What it costs
/// to be stale is a republish after a crash (persistence skips events it has); syncing it
/// after every confirm made as many syncs as the journal at low rates, competing with the
/// journal's for the disk (`make chaos-disk-io`).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// How long closing a connection may take before it is dropped as it is.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Syncs the checkpoint to `(offset, seq)` unless it holds that offset already (the publisher
/// is stopping).
fn settle(checkpoint: &mut Checkpoint, offset: u64, seq: u64) -> std::io::Result<()> {
    if checkpoint.get().0 != offset {
        checkpoint.set(offset, seq)?;
    }
    Ok(())
}

/// Everything the publisher needs.
#[derive(Debug)]
pub struct Outbox {
    pub config: AmqpConfig,
    pub journal_path: PathBuf,
    pub checkpoint_path: PathBuf,
    pub durable: watch::Receiver<Durable>,
    pub readiness: Readiness,
    pub shutdown: Shutdown,
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("journal: {0}")]
    Journal(#[from] std::io::Error),
    /// A step that did not finish in time: the connection may be hung (lapin does not always
    /// notice a broker that went away mid-handshake), so it is dropped and made again.
    #[error("{0} did not finish within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("broker nacked the batch")]
    Nack,
    #[error("batch was unroutable (returned): is the queue bound?")]
    Returned,
}

impl PublishError {
    /// The `result` label of `dependency_request_duration_seconds{dependency="rabbitmq"}`.
    fn kind(&self) -> &'static str {
        match self {
            PublishError::Amqp(_) => "amqp",
            PublishError::Journal(_) => "journal",
            PublishError::Timeout(..) => "timeout",
            PublishError::Nack => "nack",
            PublishError::Returned => "returned",
        }
    }
}

/// Keeps `engine_outbox_lag_events` and `engine_outbox_lag_bytes` current from the journal's
/// durable end and the confirmed position, until either side stops or shutdown.
async fn watch_lag(
    mut durable: watch::Receiver<Durable>,
    mut confirmed: watch::Receiver<(u64, u64)>,
    shutdown: Shutdown,
) {
    loop {
        let end = *durable.borrow_and_update();
        let (offset, seq) = *confirmed.borrow_and_update();
        metrics::gauge!("engine_outbox_lag_events").set(end.last_seq.saturating_sub(seq) as f64);
        metrics::gauge!("engine_outbox_lag_bytes").set(end.offset.saturating_sub(offset) as f64);
        tokio::select! {
            r = durable.changed() => if r.is_err() { return },
            r = confirmed.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}

impl Outbox {
    /// Runs until shutdown, reconnecting with capped backoff.
    pub async fn run(mut self) -> std::io::Result<()> {
        let mut checkpoint = Checkpoint::open(&self.checkpoint_path)?;
        let journal = File::open(&self.journal_path)?;
        let journal_len = journal.metadata()?.len();
        if checkpoint.get().0 > journal_len {
            // The journal was replaced (a new exchange): publish it from the start.
            tracing::warn!(
                checkpoint = checkpoint.get().0,
                journal_len,
                "outbox checkpoint is past the journal's end; restarting from 0"
            );
            checkpoint.set(0, 0)?;
        }
        let (offset, seq) = checkpoint.get();
        tracing::info!(
            offset,
            confirmed_seq = seq,
            "outbox starting from its checkpoint"
        );
        metrics::gauge!("engine_outbox_confirmed_seq").set(seq as f64);
        let (confirmed, confirmed_rx) = watch::channel((offset, seq));
        let lag = tokio::spawn(watch_lag(
            self.durable.clone(),
            confirmed_rx,
            self.shutdown.clone(),
        ));
        let initial = Duration::from_millis(50);
        let max = Duration::from_millis(self.config.reconnect_max_ms);
        let mut backoff = initial;
        let mut first = true;
        while !self.shutdown.is_triggered() {
            if !first {
                metrics::counter!("engine_amqp_reconnects_total").increment(1);
            }
            first = false;
            match self.connect().await {
                Ok((conn, channel)) => {
                    self.readiness.set("rabbitmq", true);
                    backoff = initial;
                    let result = self
                        .publish_loop(&channel, &journal, &mut checkpoint, &confirmed)
                        .await;
                    // A connection that is already gone may never answer the close.
                    let _ = tokio::time::timeout(
                        CLOSE_TIMEOUT,
                        conn.close(200, "engine outbox stopping".into()),
                    )
                    .await;
                    match result {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox lost the broker; reconnecting")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach RabbitMQ")
                }
            }
            self.readiness.set("rabbitmq", false);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shutdown.wait() => break,
            }
            backoff = (backoff * 2).min(max);
        }
        lag.abort();
        Ok(())
    }

    /// Connects, opens a confirming channel and declares the topology, all within
    /// `amqp.connect_timeout_ms`.
    async fn connect(&self) -> Result<(lapin::Connection, Channel), PublishError> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let connecting = async {
            let conn = kit::amqp::connect(&self.config.url, "matching-engine").await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            kit::amqp::declare_topology(&channel).await?;
            Ok::<_, lapin::Error>((conn, channel))
        };
        Ok(tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| PublishError::Timeout("connecting to RabbitMQ", timeout))??)
    }

    /// Publishes until shutdown (`Ok`) or a broker error (`Err`, reconnect).
    async fn publish_loop(
        &mut self,
        channel: &Channel,
        journal: &File,
        checkpoint: &mut Checkpoint,
        confirmed: &watch::Sender<(u64, u64)>,
    ) -> Result<(), PublishError> {
        let mut last_sync = Instant::now();
        let (mut offset, mut confirmed_seq) = checkpoint.get();
        let interval = Duration::from_millis(self.config.publish_interval_ms);
        let mut next_publish = Instant::now();
        loop {
            if Instant::now() < next_publish {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_publish.into()) => {}
                    _ = self.shutdown.wait() => {
                        settle(checkpoint, offset, confirmed_seq)?;
                        return Ok(());
                    }
                }
            }
            let durable = *self.durable.borrow_and_update();
            if offset >= durable.offset {
                // Caught up: the checkpoint follows once the interval has passed.
                let behind = checkpoint.get().0 != offset;
                if behind && last_sync.elapsed() >= CHECKPOINT_INTERVAL {
                    checkpoint.set(offset, confirmed_seq)?;
                    last_sync = Instant::now();
                    continue;
                }
                let sync_at = last_sync + CHECKPOINT_INTERVAL;
                tokio::select! {
                    changed = self.durable.changed() => {
                        if changed.is_err() {
                            // The matching thread stopped: everything durable is published.
                            settle(checkpoint, offset, confirmed_seq)?;
                            return Ok(());
                        }
                    }
                    _ = tokio::time::sleep_until(sync_at.into()), if behind => {}
                    _ = self.shutdown.wait() => {
                        settle(checkpoint, offset, confirmed_seq)?;
                        return Ok(());
                    }
                }
                continue;
            }
            let chunk = crate::journal::read_events(
                journal,
                offset,
                durable.offset,
                self.config.batch_events_max,
            )?;
            let mut body = Vec::with_capacity(chunk.events_json.len() + 16);
            body.extend_from_slice(
                format!("{{\"v\":{},\"events\":", domain::WIRE_VERSION).as_bytes(),
            );
            body.extend_from_slice(&chunk.events_json);
            body.push(b'}');
            let started = Instant::now();
            next_publish = started + interval;
            let now_secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_timestamp(now_secs)
                .with_message_id(format!("events-{}-{}", chunk.first_seq, chunk.last_seq).into());
            let timeout = Duration::from_millis(self.config.confirm_timeout_ms);
            let publishing = async {
                let confirm = channel
                    .basic_publish(
                        kit::amqp::EVENTS_EXCHANGE.into(),
                        kit::amqp::EVENTS_ROUTING_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        props,
                    )
                    .await?;
                match confirm.await? {
                    Confirmation::Ack(None) => Ok(()),
                    Confirmation::Ack(Some(_)) => Err(PublishError::Returned),
                    Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nack),
                }
            };
            // The send counts against the timeout too: a broker that stopped reading (gone, or
            // blocking publishers on an alarm) must not hold the loop forever.
            let published = tokio::time::timeout(timeout, publishing)
                .await
                .unwrap_or(Err(PublishError::Timeout("publish and confirm", timeout)));
            kit::metrics::observe_dependency_call(
                "rabbitmq",
                "publish",
                published
                    .as_ref()
                    .map_or_else(PublishError::kind, |()| kit::metrics::RESULT_OK),
                started.elapsed(),
            );
            published?;
            metrics::histogram!("engine_outbox_publish_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("engine_outbox_batch_size").record(chunk.events as f64);
            metrics::counter!("engine_outbox_published_events_total")
                .increment(chunk.events as u64);
            offset = chunk.end_offset;
            confirmed_seq = chunk.last_seq;
            confirmed.send_replace((offset, confirmed_seq));
            metrics::gauge!("engine_outbox_confirmed_seq").set(confirmed_seq as f64);
            if last_sync.elapsed() >= CHECKPOINT_INTERVAL {
                checkpoint.set(offset, confirmed_seq)?;
                last_sync = Instant::now();
            }
        }
    }
}
