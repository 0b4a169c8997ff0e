//! The gateway's state and its core decisions: where a command goes (engine or retry queue),
//! what the client is told, and what is remembered.
//!
//! **Ordering invariant:** while the retry queue holds anything, every new command joins the
//! end of the queue rather than going to the engine directly, so commands reach the engine in
//! the order they were acknowledged (a cancel never overtakes the order it cancels).
//!
//! **Durability invariant:** a `202 queued` is answered only after the command is on disk
//! (kit's spool returns from `append` after `fdatasync`). When the spool is full the answer is
//! `503` with `Retry-After`: load is shed, never silently dropped.

use crate::answers::{self, OrderAnswer, QueuedAnswer};
use crate::batcher::EngineBatcher;
use crate::config::GatewayConfig;
use crate::error::{AppError, ErrorDetail};
use crate::idempotency::{self, Begin, Idempotency, Reservation, StoredAnswer};
use crate::ids::{DirLock, IdError, OrderIds};
use crate::known::{KnownOrder, KnownOrders, KnownView};
use crate::upstream::{self, CallError, EngineAnswer, EngineClient, PersistenceClient};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use domain::{
    CancelOrder, Catalog, ClientOrderId, Command, NewOrder, OrderId, OrderOutcome, OrderStatus,
    RejectReason, Symbol, SymbolSpec,
};
use kit::health::Readiness;
use kit::spool::{Delivery, Entry, Spool, SpoolError};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;

/// Name of the retry queue in `spool_*` metrics.
pub const SPOOL_NAME: &str = "gateway";
/// Readiness flag behind `/readyz`: the gateway is ready while its spool accepts appends
/// (it takes orders even with the engine down).
pub const READY_SPOOL: &str = "spool";

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("order ids: {0}")]
    Ids(#[from] IdError),
    #[error("retry queue: {0}")]
    Spool(#[from] SpoolError),
    #[error("HTTP client: {0}")]
    Client(#[from] upstream::ClientError),
    #[error("serving: {0}")]
    Serve(#[from] std::io::Error),
}

/// The whole gateway; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("generation", &self.inner.ids.generation())
            .field("queued", &self.inner.spool.len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: GatewayConfig,
    catalog: Catalog,
    /// Held for the gateway's life: no second gateway can use the same data directory.
    _lock: DirLock,
    ids: OrderIds,
    idempotency: Arc<Idempotency>,
    known: KnownOrders,
    spool: Spool,
    engine: EngineClient,
    /// Client commands to the engine, batched under load.
    batcher: EngineBatcher,
    /// The engine for retry-queue delivery: same timeouts but a short connect timeout
    /// (`[delivery] connect_timeout_ms`), so a healed engine is found fast.
    delivery: EngineClient,
    persistence: PersistenceClient,
    /// Behind `/readyz` (the spool only).
    readiness: Readiness,
    /// Feeds `dependency_up{dependency="engine"|"persistence"}`; not part of readiness.
    dependencies: Readiness,
    metrics: PrometheusHandle,
}

/// Counts one answer to `POST /v1/orders` in `gateway_orders_total{outcome}`.
fn count_order(outcome: &'static str) {
    metrics::counter!("gateway_orders_total", "outcome" => outcome).increment(1);
}

/// Counts a rejected order: `gateway_orders_total{outcome="rejected"}` and
/// `gateway_orders_rejected_total{reason}` (one of [`crate::obs::REJECT_REASONS`]).
pub(crate) fn count_rejected(reason: &'static str) {
    count_order("rejected");
    metrics::counter!("gateway_orders_rejected_total", "reason" => reason).increment(1);
}

/// Counts one answer to `DELETE /v1/orders/{id}` in `gateway_cancels_total{outcome}`.
fn count_cancel(outcome: &'static str) {
    metrics::counter!("gateway_cancels_total", "outcome" => outcome).increment(1);
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The answer given before, byte for byte.
pub fn stored_response(a: &StoredAnswer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
    json_response(status, a.body.clone())
}

fn to_json_bytes<T: serde::Serialize>(v: &T) -> Result<Bytes, AppError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| AppError::Internal(format!("serializing an answer: {e}")))
}

impl Gateway {
    /// Opens the data directory (lock, new id generation, retry queue), rebuilds what the
    /// queue implies (idempotency answers, queued orders) and builds the HTTP clients. Binds
    /// nothing and spawns no task: see [`Gateway::spawn_background`] and [`crate::app`].
    pub fn open(config: GatewayConfig) -> Result<Gateway, StartError> {
        let dir = config.data.dir.clone();
        let lock = DirLock::acquire(&dir)?;
        let ids = OrderIds::start(&dir)?;
        let spool = Spool::open(&dir.join("spool"), SPOOL_NAME, config.spool.clone())?;
        let readiness = Readiness::new(&[READY_SPOOL]);
        crate::obs::describe();
        let dependencies = Readiness::new(&[upstream::ENGINE, upstream::PERSISTENCE]);
        let engine = EngineClient::new(&config.engine, dependencies.clone())?;
        let delivery = EngineClient::new(
            &crate::config::UpstreamConfig {
                connect_timeout_ms: config.delivery.connect_timeout_ms,
                ..config.engine.clone()
            },
            dependencies.clone(),
        )?;
        let persistence = PersistenceClient::new(&config.persistence, dependencies.clone())?;
        let gw = Gateway {
            inner: Arc::new(Inner {
                catalog: Catalog::lab(),
                _lock: lock,
                ids,
                idempotency: Idempotency::new(
                    config.idempotency.max_entries,
                    config.idempotency.max_bytes,
                ),
                known: KnownOrders::new(config.idempotency.recent_orders_max_entries),
                spool,
                delivery,
                batcher: EngineBatcher::new(engine.clone(), config.batching.clone()),
                engine,
                persistence,
                readiness,
                dependencies,
                metrics: kit::metrics::install(),
                config,
            }),
        };
        gw.rebuild_from_spool();
        gw.inner.readiness.set(READY_SPOOL, true);
        Ok(gw)
    }

    /// Every order still in the retry queue was answered `202 queued`: remember those
    /// answers again, and that the orders are queued.
    fn rebuild_from_spool(&self) {
        let pending = self.inner.spool.pending();
        let mut orders = 0usize;
        for entry in &pending {
            match serde_json::from_slice::<Command>(&entry.payload) {
                Ok(Command::NewOrder(order)) => {
                    let Ok(body) = to_json_bytes(&QueuedAnswer::for_command(&Command::NewOrder(
                        order.clone(),
                    ))) else {
                        continue;
                    };
                    self.inner.idempotency.remember(
                        order.client_order_id.as_str(),
                        idempotency::fingerprint(&order),
                        StoredAnswer { status: 202, body },
                    );
                    self.inner
                        .known
                        .queued(order.order_id, self.queued_known(&order));
                    orders += 1;
                }
                Ok(Command::Cancel(_)) => {}
                Err(e) => {
                    // Delivery dead-letters it; nothing to remember.
                    tracing::warn!(seq = entry.seq, error = %e, "spooled entry is not a command");
                }
            }
        }
        tracing::info!(
            entries = pending.len(),
            orders,
            generation = self.inner.ids.generation(),
            "gateway state rebuilt from the retry queue"
        );
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    pub fn spool(&self) -> &Spool {
        &self.inner.spool
    }

    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    pub fn dependencies(&self) -> &Readiness {
        &self.inner.dependencies
    }

    pub fn metrics_handle(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    pub fn engine(&self) -> &EngineClient {
        &self.inner.engine
    }

    pub fn persistence(&self) -> &PersistenceClient {
        &self.inner.persistence
    }

    /// The id generation of this run.
    pub fn generation(&self) -> u64 {
        self.inner.ids.generation()
    }

    fn spec(&self, symbol: &Symbol) -> Option<&SymbolSpec> {
        self.inner.catalog.get("symbol", symbol.as_str()).ok()
    }

    fn queued_known(&self, order: &NewOrder) -> KnownOrder {
        KnownOrder {
            symbol: order.symbol.clone(),
            view: KnownView::Json(Arc::new(answers::queued_view(
                order,
                self.spec(&order.symbol),
            ))),
        }
    }

    fn remember_answer(&self, answer: Arc<OrderAnswer>, symbol: &Symbol) {
        self.inner.known.answered(
            answer.order_id,
            KnownOrder {
                symbol: symbol.clone(),
                view: KnownView::Answered(answer),
            },
        );
    }

    /// `POST /v1/orders` after parsing: idempotency, id, engine or queue.
    pub async fn submit(&self, mut order: NewOrder) -> Result<Response, AppError> {
        let fingerprint = idempotency::fingerprint(&order);
        let reservation = loop {
            match self
                .inner
                .idempotency
                .begin(order.client_order_id.as_str(), fingerprint)
            {
                Begin::Fresh(r) => break r,
                Begin::Replay(answer) => {
                    count_order("replayed");
                    return Ok(stored_response(&answer));
                }
                Begin::Conflict => {
                    count_order("conflict");
                    return Err(AppError::Conflict {
                        field: "client_order_id".into(),
                        code: "conflict".into(),
                        message: format!(
                            "client_order_id {:?} was already used for an order with different content",
                            order.client_order_id.as_str()
                        ),
                    });
                }
                // Another request with this key and content is being answered; its answer
                // is ours. Bounded by that request's own timeouts.
                Begin::Wait(mut rx) => {
                    let _ = rx.wait_for(|done| *done).await;
                }
            }
        };
        order.order_id = self.inner.ids.next_id().map_err(|e| {
            count_order("error");
            AppError::Internal(e.to_string())
        })?;
        let command = Command::NewOrder(order.clone());
        if !self.inner.spool.is_empty() {
            return self.queue_order(reservation, &order, &command).await;
        }
        match self.inner.batcher.send(command.clone()).await {
            Ok(EngineAnswer::Outcome(outcome)) => {
                let answer = Arc::new(OrderAnswer::from_outcome(
                    &outcome,
                    Some(&order.client_order_id),
                    self.spec(&order.symbol),
                ));
                let body = to_json_bytes(&*answer)?;
                self.remember_answer(answer, &order.symbol);
                let stored = reservation.complete(StoredAnswer { status: 201, body });
                match outcome.reject_reason {
                    Some(reason) => count_rejected(reason.as_str()),
                    None => count_order("accepted"),
                }
                Ok(stored_response(&stored))
            }
            Ok(EngineAnswer::Refused { status, detail }) => {
                drop(reservation);
                if status == StatusCode::CONFLICT {
                    count_order("conflict");
                } else {
                    count_rejected("engine_refused");
                }
                Err(AppError::Engine { status, detail })
            }
            Err(e) => {
                tracing::warn!(order_id = %order.order_id, client_order_id = %order.client_order_id, error = %e, kind = e.kind(), "engine unavailable; queueing the order");
                self.queue_order(reservation, &order, &command).await
            }
        }
    }

    async fn queue_order(
        &self,
        reservation: Reservation,
        order: &NewOrder,
        command: &Command,
    ) -> Result<Response, AppError> {
        let body = to_json_bytes(&QueuedAnswer::for_command(command))?;
        // Known as queued before it can be delivered, so delivery's removal never races
        // ahead of this insertion.
        self.inner
            .known
            .queued(order.order_id, self.queued_known(order));
        match self.append(command).await {
            Ok(seq) => {
                tracing::debug!(order_id = %order.order_id, client_order_id = %order.client_order_id, seq, "order queued");
                let stored = reservation.complete(StoredAnswer { status: 202, body });
                count_order("queued");
                Ok(stored_response(&stored))
            }
            Err(e) => {
                self.inner.known.dequeued(order.order_id);
                count_order(if matches!(e, AppError::Overloaded(_)) {
                    "shed"
                } else {
                    "error"
                });
                Err(e)
            }
        }
    }

    /// Appends `command` to the retry queue (durably), mapping failures to answers.
    async fn append(&self, command: &Command) -> Result<u64, AppError> {
        let payload = serde_json::to_vec(command)
            .map_err(|e| AppError::Internal(format!("serializing a command: {e}")))?;
        match self.inner.spool.append(payload).await {
            Ok(seq) => Ok(seq),
            Err(SpoolError::Full { entries, bytes }) => {
                tracing::warn!(entries, bytes, "retry queue full; shedding load");
                Err(AppError::Overloaded(format!(
                    "the engine is unreachable and the retry queue is full ({entries} commands waiting); retry later"
                )))
            }
            Err(e) => {
                tracing::error!(error = %e, "retry queue cannot take commands");
                if !matches!(e, SpoolError::TooLarge(_)) {
                    self.inner.readiness.set(READY_SPOOL, false);
                }
                Err(AppError::Unavailable {
                    dependency: "retry queue",
                    message: e.to_string(),
                })
            }
        }
    }

    /// `DELETE /v1/orders/{id}`.
    pub async fn cancel(&self, order_id: OrderId) -> Result<Response, AppError> {
        let command = Command::Cancel(CancelOrder { order_id });
        if !self.inner.spool.is_empty() {
            return self.queue_cancel(&command).await;
        }
        match self.inner.batcher.send(command.clone()).await {
            Ok(EngineAnswer::Outcome(outcome)) => self.cancel_answer(&outcome),
            Ok(EngineAnswer::Refused { status, detail }) => {
                count_cancel("refused");
                Err(AppError::Engine { status, detail })
            }
            Err(e) => {
                tracing::warn!(%order_id, error = %e, kind = e.kind(), "engine unavailable; queueing the cancel");
                self.queue_cancel(&command).await
            }
        }
    }

    fn cancel_answer(&self, outcome: &OrderOutcome) -> Result<Response, AppError> {
        let id = outcome.order_id;
        // A refused cancel carries a reject reason; its status is the order's own (for
        // `order_not_open`: filled, cancelled or expired), or `rejected`.
        if outcome.reject_reason.is_some() || outcome.status == OrderStatus::Rejected {
            return Err(match outcome.reject_reason {
                Some(RejectReason::UnknownOrder) => {
                    count_cancel("unknown_order");
                    AppError::NotFound {
                        field: Some("order_id".into()),
                        code: "unknown_order".into(),
                        message: format!("order {id} is not known to the matching engine"),
                    }
                }
                Some(RejectReason::OrderNotOpen) => {
                    count_cancel("order_not_open");
                    AppError::Conflict {
                        field: "order_id".into(),
                        code: "order_not_open".into(),
                        message: format!(
                            "order {id} is no longer open (status {})",
                            outcome.status.as_str()
                        ),
                    }
                }
                other => {
                    count_cancel("rejected");
                    AppError::Conflict {
                        field: "order_id".into(),
                        code: other.map_or("rejected", RejectReason::as_str).into(),
                        message: format!("the matching engine refused to cancel order {id}"),
                    }
                }
            });
        }
        let known = self.inner.known.get(id);
        let symbol = known.as_ref().map(|k| k.symbol.clone());
        let client_order_id = known.as_ref().and_then(|k| {
            k.view
                .client_order_id()
                .and_then(|s| ClientOrderId::parse("client_order_id", s).ok())
        });
        let answer = Arc::new(OrderAnswer::from_outcome(
            outcome,
            client_order_id.as_ref(),
            symbol.as_ref().and_then(|s| self.spec(s)),
        ));
        let body = to_json_bytes(&*answer)?;
        if let Some(s) = &symbol {
            self.remember_answer(answer, s);
        }
        count_cancel("cancelled");
        Ok(json_response(StatusCode::OK, body))
    }

    async fn queue_cancel(&self, command: &Command) -> Result<Response, AppError> {
        let body = to_json_bytes(&QueuedAnswer::for_command(command))?;
        match self.append(command).await {
            Ok(seq) => {
                tracing::debug!(seq, "cancel queued");
                count_cancel("queued");
                Ok(json_response(StatusCode::ACCEPTED, body))
            }
            Err(e) => {
                count_cancel(if matches!(e, AppError::Overloaded(_)) {
                    "shed"
                } else {
                    "error"
                });
                Err(e)
            }
        }
    }

    /// `GET /v1/orders/{id}`: persistence's record, or what the gateway knows.
    pub async fn status(&self, order_id: OrderId) -> Result<Response, AppError> {
        // A queued order cannot be in persistence yet; answer without asking.
        if self.inner.known.is_queued(order_id)
            && let Some(k) = self.inner.known.get(order_id)
        {
            return self.known_response(&k);
        }
        let fallback = || self.inner.known.get(order_id);
        match self.inner.persistence.order(order_id).await {
            Ok(upstream::Stored::Found(body)) => {
                if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
                    Ok(json_response(StatusCode::OK, body))
                } else {
                    Err(AppError::Unavailable {
                        dependency: upstream::PERSISTENCE,
                        message: "answered 200 with a body that is not JSON".into(),
                    })
                }
            }
            Ok(upstream::Stored::NotFound) => match fallback() {
                Some(k) => self.known_response(&k),
                None => Err(AppError::NotFound {
                    field: Some("order_id".into()),
                    code: "unknown_order".into(),
                    message: format!(
                        "order {order_id} is not known (an order the engine just accepted can take a moment to reach persistence)"
                    ),
                }),
            },
            Err(e) => match fallback() {
                Some(k) => self.known_response(&k),
                None => Err(AppError::Unavailable {
                    dependency: upstream::PERSISTENCE,
                    message: e.to_string(),
                }),
            },
        }
    }

    fn known_response(&self, k: &KnownOrder) -> Result<Response, AppError> {
        Ok(json_response(
            StatusCode::OK,
            to_json_bytes(&k.view.to_value())?,
        ))
    }

    /// `GET /v1/book/{symbol}?depth=N`, from the engine as it answered.
    pub async fn book(&self, symbol: &str, depth: u32) -> Result<Response, AppError> {
        let unavailable = |message: String| AppError::Unavailable {
            dependency: upstream::ENGINE,
            message,
        };
        let (status, body) = self
            .inner
            .engine
            .book(symbol, depth)
            .await
            .map_err(|e: CallError| unavailable(e.to_string()))?;
        let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
        match status {
            s if s.is_server_error() => Err(unavailable(format!("answered {}", s.as_u16()))),
            s if is_json => Ok(json_response(s, body)),
            s if s.is_success() => Err(unavailable(
                "answered 200 with a body that is not JSON".into(),
            )),
            s => Err(AppError::Engine {
                status: s,
                detail: ErrorDetail {
                    code: "rejected".into(),
                    field: None,
                    message: format!("the matching engine answered {}", s.as_u16()),
                },
            }),
        }
    }

    /// Delivers spooled commands to the engine in one request, in order (the callback of
    /// `kit::spool::deliver`). An entry that is not a command ends the batch and is rejected.
    pub async fn deliver_batch(&self, entries: Vec<Arc<Entry>>) -> Vec<Delivery> {
        let mut commands = Vec::with_capacity(entries.len());
        let mut unreadable = None;
        for entry in &entries {
            match serde_json::from_slice::<Command>(&entry.payload) {
                Ok(c) => commands.push(c),
                Err(e) => {
                    unreadable = Some(Delivery::Reject(format!("not a command: {e}")));
                    break;
                }
            }
        }
        let mut out = Vec::with_capacity(entries.len());
        if !commands.is_empty() {
            match self.inner.delivery.send_batch(&commands).await {
                Ok(answers) => {
                    for (command, answer) in commands.iter().zip(answers) {
                        let d = self.settle(command, answer);
                        let retry = matches!(d, Delivery::Retry(_));
                        out.push(d);
                        if retry {
                            return out;
                        }
                    }
                }
                Err(e) => {
                    out.push(Delivery::Retry(e.to_string()));
                    return out;
                }
            }
        }
        out.extend(unreadable);
        out
    }

    /// What one engine answer to a delivered command means for the retry queue.
    fn settle(&self, command: &Command, answer: Result<EngineAnswer, CallError>) -> Delivery {
        match answer {
            Ok(EngineAnswer::Outcome(outcome)) => {
                if let Command::NewOrder(order) = &command {
                    self.inner.known.dequeued(order.order_id);
                    let answer = Arc::new(OrderAnswer::from_outcome(
                        &outcome,
                        Some(&order.client_order_id),
                        self.spec(&order.symbol),
                    ));
                    self.remember_answer(answer, &order.symbol);
                    if outcome.order_id != order.order_id {
                        tracing::warn!(order_id = %order.order_id, original_order_id = %outcome.order_id, client_order_id = %order.client_order_id, "queued order was a retry of an earlier order; the engine kept the original");
                    }
                }
                tracing::debug!(order_id = %outcome.order_id, status = outcome.status.as_str(), "queued command delivered");
                Delivery::Done
            }
            Ok(EngineAnswer::Refused { status, detail }) => {
                if let Command::NewOrder(order) = &command {
                    self.inner.known.dequeued(order.order_id);
                    self.inner.known.answered(
                        order.order_id,
                        KnownOrder {
                            symbol: order.symbol.clone(),
                            view: KnownView::Json(Arc::new(serde_json::json!({
                                "order_id": order.order_id,
                                "client_order_id": order.client_order_id,
                                "symbol": order.symbol,
                                "status": "rejected",
                                "error": detail,
                                "source": "gateway",
                            }))),
                        },
                    );
                }
                Delivery::Reject(format!(
                    "engine answered {}: {}: {}",
                    status.as_u16(),
                    detail.code,
                    detail.message
                ))
            }
            Err(e) => Delivery::Retry(e.to_string()),
        }
    }
}
