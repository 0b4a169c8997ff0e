//! HTTP plumbing shared by every service: the admin routes, the standard layers, and serving
//! with graceful shutdown on an already-bound listener (so tests bind port 0 first).

use crate::config::HttpConfig;
use crate::health::Readiness;
use crate::shutdown::Shutdown;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// `GET /healthz` (alive), `GET /readyz` (every dependency up), `GET /metrics`.
pub fn admin_routes(metrics: PrometheusHandle, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { metrics, readiness })
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let deps = s.readiness.snapshot();
    let ready = s.readiness.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "ready": ready, "dependencies": deps })),
    )
        .into_response()
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(&s.metrics),
    )
        .into_response()
}

/// Adds what every service's router needs: RED metrics per route
/// (`http_server_requests_total`, `http_server_request_duration_seconds`), request tracing,
/// a body size limit (413) and a request timeout (408).
pub fn with_standard_layers(router: Router, http: &HttpConfig) -> Router {
    router
        .route_layer(middleware::from_fn(red_metrics))
        .layer(RequestBodyLimitLayer::new(http.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            http.body_limit_bytes,
            drain_oversized,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(http.request_timeout_ms),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Most bytes of an oversized body read (and thrown away) before answering 413.
const DRAIN_MAX_BYTES: usize = 8 << 20;

/// Answers a request whose `Content-Length` exceeds the limit with a bare 413 (services turn it
/// into their JSON error), but only after reading and discarding the body, up to
/// [`DRAIN_MAX_BYTES`]: closing a socket with unread data makes the kernel send a reset, and
/// the client would see "connection reset" instead of the answer.
async fn drain_oversized(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            let drain = axum::body::to_bytes(req.into_body(), DRAIN_MAX_BYTES);
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
            StatusCode::PAYLOAD_TOO_LARGE.into_response()
        }
        _ => next.run(req).await,
    }
}

async fn red_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("http_server_request_duration_seconds", "route" => route.clone(), "method" => method.clone())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!("http_server_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    resp
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}

/// Serves `router` on `listener` until `shutdown` triggers, then stops accepting and waits
/// for in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.wait().await })
    .await
}
