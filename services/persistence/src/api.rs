//! The read API: order status with fills, recent trades per symbol, and drain statistics.
//!
//! * `GET /v1/orders/{order_id}` and `GET /v1/orders?client_order_id=X`: the order and its
//!   fills, or 404.
//! * `GET /v1/trades?symbol=AAPL&limit=N`: newest first; `limit` 1..=1000, default 100.
//! * `GET /v1/stats`: `last_seq`, `contiguous_seq` and row counts, to wait for a drain.
//!
//! Every error is `{"error": {"code", "field", "message"}}` with the status that fits
//! ([`ApiError`] is the one place where errors become responses).

use crate::error::StoreError;
use crate::store::{self, OrderKey, OrderView, StatsView, TradeView};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use domain::{Catalog, ClientOrderId, ErrorCode, ValidationError};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::Arc;

/// Default and largest `limit` of `GET /v1/trades`.
pub const TRADES_LIMIT_DEFAULT: i64 = 100;
pub const TRADES_LIMIT_MAX: i64 = 1_000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub catalog: Arc<Catalog>,
}

/// The `/v1` routes (the caller adds the admin routes and the standard layers).
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/orders/{order_id}", get(order_by_id))
        .route("/v1/orders", get(order_by_client_id))
        .route("/v1/trades", get(trades))
        .route("/v1/stats", get(stats))
        .with_state(state)
}

/// An error answer.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request cannot be read (a non-numeric id, a missing parameter).
    BadRequest(ValidationError),
    /// 404.
    NotFound {
        field: &'static str,
        message: String,
    },
    /// 422: well-formed, but a value is not acceptable (unlisted symbol, limit too large).
    Unprocessable(ValidationError),
    /// 503: the database is not reachable right now.
    Unavailable(String),
    /// 500.
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    field: Option<&'a str>,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field, message) = match &self {
            ApiError::BadRequest(e) => (
                StatusCode::BAD_REQUEST,
                e.code.as_str(),
                Some(e.field.as_str()),
                e.message.as_str(),
            ),
            ApiError::NotFound { field, message } => (
                StatusCode::NOT_FOUND,
                "not_found",
                Some(*field),
                message.as_str(),
            ),
            ApiError::Unprocessable(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                e.code.as_str(),
                Some(e.field.as_str()),
                e.message.as_str(),
            ),
            ApiError::Unavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                None,
                m.as_str(),
            ),
            ApiError::Internal(m) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                None,
                m.as_str(),
            ),
        };
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code,
                field,
                message,
            },
        });
        if status == StatusCode::SERVICE_UNAVAILABLE {
            (status, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        if e.is_transient() {
            tracing::warn!(error = %e, "read query failed: database unavailable");
            ApiError::Unavailable(format!("database unavailable: {e}"))
        } else {
            tracing::error!(error = %e, "read query failed");
            ApiError::Internal(format!("read query failed: {e}"))
        }
    }
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::BadRequest(ValidationError::new(
        "query",
        ErrorCode::Malformed,
        e.body_text(),
    ))
}

async fn order_by_id(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<OrderView>, ApiError> {
    let raw = path
        .map_err(|e| {
            ApiError::BadRequest(ValidationError::new(
                "order_id",
                ErrorCode::Malformed,
                e.body_text(),
            ))
        })?
        .0;
    let id: u64 = raw.parse().map_err(|_| {
        ApiError::BadRequest(ValidationError::new(
            "order_id",
            ErrorCode::Malformed,
            format!("order_id {raw:?} must be a non-negative integer"),
        ))
    })?;
    let not_found = || ApiError::NotFound {
        field: "order_id",
        message: format!("no order with order_id {id}"),
    };
    let id = i64::try_from(id).map_err(|_| not_found())?;
    store::order(&s.pool, OrderKey::Id(id))
        .await?
        .map(Json)
        .ok_or_else(not_found)
}

#[derive(Deserialize)]
struct ClientOrderQuery {
    client_order_id: Option<String>,
}

async fn order_by_client_id(
    State(s): State<ApiState>,
    query: Result<Query<ClientOrderQuery>, QueryRejection>,
) -> Result<Json<OrderView>, ApiError> {
    let q = query.map_err(bad_query)?.0;
    let raw = q.client_order_id.ok_or_else(|| {
        ApiError::BadRequest(ValidationError::new(
            "client_order_id",
            ErrorCode::Missing,
            "query parameter client_order_id is required (or use /v1/orders/{order_id})",
        ))
    })?;
    let cid = ClientOrderId::parse("client_order_id", &raw).map_err(ApiError::BadRequest)?;
    store::order(&s.pool, OrderKey::ClientOrderId(cid.as_str()))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound {
            field: "client_order_id",
            message: format!("no order with client_order_id {:?}", cid.as_str()),
        })
}

#[derive(Deserialize)]
struct TradesQuery {
    symbol: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/trades` body.
#[derive(Debug, Serialize)]
pub struct TradesView {
    pub symbol: String,
    pub trades: Vec<TradeView>,
}

async fn trades(
    State(s): State<ApiState>,
    query: Result<Query<TradesQuery>, QueryRejection>,
) -> Result<Json<TradesView>, ApiError> {
    let q = query.map_err(bad_query)?.0;
    let symbol = q.symbol.ok_or_else(|| {
        ApiError::Unprocessable(ValidationError::new(
            "symbol",
            ErrorCode::Missing,
            "query parameter symbol is required",
        ))
    })?;
    let spec = s
        .catalog
        .get("symbol", &symbol)
        .map_err(ApiError::Unprocessable)?;
    let limit = match q.limit {
        None => TRADES_LIMIT_DEFAULT,
        Some(raw) => {
            let n: i64 = raw.parse().map_err(|_| {
                ApiError::Unprocessable(ValidationError::new(
                    "limit",
                    ErrorCode::Malformed,
                    format!("limit {raw:?} must be an integer"),
                ))
            })?;
            if !(1..=TRADES_LIMIT_MAX).contains(&n) {
                return Err(ApiError::Unprocessable(ValidationError::new(
                    "limit",
                    ErrorCode::OutOfRange,
                    format!("limit {n} must be between 1 and {TRADES_LIMIT_MAX}"),
                )));
            }
            n
        }
    };
    let symbol = spec.symbol.as_str().to_owned();
    let trades = store::trades(&s.pool, &symbol, limit).await?;
    Ok(Json(TradesView { symbol, trades }))
}

async fn stats(State(s): State<ApiState>) -> Result<Json<StatsView>, ApiError> {
    Ok(Json(store::stats(&s.pool).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseConfig;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// Validation answers before any query, so a pool that points nowhere is enough.
    fn app() -> Router {
        let cfg = DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:1/none".into(),
            acquire_timeout_ms: 50,
            ..DatabaseConfig::default()
        };
        let pool = store::pool(&cfg).unwrap();
        routes(ApiState {
            pool,
            catalog: Arc::new(Catalog::lab()),
        })
    }

    async fn call(uri: &str) -> (StatusCode, serde_json::Value) {
        let resp = app()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn bad_requests_name_their_field() {
        let table: &[(&str, u16, &str, &str)] = &[
            ("/v1/orders/abc", 400, "order_id", "malformed"),
            ("/v1/orders/-1", 400, "order_id", "malformed"),
            (
                "/v1/orders/99999999999999999999",
                400,
                "order_id",
                "malformed",
            ),
            (
                "/v1/orders/18446744073709551615",
                404,
                "order_id",
                "not_found",
            ),
            ("/v1/orders", 400, "client_order_id", "missing"),
            (
                "/v1/orders?client_order_id=a%20b",
                400,
                "client_order_id",
                "malformed",
            ),
            ("/v1/trades", 422, "symbol", "missing"),
            ("/v1/trades?symbol=ZZZZ", 422, "symbol", "unknown_symbol"),
            (
                "/v1/trades?symbol=AAPL&limit=0",
                422,
                "limit",
                "out_of_range",
            ),
            (
                "/v1/trades?symbol=AAPL&limit=1001",
                422,
                "limit",
                "out_of_range",
            ),
            ("/v1/trades?symbol=AAPL&limit=x", 422, "limit", "malformed"),
        ];
        for (uri, status, field, code) in table {
            let (s, body) = call(uri).await;
            assert_eq!(s.as_u16(), *status, "{uri}: {body}");
            assert_eq!(body["error"]["field"], *field, "{uri}: {body}");
            assert_eq!(body["error"]["code"], *code, "{uri}: {body}");
            assert!(body["error"]["message"].as_str().is_some(), "{uri}: {body}");
        }
    }

    #[tokio::test]
    async fn database_down_is_503() {
        let (s, body) = call("/v1/stats").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "unavailable");
    }
}
