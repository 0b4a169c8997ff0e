//! The engine's internal HTTP API, called by the order-gateway:
//!
//! * `POST /v1/orders` — a `domain::NewOrder` → `200` `OrderOutcome` (`x-replayed: true` when it
//!   is the original answer to a retry), `409` when an id is reused with different content,
//!   `422` for a body that is not a `NewOrder`, `503` + `Retry-After` when the matching queue is
//!   full or the engine drains.
//! * `POST /v1/orders/{order_id}/cancel` → `200` `OrderOutcome`.
//! * `POST /v1/commands` — an array of up to 1024 tagged `domain::Command`s, applied in order
//!   as one request to the matching thread (the gateway sends its batches under load and
//!   drains its retry queue with it) → `200` with one result per command, in order:
//!   `{"status": 200, "outcome": ..., "replayed": bool}` or `{"status": 409|503, "error": {...}}`
//!   (`503` for every item when the matching queue is full).
//! * `GET /v1/book/{symbol}?depth=N` → the aggregated book, best levels first.
//! * `GET /v1/state` → last sequence number, journal size, and every book's hash.
//!
//! Errors are `{"error": {"code", "field", "message"}}`, as on the public API.

use crate::exchange::Applied;
use crate::matcher::{Busy, Matcher};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use domain::{CancelOrder, Command, NewOrder, OrderId, OrderOutcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The engine's error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &'static str,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl From<Busy> for ApiError {
    fn from(b: Busy) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            None,
            b.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "field": self.field, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The API routes over a running matcher.
pub fn routes(matcher: Matcher) -> Router {
    Router::new()
        .route("/v1/orders", post(new_order))
        .route("/v1/orders/{order_id}/cancel", post(cancel))
        .route("/v1/commands", post(commands))
        .route("/v1/book/{symbol}", get(book))
        .route("/v1/state", get(state))
        .with_state(matcher)
}

fn answer(applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::New { outcome, .. } => Ok(axum::Json(&*outcome).into_response()),
        Applied::Replay(outcome) => {
            let mut resp = axum::Json(&*outcome).into_response();
            resp.headers_mut()
                .insert("x-replayed", HeaderValue::from_static("true"));
            Ok(resp)
        }
        Applied::Conflict { field, message } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            Some(field),
            message,
        )),
    }
}

async fn new_order(State(m): State<Matcher>, body: Bytes) -> Result<Response, ApiError> {
    let order: NewOrder = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed",
            Some("body"),
            format!("not a NewOrder: {e}"),
        )
    })?;
    answer(m.command(Command::NewOrder(order)).await?)
}

async fn cancel(
    State(m): State<Matcher>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = order_id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            Some("order_id"),
            format!("order id {order_id:?} is not a number"),
        )
    })?;
    answer(
        m.command(Command::Cancel(CancelOrder {
            order_id: OrderId(id),
        }))
        .await?,
    )
}

/// Most commands in one `POST /v1/commands`.
pub const MAX_BATCH_COMMANDS: usize = 1024;

async fn commands(State(m): State<Matcher>, body: Bytes) -> Result<Response, ApiError> {
    let commands: Vec<Command> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed",
            Some("body"),
            format!("not an array of commands: {e}"),
        )
    })?;
    if commands.len() > MAX_BATCH_COMMANDS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "out_of_range",
            Some("body"),
            format!(
                "{} commands; at most {MAX_BATCH_COMMANDS} per request",
                commands.len()
            ),
        ));
    }
    let applied = m.commands(commands).await;
    let results: Vec<Item<'_>> = applied
        .iter()
        .map(|r| match r {
            Ok(Applied::New { outcome, .. }) => Item::Done {
                status: 200,
                outcome,
                replayed: false,
            },
            Ok(Applied::Replay(outcome)) => Item::Done {
                status: 200,
                outcome,
                replayed: true,
            },
            Ok(Applied::Conflict { field, message }) => Item::Failed {
                status: 409,
                error: ItemError {
                    code: "conflict",
                    field: Some(field),
                    message: message.clone(),
                },
            },
            Err(b) => Item::Failed {
                status: 503,
                error: ItemError {
                    code: "unavailable",
                    field: None,
                    message: b.to_string(),
                },
            },
        })
        .collect();
    Ok(axum::Json(results).into_response())
}

/// One result of `POST /v1/commands`.
#[derive(Serialize)]
#[serde(untagged)]
enum Item<'a> {
    Done {
        status: u16,
        outcome: &'a OrderOutcome,
        replayed: bool,
    },
    Failed {
        status: u16,
        error: ItemError,
    },
}

#[derive(Serialize)]
struct ItemError {
    code: &'static str,
    field: Option<&'static str>,
    message: String,
}

#[derive(Debug, Deserialize)]
struct DepthQuery {
    depth: Option<String>,
}

async fn book(
    State(m): State<Matcher>,
    Path(symbol): Path<String>,
    Query(q): Query<DepthQuery>,
) -> Result<Response, ApiError> {
    let depth = match q.depth.as_deref() {
        None => 10,
        Some(d) => match d.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "out_of_range",
                    Some("depth"),
                    format!("depth {d:?} must be a whole number from 1 to 1000"),
                ));
            }
        },
    };
    match m.book(symbol.clone(), depth).await? {
        Some(view) => Ok(axum::Json(view).into_response()),
        None => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_symbol",
            Some("symbol"),
            format!("symbol {symbol:?} is not listed"),
        )),
    }
}

async fn state(State(m): State<Matcher>) -> Result<Response, ApiError> {
    Ok(axum::Json(m.state().await?).into_response())
}
