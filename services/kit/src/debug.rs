//! `/debug/pprof`: profiles of a running service, without instrumentation, behind a guard.
//!
//! | route | what |
//! |---|---|
//! | `GET /debug/pprof/` | index of what is available (and whether heap profiling is on) |
//! | `GET /debug/pprof/profile?seconds=N[&hz=H][&format=pprof\|svg\|collapsed]` | CPU profile |
//! | `GET /debug/pprof/flamegraph?seconds=N[&hz=H]` | the CPU flamegraph (SVG) directly |
//! | `GET /debug/pprof/heap[?format=pprof\|svg\|collapsed]` | in-use heap (jemalloc) |
//!
//! **CPU** profiles come from pprof-rs: `setitimer(ITIMER_PROF)` sends SIGPROF per `1/hz` s of
//! CPU the process burns, the handler unwinds the interrupted thread (libgcc's DWARF unwinder,
//! which keeps the interrupted function; pprof-rs's `frame-pointer` unwinder drops it) and
//! counts the stack. kit then symbolizes each distinct address once (release keeps line
//! tables), cuts the profiler's own frames (the SIGPROF handler up to the signal trampoline),
//! qualifies the bare names line tables carry ([`qualify`]) and builds the pprof `Profile`.
//! The default answer is a gzipped pprof protobuf (`go tool pprof -top URL` opens it, fully
//! symbolized: function names are in the profile); `svg` is an inferno flamegraph and
//! `collapsed` the folded stacks (`thread;root;...;leaf count`), all three from one profile.
//! `seconds` defaults to 30 and is capped at [`MAX_SECONDS`]; one CPU profile at a time per
//! process (pprof-rs's profiler is a process-wide singleton): a second request gets `409`.
//!
//! **Heap** profiles come from jemalloc's own sampling profiler: a service makes
//! [`Jemalloc`] its global allocator and exports [`MALLOC_CONF`] as `malloc_conf`, which turns
//! on `prof:true,prof_active:true,lg_prof_sample:19` (one sample per 512 KiB allocated on
//! average). `/debug/pprof/heap` asks jemalloc for a dump (`prof.dump`) and converts it with
//! `jemalloc_pprof` (symbolized in-process). A process without that configuration answers
//! `501` and says why.
//!
//! **Access**: loopback peers are served; any other peer must send
//! `Authorization: Bearer <[debug] token>` (401 when it is missing or wrong, 403 when no token
//! is configured, since then the endpoints are loopback-only). The peer address comes from
//! `ConnectInfo<SocketAddr>`, which [`crate::http::serve`] provides; a request without it is
//! treated as remote. Services add the routes with [`with_debug_routes`] on their finished
//! router (outside the request timeout, keeping their own 404 answer).
//!
//! [`stacks`], [`collapsed`], [`flamegraph_svg`], [`decode_pprof`] and [`encode_pprof`] work on
//! any pprof `Profile`; the `profiler` tool uses them on the files it saves.

use crate::config::{ConfigError, DebugConfig, Validate};
use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use pprof::protos::{Message as _, Profile};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// jemalloc, the allocator whose sampling heap profiler `/debug/pprof/heap` reads (with an arena
/// of its own for the CPU profiler's tables, [`crate::alloc`]). Each service installs it with
/// `#[global_allocator]` in its `main.rs`.
pub use crate::alloc::Jemalloc;
use crate::alloc::{in_profiler_arena, release_profiler_arena};

/// jemalloc's start-up options for a service, NUL-terminated for C: heap profiling compiled in
/// and active, one sample per 2^19 bytes (512 KiB) allocated on average (measured: 1-2 % of the
/// CPU of the gateway under load, see docs/profiling.md). A service exports a pointer to it as
/// the `malloc_conf` symbol jemalloc reads.
pub const MALLOC_CONF: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

/// Default and largest `seconds` of a CPU profile.
pub const DEFAULT_SECONDS: u64 = 30;
pub const MAX_SECONDS: u64 = 300;
/// Default sampling rate: 99 Hz, not 100, so sampling does not run in lockstep with periodic
/// work.
pub const DEFAULT_HZ: u32 = 99;
/// Highest sampling rate accepted.
pub const MAX_HZ: u32 = 1000;

/// glibc's signal trampoline on x86_64 Linux: the frame between a signal handler and the code
/// it interrupted.
const SIGNAL_TRAMPOLINE: &str = "__restore_rt";

/// Frames that belong to the profiler itself, never to the profiled program.
const PROFILER_FRAME_PREFIXES: &[&str] = &[
    "pprof::",
    "<pprof::",
    "backtrace::",
    "<backtrace::",
    "__restore_rt",
    "perf_signal_handler",
    // The timing wrapper in front of pprof-rs's handler (crate::sigprof).
    "kit::sigprof::",
];

/// Why a profile could not be served. The `IntoResponse` impl is the one place these become
/// HTTP answers.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "a CPU profile is already being taken in this process (one at a time); retry when it finishes"
    )]
    Busy,
    #[error("the profile was abandoned: the client went away")]
    Cancelled,
    #[error("heap profiling is not available in this process: {0}")]
    HeapUnavailable(String),
    #[error("profiling failed: {0}")]
    Failed(String),
}

impl ProfileError {
    fn status(&self) -> StatusCode {
        match self {
            ProfileError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProfileError::Busy => StatusCode::CONFLICT,
            ProfileError::HeapUnavailable(_) => StatusCode::NOT_IMPLEMENTED,
            ProfileError::Cancelled | ProfileError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ProfileError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "debug endpoint failed");
        }
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response()
    }
}

impl From<pprof::Error> for ProfileError {
    fn from(e: pprof::Error) -> Self {
        ProfileError::Failed(format!("pprof-rs: {e}"))
    }
}

impl Validate for DebugConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match &self.token {
            Some(t) if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                Err(ConfigError::invalid(
                    "debug.token",
                    "must be at least 16 characters without spaces (leave it unset for loopback-only access)",
                ))
            }
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes and the guard.

#[derive(Clone)]
struct DebugState {
    service: &'static str,
    /// `[debug] token`; `None`: loopback only.
    token: Option<Arc<str>>,
}

/// The `/debug/pprof` routes of `service`, guarded by [`decide`]; see [`with_debug_routes`].
pub fn routes(service: &'static str, config: &DebugConfig) -> Router {
    let state = DebugState {
        service,
        token: config.token.as_deref().map(Arc::from),
    };
    Router::new()
        .route("/debug/pprof", get(index))
        .route("/debug/pprof/", get(index))
        .route("/debug/pprof/profile", get(cpu))
        .route("/debug/pprof/flamegraph", get(flamegraph))
        .route("/debug/pprof/heap", get(heap))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// `app` plus the `/debug/pprof` routes of `service`. Call it on the finished application
/// (after [`crate::http::with_standard_layers`] and any other layer), so that the request
/// timeout does not cut a 30 s profile short. The application is merged *into* the debug
/// router: axum keeps the fallback of the router merged in, so the application's own (layered)
/// 404 answer stays what it was.
pub fn with_debug_routes(app: Router, service: &'static str, config: &DebugConfig) -> Router {
    routes(service, config).merge(app)
}

/// `router`'s routes behind the access rule of `/debug/pprof` ([`decide`]), for other debug
/// endpoints (the probes agent's `/debug/offcpu`).
pub fn guard_routes<S>(router: Router<S>, config: &DebugConfig) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let state = DebugState {
        service: "",
        token: config.token.as_deref().map(Arc::from),
    };
    router.route_layer(middleware::from_fn_with_state(state, guard))
}

/// What the guard decided about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// 401: a token is configured and the request did not present it.
    Unauthorized(&'static str),
    /// 403: no token is configured and the peer is not on loopback.
    Forbidden(&'static str),
}

/// The access rule: loopback peers are allowed; others need `Authorization: Bearer <token>`
/// equal to the configured token. An unknown peer counts as remote.
pub fn decide(
    peer: Option<SocketAddr>,
    authorization: Option<&str>,
    token: Option<&str>,
) -> Access {
    if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) {
        return Access::Allowed;
    }
    let Some(token) = token else {
        return Access::Forbidden(
            "debug endpoints answer loopback clients only: no [debug] token is configured (APP__DEBUG__TOKEN)",
        );
    };
    let presented = authorization.and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    match presented {
        None => Access::Unauthorized("send Authorization: Bearer <token> (the [debug] token)"),
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => Access::Allowed,
        Some(_) => Access::Unauthorized("wrong bearer token"),
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn guard(State(state): State<DebugState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match decide(peer, authorization, state.token.as_deref()) {
        Access::Allowed => next.run(req).await,
        Access::Unauthorized(why) => {
            tracing::warn!(peer = ?peer, path = %req.uri().path(), "debug endpoint: unauthorized");
            (
                StatusCode::UNAUTHORIZED,
                [
                    (header::WWW_AUTHENTICATE, "Bearer realm=\"debug\""),
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                ],
                format!("{why}\n"),
            )
                .into_response()
        }
        Access::Forbidden(why) => {
            tracing::warn!(peer = ?peer, path = %req.uri().path(), "debug endpoint: forbidden");
            (
                StatusCode::FORBIDDEN,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{why}\n"),
            )
                .into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers.

async fn index(State(state): State<DebugState>) -> Response {
    let heap = match heap_status() {
        Ok(lg) => format!("on (one sample per 2^{lg} bytes allocated)"),
        Err(why) => format!("unavailable: {why}"),
    };
    let busy = if cpu_profile_running() {
        "a CPU profile is being taken now (a second one gets 409)"
    } else {
        "idle"
    };
    let service = state.service;
    let body = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>{service} /debug/pprof</title></head>
<body><h1>{service} /debug/pprof</h1>
<p>CPU profiler: {busy}. Heap profiler: {heap}.</p>
<table>
<tr><td><a href="profile?seconds=30">profile?seconds=N[&amp;hz=H][&amp;format=pprof|svg|collapsed]</a></td>
<td>CPU profile; default gzipped pprof protobuf (<code>go tool pprof -top URL</code>), seconds &le; {MAX_SECONDS}, hz &le; {MAX_HZ} (default {DEFAULT_HZ})</td></tr>
<tr><td><a href="flamegraph?seconds=10">flamegraph?seconds=N</a></td><td>CPU flamegraph (SVG)</td></tr>
<tr><td><a href="heap">heap[?format=pprof|svg|collapsed]</a></td><td>in-use heap from jemalloc's sampling profiler</td></tr>
</table>
<p>Served to loopback clients, or with <code>Authorization: Bearer &lt;[debug] token&gt;</code>.</p>
</body></html>
"#
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

/// Output format of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// gzipped pprof protobuf.
    Pprof,
    /// inferno flamegraph.
    Svg,
    /// folded stacks, one `a;b;c count` line per stack.
    Collapsed,
}

impl Format {
    fn parse(v: Option<&str>) -> Result<Format, ProfileError> {
        match v {
            None | Some("pprof" | "proto") => Ok(Format::Pprof),
            Some("svg" | "flamegraph") => Ok(Format::Svg),
            Some("collapsed" | "folded") => Ok(Format::Collapsed),
            Some(other) => Err(ProfileError::BadRequest(format!(
                "format={other:?}: use pprof, svg or collapsed"
            ))),
        }
    }
}

/// The parameters of a CPU profile request, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuRequest {
    pub seconds: u64,
    pub hz: u32,
    pub format: Format,
    /// `seconds` was above [`MAX_SECONDS`] and was lowered to it.
    pub capped: bool,
}

impl CpuRequest {
    /// Parses `seconds`, `hz` and `format`; anything else is refused so that a typo does not
    /// silently profile with defaults.
    pub fn parse(query: &HashMap<String, String>) -> Result<CpuRequest, ProfileError> {
        if let Some(k) = query
            .keys()
            .find(|k| !matches!(k.as_str(), "seconds" | "hz" | "format"))
        {
            return Err(ProfileError::BadRequest(format!(
                "unknown parameter {k:?}: use seconds, hz, format"
            )));
        }
        let seconds = match query.get("seconds") {
            None => DEFAULT_SECONDS,
            Some(v) => v.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(|| {
                ProfileError::BadRequest(format!(
                    "seconds={v:?}: must be a whole number of seconds, at least 1 (at most {MAX_SECONDS})"
                ))
            })?,
        };
        let hz = match query.get("hz") {
            None => DEFAULT_HZ,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|h| (1..=MAX_HZ).contains(h))
                .ok_or_else(|| {
                    ProfileError::BadRequest(format!("hz={v:?}: must be between 1 and {MAX_HZ}"))
                })?,
        };
        Ok(CpuRequest {
            seconds: seconds.min(MAX_SECONDS),
            hz,
            format: Format::parse(query.get("format").map(String::as_str))?,
            capped: seconds > MAX_SECONDS,
        })
    }
}

async fn cpu(
    State(state): State<DebugState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ProfileError> {
    let req = CpuRequest::parse(&query)?;
    serve_cpu(state.service, req).await
}

async fn flamegraph(
    State(state): State<DebugState>,
    Query(mut query): Query<HashMap<String, String>>,
) -> Result<Response, ProfileError> {
    query.insert("format".into(), "svg".into());
    let req = CpuRequest::parse(&query)?;
    serve_cpu(state.service, req).await
}

async fn serve_cpu(service: &'static str, req: CpuRequest) -> Result<Response, ProfileError> {
    tracing::info!(
        seconds = req.seconds,
        hz = req.hz,
        capped = req.capped,
        "CPU profile started"
    );
    let (profile, cost) = cpu_profile_measured(Duration::from_secs(req.seconds), req.hz).await?;
    let mut spent = cost.building;
    let encode_started = thread_cpu_time();
    let samples: i64 = profile.sample.iter().filter_map(|s| s.value.first()).sum();
    tracing::info!(samples, "CPU profile done");
    let title = format!(
        "{service}: CPU, {} s at {} Hz, {samples} samples",
        req.seconds, req.hz
    );
    let mut resp = render(&profile, req.format, &title, "samples", service, "cpu")?;
    if let (Some(a), Some(b)) = (encode_started, thread_cpu_time()) {
        spent += b.saturating_sub(a);
    }
    // What building and encoding this profile cost the process (the benchmark adds it up).
    let ms = |d: Duration| {
        HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|_| HeaderValue::from_static("0"))
    };
    resp.headers_mut().insert("x-profile-cpu-ms", ms(spent));
    // What the signal handler cost the sampled threads during the profile (kit::sigprof).
    resp.headers_mut()
        .insert("x-profile-handler-ms", ms(cost.handler));
    resp.headers_mut().insert(
        "x-profile-handler-runs",
        HeaderValue::from(cost.handler_runs),
    );
    resp.headers_mut()
        .insert("x-profile-seconds", HeaderValue::from(req.seconds));
    if req.capped {
        resp.headers_mut().insert(
            "x-profile-capped",
            HeaderValue::from_static("seconds lowered to the maximum"),
        );
    }
    Ok(resp)
}

async fn heap(
    State(state): State<DebugState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ProfileError> {
    if let Some(k) = query.keys().find(|k| k.as_str() != "format") {
        return Err(ProfileError::BadRequest(format!(
            "unknown parameter {k:?}: use format"
        )));
    }
    let format = Format::parse(query.get("format").map(String::as_str))?;
    let profile = heap_profile().await?;
    let bytes: i64 = profile.sample.iter().filter_map(|s| s.value.first()).sum();
    let title = format!(
        "{}: in-use heap, {:.1} MiB sampled",
        state.service,
        bytes as f64 / (1 << 20) as f64
    );
    render(&profile, format, &title, "bytes", state.service, "heap")
}

/// Turns `profile` into the answer in `format`.
fn render(
    profile: &Profile,
    format: Format,
    title: &str,
    count_name: &str,
    service: &str,
    kind: &str,
) -> Result<Response, ProfileError> {
    let resp = match format {
        Format::Pprof => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_str(&format!(
                        "attachment; filename=\"{service}-{kind}.pb.gz\""
                    ))
                    .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
                ),
            ],
            encode_pprof(profile),
        )
            .into_response(),
        Format::Svg => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            flamegraph_svg(&stacks(profile, 0), title, count_name)?,
        )
            .into_response(),
        Format::Collapsed => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            collapsed(&stacks(profile, 0), true),
        )
            .into_response(),
    };
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// CPU profiles.

/// Set while a CPU profile runs: pprof-rs's profiler is one per process.
static CPU_PROFILE_RUNNING: AtomicBool = AtomicBool::new(false);

/// Whether a CPU profile is being taken in this process right now.
pub fn cpu_profile_running() -> bool {
    CPU_PROFILE_RUNNING.load(Ordering::SeqCst)
}

/// Holds [`CPU_PROFILE_RUNNING`] and releases it when dropped, whatever happens.
struct CpuSlot;

impl CpuSlot {
    fn acquire() -> Result<CpuSlot, ProfileError> {
        CPU_PROFILE_RUNNING
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| CpuSlot)
            .map_err(|_| ProfileError::Busy)
    }
}

impl Drop for CpuSlot {
    fn drop(&mut self) {
        CPU_PROFILE_RUNNING.store(false, Ordering::SeqCst);
    }
}

/// Profiles this process's CPU for `duration` at `hz` samples per CPU-second and returns the
/// symbolized profile (sample values: `samples/count`, `cpu/nanoseconds`). Fails with
/// [`ProfileError::Busy`] while another profile runs. Dropping the future stops the profile
/// early (the client went away).
pub async fn cpu_profile(duration: Duration, hz: u32) -> Result<Profile, ProfileError> {
    cpu_profile_measured(duration, hz).await.map(|(p, _)| p)
}

/// CPU time the calling thread has used so far, from `/proc/thread-self/schedstat` (in
/// nanoseconds; it may lag by up to a scheduler tick for a running thread). `None` off Linux.
pub fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// What one CPU profile cost the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProfileCost {
    /// CPU time spent turning the samples into the profile (resuming or renewing the session,
    /// copying the stacks out, symbolizing, building the protobuf).
    pub building: Duration,
    /// Time spent in the `SIGPROF` handler during the profile (unwinding and counting each
    /// sample, in the sampled threads: [`crate::sigprof`]).
    pub handler: Duration,
    /// Samples the handler took during the profile.
    pub handler_runs: u64,
}

/// [`cpu_profile`], plus what it cost: building the profile and running the signal handler.
pub async fn cpu_profile_measured(
    duration: Duration,
    hz: u32,
) -> Result<(Profile, ProfileCost), ProfileError> {
    let slot = CpuSlot::acquire()?;
    let hz = i32::try_from(hz.clamp(1, MAX_HZ)).unwrap_or(DEFAULT_HZ as i32);
    // The blocking thread waits on this channel: a timeout means the profile is complete; a
    // disconnect means this future was dropped.
    let (_alive, wait) = std::sync::mpsc::channel::<()>();
    // Everything the profile allocates (copies of the sample table, the profile itself, and
    // the next table when the session is renewed) comes from the profiler arena, whose pages
    // the next profile reuses instead of faulting in new ones (crate::alloc).
    let task = tokio::task::spawn_blocking(move || {
        in_profiler_arena(|| {
            let _slot = slot;
            let cpu_at_start = thread_cpu_time();
            let (session, baseline) = Session::resume(hz)?;
            let setup = elapsed_cpu(cpu_at_start);
            let handler_at_start = crate::sigprof::totals();
            let waited = wait.recv_timeout(duration);
            let handler_at_end = crate::sigprof::totals();
            // The raw stacks (addresses) are copied out under the profiler's lock — samples that
            // arrive meanwhile are dropped — and symbolized outside it.
            let started = thread_cpu_time();
            let end = match session.guard.report().build_unresolved() {
                Ok(end) => end,
                Err(e) => {
                    session.park(None);
                    return Err(e.into());
                }
            };
            // A profile whose client went away is not built, but its end still serves as the
            // next profile's baseline.
            let cancelled = matches!(waited, Err(std::sync::mpsc::RecvTimeoutError::Disconnected));
            let raw = (!cancelled).then(|| since(&end, baseline.as_ref(), duration, hz));
            session.park(Some(end));
            let Some(raw) = raw else {
                return Err(ProfileError::Cancelled);
            };
            let profile = build_profile(&raw, hz);
            let cost = ProfileCost {
                building: setup + elapsed_cpu(started),
                handler: Duration::from_nanos(handler_at_end.0.saturating_sub(handler_at_start.0)),
                handler_runs: handler_at_end.1.saturating_sub(handler_at_start.1),
            };
            Ok((profile, cost))
        })
    });
    task.await
        .map_err(|e| ProfileError::Failed(format!("profiling task: {e}")))?
}

/// CPU time this thread used since `start` (zero when unknown).
fn elapsed_cpu(start: Option<Duration>) -> Duration {
    match (start, thread_cpu_time()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    }
}

/// A running pprof-rs profiler kept between CPU profiles.
///
/// Starting pprof-rs is cheap, but stopping it is not: it replaces its sample table (80 MB:
/// 4,096 buckets of four stacks, each a 4,160-byte key of 128 inline 32-byte frames) with a
/// fresh one, which costs 40–60 ms of page faults, or 5–10 ms in the profiler arena once the
/// arena holds the pages of a freed table ([`crate::alloc`]). Continuous profiling asks for a
/// profile every few seconds, so the profiler is kept running for [`SESSION_LINGER`] after
/// each profile; a profile that starts meanwhile takes the counts at its start as a baseline
/// and reports only what was sampled after it. A session is renewed after [`SESSION_MAX_AGE`]
/// (pprof-rs spills stacks that do not fit its table to a file that only grows while it runs).
struct Session {
    guard: pprof::ProfilerGuard<'static>,
    hz: i32,
    born: std::time::Instant,
    /// Which parking this is: a linger timer only stops the session it was set for.
    epoch: u64,
    /// The counts at the end of the last profile, and when they were taken.
    last: Option<(std::time::Instant, pprof::UnresolvedReport)>,
}

/// A profile that starts within this time of the previous one's end continues from it: the
/// samples taken in between (the client's round trip) count in the new profile, so back-to-back
/// profiles leave no gap.
const BACK_TO_BACK: Duration = Duration::from_secs(1);

/// Counts parkings: the epoch of the next one.
static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long the profiler arena keeps its free pages after the last session stopped.
const ARENA_KEPT_IDLE: Duration = Duration::from_secs(300);

/// The parked session, if one lingers.
static SESSION: std::sync::Mutex<Option<Session>> = std::sync::Mutex::new(None);

/// Gauge: 1 while pprof-rs samples this process (a profile runs or the profiler lingers after
/// one), else 0.
pub const SAMPLING_GAUGE: &str = "debug_pprof_sampling";

/// How long the profiler keeps sampling after a profile, waiting for the next one.
pub const SESSION_LINGER: Duration = Duration::from_secs(15);

/// Age after which a parked session is stopped rather than resumed.
///
/// Each profile copies out everything the session has counted so far (pprof-rs has no
/// "since"), so a profile costs more the older its session is: measured on the gateway at
/// 100 orders/s with back-to-back 10 s profiles, from ~7 ms of CPU in a fresh session to
/// ~30 ms after 10 minutes. Renewing costs 5–10 ms in the profiler arena (it was ~75 ms when
/// each new table faulted its pages in, and 180 s was then the best age); at 60 s the
/// services' steady state of back-to-back profiles went from 1.66 % to 0.90 % of their CPU
/// (docs/profiling.md).
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(60);

impl Session {
    /// The parked session if it samples at `hz` and is young enough (with a snapshot of its
    /// counts so far), else a new one (no baseline needed).
    fn resume(hz: i32) -> Result<(Session, Option<pprof::UnresolvedReport>), ProfileError> {
        let parked = SESSION
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        metrics::gauge!(SAMPLING_GAUGE).set(1.0);
        if let Some(mut session) = parked {
            if session.hz == hz && session.born.elapsed() < SESSION_MAX_AGE {
                // Back to back (a continuous profiler): the previous profile's end is this
                // one's start, and copying the counts out again is saved.
                let baseline = match session.last.take() {
                    Some((at, end)) if at.elapsed() < BACK_TO_BACK => end,
                    _ => session.guard.report().build_unresolved()?,
                };
                return Ok((session, Some(baseline)));
            }
            drop(session);
        }
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(hz)
            .build()?;
        // pprof-rs has just installed its SIGPROF handler: time it from now on.
        if !crate::sigprof::wrap() {
            tracing::debug!(
                "the SIGPROF handler could not be timed; profiles report building cost only"
            );
        }
        Ok((
            Session {
                guard,
                hz,
                born: std::time::Instant::now(),
                epoch: 0,
                last: None,
            },
            None,
        ))
    }

    /// Parks the session (with the counts at the end of the profile just taken) and sets a
    /// timer that stops it unless a profile resumed it first.
    fn park(mut self, end: Option<pprof::UnresolvedReport>) {
        self.last = end.map(|r| (std::time::Instant::now(), r));
        let epoch = EPOCH.fetch_add(1, Ordering::SeqCst);
        self.epoch = epoch;
        *SESSION
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(self);
        let timer = std::thread::Builder::new()
            .name("pprof-linger".into())
            .spawn(move || {
                std::thread::sleep(SESSION_LINGER);
                let expired = {
                    let mut parked = SESSION
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match parked.as_ref() {
                        Some(s) if s.epoch == epoch => parked.take(),
                        _ => None,
                    }
                };
                if expired.is_none() {
                    return;
                }
                // Stopping pprof-rs builds its next table: in the arena, like every table.
                in_profiler_arena(|| drop(expired));
                metrics::gauge!(SAMPLING_GAUGE).set(0.0);
                // The arena keeps the freed table's pages for the next session; when none has
                // come for a while, they go back to the kernel.
                std::thread::sleep(ARENA_KEPT_IDLE);
                if EPOCH.load(Ordering::SeqCst) == epoch + 1 {
                    release_profiler_arena();
                }
            });
        if timer.is_err() {
            // No thread for the timer: stop now rather than sample forever.
            let parked = SESSION
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            in_profiler_arena(|| drop(parked));
            release_profiler_arena();
            metrics::gauge!(SAMPLING_GAUGE).set(0.0);
        }
    }
}

/// Whether a profiler session is parked between profiles (still sampling).
pub fn session_lingering() -> bool {
    SESSION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_some()
}

/// The samples of `now` that are not in `baseline` (counts only grow while a session runs),
/// timed as one profile of `duration` at `hz`.
fn since(
    now: &pprof::UnresolvedReport,
    baseline: Option<&pprof::UnresolvedReport>,
    duration: Duration,
    hz: i32,
) -> pprof::UnresolvedReport {
    let Some(base) = baseline else {
        return pprof::UnresolvedReport {
            data: now.data.clone(),
            timing: now.timing.clone(),
        };
    };
    let data = now
        .data
        .iter()
        .filter_map(|(frames, count)| {
            let new = count - base.data.get(frames).copied().unwrap_or(0);
            (new > 0).then(|| (frames.clone(), new))
        })
        .collect();
    let mut timing = now.timing.clone();
    timing.frequency = hz;
    timing.start_time = std::time::SystemTime::now() - duration;
    timing.duration = duration;
    pprof::UnresolvedReport { data, timing }
}

/// One function at an address: demangled and qualified name, source file, line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CodeLine {
    name: String,
    file: String,
    line: u32,
}

/// The code at `frame`'s address, innermost inlined function first (empty if unknown).
fn resolve(frame: &backtrace::Frame) -> Vec<CodeLine> {
    let mut out = Vec::new();
    backtrace::resolve_frame(frame, |sym| {
        let file = sym
            .filename()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(name) = sym.name().map(|n| format!("{n:#}")) else {
            return;
        };
        let name = strip_hash(&name);
        let name = qualify(name, &file).unwrap_or_else(|| name.to_string());
        out.push(CodeLine {
            name,
            file,
            line: sym.lineno().unwrap_or(0),
        });
    });
    out
}

/// How many frames at the leaf end of a stack belong to the profiler: the unwinder starts
/// inside the SIGPROF handler (pprof-rs and `backtrace` frames), then comes the signal
/// trampoline (`__restore_rt`, unresolved when libc has no symbol for it), then the interrupted
/// function.
fn profiler_frames(stack: &[&[CodeLine]]) -> usize {
    if let Some(i) = stack
        .iter()
        .position(|f| f.iter().any(|l| l.name == SIGNAL_TRAMPOLINE))
    {
        return i + 1;
    }
    let own = |f: &&&[CodeLine]| {
        f.iter().any(|l| {
            PROFILER_FRAME_PREFIXES
                .iter()
                .any(|p| l.name.starts_with(p))
        })
    };
    let mut cut = stack.iter().take_while(own).count();
    if cut > 0 && stack.get(cut).is_some_and(|f| f.is_empty()) {
        cut += 1; // the nameless trampoline
    }
    cut
}

/// Symbolized addresses, kept across profiles (bounded by [`RESOLVED_MAX`]).
static RESOLVED: std::sync::Mutex<Option<HashMap<usize, Vec<CodeLine>>>> =
    std::sync::Mutex::new(None);

/// Most addresses kept in [`RESOLVED`] (a few hundred bytes each); beyond it the cache starts
/// over.
const RESOLVED_MAX: usize = 200_000;

/// Builds the pprof `Profile` of `raw`: one location per address (with its inlined functions),
/// one function per name and file, samples valued `samples/count` and `cpu/nanoseconds`,
/// labelled with their thread. Each address is symbolized once, however many stacks share it.
fn build_profile(raw: &pprof::UnresolvedReport, hz: i32) -> Profile {
    use pprof::protos::{Function, Label, Line, Location, Sample, ValueType};
    let mut strings: Vec<String> = vec![String::new()];
    let mut string_ids: HashMap<String, i64> = HashMap::new();
    let mut intern = |s: &str| -> i64 {
        if let Some(i) = string_ids.get(s) {
            return *i;
        }
        let i = strings.len() as i64;
        strings.push(s.to_string());
        string_ids.insert(s.to_string(), i);
        i
    };
    // Addresses resolved by earlier profiles are reused: continuous profiling sees mostly the
    // same code, so after the first profile only new addresses cost a lookup.
    let mut cache = RESOLVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let resolved = cache.get_or_insert_with(HashMap::new);
    if resolved.len() > RESOLVED_MAX {
        resolved.clear();
    }
    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(String, String), u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_ids: HashMap<usize, u64> = HashMap::new();
    let period = 1_000_000_000 / i64::from(hz.max(1));
    let thread_key = intern("thread");
    // New addresses are symbolized in address order, so that each shared object's debug
    // information is used in one run: `backtrace` keeps only four objects' debug information
    // loaded and a service maps six (the binary, libc, ld.so, libgcc_s, libm, the vDSO), so
    // resolving in stack order kept evicting and re-reading them (libc's and ld.so's separate
    // debug files among them: `strace` saw 9 such reloads in 230 s of back-to-back profiles of
    // the gateway under load, none after this change).
    let fresh: std::collections::BTreeMap<usize, &backtrace::Frame> = raw
        .data
        .keys()
        .flat_map(|frames| frames.frames.iter())
        .filter(|f| !f.ip().is_null() && !resolved.contains_key(&(f.ip() as usize)))
        .map(|f| (f.ip() as usize, f))
        .collect();
    for (ip, frame) in fresh {
        resolved.insert(ip, resolve(frame));
    }
    let mut samples = Vec::new();
    for (frames, count) in &raw.data {
        // An address of 0 ends some unwinds: not a frame.
        let ips: Vec<usize> = frames
            .frames
            .iter()
            .filter(|f| !f.ip().is_null())
            .map(|f| f.ip() as usize)
            .collect();
        let chain: Vec<&[CodeLine]> = ips.iter().map(|ip| resolved[ip].as_slice()).collect();
        let skip = profiler_frames(&chain);
        let mut location_id = Vec::with_capacity(ips.len() - skip);
        for ip in &ips[skip..] {
            let id = match location_ids.get(ip) {
                Some(id) => *id,
                None => {
                    let id = locations.len() as u64 + 1;
                    let mut lines = Vec::new();
                    for l in &resolved[ip] {
                        let key = (l.name.clone(), l.file.clone());
                        let function_id = match function_ids.get(&key) {
                            Some(f) => *f,
                            None => {
                                let f = functions.len() as u64 + 1;
                                functions.push(Function {
                                    id: f,
                                    name: intern(&l.name),
                                    system_name: intern(&l.name),
                                    filename: intern(&l.file),
                                    ..Function::default()
                                });
                                function_ids.insert(key, f);
                                f
                            }
                        };
                        lines.push(Line {
                            function_id,
                            line: i64::from(l.line),
                        });
                    }
                    locations.push(Location {
                        id,
                        address: *ip as u64,
                        line: lines,
                        ..Location::default()
                    });
                    location_ids.insert(*ip, id);
                    id
                }
            };
            location_id.push(id);
        }
        if location_id.is_empty() {
            continue;
        }
        let thread =
            String::from_utf8_lossy(&frames.thread_name[..frames.thread_name_length]).into_owned();
        let thread = if thread.is_empty() {
            frames.thread_id.to_string()
        } else {
            thread
        };
        let count = *count as i64;
        samples.push(Sample {
            location_id,
            value: vec![count, count * period],
            label: vec![Label {
                key: thread_key,
                str: intern(&thread),
                ..Label::default()
            }],
        });
    }
    let samples_ty = ValueType {
        ty: intern("samples"),
        unit: intern("count"),
    };
    let cpu_ty = ValueType {
        ty: intern("cpu"),
        unit: intern("nanoseconds"),
    };
    Profile {
        sample_type: vec![samples_ty, cpu_ty.clone()],
        sample: samples,
        location: locations,
        function: functions,
        time_nanos: raw
            .timing
            .start_time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_nanos: raw.timing.duration.as_nanos() as i64,
        period_type: Some(cpu_ty),
        period,
        string_table: strings,
        ..Profile::default()
    }
}

/// Qualifies a bare Rust function name with the module its source file implies:
/// `parse_headers<hyper::proto::h1::role::Server>` in
/// `.../hyper-1.7.0/src/proto/h1/role.rs` becomes
/// `hyper::proto::h1::role::parse_headers<hyper::proto::h1::role::Server>`.
///
/// Release builds keep only line tables (`debug = "line-tables-only"`), whose function entries
/// carry bare names; without this, every `{async_fn#0}` of every crate would be one function and
/// the categories could not tell hyper's `poll` from tokio's. `None` when the name is already
/// qualified or the file is not a crate's `src/*.rs` (C code, generated files).
pub fn qualify(name: &str, file: &str) -> Option<String> {
    let head = name.split('<').next().unwrap_or(name);
    if name.starts_with('<') || (head.contains("::") && !head.starts_with("::")) {
        return None;
    }
    let (dir, rest) = file.rsplit_once("/src/")?;
    let rest = rest.strip_suffix(".rs")?;
    let krate = dir.rsplit('/').next().filter(|c| !c.is_empty())?;
    // `hyper-1.7.0` -> `hyper`; `order-gateway` -> `order_gateway`.
    let krate = match krate.rsplit_once('-') {
        Some((n, v)) if v.starts_with(|c: char| c.is_ascii_digit()) => n,
        _ => krate,
    }
    .replace('-', "_");
    let mut path = vec![krate];
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if last && (*seg == "mod" || (i == 0 && (*seg == "lib" || *seg == "main"))) {
            continue;
        }
        if seg.is_empty() || !seg.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        path.push((*seg).to_string());
    }
    Some(format!(
        "{}::{}",
        path.join("::"),
        name.trim_start_matches("::")
    ))
}

/// `foo::bar::h0123456789abcdef` -> `foo::bar`.
pub fn strip_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            head
        }
        _ => name,
    }
}

// ---------------------------------------------------------------------------------------------
// Heap profiles.

/// `Ok(lg_sample)` when jemalloc heap profiling is on in this process, else why not.
pub fn heap_status() -> Result<usize, String> {
    // `jemalloc_pprof` reads `opt.prof` on first use and panics if jemalloc was built without
    // profiling; kit always builds it with profiling, but a panic must not reach a handler.
    let ctl = std::panic::catch_unwind(|| jemalloc_pprof::PROF_CTL.as_ref().cloned())
        .map_err(|_| "jemalloc was built without profiling support".to_string())?;
    let Some(ctl) = ctl else {
        return Err(
            "jemalloc heap profiling is off (opt.prof=false): the binary must use \
                    kit::debug::Jemalloc as #[global_allocator] and export kit::debug::MALLOC_CONF \
                    as `malloc_conf` (or run with MALLOC_CONF=prof:true,prof_active:true)"
                .to_string(),
        );
    };
    let ctl = ctl
        .try_lock()
        .map_err(|_| "a heap dump is in progress".to_string())?;
    if !ctl.activated() {
        return Err("jemalloc profiling is compiled in but not active (prof_active:false)".into());
    }
    Ok(ctl.lg_sample())
}

/// Dumps jemalloc's in-use heap profile (sample value: `inuse_space/bytes`, already scaled up
/// from the samples to estimated bytes), symbolized.
pub async fn heap_profile() -> Result<Profile, ProfileError> {
    heap_status().map_err(ProfileError::HeapUnavailable)?;
    let ctl = jemalloc_pprof::PROF_CTL
        .as_ref()
        .cloned()
        .ok_or_else(|| ProfileError::HeapUnavailable("opt.prof=false".into()))?;
    let mut ctl = ctl.lock_owned().await;
    let bytes = tokio::task::spawn_blocking(move || ctl.dump_pprof())
        .await
        .map_err(|e| ProfileError::Failed(format!("heap dump task: {e}")))?
        .map_err(|e| ProfileError::Failed(format!("jemalloc heap dump: {e:#}")))?;
    let mut profile = decode_pprof(&bytes).map_err(ProfileError::Failed)?;
    // The profile is symbolized: without mappings, `go tool pprof` shows these names instead of
    // re-symbolizing from the local binary's line tables (bare names, see `qualify`).
    profile.mapping.clear();
    for l in &mut profile.location {
        l.mapping_id = 0;
    }
    for f in &mut profile.function {
        // Names from jemalloc_pprof are demangled already; hashes may remain, and names from
        // line tables are bare (see `qualify`).
        let get = |i: i64| profile.string_table.get(i as usize).cloned();
        let name = get(f.name).unwrap_or_default();
        let clean = strip_hash(&name);
        let qualified = get(f.filename).and_then(|file| qualify(clean, &file));
        let shown = qualified.as_deref().unwrap_or(clean);
        if shown != name {
            f.name = profile.string_table.len() as i64;
            profile.string_table.push(shown.to_string());
        }
    }
    strip_allocator_frames(&mut profile);
    Ok(profile)
}

/// Whether a heap-profile frame belongs to the allocator (jemalloc, its profiler, the Rust
/// allocator shims) rather than to the code that allocated.
fn is_allocator_frame(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "malloc",
        "calloc",
        "realloc",
        "free",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "mallocx",
        "rallocx",
        "xallocx",
        "sdallocx",
        "do_rallocx",
    ];
    const PREFIXES: &[&str] = &[
        "prof_",
        "_rjem_",
        "je_",
        "imalloc",
        "ialloc",
        "irealloc",
        "iralloc",
        "__rust_alloc",
        "__rust_realloc",
        "__rdl_",
        "__rg_",
        "tikv_jemallocator::",
        "<tikv_jemallocator::",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Drops the allocator's frames from the leaf end of every heap sample (jemalloc records the
/// stack from inside itself), so that the leaf is the code that allocated.
fn strip_allocator_frames(profile: &mut Profile) {
    let names: HashMap<u64, bool> = profile
        .function
        .iter()
        .map(|f| {
            let n = profile
                .string_table
                .get(f.name as usize)
                .map(String::as_str)
                .unwrap_or("");
            (f.id, is_allocator_frame(n))
        })
        .collect();
    let allocator_location: HashMap<u64, bool> = profile
        .location
        .iter()
        .map(|l| {
            let all = !l.line.is_empty()
                && l.line
                    .iter()
                    .all(|line| names.get(&line.function_id).copied().unwrap_or(false));
            (l.id, all)
        })
        .collect();
    for sample in &mut profile.sample {
        let skip = sample
            .location_id
            .iter()
            .take_while(|id| allocator_location.get(id).copied().unwrap_or(false))
            .count()
            .min(sample.location_id.len().saturating_sub(1));
        sample.location_id.drain(..skip);
    }
}

// ---------------------------------------------------------------------------------------------
// Working with pprof profiles.

/// Gzip-compresses the protobuf encoding of `profile`, as `go tool pprof` expects it. The
/// fastest level: under continuous profiling the default level was a third of the cost of
/// building a profile; the fastest is 2.6 times quicker for files about a fifth larger (an
/// engine profile of 156 KB: 33.7 KB instead of 28.6 KB).
pub fn encode_pprof(profile: &Profile) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(&profile.encode_to_vec());
    gz.finish().unwrap_or_default()
}

/// Decodes a pprof profile, gzipped (as served and saved) or not.
pub fn decode_pprof(bytes: &[u8]) -> Result<Profile, String> {
    let raw;
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| format!("gunzip: {e}"))?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    Profile::decode(data).map_err(|e| format!("not a pprof protobuf: {e}"))
}

/// Off-CPU stacks weighted in microseconds (the probes agent's) as a gzipped pprof protobuf
/// with sample type `off_cpu` in nanoseconds, for `go tool pprof`.
pub fn off_cpu_pprof(stacks_us: &[Stack], duration: Duration) -> Vec<u8> {
    let in_ns: Vec<Stack> = stacks_us
        .iter()
        .map(|s| Stack {
            value: s.value.saturating_mul(1000),
            ..s.clone()
        })
        .collect();
    encode_pprof(&profile_of_stacks(
        &in_ns,
        ("off_cpu", "nanoseconds"),
        duration,
    ))
}

/// The flamegraph of off-CPU stacks weighted in microseconds.
pub fn off_cpu_svg(stacks_us: &[Stack], title: &str) -> Result<Vec<u8>, ProfileError> {
    flamegraph_svg(stacks_us, title, "µs off-CPU")
}

/// A pprof profile of already-named stacks (root first), one sample per stack with its
/// `thread` label and its value in `unit` of `value_type`. Frames become one function and one
/// location each, by name; [`stacks`] reads the stacks back unchanged.
fn profile_of_stacks(
    stacks: &[Stack],
    (value_type, unit): (&str, &str),
    duration: std::time::Duration,
) -> Profile {
    use pprof::protos::{Function, Label, Line, Location, Sample, ValueType};
    let mut strings: Vec<String> = vec![String::new()];
    let mut string_ids: HashMap<String, i64> = HashMap::new();
    let mut intern = |s: &str| -> i64 {
        *string_ids.entry(s.to_string()).or_insert_with(|| {
            strings.push(s.to_string());
            strings.len() as i64 - 1
        })
    };
    let thread_key = intern("thread");
    let mut location_of: HashMap<&str, u64> = HashMap::new();
    let mut functions = Vec::new();
    let mut locations = Vec::new();
    let mut samples = Vec::with_capacity(stacks.len());
    for st in stacks {
        let mut location_id = Vec::with_capacity(st.frames.len());
        for frame in st.frames.iter().rev() {
            let id = *location_of.entry(frame.as_str()).or_insert_with(|| {
                let id = locations.len() as u64 + 1;
                let name = intern(frame);
                functions.push(Function {
                    id,
                    name,
                    system_name: name,
                    ..Function::default()
                });
                locations.push(Location {
                    id,
                    line: vec![Line {
                        function_id: id,
                        line: 0,
                    }],
                    ..Location::default()
                });
                id
            });
            location_id.push(id);
        }
        if location_id.is_empty() {
            continue;
        }
        let label = st
            .thread
            .as_deref()
            .map(|t| Label {
                key: thread_key,
                str: intern(t),
                ..Label::default()
            })
            .into_iter()
            .collect();
        samples.push(Sample {
            location_id,
            value: vec![st.value],
            label,
        });
    }
    let ty = ValueType {
        ty: intern(value_type),
        unit: intern(unit),
    };
    Profile {
        sample_type: vec![ty.clone()],
        sample: samples,
        location: locations,
        function: functions,
        time_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_nanos: duration.as_nanos().min(i64::MAX as u128) as i64,
        period_type: Some(ty),
        period: 1,
        string_table: strings,
        ..Profile::default()
    }
}

/// One distinct stack of a profile and its weight.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stack {
    /// Function names, **root first**, leaf last (inlined functions are frames too).
    pub frames: Vec<String>,
    /// The `thread` label, when the profile has one (pprof-rs sets it).
    pub thread: Option<String>,
    pub value: i64,
}

/// The stacks of `profile` weighted by sample value number `value_index` (0: samples for a
/// CPU profile, bytes for a heap profile), identical stacks merged, heaviest first.
pub fn stacks(profile: &Profile, value_index: usize) -> Vec<Stack> {
    let strings = &profile.string_table;
    let s = |i: i64| strings.get(i as usize).map(String::as_str).unwrap_or("");
    let functions: HashMap<u64, &str> =
        profile.function.iter().map(|f| (f.id, s(f.name))).collect();
    let locations: HashMap<u64, Vec<String>> = profile
        .location
        .iter()
        .map(|l| {
            // `line` lists the innermost (inlined) function first, the caller last.
            let mut names: Vec<String> = l
                .line
                .iter()
                .map(|line| {
                    let n = functions.get(&line.function_id).copied().unwrap_or("");
                    strip_hash(n).to_string()
                })
                .filter(|n| !n.is_empty())
                .collect();
            if names.is_empty() {
                names.push(format!("0x{:x}", l.address));
            }
            (l.id, names)
        })
        .collect();
    let thread_key = strings.iter().position(|k| k == "thread").map(|i| i as i64);
    let mut merged: BTreeMap<(Option<String>, Vec<String>), i64> = BTreeMap::new();
    for sample in &profile.sample {
        let value = sample.value.get(value_index).copied().unwrap_or(0);
        if value == 0 {
            continue;
        }
        // `location_id[0]` is the leaf.
        let mut frames: Vec<String> = sample
            .location_id
            .iter()
            .flat_map(|id| {
                locations
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| vec![format!("location#{id}")])
            })
            .collect();
        frames.reverse();
        let thread = thread_key.and_then(|k| {
            sample
                .label
                .iter()
                .find(|l| l.key == k && l.str != 0)
                .map(|l| s(l.str).to_string())
        });
        *merged.entry((thread, frames)).or_default() += value;
    }
    let mut out: Vec<Stack> = merged
        .into_iter()
        .map(|((thread, frames), value)| Stack {
            frames,
            thread,
            value,
        })
        .collect();
    out.sort_by(|a, b| b.value.cmp(&a.value).then_with(|| a.frames.cmp(&b.frames)));
    out
}

/// Folded stacks (`root;...;leaf value` per line, Brendan Gregg's format), with the thread
/// name as the root frame when `with_thread`.
pub fn collapsed(stacks: &[Stack], with_thread: bool) -> String {
    let mut out = String::new();
    for st in stacks {
        let mut parts: Vec<&str> = Vec::with_capacity(st.frames.len() + 1);
        if with_thread && let Some(t) = &st.thread {
            parts.push(t);
        }
        parts.extend(st.frames.iter().map(String::as_str));
        // `;` separates frames and a space precedes the count: keep names from breaking that.
        let line: Vec<String> = parts.iter().map(|p| p.replace(';', ":")).collect();
        out.push_str(&line.join(";"));
        out.push(' ');
        out.push_str(&st.value.to_string());
        out.push('\n');
    }
    out
}

/// An inferno flamegraph of `stacks` (thread names as the root frames).
pub fn flamegraph_svg(
    stacks: &[Stack],
    title: &str,
    count_name: &str,
) -> Result<Vec<u8>, ProfileError> {
    use pprof::flamegraph::color::{MultiPalette, Palette};
    if stacks.is_empty() {
        return Ok(empty_svg(title).into_bytes());
    }
    let folded = collapsed(stacks, true);
    let mut options = pprof::flamegraph::Options::default();
    options.title = title.to_string();
    options.count_name = count_name.to_string();
    options.colors = Palette::Multi(MultiPalette::Rust);
    let mut svg = Vec::new();
    pprof::flamegraph::from_lines(&mut options, folded.lines(), &mut svg)
        .map_err(|e| ProfileError::Failed(format!("rendering the flamegraph: {e}")))?;
    Ok(svg)
}

/// A valid SVG saying that there was nothing to draw (an idle process takes no CPU samples).
fn empty_svg(title: &str) -> String {
    let esc = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        r#"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="1200" height="80" xmlns="http://www.w3.org/2000/svg">
<text x="600" y="30" text-anchor="middle" font-family="Verdana" font-size="17">{esc}</text>
<text x="600" y="60" text-anchor="middle" font-family="Verdana" font-size="12">no samples: nothing was recorded while the process was profiled (an idle process takes no CPU samples)</text>
</svg>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_stacks_survive_a_pprof_round_trip() {
        let stack = |thread: &str, frames: &[&str], value: i64| Stack {
            frames: frames.iter().map(|f| f.to_string()).collect(),
            thread: Some(thread.to_string()),
            value,
        };
        let input = vec![
            stack("matcher", &["main", "journal::sync", "do_fsync_[k]"], 4_000),
            stack("tokio-rt-worker", &["main", "park", "epoll_wait"], 9_000),
            stack("matcher", &["main", "park", "futex_wait_[k]"], 1_000),
        ];
        let bytes = off_cpu_pprof(&input, Duration::from_secs(2));
        let back = decode_pprof(&bytes).expect("decodes");
        assert_eq!(back.duration_nanos, 2_000_000_000);
        let ty = &back.sample_type[0];
        assert_eq!(back.string_table[ty.ty as usize], "off_cpu");
        assert_eq!(back.string_table[ty.unit as usize], "nanoseconds");
        let mut got = stacks(&back, 0);
        // Microseconds in, nanoseconds out.
        let mut want: Vec<Stack> = input
            .into_iter()
            .map(|s| Stack {
                value: s.value * 1000,
                ..s
            })
            .collect();
        got.sort_by(|a, b| a.frames.cmp(&b.frames));
        want.sort_by(|a, b| a.frames.cmp(&b.frames));
        assert_eq!(got, want);
        // Shared frames are one function each.
        assert_eq!(back.function.len(), 6);
    }
    use axum::body::Body;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;
    use tower::ServiceExt as _;

    /// Turns jemalloc heap profiling on in this test binary, exactly as a service's `main.rs`
    /// does, so that `/debug/pprof/heap` can be tested for real.
    #[allow(unsafe_code, non_upper_case_globals)]
    #[unsafe(export_name = "malloc_conf")]
    pub static malloc_conf: &u8 = &MALLOC_CONF[0];

    /// Profiles in this binary take turns: pprof-rs's profiler is one per process.
    static PROFILE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    const TOKEN: &str = "0123456789abcdef-test-token";

    fn app(token: Option<&str>) -> Router {
        routes(
            "test-service",
            &DebugConfig {
                token: token.map(str::to_string),
            },
        )
    }

    fn request(path: &str, peer: Option<SocketAddr>, auth: Option<&str>) -> Request {
        let mut req = Request::builder().uri(path);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let mut req = req.body(Body::empty()).expect("a valid request");
        if let Some(p) = peer {
            req.extensions_mut().insert(ConnectInfo(p));
        }
        req
    }

    async fn body(resp: Response) -> Vec<u8> {
        axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .expect("body")
            .to_vec()
    }

    fn content_type(resp: &Response) -> String {
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
    const BRIDGE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 40000);

    #[test]
    fn the_access_rule() {
        let v6_loopback = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1);
        let mapped = SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), 1);
        let ok = format!("Bearer {TOKEN}");
        /// (peer, Authorization header, configured token, expected decision)
        type Case<'a> = (
            Option<SocketAddr>,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
        );
        let table: &[Case] = &[
            (Some(LOOPBACK), None, None, "allowed"),
            (Some(v6_loopback), None, Some(TOKEN), "allowed"),
            (Some(mapped), None, None, "allowed"),
            (Some(LOOPBACK), Some("Bearer wrong"), Some(TOKEN), "allowed"),
            (Some(BRIDGE), None, None, "403"),
            (Some(BRIDGE), Some(&ok), None, "403"),
            (Some(BRIDGE), None, Some(TOKEN), "401"),
            (Some(BRIDGE), Some("Bearer wrong"), Some(TOKEN), "401"),
            (Some(BRIDGE), Some(TOKEN), Some(TOKEN), "401"),
            (Some(BRIDGE), Some("Basic abc"), Some(TOKEN), "401"),
            (Some(BRIDGE), Some(&ok), Some(TOKEN), "allowed"),
            (
                Some(BRIDGE),
                Some(&format!("bearer  {TOKEN} ")),
                Some(TOKEN),
                "allowed",
            ),
            (None, None, None, "403"),
            (None, Some(&ok), Some(TOKEN), "allowed"),
        ];
        for (peer, auth, token, want) in table {
            let got = match decide(*peer, *auth, *token) {
                Access::Allowed => "allowed",
                Access::Unauthorized(_) => "401",
                Access::Forbidden(_) => "403",
            };
            assert_eq!(got, *want, "peer {peer:?} auth {auth:?} token {token:?}");
        }
    }

    #[tokio::test]
    async fn the_guard_answers_401_and_403_before_any_work() {
        let cases: &[(Option<&str>, SocketAddr, Option<&str>, StatusCode)] = &[
            (None, LOOPBACK, None, StatusCode::OK),
            (None, BRIDGE, None, StatusCode::FORBIDDEN),
            (Some(TOKEN), BRIDGE, None, StatusCode::UNAUTHORIZED),
            (
                Some(TOKEN),
                BRIDGE,
                Some("Bearer nope"),
                StatusCode::UNAUTHORIZED,
            ),
            (
                Some(TOKEN),
                BRIDGE,
                Some("Bearer 0123456789abcdef-test-token"),
                StatusCode::OK,
            ),
        ];
        for (token, peer, auth, want) in cases {
            for path in ["/debug/pprof/", "/debug/pprof/heap?format=nope"] {
                let resp = app(*token)
                    .oneshot(request(path, Some(*peer), *auth))
                    .await
                    .expect("infallible");
                let want = if *want == StatusCode::OK && path.contains("heap") {
                    StatusCode::BAD_REQUEST // past the guard: the bad format is the problem
                } else {
                    *want
                };
                assert_eq!(
                    resp.status(),
                    want,
                    "{path} token {token:?} peer {peer} auth {auth:?}"
                );
                if want == StatusCode::UNAUTHORIZED {
                    assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
                }
            }
        }
        // Without ConnectInfo the peer is unknown: treated as remote.
        let resp = app(None)
            .oneshot(request("/debug/pprof/", None, None))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn parameters_are_checked() {
        let q = |pairs: &[(&str, &str)]| {
            CpuRequest::parse(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let d = q(&[]).expect("defaults");
        assert_eq!(
            (d.seconds, d.hz, d.format, d.capped),
            (30, 99, Format::Pprof, false)
        );
        let c = q(&[
            ("seconds", "100000"),
            ("hz", "250"),
            ("format", "collapsed"),
        ])
        .expect("ok");
        assert_eq!(
            (c.seconds, c.hz, c.format, c.capped),
            (MAX_SECONDS, 250, Format::Collapsed, true)
        );
        for bad in [
            vec![("seconds", "0")],
            vec![("seconds", "-1")],
            vec![("seconds", "1.5")],
            vec![("hz", "0")],
            vec![("hz", "5000")],
            vec![("format", "png")],
            vec![("second", "5")],
        ] {
            let e = q(&bad).expect_err("refused");
            assert!(matches!(e, ProfileError::BadRequest(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn token_validation() {
        let c = |t: Option<&str>| DebugConfig {
            token: t.map(str::to_string),
        };
        assert!(c(None).validate().is_ok());
        assert!(c(Some(TOKEN)).validate().is_ok());
        for bad in ["", "short", "has a space in it, sixteen+"] {
            let e = c(Some(bad)).validate().expect_err(bad).to_string();
            assert!(e.contains("debug.token"), "{e}");
        }
    }

    #[test]
    fn bare_names_are_qualified_from_their_file() {
        let reg = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f";
        let table: &[(&str, &str, Option<&str>)] = &[
            (
                "parse_headers<hyper::proto::h1::role::Server>",
                &format!("{reg}/hyper-1.7.0/src/proto/h1/role.rs"),
                Some("hyper::proto::h1::role::parse_headers<hyper::proto::h1::role::Server>"),
            ),
            (
                "schedule",
                &format!("{reg}/tokio-1.54.1/src/runtime/scheduler/multi_thread/handle.rs"),
                Some("tokio::runtime::scheduler::multi_thread::handle::schedule"),
            ),
            (
                "{async_fn#0}",
                "/work/main/services/order-gateway/src/upstream.rs",
                Some("order_gateway::upstream::{async_fn#0}"),
            ),
            (
                "is_none",
                "/rustc/59807616e1fa/library/core/src/option.rs",
                Some("core::option::is_none"),
            ),
            (
                "fmt",
                "/rustc/x/library/core/src/fmt/mod.rs",
                Some("core::fmt::fmt"),
            ),
            (
                "::fmt",
                "/rustc/x/library/core/src/macros/mod.rs",
                Some("core::macros::fmt"),
            ),
            ("run", "/work/main/loadgen/src/lib.rs", Some("loadgen::run")),
            (
                "serde_json::de::from_slice",
                "/x/serde_json-1.0.1/src/de.rs",
                None,
            ),
            ("<hyper::Foo as Bar>::poll", "/x/hyper-1.7.0/src/a.rs", None),
            ("__GI___writev", "sysdeps/unix/sysv/linux/writev.c", None),
            (
                "build",
                "/work/main/target/release/build/x-1/out/gen.rs",
                None,
            ),
        ];
        for (name, file, want) in table {
            assert_eq!(qualify(name, file).as_deref(), *want, "{name} in {file}");
        }
    }

    #[test]
    fn hashes_are_stripped() {
        assert_eq!(strip_hash("a::b::h0123456789abcdef"), "a::b");
        assert_eq!(strip_hash("a::b::hello"), "a::b::hello");
        assert_eq!(strip_hash("main"), "main");
    }

    /// Burns CPU in a known function until `stop` is set: the profiled workload.
    #[inline(never)]
    fn kit_debug_test_burn(stop: &AtomicBool, sink: &AtomicU64) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            sink.fetch_add(x & 1, Ordering::Relaxed);
        }
    }

    /// Like [`kit_debug_test_burn`], in a function of its own.
    #[inline(never)]
    fn kit_debug_test_spin(stop: &AtomicBool, sink: &AtomicU64) {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..10_000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            sink.fetch_add(x >> 63, Ordering::Relaxed);
        }
    }

    /// Runs a burn function on a thread until the returned guard is dropped.
    struct Burner {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Burner {
        fn start() -> Burner {
            Burner::running(kit_debug_test_burn)
        }

        fn running(work: fn(&AtomicBool, &AtomicU64)) -> Burner {
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            let thread = std::thread::Builder::new()
                .name("burner".into())
                .spawn(move || work(&s, &AtomicU64::new(0)))
                .expect("spawn");
            Burner {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Burner {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The leaf end of a raw stack: the profiler's frames, the timing wrapper, the signal
    /// trampoline (nameless where libc's symbols are missing, as in CI's debug builds), then
    /// the interrupted code. Everything up to the trampoline goes.
    #[test]
    fn the_profilers_own_frames_are_cut_with_or_without_a_named_trampoline() {
        let line = |name: &str| CodeLine {
            name: name.into(),
            file: String::new(),
            line: 0,
        };
        let (bt, handler, wrapper, app, main) = (
            vec![line("backtrace::backtrace::trace_unsynchronized")],
            vec![line("perf_signal_handler")],
            vec![line("kit::sigprof::timed")],
            vec![line("order_gateway::api::submit")],
            vec![line("main")],
        );
        let named = vec![line(SIGNAL_TRAMPOLINE)];
        let nameless: Vec<CodeLine> = Vec::new();
        for trampoline in [&named, &nameless] {
            let stack: Vec<&[CodeLine]> = vec![&bt, &handler, &wrapper, trampoline, &app, &main];
            assert_eq!(profiler_frames(&stack), 4, "{trampoline:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn formats_and_content_types() {
        let _turn = PROFILE_LOCK.lock().await;
        let _burn = Burner::start();
        let cases = [
            ("/debug/pprof/profile?seconds=1", "application/octet-stream"),
            (
                "/debug/pprof/profile?seconds=1&format=pprof&hz=199",
                "application/octet-stream",
            ),
            ("/debug/pprof/profile?seconds=1&format=svg", "image/svg+xml"),
            ("/debug/pprof/flamegraph?seconds=1", "image/svg+xml"),
            (
                "/debug/pprof/profile?seconds=1&format=collapsed",
                "text/plain; charset=utf-8",
            ),
        ];
        for (path, want) in cases {
            let resp = app(None)
                .oneshot(request(path, Some(LOOPBACK), None))
                .await
                .expect("infallible");
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(content_type(&resp), want, "{path}");
            let cost: f64 = resp
                .headers()
                .get("x-profile-cpu-ms")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .expect("x-profile-cpu-ms");
            assert!(cost >= 0.0, "{cost}");
            // The signal handler was timed (kit::sigprof): a second of a burning thread is
            // about 100 samples at 99 Hz, each a few microseconds of unwinding.
            let header = |name: &str| -> f64 {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or_else(|| panic!("{name} on {path}"))
            };
            let (handler_ms, handler_runs) = (
                header("x-profile-handler-ms"),
                header("x-profile-handler-runs"),
            );
            assert!(handler_runs >= 10.0, "{path}: {handler_runs} handler runs");
            assert!(handler_ms > 0.0, "{path}: {handler_ms} ms in the handler");
            let bytes = body(resp).await;
            match want {
                "application/octet-stream" => {
                    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
                    let p = decode_pprof(&bytes).expect("a pprof Profile");
                    assert!(!p.sample.is_empty(), "samples");
                    assert!(!p.function.is_empty(), "symbolized");
                    let folded = collapsed(&stacks(&p, 0), true);
                    assert!(folded.contains("kit_debug_test_burn"), "{folded}");
                    let own = stacks(&p, 0).into_iter().flat_map(|s| s.frames).find(|f| {
                        // (`backtrace::` frames may be genuine: the heap test symbolizes.)
                        f.starts_with("pprof::")
                            || f.starts_with("kit::sigprof::")
                            || f.contains("perf_signal_handler")
                            || f == SIGNAL_TRAMPOLINE
                    });
                    assert_eq!(own, None, "the profiler's own frames are stripped");
                }
                "image/svg+xml" => {
                    let svg = String::from_utf8_lossy(&bytes);
                    assert!(svg.contains("<svg"), "svg");
                    assert!(
                        svg.contains("kit_debug_test_burn"),
                        "flamegraph names the burner"
                    );
                }
                _ => {
                    let text = String::from_utf8_lossy(&bytes);
                    let line = text
                        .lines()
                        .find(|l| l.contains("kit_debug_test_burn"))
                        .expect("the burner's stack");
                    assert!(line.starts_with("burner;"), "thread name first: {line}");
                    let (_, n) = line.rsplit_once(' ').expect("a count");
                    assert!(n.parse::<u64>().expect("a number") > 0);
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_profiler_reports_only_its_own_window() {
        let _turn = PROFILE_LOCK.lock().await;
        async fn folded() -> String {
            let resp = app(None)
                .oneshot(request(
                    "/debug/pprof/profile?seconds=1&format=collapsed&hz=97",
                    Some(LOOPBACK),
                    None,
                ))
                .await
                .expect("infallible");
            assert_eq!(resp.status(), StatusCode::OK);
            String::from_utf8_lossy(&body(resp).await).into_owned()
        }
        // (pprof-rs keys stacks by thread id and function addresses; a thread that reuses a
        // finished one's id keeps that one's name, so functions tell the windows apart.)
        let samples_in = |text: &str, function: &str| -> u64 {
            text.lines()
                .filter_map(|l| l.rsplit_once(' '))
                .filter(|(stack, _)| {
                    stack
                        .split(';')
                        .any(|f| f.ends_with(&format!("::{function}")))
                })
                .filter_map(|(_, n)| n.parse::<u64>().ok())
                .sum()
        };
        let first = {
            let _a = Burner::running(kit_debug_test_burn);
            folded().await
        };
        let a_before = samples_in(&first, "kit_debug_test_burn");
        assert!(a_before >= 20, "a busy second at 97 Hz: {first}");
        assert!(
            session_lingering(),
            "the profiler keeps running for the next profile"
        );
        let _b = Burner::running(kit_debug_test_spin);
        let second = folded().await;
        assert!(samples_in(&second, "kit_debug_test_spin") >= 20, "{second}");
        // Back to back, the second profile starts where the first ended: only the time
        // between them (building the first answer, stopping the first burner: tens of
        // milliseconds on a busy machine; CI once saw 4 samples) can add samples of it. Without
        // the subtraction the second would hold all of the first's.
        let a_after = samples_in(&second, "kit_debug_test_burn");
        assert!(
            a_after * 10 <= a_before,
            "samples from before the second profile are subtracted ({a_before} before, {a_after} after): {second}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_concurrent_profile_gets_409() {
        let _turn = PROFILE_LOCK.lock().await;
        let first = tokio::spawn(app(None).oneshot(request(
            "/debug/pprof/profile?seconds=2",
            Some(LOOPBACK),
            None,
        )));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cpu_profile_running() {
            assert!(Instant::now() < deadline, "the first profile never started");
            tokio::task::yield_now().await;
        }
        let second = app(None)
            .oneshot(request(
                "/debug/pprof/flamegraph?seconds=1",
                Some(LOOPBACK),
                None,
            ))
            .await
            .expect("infallible");
        assert_eq!(second.status(), StatusCode::CONFLICT);
        assert!(String::from_utf8_lossy(&body(second).await).contains("already"));
        let first = first.await.expect("join").expect("infallible");
        assert_eq!(first.status(), StatusCode::OK);
        assert!(!cpu_profile_running(), "the slot is released");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_profile_frees_the_slot() {
        let _turn = PROFILE_LOCK.lock().await;
        let started = Instant::now();
        let abandoned = tokio::time::timeout(
            Duration::from_millis(300),
            cpu_profile(Duration::from_secs(60), 99),
        )
        .await;
        assert!(abandoned.is_err(), "timed out");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cpu_profile_running() {
            assert!(Instant::now() < deadline, "the slot was never released");
            tokio::task::yield_now().await;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn heap_profile_from_jemalloc() {
        assert!(heap_status().is_ok(), "{:?}", heap_status());
        // Something to find: 64 MiB held by a known function.
        #[inline(never)]
        fn kit_debug_test_hold() -> Vec<Vec<u8>> {
            (0..64).map(|i| vec![i as u8; 1 << 20]).collect()
        }
        let held = kit_debug_test_hold();
        for (path, want) in [
            ("/debug/pprof/heap", "application/octet-stream"),
            ("/debug/pprof/heap?format=svg", "image/svg+xml"),
            (
                "/debug/pprof/heap?format=collapsed",
                "text/plain; charset=utf-8",
            ),
        ] {
            let resp = app(None)
                .oneshot(request(path, Some(LOOPBACK), None))
                .await
                .expect("infallible");
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(content_type(&resp), want, "{path}");
            let bytes = body(resp).await;
            if want == "application/octet-stream" {
                let p = decode_pprof(&bytes).expect("pprof");
                let folded = collapsed(&stacks(&p, 0), false);
                let held_bytes: i64 = stacks(&p, 0)
                    .iter()
                    .filter(|s| s.frames.iter().any(|f| f.contains("kit_debug_test_hold")))
                    .map(|s| s.value)
                    .sum();
                assert!(
                    held_bytes > 32 << 20,
                    "~64 MiB attributed to the holder, got {held_bytes}:\n{folded}"
                );
                assert!(
                    p.mapping.is_empty(),
                    "symbolized: no mappings to re-symbolize"
                );
                let allocator_leaf = stacks(&p, 0)
                    .into_iter()
                    .filter_map(|s| s.frames.last().cloned())
                    .find(|leaf| leaf.starts_with("prof_") || leaf.starts_with("_rjem_"));
                assert_eq!(allocator_leaf, None, "jemalloc's own frames are stripped");
            }
        }
        drop(held);
    }

    /// `go tool pprof -top` opens what the endpoint serves and names the hot function. Skipped,
    /// saying so, when Go is not installed (`apt-get install golang-go`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_tool_pprof_opens_the_profile() {
        let go_found = std::process::Command::new("go")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !go_found {
            eprintln!(
                "SKIPPED go_tool_pprof_opens_the_profile: `go` is not installed (apt-get install -y golang-go)"
            );
            return;
        }
        let bytes = {
            let _turn = PROFILE_LOCK.lock().await;
            let _burn = Burner::start();
            let resp = app(None)
                .oneshot(request(
                    "/debug/pprof/profile?seconds=1",
                    Some(LOOPBACK),
                    None,
                ))
                .await
                .expect("infallible");
            assert_eq!(resp.status(), StatusCode::OK);
            body(resp).await
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cpu.pb.gz");
        std::fs::write(&file, &bytes).expect("write");
        let out = std::process::Command::new("go")
            .args(["tool", "pprof", "-top", "-nodecount=15"])
            .arg(&file)
            .env("HOME", dir.path())
            .env("GOCACHE", dir.path().join("gocache"))
            .env("PPROF_TMPDIR", dir.path())
            .output()
            .expect("run go tool pprof");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("kit_debug_test_burn"), "{text}");
    }

    #[tokio::test]
    async fn the_application_keeps_its_404_and_escapes_the_timeout() {
        // An application whose layers turn the router's bare 404 into its own answer and time
        // requests out after 50 ms.
        let app = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "late"
                }),
            )
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(50),
            ))
            .layer(middleware::map_response(|r: Response| async move {
                if r.status() == StatusCode::NOT_FOUND {
                    (StatusCode::NOT_FOUND, "the app's own 404").into_response()
                } else {
                    r
                }
            }));
        let app = with_debug_routes(app, "test-service", &DebugConfig::default());
        let resp = app
            .clone()
            .oneshot(request("/nothing", Some(LOOPBACK), None))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(body(resp).await, b"the app's own 404");
        let resp = app
            .clone()
            .oneshot(request("/slow", Some(LOOPBACK), None))
            .await
            .expect("infallible");
        assert_eq!(
            resp.status(),
            StatusCode::REQUEST_TIMEOUT,
            "the app's layers still apply"
        );
        let _turn = PROFILE_LOCK.lock().await;
        let resp = app
            .oneshot(request(
                "/debug/pprof/profile?seconds=1&format=collapsed",
                Some(LOOPBACK),
                None,
            ))
            .await
            .expect("infallible");
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "a profile longer than the app's timeout"
        );
    }

    #[tokio::test]
    async fn the_index_lists_the_endpoints() {
        let resp = app(None)
            .oneshot(request("/debug/pprof/", Some(LOOPBACK), None))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let text = String::from_utf8_lossy(&body(resp).await).to_string();
        for want in ["profile?seconds", "flamegraph", "heap", "Heap profiler: on"] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }
}
