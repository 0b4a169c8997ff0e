//! The agent's HTTP side: `/metrics` (probe metrics, then kit's process and HTTP metrics),
//! `GET /events?since=<unix ms>`, `/healthz`, `/readyz`. Built as a plain `Router` so tests
//! call it without a socket.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::agent::Agent;

/// Renders the process-wide metrics kit keeps (`process_*`, `http_server_*`).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AppState {
    agent: Arc<Agent>,
    extra: ExtraMetrics,
}

/// The agent's routes.
pub fn app(agent: Arc<Agent>, extra: ExtraMetrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .with_state(AppState { agent, extra })
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut text = s.agent.render_metrics();
    text.push_str(&(s.extra)());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    let probes = s.agent.probe_status();
    let ready = probes.iter().any(|p| p.attached);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "ready": ready, "probes": probes })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<String>,
}

async fn events(State(s): State<AppState>, Query(q): Query<EventsQuery>) -> Response {
    let since = match q.since.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(v)) => v,
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({
                    "error": "since must be a Unix time in milliseconds (an unsigned integer)",
                    "field": "since",
                })),
            )
                .into_response();
        }
    };
    // Events may sit in the ring buffer until the next wakeup; take them first.
    s.agent.drain_events();
    axum::Json(serde_json::json!({ "events": s.agent.events_since(since) })).into_response()
}
