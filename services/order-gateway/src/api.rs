//! The public HTTP API: routes, handlers, and the layers around them.
//!
//! The route table ([`api_routes`]) is the single list the router is built from; the OpenAPI
//! description (`openapi.json`, served at `GET /openapi.json`) is checked against it by the
//! tests, so the two cannot drift apart.
//!
//! Handlers only translate HTTP into calls on [`Gateway`] and back; every error goes through
//! [`AppError`], and the outermost layer turns the bare error responses of kit's layers and
//! of the router (413, 408, 404, 405) into the same JSON error shape.

use crate::error::AppError;
use crate::gateway::Gateway;
use crate::parse;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{Method, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use bytes::Bytes;
use domain::{ErrorCode, Symbol, ValidationError};
use std::io::Write as _;

/// The OpenAPI 3.0 description of this API.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Routes kit's admin router adds (`/healthz`, `/readyz`, `/metrics`).
pub const ADMIN_ROUTES: &[(&str, &str)] =
    &[("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")];

/// Every public route: method, path template, handler.
pub fn api_routes() -> Vec<(Method, &'static str, MethodRouter<Gateway>)> {
    vec![
        (Method::POST, "/v1/orders", post(create_order)),
        (Method::POST, "/v1/orders/batch", post(create_orders)),
        (Method::GET, "/v1/orders/{order_id}", get(get_order)),
        (
            Method::DELETE,
            "/v1/orders/{order_id}",
            delete(cancel_order),
        ),
        (Method::GET, "/v1/book/{symbol}", get(get_book)),
        (Method::GET, "/openapi.json", get(openapi)),
    ]
}

/// Every route the gateway serves (public and admin), as `(method, path template)`.
pub fn served_routes() -> Vec<(String, String)> {
    api_routes()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), p.to_owned()))
        .chain(
            ADMIN_ROUTES
                .iter()
                .map(|(m, p)| ((*m).to_owned(), (*p).to_owned())),
        )
        .collect()
}

/// The whole HTTP application: public routes, admin routes, kit's standard layers (RED
/// metrics, tracing, body limit, timeout) and the JSON error shape for every error. Tests call
/// it with `tower::ServiceExt::oneshot`, no socket needed.
pub fn app(gw: Gateway) -> Router {
    let mut router = Router::new();
    for (_, path, handler) in api_routes() {
        router = router.route(path, handler);
    }
    let router = router.with_state(gw.clone()).merge(kit::http::admin_routes(
        gw.metrics_handle().clone(),
        gw.readiness().clone(),
    ));
    let limit = gw.config().http.body_limit_bytes;
    let app = kit::http::with_standard_layers(router, &gw.config().http)
        .layer(middleware::map_response_with_state(limit, json_errors));
    // Outside the layers: a 30 s profile must not meet the request timeout.
    kit::debug::with_debug_routes(app, crate::SERVICE, &gw.config().debug)
}

/// Rewrites bare (non-JSON) error responses from layers and the router into the error shape.
async fn json_errors(State(body_limit): State<usize>, resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    AppError::for_bare_status(status, body_limit).into_response()
}

/// Reads the whole body, up to `limit` bytes (413 beyond it).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, AppError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_length_limit(&e) {
            AppError::TooLarge { limit }
        } else {
            AppError::MalformedBody(format!("could not read the request body: {e}"))
        }
    })
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `POST /v1/orders`.
async fn create_order(State(gw): State<Gateway>, body: Body) -> Result<Response, AppError> {
    let bytes = read_body(body, gw.config().http.body_limit_bytes).await?;
    submit_one(&gw, &bytes).await
}

/// One order's body, validated and submitted: the whole of `POST /v1/orders`.
async fn submit_one(gw: &Gateway, body: &[u8]) -> Result<Response, AppError> {
    let order = parse::new_order(body, gw.catalog())
        .inspect_err(|_| crate::gateway::count_rejected("validation"))?;
    gw.submit(order).await
}

/// Most orders one `POST /v1/orders/batch` may carry.
pub const MAX_BATCH_ORDERS: usize = 100;

/// `POST /v1/orders/batch`: `{"orders": [...]}`, up to [`MAX_BATCH_ORDERS`] orders, each
/// handled exactly as `POST /v1/orders` handles it alone (validation, idempotency, the engine
/// or the retry queue), all at once: they reach the engine together, in as few calls as the
/// batching allows. `200` with `{"results": [{"http_status": 201, "answer": {...}}, ...]}`, one
/// result per order in request order, each the status and body `POST /v1/orders` would have
/// answered; one order's error does not affect the others. No order is guaranteed to reach the
/// engine before another of the same batch. A body that cannot be split into orders is
/// answered as a whole (400, 413, 422 naming `orders`).
async fn create_orders(State(gw): State<Gateway>, body: Body) -> Result<Response, AppError> {
    let bytes = read_body(body, gw.config().http.body_limit_bytes).await?;
    let orders = parse::order_batch(&bytes, MAX_BATCH_ORDERS)?;
    let results = futures_util::future::join_all(orders.iter().map(|raw| async {
        let response = submit_one(&gw, raw.get().as_bytes())
            .await
            .unwrap_or_else(IntoResponse::into_response);
        let status = response.status().as_u16();
        // Every answer is a JSON body of ours, already in memory.
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        (status, body)
    }))
    .await;
    let mut out = Vec::with_capacity(16 + results.iter().map(|(_, b)| b.len() + 32).sum::<usize>());
    out.extend_from_slice(b"{\"results\":[");
    for (i, (status, body)) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{{\"http_status\":{status},\"answer\":");
        out.extend_from_slice(if body.is_empty() { b"null" } else { body });
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// The `{order_id}` path segment, or a 400 naming `order_id`.
fn order_id_param(path: Result<Path<String>, PathRejection>) -> Result<domain::OrderId, AppError> {
    match path {
        Ok(Path(segment)) => parse::order_id(&segment),
        Err(rejection) => Err(AppError::BadParameter(ValidationError::new(
            "order_id",
            ErrorCode::Malformed,
            format!("order_id: {rejection}"),
        ))),
    }
}

/// `GET /v1/orders/{order_id}`.
async fn get_order(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, AppError> {
    let id = order_id_param(path)?;
    gw.status(id).await
}

/// `DELETE /v1/orders/{order_id}`.
async fn cancel_order(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, AppError> {
    let id = order_id_param(path)?;
    gw.cancel(id).await
}

/// `GET /v1/book/{symbol}?depth=N`.
async fn get_book(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, AppError> {
    let symbol = match path {
        Ok(Path(s)) => s,
        Err(rejection) => {
            return Err(AppError::Invalid(ValidationError::new(
                "symbol",
                ErrorCode::Malformed,
                format!("symbol: {rejection}"),
            )));
        }
    };
    Symbol::parse("symbol", &symbol)?;
    let spec = gw.catalog().get("symbol", &symbol)?;
    let depth = parse::book_depth(query.as_deref())?;
    gw.book(spec.symbol.as_str(), depth).await
}

/// `GET /openapi.json`.
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}
