//! Smart batching of commands toward the matching engine.
//!
//! Each new order or cancel is handed to one dispatcher task. While fewer than
//! `[batching] in_flight` calls to the engine are out, the dispatcher sends whatever is waiting
//! at once: a single command alone on its own route (`POST /v1/orders`, as before), several
//! together in one `POST /v1/commands` (at most `max_commands`), which the engine applies in
//! order, journals with one `fdatasync` and answers item by item. So an idle exchange adds no
//! delay, and under load the batches grow by themselves: every HTTP exchange, wake-up and
//! fsync is shared by the commands that arrived during the previous call (the "smart batching"
//! of the LMAX disruptor and of Kafka's producer, without a linger timer).
//!
//! The answers mean exactly what a single call's answer means: an outcome, a refusal, or an
//! error after which the caller queues the command (the engine's idempotency on `order_id`
//! makes a redelivery harmless). The hand-off queue is bounded (one full batch per call
//! slot); a caller waits for room, bounded by the engine's request timeout.

use crate::config::BatchingConfig;
use crate::upstream::{CallError, EngineAnswer, EngineClient};
use domain::Command;
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, mpsc, oneshot};

type Reply = oneshot::Sender<Result<EngineAnswer, CallError>>;
type Job = (Command, Reply);

/// The gateway's way to the engine for client commands; cheap to clone.
#[derive(Clone)]
pub struct EngineBatcher {
    tx: mpsc::Sender<Job>,
    /// The receiver until the dispatcher starts (on the first command, inside the runtime).
    idle: Arc<Mutex<Option<mpsc::Receiver<Job>>>>,
    engine: EngineClient,
    config: BatchingConfig,
}

impl std::fmt::Debug for EngineBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBatcher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EngineBatcher {
    /// A batcher over `engine`. Spawns nothing yet: the dispatcher starts with the first
    /// command.
    pub fn new(engine: EngineClient, config: BatchingConfig) -> EngineBatcher {
        let (tx, rx) = mpsc::channel(config.max_commands * config.in_flight);
        EngineBatcher {
            tx,
            idle: Arc::new(Mutex::new(Some(rx))),
            engine,
            config,
        }
    }

    /// Sends `command` to the engine, alone or with others, and returns its answer.
    pub async fn send(&self, command: Command) -> Result<EngineAnswer, CallError> {
        self.start();
        let (reply, answer) = oneshot::channel();
        if self.tx.send((command, reply)).await.is_err() {
            return Err(CallError::Io("the engine dispatcher stopped".into()));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CallError::Io(
                "the engine dispatcher dropped the command".into(),
            ))
        })
    }

    fn start(&self) {
        let rx = match self.idle.lock() {
            Ok(mut idle) => idle.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(rx) = rx {
            tokio::spawn(dispatch(rx, self.engine.clone(), self.config.clone()));
        }
    }
}

async fn dispatch(mut rx: mpsc::Receiver<Job>, engine: EngineClient, config: BatchingConfig) {
    let slots = Arc::new(Semaphore::new(config.in_flight));
    loop {
        // Take a call slot first: while every slot is busy, commands accumulate in the queue
        // and leave together when one frees up.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut commands = vec![first.0];
        let mut replies = vec![first.1];
        while commands.len() < config.max_commands {
            match rx.try_recv() {
                Ok((c, r)) => {
                    commands.push(c);
                    replies.push(r);
                }
                Err(_) => break,
            }
        }
        let engine = engine.clone();
        tokio::spawn(async move {
            metrics::histogram!("gateway_engine_batch_size").record(commands.len() as f64);
            if let [command] = commands.as_slice() {
                let answer = engine.send(command).await;
                if let Some(reply) = replies.pop() {
                    let _ = reply.send(answer);
                }
            } else {
                match engine.send_batch(&commands).await {
                    Ok(answers) => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(answer);
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
            drop(slot);
        });
    }
}
