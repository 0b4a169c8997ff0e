//! The gateway's background work: draining the retry queue into the engine, and probing the
//! dependencies so `dependency_up` is right even when no order flows.
//!
//! Delivery goes through `kit::spool::deliver`: up to [`DELIVERY_BATCH`] commands per
//! `POST /v1/commands`, oldest first, applied by the engine in that order, so the engine sees
//! commands in the order the gateway acknowledged them. The engine's `200` is
//! done; `409`/`422` can never succeed and go to the dead-letter file; anything else (no
//! connection, timeout, 5xx) is retried after a backoff of ~50 ms doubling to 1 s. Redelivery
//! after a crash is harmless: the engine answers a known `order_id` with its original outcome.

use crate::gateway::Gateway;
use kit::shutdown::Shutdown;
use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// Most queued commands delivered in one request (the engine takes up to 1024; this keeps a
/// request well under the engine's 1 MiB body limit).
pub const DELIVERY_BATCH: usize = 256;

impl Gateway {
    /// Starts delivery and the probes; the returned task ends once `shutdown` triggers and
    /// the delivery in progress (bounded by the engine timeout) has finished.
    pub fn spawn_background(&self, shutdown: Shutdown) -> JoinHandle<()> {
        let gw = self.clone();
        tokio::spawn(async move {
            let delivery = {
                let gw = gw.clone();
                kit::spool::deliver(
                    gw.spool().clone(),
                    shutdown.clone(),
                    gw.config().delivery.backoff(),
                    DELIVERY_BATCH,
                    move |entries| {
                        let gw = gw.clone();
                        async move { gw.deliver_batch(entries).await }
                    },
                )
            };
            let engine_probe = {
                let gw = gw.clone();
                probe_loop(
                    gw.config().engine.probe_interval(),
                    shutdown.clone(),
                    move || {
                        let gw = gw.clone();
                        async move { gw.engine().probe().await }
                    },
                )
            };
            let persistence_probe = {
                let gw = gw.clone();
                probe_loop(
                    gw.config().persistence.probe_interval(),
                    shutdown.clone(),
                    move || {
                        let gw = gw.clone();
                        async move { gw.persistence().probe().await }
                    },
                )
            };
            tokio::join!(delivery, engine_probe, persistence_probe);
            tracing::info!(queued = gw.spool().len(), "background tasks stopped");
        })
    }
}

/// Runs `probe` every `interval` until `shutdown`.
async fn probe_loop<F, Fut>(interval: Duration, shutdown: Shutdown, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = async { tick.tick().await; probe().await } => {}
            _ = shutdown.wait() => break,
        }
    }
}
