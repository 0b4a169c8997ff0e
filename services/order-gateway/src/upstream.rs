//! HTTP clients for the gateway's two dependencies: the matching engine (orders, cancels,
//! book) and persistence (order status).
//!
//! Every call has a connect timeout (~1 s) and a whole-request timeout (~2 s), far below the
//! kernel's 25 s, so an outage is noticed in about a second. Each call records outbound RED
//! metrics (kit's `dependency_request_duration_seconds{dependency,operation,result}` with
//! `dependency="engine"|"persistence"` and the route as `operation`, and
//! `gateway_engine_errors_total{kind}` / `gateway_persistence_errors_total{kind}`) and flips
//! the dependency's `dependency_up` gauge. Proxies from the environment are ignored: only kit's
//! config module reads the environment.

use crate::config::UpstreamConfig;
use crate::error::ErrorDetail;
use bytes::{Bytes, BytesMut};
use domain::{Command, NewOrder, OrderId, OrderOutcome};
use kit::health::Readiness;
use reqwest::StatusCode;
use std::time::Instant;

/// Largest answer body read from a dependency; anything larger is a protocol error.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Dependency names, as they appear in `dependency_up{dependency}`.
pub const ENGINE: &str = "engine";
pub const PERSISTENCE: &str = "persistence";

/// Why a call got no usable answer. Every variant means "the engine may or may not have acted":
/// the caller spools the command, and the engine's idempotency on `order_id` makes the
/// redelivery harmless.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("connection broke: {0}")]
    Io(String),
    #[error("answered {0}")]
    Status(u16),
    #[error("unreadable answer: {0}")]
    Protocol(String),
}

impl CallError {
    /// The `kind` label of `gateway_*_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Connect(_) => "connect",
            CallError::Timeout(_) => "timeout",
            CallError::Io(_) => "io",
            CallError::Status(_) => "status",
            CallError::Protocol(_) => "protocol",
        }
    }
}

/// Why a dependency's client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("bad URL: {0}")]
    Url(String),
}

/// One dependency: a client with its timeouts, its base URL and its error metric's name.
#[derive(Debug, Clone)]
struct Upstream {
    name: &'static str,
    errors_metric: &'static str,
    /// Parsed once: parsing a URL (host validation, IDNA) per call showed in CPU profiles.
    base: reqwest::Url,
    request_timeout_ms: u64,
    client: reqwest::Client,
    deps: Readiness,
}

impl Upstream {
    fn new(
        name: &'static str,
        errors_metric: &'static str,
        config: &UpstreamConfig,
        deps: Readiness,
    ) -> Result<Upstream, ClientError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout())
            .timeout(config.request_timeout())
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Upstream {
            name,
            errors_metric,
            base: reqwest::Url::parse(config.base_url()).map_err(|e| {
                ClientError::Url(format!("{name} URL {:?}: {e}", config.base_url()))
            })?,
            request_timeout_ms: config.request_timeout_ms,
            client,
            deps,
        })
    }

    /// Sends `request`, reads the whole answer (bounded), and records metrics. Any HTTP
    /// answer comes back as `Ok`, whatever its status; the caller decides what it means.
    async fn call(
        &self,
        route: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let started = Instant::now();
        let result = self.exchange(request).await;
        let label = match &result {
            Ok((s, _)) if s.is_success() => "ok",
            Ok((s, _)) if *s == StatusCode::CONFLICT => "conflict",
            Ok((s, _)) if s.is_client_error() => "client_error",
            Ok(_) => "server_error",
            Err(e) => e.kind(),
        };
        kit::metrics::observe_dependency_call(self.name, route, label, started.elapsed());
        match &result {
            Ok((s, _)) if s.is_server_error() => {
                metrics::counter!(self.errors_metric, "kind" => "status").increment(1);
                self.deps.set(self.name, false);
            }
            Ok(_) => self.deps.set(self.name, true),
            Err(e) => {
                metrics::counter!(self.errors_metric, "kind" => e.kind()).increment(1);
                self.deps.set(self.name, false);
            }
        }
        result
    }

    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let mut resp = request.send().await.map_err(|e| self.classify(&e))?;
        let status = resp.status();
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.classify(&e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CallError::Protocol(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body.freeze()))
    }

    fn classify(&self, e: &reqwest::Error) -> CallError {
        if e.is_connect() {
            CallError::Connect(error_chain(e))
        } else if e.is_timeout() {
            CallError::Timeout(self.request_timeout_ms)
        } else {
            CallError::Io(error_chain(e))
        }
    }

    /// The base URL with `path_and_query` (starting with `/`) in place of its path.
    fn url(&self, path_and_query: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        url.set_path(path);
        url.set_query(query);
        url
    }

    /// `GET {base}/healthz`: reachable if it answers anything below 500.
    async fn probe(&self) {
        let req = self.client.get(self.url("/healthz"));
        let _ = self.call("probe", req).await;
    }
}

/// The full `source()` chain of an error on one line (reqwest's top-level message alone says
/// little: "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// What the engine said about a command.
#[derive(Debug, Clone)]
pub enum EngineAnswer {
    /// `200`: the command's outcome (for a known order, the original one).
    Outcome(OrderOutcome),
    /// `409` or `422`: refused for good, with the engine's error.
    Refused {
        status: StatusCode,
        detail: ErrorDetail,
    },
}

/// The matching engine's internal API.
#[derive(Debug, Clone)]
pub struct EngineClient {
    up: Upstream,
}

/// Route labels of outbound engine calls.
pub const ROUTE_NEW_ORDER: &str = "POST /v1/orders";
pub const ROUTE_CANCEL: &str = "POST /v1/orders/{order_id}/cancel";
pub const ROUTE_BOOK: &str = "GET /v1/book/{symbol}";
pub const ROUTE_COMMANDS: &str = "POST /v1/commands";

impl EngineClient {
    pub fn new(config: &UpstreamConfig, deps: Readiness) -> Result<EngineClient, ClientError> {
        Ok(EngineClient {
            up: Upstream::new(ENGINE, "gateway_engine_errors_total", config, deps)?,
        })
    }

    /// Sends `command` and interprets the answer: 200 → outcome, 409/422 → refused, anything
    /// else (or nothing) → `Err`.
    pub async fn send(&self, command: &Command) -> Result<EngineAnswer, CallError> {
        let (status, body) = self.send_raw(command).await?;
        match status {
            StatusCode::OK => serde_json::from_slice::<OrderOutcome>(&body)
                .map(EngineAnswer::Outcome)
                .map_err(|e| CallError::Protocol(format!("200 without an outcome: {e}"))),
            StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY => Ok(EngineAnswer::Refused {
                status,
                detail: engine_error_detail(status, &body),
            }),
            other => Err(CallError::Status(other.as_u16())),
        }
    }

    /// Sends `command` and returns the engine's raw status and body.
    pub async fn send_raw(&self, command: &Command) -> Result<(StatusCode, Bytes), CallError> {
        match command {
            Command::NewOrder(order) => self.post_order(order).await,
            Command::Cancel(c) => self.post_cancel(c.order_id).await,
        }
    }

    /// Sends several commands in one `POST /v1/commands`; the engine applies them in order.
    /// Returns one answer per command (`Err` for those the engine could not take now), or
    /// `Err` for the whole call when there was no usable answer.
    pub async fn send_batch(
        &self,
        commands: &[Command],
    ) -> Result<Vec<Result<EngineAnswer, CallError>>, CallError> {
        #[derive(serde::Deserialize)]
        struct Item {
            status: u16,
            #[serde(default)]
            outcome: Option<OrderOutcome>,
            #[serde(default)]
            error: Option<ErrorDetail>,
        }
        let req = self
            .up
            .client
            .post(self.up.url("/v1/commands"))
            .json(commands);
        let (status, body) = self.up.call(ROUTE_COMMANDS, req).await?;
        if status != StatusCode::OK {
            return Err(CallError::Status(status.as_u16()));
        }
        let items: Vec<Item> = serde_json::from_slice(&body)
            .map_err(|e| CallError::Protocol(format!("200 without a list of results: {e}")))?;
        if items.len() != commands.len() {
            return Err(CallError::Protocol(format!(
                "{} results for {} commands",
                items.len(),
                commands.len()
            )));
        }
        Ok(items
            .into_iter()
            .map(|item| match (item.status, item.outcome, item.error) {
                (200, Some(outcome), _) => Ok(EngineAnswer::Outcome(outcome)),
                (code @ (409 | 422), _, detail) => {
                    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::CONFLICT);
                    Ok(EngineAnswer::Refused {
                        status,
                        detail: detail.unwrap_or_else(|| engine_error_detail(status, b"")),
                    })
                }
                (code, _, _) => Err(CallError::Status(code)),
            })
            .collect())
    }

    async fn post_order(&self, order: &NewOrder) -> Result<(StatusCode, Bytes), CallError> {
        let req = self.up.client.post(self.up.url("/v1/orders")).json(order);
        self.up.call(ROUTE_NEW_ORDER, req).await
    }

    async fn post_cancel(&self, id: OrderId) -> Result<(StatusCode, Bytes), CallError> {
        let req = self
            .up
            .client
            .post(self.up.url(&format!("/v1/orders/{id}/cancel")));
        self.up.call(ROUTE_CANCEL, req).await
    }

    /// `GET {engine}/v1/book/{symbol}?depth=N`, status and body as the engine gave them.
    /// `symbol` must already be validated (it goes into the URL as is).
    pub async fn book(&self, symbol: &str, depth: u32) -> Result<(StatusCode, Bytes), CallError> {
        let req = self
            .up
            .client
            .get(self.up.url(&format!("/v1/book/{symbol}?depth={depth}")));
        self.up.call(ROUTE_BOOK, req).await
    }

    pub async fn probe(&self) {
        self.up.probe().await
    }
}

/// The engine's `{"error": {...}}`, or a stand-in if its body is not that shape.
fn engine_error_detail(status: StatusCode, body: &[u8]) -> ErrorDetail {
    serde_json::from_slice::<crate::error::ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| ErrorDetail {
            code: if status == StatusCode::CONFLICT {
                "conflict".into()
            } else {
                "rejected".into()
            },
            field: None,
            message: format!(
                "the matching engine refused the command ({}): {}",
                status.as_u16(),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        })
}

/// What persistence knows about an order.
#[derive(Debug, Clone)]
pub enum Stored {
    /// `200`: its JSON, passed through as is.
    Found(Bytes),
    /// `404`.
    NotFound,
}

/// Persistence's read API.
#[derive(Debug, Clone)]
pub struct PersistenceClient {
    up: Upstream,
}

pub const ROUTE_ORDER_STATUS: &str = "GET /v1/orders/{order_id}";

impl PersistenceClient {
    pub fn new(config: &UpstreamConfig, deps: Readiness) -> Result<PersistenceClient, ClientError> {
        Ok(PersistenceClient {
            up: Upstream::new(
                PERSISTENCE,
                "gateway_persistence_errors_total",
                config,
                deps,
            )?,
        })
    }

    /// `GET {persistence}/v1/orders/{order_id}`.
    pub async fn order(&self, id: OrderId) -> Result<Stored, CallError> {
        let req = self.up.client.get(self.up.url(&format!("/v1/orders/{id}")));
        let (status, body) = self.up.call(ROUTE_ORDER_STATUS, req).await?;
        match status {
            StatusCode::OK => Ok(Stored::Found(body)),
            StatusCode::NOT_FOUND => Ok(Stored::NotFound),
            other => Err(CallError::Status(other.as_u16())),
        }
    }

    pub async fn probe(&self) {
        self.up.probe().await
    }
}
