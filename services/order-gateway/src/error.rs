//! The one place where the gateway's errors become HTTP answers.
//!
//! Every error answer, whoever produced it (a handler, kit's body-limit or timeout layer, the
//! router's "no such route"), has the same JSON shape:
//!
//! ```json
//! {"error": {"code": "off_tick_grid", "field": "price", "message": "price \"101.255\" ..."}}
//! ```
//!
//! `field` names the offending input (`null` when no single field is at fault). Bad input is
//! always a 4xx, never a 5xx: 400 when the request cannot be read as a request at all (not
//! JSON, not an object, a bad path parameter), 413 when the body is too large, 422 when a field
//! is missing, has the wrong JSON type, is unknown, or fails validation.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::{ErrorCode, ValidationError};
use serde::{Deserialize, Serialize};

/// Seconds a client should wait before retrying a shed or unavailable request.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// The JSON body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, machine-readable (`code`, `field`) and for a person (`message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    #[serde(default)]
    pub field: Option<String>,
    pub message: String,
}

/// Every way a request can fail, each with its status code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: the body is not a JSON object, or could not be read.
    #[error("body: {0}")]
    MalformedBody(String),
    /// 413: the body is larger than `[http] body_limit_bytes`.
    #[error("body: larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// 400: a path or query parameter that is not what it should be.
    #[error("{0}")]
    BadParameter(ValidationError),
    /// 422: a field is missing, of the wrong JSON type, or fails validation.
    #[error("{0}")]
    Invalid(ValidationError),
    /// 422: a field the API does not define.
    #[error("{field}: unknown field")]
    UnknownField { field: String },
    /// 409: the request contradicts an earlier one (idempotency key reused with other
    /// content, cancel of an order that is no longer open).
    #[error("{field}: {message}")]
    Conflict {
        field: String,
        code: String,
        message: String,
    },
    /// 404: the order (or route) does not exist.
    #[error("{message}")]
    NotFound {
        field: Option<String>,
        code: String,
        message: String,
    },
    /// The engine's own 4xx error, passed through with its status and body.
    #[error("engine answered {status}: {}", detail.message)]
    Engine {
        status: StatusCode,
        detail: ErrorDetail,
    },
    /// 503 + `Retry-After`: the retry queue is full; the request was not accepted.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// 503 + `Retry-After`: a dependency needed for this request cannot be reached.
    #[error("{dependency} unavailable: {message}")]
    Unavailable {
        dependency: &'static str,
        message: String,
    },
    /// 408: kit's request timeout fired.
    #[error("request timed out")]
    Timeout,
    /// 405: the route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 500: a fault of the gateway itself (never caused by input).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Field names that may appear as a metrics label; anything else (a client's unknown field)
/// is counted as `other` so clients cannot create label values.
const LABEL_FIELDS: &[&str] = &[
    "client_order_id",
    "account",
    "symbol",
    "side",
    "type",
    "price",
    "quantity",
    "time_in_force",
    "body",
    "order_id",
    "depth",
];

/// Longest field name echoed back in an error (unknown fields come from the client).
const MAX_ECHOED_FIELD: usize = 64;

impl AppError {
    /// A 422 for a field of the wrong JSON type (or otherwise unreadable as its type).
    pub fn malformed_field(field: &str, message: impl Into<String>) -> AppError {
        AppError::Invalid(ValidationError::new(field, ErrorCode::Malformed, message))
    }

    /// The status code this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::MalformedBody(_) | AppError::BadParameter(_) => StatusCode::BAD_REQUEST,
            AppError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Invalid(_) | AppError::UnknownField { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::NotFound { .. } => StatusCode::NOT_FOUND,
            AppError::Engine { status, .. } => *status,
            AppError::Overloaded(_) | AppError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Timeout => StatusCode::REQUEST_TIMEOUT,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The wire `error` object.
    pub fn detail(&self) -> ErrorDetail {
        let d = |code: &str, field: Option<&str>, message: String| ErrorDetail {
            code: code.to_owned(),
            field: field.map(str::to_owned),
            message,
        };
        match self {
            AppError::MalformedBody(m) => d("malformed", Some("body"), m.clone()),
            AppError::TooLarge { limit } => d(
                "too_large",
                Some("body"),
                format!("request body is larger than the limit of {limit} bytes"),
            ),
            AppError::BadParameter(v) | AppError::Invalid(v) => {
                d(v.code.as_str(), Some(&v.field), v.message.clone())
            }
            AppError::UnknownField { field } => {
                let shown: String = field.chars().take(MAX_ECHOED_FIELD).collect();
                let message = format!(
                    "unknown field {shown:?}; fields are client_order_id, account, symbol, side, type, price, quantity, time_in_force"
                );
                d("unknown_field", Some(&shown), message)
            }
            AppError::Conflict {
                field,
                code,
                message,
            } => d(code, Some(field), message.clone()),
            AppError::NotFound {
                field,
                code,
                message,
            } => d(code, field.as_deref(), message.clone()),
            AppError::Engine { detail, .. } => detail.clone(),
            AppError::Overloaded(m) => d("overloaded", None, m.clone()),
            AppError::Unavailable {
                dependency,
                message,
            } => d("unavailable", None, format!("{dependency}: {message}")),
            AppError::Timeout => d(
                "timeout",
                None,
                "the request took longer than the gateway's request timeout".into(),
            ),
            AppError::MethodNotAllowed => d(
                "method_not_allowed",
                None,
                "this route does not take that method; see GET /openapi.json".into(),
            ),
            AppError::Internal(m) => d("internal", None, m.clone()),
        }
    }

    /// Whether the client's input was at fault (counted in `gateway_validation_errors_total`).
    fn is_input_error(&self) -> bool {
        matches!(
            self,
            AppError::MalformedBody(_)
                | AppError::TooLarge { .. }
                | AppError::BadParameter(_)
                | AppError::Invalid(_)
                | AppError::UnknownField { .. }
        )
    }

    /// Builds the error for a bare error response made by a layer or the router (a 413 from
    /// the body limit, a 408 from the timeout, a 404 for an unknown route).
    pub fn for_bare_status(status: StatusCode, body_limit: usize) -> AppError {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge { limit: body_limit },
            StatusCode::REQUEST_TIMEOUT => AppError::Timeout,
            StatusCode::NOT_FOUND => AppError::NotFound {
                field: None,
                code: "not_found".into(),
                message: "no such route; see GET /openapi.json".into(),
            },
            StatusCode::METHOD_NOT_ALLOWED => AppError::MethodNotAllowed,
            s if s.is_client_error() => AppError::MalformedBody(format!(
                "the request could not be read ({})",
                s.canonical_reason().unwrap_or("client error")
            )),
            s => AppError::Internal(format!(
                "{} {}",
                s.as_u16(),
                s.canonical_reason().unwrap_or("server error")
            )),
        }
    }
}

impl From<ValidationError> for AppError {
    fn from(v: ValidationError) -> Self {
        AppError::Invalid(v)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = self.detail();
        if self.is_input_error() {
            let field = detail
                .field
                .as_deref()
                .filter(|f| LABEL_FIELDS.contains(f))
                .unwrap_or("other")
                .to_owned();
            metrics::counter!("gateway_validation_errors_total", "field" => field, "code" => detail.code.clone())
                .increment(1);
        }
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), code = %detail.code, message = %detail.message, "answering with an error");
        } else {
            tracing::debug!(status = status.as_u16(), code = %detail.code, field = ?detail.field, "request refused");
        }
        let mut resp = (status, axum::Json(ErrorBody { error: detail })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_statuses() {
        let e = AppError::UnknownField {
            field: "x".repeat(200),
        };
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.detail().field.map(|f| f.len()), Some(MAX_ECHOED_FIELD));
        let r = AppError::Overloaded("full".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let j = serde_json::to_value(ErrorBody {
            error: AppError::TooLarge { limit: 10 }.detail(),
        })
        .unwrap();
        assert_eq!(j["error"]["field"], "body");
        assert_eq!(j["error"]["code"], "too_large");
    }
}
