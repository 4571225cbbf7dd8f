//! `POST /api/token/{connection}/invalidate`: a caller whose backend refused a token asks the
//! broker to drop it. The form names the refused `access_token` and the same `scope`,
//! `audience` and `resource` the token was asked for; the caller must be allowed to use the
//! connection, as for the token itself. What the cache does is in `cache::invalidation`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;
use serde::Serialize;

use super::label::truncate;
use super::limits::read_body;
use super::token::{asked, form_body};
use crate::app_state::AppState;
use crate::cache::{Invalidation, fingerprint};
use crate::caller_check::CallerHeaders;
use crate::error::ApiError;

/// The path suffix of an invalidation, after the connection's name.
const SUFFIX: &str = "/invalidate";

/// The connection of `{connection}/invalidate` (the token route's rest), any casing.
pub(super) fn invalidation_route(rest: &str) -> Option<&str> {
    let split = rest.len().checked_sub(SUFFIX.len())?;
    let (connection, suffix) = (rest.get(..split)?, rest.get(split..)?);
    suffix.eq_ignore_ascii_case(SUFFIX).then_some(connection)
}

#[derive(Serialize)]
struct Answer {
    invalidated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// `POST /api/token/{connection}/invalidate`.
pub(super) async fn invalidate_request(
    state: &AppState,
    connection: &str,
    parts: &Parts,
    callers: CallerHeaders<'_>,
    body: Body,
    invocation_id: &str,
) -> Result<Response, ApiError> {
    let bytes = Box::pin(read_body(body, &parts.headers)).await?;
    let form = form_body(&parts.headers, bytes)?;
    let caller = state.callers.authenticate(callers).await?;
    let asked = asked(state, connection, parts.uri.query(), &form, &caller)?;
    // From the form only: a token in a URL would reach access logs.
    let presented = url::form_urlencoded::parse(&form)
        .find(|(name, _)| name == "access_token")
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
        .map(SecretString::from)
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "access_token (the token the backend refused) is required in the form body"
                    .to_string(),
            )
        })?;
    let settings = &asked.served.settings;
    let outcome = state
        .invalidator
        .invalidate(&asked.key, &presented, settings.min_invalidation_interval)
        .await;
    let dropped = matches!(outcome, Invalidation::Dropped { .. });
    state.observers.stats.record_invalidation(dropped);
    if let Some(otel) = &state.observers.otel {
        let result = outcome.reason().unwrap_or("invalidated");
        otel.invalidation(&settings.name, result);
    }
    let fingerprint = fingerprint(secrecy::ExposeSecret::expose_secret(&presented));
    crate::observe::audit::invalidation(&crate::observe::audit::InvalidationRecord {
        connection: &settings.name,
        caller: caller.audit_name(),
        scopes: asked.key.scopes_display(),
        audience: asked.key.audience().or(settings.audience.as_deref()),
        resource: asked.key.resource().or(settings.resource.as_deref()),
        fingerprint: &fingerprint,
        invalidated: dropped,
        reason: outcome.reason(),
        invocation_id,
        path: truncate(parts.uri.path(), 200),
    });
    if let Invalidation::Dropped { fleet: false } = outcome
        && state.shared.is_some()
    {
        tracing::warn!(connection = %settings.name, fingerprint = %fingerprint, "token invalidated on this instance only: the shared cache could not be told");
    }
    let mut response = (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(Answer {
            invalidated: dropped,
            reason: outcome.reason(),
        }),
    )
        .into_response();
    if let Invalidation::TooSoon { retry_after } = outcome {
        let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    Ok(response)
}
