//! `GET /api/health`: each connection's state as the broker observed it, for an operator or a
//! monitoring probe. Its own function (`function-health`), so that its function key can be
//! given to monitoring without giving out the token function's key.
//!
//! The answer names connections and nothing else about them: no scopes, no secret names, no
//! token. `status` is `degraded` (still HTTP 200: the broker itself is up and answering) when
//! any connection's last token fetch failed or its circuit breaker is open. Nothing here calls
//! out: it reads what requests and fetches recorded (see `stats`) and the breakers' state, so
//! a probe every few seconds costs nothing and cannot hammer an identity provider.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::app_state::AppState;
use crate::upstream_guard::BreakerState;

/// The path the host forwards `function-health` to (`route: "health"` under the `api` prefix).
pub(crate) const PATH: &str = "/api/health";

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    connections: BTreeMap<&'a str, ConnectionHealth>,
}

#[derive(Serialize)]
struct ConnectionHealth {
    /// `fresh`, `stale` or `none`: the last token handed out for the connection.
    token: &'static str,
    /// `ok`, `failed` or `never`: the last token fetch.
    last_fetch: &'static str,
    /// `closed`, `open` or `half_open`.
    breaker: &'static str,
}

/// The health answer.
pub(crate) fn answer(state: &AppState) -> Response {
    let now = SystemTime::now();
    let mut degraded = false;
    let connections = state
        .served
        .iter()
        .map(|(key, served)| {
            let connection = &served.settings;
            let breaker = state
                .token_client
                .breaker(key.as_str())
                .unwrap_or(BreakerState::Closed);
            let (token, last_fetch) = (served.observed.token(now), served.observed.last_fetch());
            degraded |= last_fetch == "failed" || breaker == BreakerState::Open;
            let health = ConnectionHealth {
                token,
                last_fetch,
                breaker: breaker.as_str(),
            };
            (connection.name.as_str(), health)
        })
        .collect();
    let body = Health {
        status: if degraded { "degraded" } else { "ok" },
        connections,
    };
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
