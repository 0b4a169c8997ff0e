//! The agent's HTTP side: `/metrics` (probe metrics, then kit's process and HTTP metrics),
//! `GET /events?since=<unix ms>`, `/healthz`, `/readyz`, and (loopback or bearer token only)
//! `GET /debug/offcpu` and `/debug/sampling` (`GET`: where sampling stands; `POST
//! /debug/sampling/hold?seconds=N`: keep the sampled probes attached; `DELETE
//! /debug/sampling/hold`: end the hold). Built as plain `Router`s so tests call them without a socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::agent::Agent;
use crate::offcpu::{self, OffCpuError, OffCpuOptions};

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
    // The maps are read when someone asks (and every poll interval in the background), so
    // what a scrape returns is current however rarely the agent polls by itself.
    s.agent.poll();
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
    // Events sit in the ring buffer until the next poll (it wakes the agent only when a
    // quarter full), and a retransmit burst is found by a poll: poll first.
    s.agent.poll();
    axum::Json(serde_json::json!({ "events": s.agent.events_since(since) })).into_response()
}

/// `GET /debug/offcpu`, behind kit's debug access rule (loopback, or the `[debug]` bearer
/// token). Merge it after the standard layers: their request timeout would cut a capture short.
pub fn debug_routes(agent: Arc<Agent>, debug: &kit::config::DebugConfig) -> Router {
    let sampling = Router::new()
        .route("/debug/sampling", get(sampling_status))
        .route(
            "/debug/sampling/hold",
            post(sampling_hold).delete(sampling_release),
        )
        .with_state(Arc::clone(&agent));
    let router = Router::new()
        .route("/debug/offcpu", get(offcpu_handler))
        .with_state(OffCpuState {
            busy: agent.offcpu_busy(),
            agent,
        })
        .merge(sampling);
    kit::debug::guard_routes(router, debug)
}

async fn sampling_status(State(agent): State<Arc<Agent>>) -> Response {
    axum::Json(agent.sampling_status()).into_response()
}

#[derive(Deserialize)]
struct HoldQuery {
    seconds: Option<String>,
}

/// `POST /debug/sampling/hold?seconds=N` (1 to 3600): the sampled probes stay attached for N
/// seconds (a longer hold already taken is kept).
async fn sampling_hold(State(agent): State<Arc<Agent>>, Query(q): Query<HoldQuery>) -> Response {
    let max = crate::agent::MAX_SAMPLING_HOLD.as_secs();
    let seconds = match q.seconds.as_deref() {
        None => return bad_request("seconds", format!("seconds is required (1 to {max})")),
        Some(v) => match parse_number("seconds", Some(v), 0) {
            Ok(n) if (1..=max).contains(&n) => n,
            Ok(n) => {
                return bad_request("seconds", format!("seconds must be 1 to {max}, got {n}"));
            }
            Err(e) => return bad_request("seconds", e),
        },
    };
    agent.hold_sampling(Duration::from_secs(seconds));
    axum::Json(agent.sampling_status()).into_response()
}

async fn sampling_release(State(agent): State<Arc<Agent>>) -> Response {
    agent.release_sampling();
    axum::Json(agent.sampling_status()).into_response()
}

#[derive(Clone)]
struct OffCpuState {
    agent: Arc<Agent>,
    /// One capture at a time: each attaches a program to every context switch of the host.
    busy: Arc<AtomicBool>,
}

#[derive(Deserialize)]
struct OffCpuQuery {
    component: Option<String>,
    /// Comma-separated pids.
    pid: Option<String>,
    seconds: Option<String>,
    min_us: Option<String>,
    format: Option<String>,
}

/// Clears the busy flag when the capture ends, however it ends.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Sets the capture's cancel flag when the request is dropped (the client went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn bad_request(field: &str, error: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({ "error": error, "field": field })),
    )
        .into_response()
}

/// `value` as an unsigned integer (`default` when absent); the error names `field`.
fn parse_number(field: &str, value: Option<&str>, default: u64) -> Result<u64, String> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{field} must be an unsigned integer, got {v:?}")),
    }
}

async fn offcpu_handler(State(s): State<OffCpuState>, Query(q): Query<OffCpuQuery>) -> Response {
    let seconds = match parse_number("seconds", q.seconds.as_deref(), 10) {
        Ok(v) if (1..=offcpu::MAX_SECONDS).contains(&v) => v,
        Ok(v) => {
            return bad_request(
                "seconds",
                format!(
                    "seconds must be between 1 and {}, got {v}",
                    offcpu::MAX_SECONDS
                ),
            );
        }
        Err(e) => return bad_request("seconds", e),
    };
    let min_us = match parse_number("min_us", q.min_us.as_deref(), 1) {
        Ok(v) => v,
        Err(e) => return bad_request("min_us", e),
    };
    let format = q.format.as_deref().unwrap_or("svg");
    if !matches!(format, "svg" | "collapsed" | "json" | "pprof") {
        return bad_request(
            "format",
            format!("format must be svg, collapsed, json or pprof, got {format:?}"),
        );
    }
    let (pids, what) = match (&q.component, &q.pid) {
        (Some(_), Some(_)) | (None, None) => {
            return bad_request(
                "component",
                "give either component=NAME (a lab component) or pid=PID[,PID...]".into(),
            );
        }
        (None, Some(list)) => {
            let parsed: Result<Vec<u32>, _> =
                list.split(',').map(|p| p.trim().parse::<u32>()).collect();
            match parsed {
                Ok(p) if !p.is_empty() => (p, format!("pid {list}")),
                _ => {
                    return bad_request(
                        "pid",
                        format!("pid must be a comma-separated list of process ids, got {list:?}"),
                    );
                }
            }
        }
        (Some(names), None) => {
            let mut pids = Vec::new();
            for name in names.split(',').map(str::trim) {
                match s.agent.tgids_of_component(name) {
                    Ok(p) if !p.is_empty() => pids.extend(p),
                    Ok(_) => {
                        return (
                            StatusCode::NOT_FOUND,
                            axum::Json(serde_json::json!({
                                "error": format!("component {name} has no running process in the agent's view of the lab"),
                                "field": "component",
                            })),
                        )
                            .into_response();
                    }
                    Err(known) => {
                        return (
                            StatusCode::NOT_FOUND,
                            axum::Json(serde_json::json!({
                                "error": format!("no component named {name:?}; known: {}", known.join(", ")),
                                "field": "component",
                            })),
                        )
                            .into_response();
                    }
                }
            }
            (pids, names.clone())
        }
    };
    if s.busy.swap(true, Ordering::AcqRel) {
        return (
            StatusCode::CONFLICT,
            "an off-CPU capture is already running; retry when it is done\n",
        )
            .into_response();
    }
    // The guard lives in the capture task: the flag clears when the program is detached, not
    // when the request goes away. A client that disconnects cancels the capture.
    let busy = Busy(Arc::clone(&s.busy));
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancel));
    let opts = OffCpuOptions {
        pids,
        duration: Duration::from_secs(seconds),
        min: Duration::from_micros(min_us),
    };
    let result = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        offcpu::capture_until(&opts, &cancel)
    })
    .await;
    let profile = match result {
        Ok(Ok(p)) => p,
        Ok(Err(OffCpuError::Invalid(why))) => return bad_request("pid", why),
        Ok(Err(OffCpuError::Unavailable(why))) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
        }
        Ok(Err(OffCpuError::Failed(e))) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response();
        }
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the capture task failed: {e}\n"),
            )
                .into_response();
        }
    };
    let summary = format!(
        "waits={} off_cpu_s={:.3} stacks={} still_waiting={} lost={} unwalkable={} program_runs={} program_ms={}",
        profile.waits,
        profile.total_ns as f64 / 1e9,
        profile.stacks.len(),
        profile.still_waiting,
        profile.lost,
        profile.unwalkable,
        profile
            .program_runs
            .map_or_else(|| "unknown".to_string(), |r| r.to_string()),
        profile.program_ns.map_or_else(
            || "unknown".to_string(),
            |n| format!("{:.3}", n as f64 / 1e6)
        ),
    );
    // Every answer carries the totals in a header.
    let answer = |content_type: &'static str, body: Vec<u8>| {
        (
            [
                (header::CONTENT_TYPE, content_type.to_string()),
                (HeaderName::from_static("x-offcpu-summary"), summary.clone()),
            ],
            body,
        )
            .into_response()
    };
    match format {
        "json" => {
            // Which component each process belongs to, for clients that split the profile.
            let components: serde_json::Map<String, serde_json::Value> = profile
                .pids
                .iter()
                .filter_map(|p| Some((p.to_string(), s.agent.component_of_pid(*p)?.into())))
                .collect();
            let body = serde_json::to_value(&profile).and_then(|mut v| {
                v["components"] = components.into();
                serde_json::to_vec(&v)
            });
            match body {
                Ok(b) => answer("application/json", b),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
            }
        }
        "pprof" => answer("application/octet-stream", profile.pprof()),
        "collapsed" => answer(
            "text/plain; charset=utf-8",
            profile.collapsed().into_bytes(),
        ),
        _ => match profile.svg(&format!("Off-CPU time: {what} ({seconds} s)")) {
            Ok(svg) => answer("image/svg+xml", svg),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
        },
    }
}
