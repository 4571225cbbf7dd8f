//! The one error type at the HTTP edge, mapped to the documented JSON contract
//! `{"error", "error_description"}`. Descriptions name the connection and the step so that an
//! operator can act on them; none carries a secret, a token or an upstream's raw body.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::caller_check::CallerError;
use crate::observe::stats::ErrorCode;
use crate::token::TokenError;

/// Longest `Retry-After` the broker gives its callers. An identity provider that asks for an
/// hour (or a circuit open for long) must not park every caller for that long: they come back
/// within this, and are answered fast from the circuit breaker or the negative cache.
pub(crate) const MAX_CALLER_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Every way a request can fail, with the status and code the API documents.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// 404 `unknown_connection`.
    UnknownConnection,
    /// 404 `not_found`: a path the broker does not serve.
    NotFound,
    /// 405 `invalid_request`, with the methods to put in `Allow`.
    MethodNotAllowed(&'static str),
    /// 400 `invalid_request`.
    InvalidRequest(String),
    /// 413, 414 or 431 `invalid_request`: a request larger than the broker accepts. With
    /// `unread_body`, a body was left unread and the connection ends with the answer (the
    /// unread rest cannot be told from the next request).
    TooLarge {
        status: StatusCode,
        what: &'static str,
        unread_body: bool,
    },
    /// 400 `invalid_scope`: a scope outside the connection's `allowed_scopes`.
    InvalidScope(String),
    /// 400 `invalid_target` (RFC 8707): an audience or resource outside the connection's
    /// allowed lists.
    InvalidTarget(String),
    /// 401 `invalid_token`: no caller credentials at all.
    MissingToken,
    /// 401 `invalid_token`: caller credentials that do not validate.
    InvalidToken(String),
    /// 403 `access_denied`.
    AccessDenied(String),
    /// 502 `upstream_rejected`, with the token endpoint's OAuth error code when it gave one.
    UpstreamRejected {
        description: String,
        code: Option<String>,
    },
    /// 502 `upstream_invalid_response`: a success answer that is not a usable token.
    UpstreamInvalidResponse(String),
    /// 503 `upstream_unavailable`.
    UpstreamUnavailable {
        description: String,
        retry_after: Option<Duration>,
    },
    /// 503 `secret_unavailable`.
    SecretUnavailable(String),
    /// 503 `caller_keys_unavailable`: caller tokens cannot be checked, for want of the
    /// issuer's signing keys.
    CallerKeysUnavailable {
        description: String,
        retry_after: Duration,
    },
    /// 503 `shared_cache_unavailable`: `function-rotation` could not carry an event through
    /// the shared tier (Redis unreachable, or the shared cache's own key could not be read
    /// again); the host fails the invocation, so Event Grid delivers it again.
    RotationNotAnnounced(&'static str),
    /// 500 `internal_error`.
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_error: Option<&'a str>,
}

impl From<&TokenError> for ApiError {
    fn from(error: &TokenError) -> Self {
        match error {
            TokenError::UnknownConnection(_) => ApiError::UnknownConnection,
            TokenError::Rejected { code, .. } => ApiError::UpstreamRejected {
                description: error.to_string(),
                code: code.clone(),
            },
            TokenError::InvalidResponse { .. } => {
                ApiError::UpstreamInvalidResponse(error.to_string())
            }
            TokenError::Internal { .. } => ApiError::Internal(error.to_string()),
            TokenError::Unavailable { retry_after, .. } => ApiError::UpstreamUnavailable {
                description: error.to_string(),
                retry_after: *retry_after,
            },
            TokenError::Secret { .. } => ApiError::SecretUnavailable(error.to_string()),
        }
    }
}

impl From<CallerError> for ApiError {
    fn from(error: CallerError) -> Self {
        match error {
            CallerError::Missing => ApiError::MissingToken,
            CallerError::InvalidToken(_) => ApiError::InvalidToken(error.to_string()),
            CallerError::Denied { .. } => ApiError::AccessDenied(error.to_string()),
            CallerError::KeysUnavailable { retry_after } => ApiError::CallerKeysUnavailable {
                description: error.to_string(),
                retry_after,
            },
        }
    }
}

/// What an error answer says: its status, code and description, the provider's own code (for
/// `upstream_rejected`), and the `Retry-After` it carries.
struct Described<'a> {
    status: StatusCode,
    code: ErrorCode,
    description: &'a str,
    upstream_error: Option<&'a str>,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// The answer's status.
    pub(crate) fn status(&self) -> StatusCode {
        self.describe().status
    }

    /// The documented code, as the stats line counts it.
    pub(crate) fn code(&self) -> ErrorCode {
        self.describe().code
    }

    /// Writes the error's log line, inside whatever span is entered (the edge enters the
    /// request's): a warning ("request failed") for a 5xx, whose cause is the broker's or a
    /// dependency's, else an INFO line ("request refused"), the caller's own doing.
    pub(crate) fn log(&self) {
        let Described {
            status,
            code,
            description,
            ..
        } = self.describe();
        if status.is_server_error() {
            tracing::warn!(
                status = status.as_u16(),
                error = code.as_str(),
                description,
                "request failed"
            );
        } else {
            tracing::info!(
                status = status.as_u16(),
                error = code.as_str(),
                description,
                "request refused"
            );
        }
    }

    fn describe(&self) -> Described<'_> {
        let (status, code, description, upstream_error, retry_after) = match self {
            ApiError::UnknownConnection => (
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownConnection,
                "no connection of that name is configured",
                None,
                None,
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "the broker serves GET or POST /api/token/{connection}",
                None,
                None,
            ),
            ApiError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidRequest,
                "this path does not serve that method; see the Allow header",
                None,
                None,
            ),
            ApiError::InvalidRequest(text) => (
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                text.as_str(),
                None,
                None,
            ),
            ApiError::TooLarge { status, what, .. } => {
                (*status, ErrorCode::InvalidRequest, *what, None, None)
            }
            ApiError::InvalidScope(text) => (
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidScope,
                text.as_str(),
                None,
                None,
            ),
            ApiError::InvalidTarget(text) => (
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidTarget,
                text.as_str(),
                None,
                None,
            ),
            ApiError::MissingToken => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::InvalidToken,
                "the request carries no caller credentials",
                None,
                None,
            ),
            ApiError::InvalidToken(text) => (
                StatusCode::UNAUTHORIZED,
                ErrorCode::InvalidToken,
                text.as_str(),
                None,
                None,
            ),
            ApiError::AccessDenied(text) => (
                StatusCode::FORBIDDEN,
                ErrorCode::AccessDenied,
                text.as_str(),
                None,
                None,
            ),
            ApiError::UpstreamRejected { description, code } => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamRejected,
                description.as_str(),
                code.as_deref(),
                None,
            ),
            ApiError::UpstreamInvalidResponse(text) => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::UpstreamInvalidResponse,
                text.as_str(),
                None,
                None,
            ),
            ApiError::UpstreamUnavailable {
                description,
                retry_after,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::UpstreamUnavailable,
                description.as_str(),
                None,
                *retry_after,
            ),
            ApiError::SecretUnavailable(text) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::SecretUnavailable,
                text.as_str(),
                None,
                None,
            ),
            ApiError::CallerKeysUnavailable {
                description,
                retry_after,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::CallerKeysUnavailable,
                description.as_str(),
                None,
                Some(*retry_after),
            ),
            ApiError::RotationNotAnnounced(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::SharedCacheUnavailable,
                *reason,
                None,
                Some(Duration::from_secs(5)),
            ),
            ApiError::Internal(text) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::InternalError,
                text.as_str(),
                None,
                None,
            ),
        };
        Described {
            status,
            code,
            description,
            upstream_error,
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Described {
            status,
            code,
            description,
            upstream_error,
            retry_after,
        } = self.describe();
        let body = ErrorBody {
            error: code.as_str(),
            error_description: description,
            upstream_error,
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            // RFC 9110 §15.5.6: a 405 lists what is allowed.
            ApiError::MethodNotAllowed(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            // RFC 6750 §3: no error code when the request had no credentials at all.
            ApiError::MissingToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"token-broker\""),
                );
            }
            ApiError::InvalidToken(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"token-broker\", error=\"invalid_token\"",
                    ),
                );
            }
            ApiError::TooLarge {
                unread_body: true, ..
            } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        // An unavailable upstream always gets a hint, so clients back off rather than spin.
        let retry_after = retry_after.or_else(|| {
            matches!(self, ApiError::UpstreamUnavailable { .. }).then(|| Duration::from_secs(5))
        });
        if let Some(retry_after) = retry_after {
            let seconds = retry_after.min(MAX_CALLER_RETRY_AFTER).as_secs().max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
