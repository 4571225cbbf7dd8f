//! A hostile or broken token endpoint: each path answers a token request the way some identity
//! provider, proxy or misconfiguration really does, so that tests can show the broker turns
//! every one of them into a documented answer. Plain HTTP on loopback (the broker accepts
//! http token URLs only there).
//!
//! `POST /{behaviour}/token`, where `behaviour` is one of [`Behaviour::ALL`]'s names. Requests
//! are counted per behaviour.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::serve::{Server, spawn};

/// What one path of the hostile endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// A token that "never expires": `expires_in` of `i64::MAX`.
    HugeExpiresIn,
    /// `expires_in` as a float beyond `u64`: `1e19`.
    FloatExpiresIn,
    /// A negative `expires_in`.
    NegativeExpiresIn,
    /// `expires_in` of 0.
    ZeroExpiresIn,
    /// 200 with an HTML page (a captive portal, a login page).
    Html200,
    /// 401 with an empty body (a gateway in front of the IdP).
    Empty401,
    /// 404 with HTML (a wrong `token_url`).
    NotFound404,
    /// 403 with HTML (a web application firewall).
    Waf403,
    /// 200 with a 5 MiB JSON body.
    Huge200,
    /// 200 JSON without `access_token`.
    NoAccessToken,
    /// 200 JSON with `"access_token": ""`.
    EmptyAccessToken,
    /// 302 to another address (a redirect must never be followed with credentials).
    Redirect302,
    /// 503 with `Retry-After` as an HTTP-date in the past (retry now).
    Unavailable503Date,
    /// Entra's v1 endpoint: `expires_in` (and `expires_on`, `ext_expires_in`) as strings.
    EntraV1,
    /// Entra refusing a wrong client secret: 401 `invalid_client`, `error_codes` [7000215].
    EntraInvalidSecret,
    /// Entra refusing an expired client secret: 401 `invalid_client`, `error_codes` [7000222].
    EntraExpiredSecret,
}

impl Behaviour {
    pub const ALL: [Behaviour; 16] = [
        Behaviour::HugeExpiresIn,
        Behaviour::FloatExpiresIn,
        Behaviour::NegativeExpiresIn,
        Behaviour::ZeroExpiresIn,
        Behaviour::Html200,
        Behaviour::Empty401,
        Behaviour::NotFound404,
        Behaviour::Waf403,
        Behaviour::Huge200,
        Behaviour::NoAccessToken,
        Behaviour::EmptyAccessToken,
        Behaviour::Redirect302,
        Behaviour::Unavailable503Date,
        Behaviour::EntraV1,
        Behaviour::EntraInvalidSecret,
        Behaviour::EntraExpiredSecret,
    ];

    /// The path segment (and a fitting connection name).
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::HugeExpiresIn => "huge-expires",
            Behaviour::FloatExpiresIn => "float-expires",
            Behaviour::NegativeExpiresIn => "negative-expires",
            Behaviour::ZeroExpiresIn => "zero-expires",
            Behaviour::Html200 => "html-200",
            Behaviour::Empty401 => "empty-401",
            Behaviour::NotFound404 => "not-found-404",
            Behaviour::Waf403 => "waf-403",
            Behaviour::Huge200 => "huge-200",
            Behaviour::NoAccessToken => "no-access-token",
            Behaviour::EmptyAccessToken => "empty-access-token",
            Behaviour::Redirect302 => "redirect-302",
            Behaviour::Unavailable503Date => "unavailable-503-date",
            Behaviour::EntraV1 => "entra-v1",
            Behaviour::EntraInvalidSecret => "entra-invalid-secret",
            Behaviour::EntraExpiredSecret => "entra-expired-secret",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// A token shaped like a JWT, so that leak scans recognise it.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJob3N0aWxlLWRvdWJsZSJ9.c2lnbmF0dXJlLW9mLXRoZS1ob3N0aWxlLWRvdWJsZQ";

#[derive(Default)]
struct Shared {
    counts: Mutex<HashMap<Behaviour, usize>>,
    total: AtomicUsize,
    /// Where `Redirect302` points: this server's `/elsewhere/token`, once the port is known.
    elsewhere: std::sync::OnceLock<String>,
    /// Requests that reached the redirect's target (a broker must never follow it).
    elsewhere_hits: AtomicUsize,
}

/// A running hostile endpoint; dropping it stops it.
pub struct HostileIdp {
    server: Server,
    shared: Arc<Shared>,
}

impl HostileIdp {
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let router = Router::new()
            .route(
                "/elsewhere/token",
                axum::routing::any(|State(shared): State<Arc<Shared>>| async move {
                    shared.elsewhere_hits.fetch_add(1, Ordering::SeqCst);
                    StatusCode::NO_CONTENT
                }),
            )
            .route("/{behaviour}/token", axum::routing::post(answer))
            .with_state(shared.clone());
        let server = spawn(router, 0, None).await?;
        let _ = shared.elsewhere.set(format!(
            "http://127.0.0.1:{}/elsewhere/token",
            server.address.port()
        ));
        Ok(Self { server, shared })
    }

    /// The token URL that behaves as `behaviour`.
    pub fn token_url(&self, behaviour: Behaviour) -> String {
        format!(
            "http://127.0.0.1:{}/{}/token",
            self.server.address.port(),
            behaviour.name()
        )
    }

    /// Token requests received for `behaviour`.
    pub fn requests(&self, behaviour: Behaviour) -> usize {
        self.shared
            .counts
            .lock()
            .unwrap()
            .get(&behaviour)
            .copied()
            .unwrap_or(0)
    }

    /// Requests that reached the address `Redirect302` points to.
    pub fn redirect_target_hits(&self) -> usize {
        self.shared.elsewhere_hits.load(Ordering::SeqCst)
    }

    /// Token requests received, all behaviours together.
    pub fn total_requests(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }
}

fn token_json(expires_in: &str) -> Response {
    json_body(
        StatusCode::OK,
        format!(r#"{{"access_token":"{TOKEN}","token_type":"Bearer","expires_in":{expires_in}}}"#),
    )
}

fn json_body(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode) -> Response {
    let mut response = (
        status,
        "<!DOCTYPE html><html><body><h1>Nothing to see</h1></body></html>",
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

async fn answer(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let Some(behaviour) = Behaviour::from_name(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    shared.total.fetch_add(1, Ordering::SeqCst);
    *shared.counts.lock().unwrap().entry(behaviour).or_default() += 1;
    match behaviour {
        Behaviour::HugeExpiresIn => token_json("9223372036854775807"),
        Behaviour::FloatExpiresIn => token_json("1e19"),
        Behaviour::NegativeExpiresIn => token_json("-3600"),
        Behaviour::ZeroExpiresIn => token_json("0"),
        Behaviour::Html200 => html(StatusCode::OK),
        Behaviour::Empty401 => StatusCode::UNAUTHORIZED.into_response(),
        Behaviour::NotFound404 => html(StatusCode::NOT_FOUND),
        Behaviour::Waf403 => html(StatusCode::FORBIDDEN),
        Behaviour::Huge200 => {
            let padding = "x".repeat(5 * 1024 * 1024);
            json_body(
                StatusCode::OK,
                format!(
                    r#"{{"access_token":"{TOKEN}","token_type":"Bearer","expires_in":3600,"padding":"{padding}"}}"#
                ),
            )
        }
        Behaviour::NoAccessToken => json_body(
            StatusCode::OK,
            r#"{"token_type":"Bearer","expires_in":3600}"#.to_string(),
        ),
        Behaviour::EmptyAccessToken => json_body(
            StatusCode::OK,
            r#"{"access_token":"","token_type":"Bearer","expires_in":3600}"#.to_string(),
        ),
        Behaviour::Redirect302 => {
            let mut response = StatusCode::FOUND.into_response();
            let target = shared.elsewhere.get().cloned().unwrap_or_default();
            if let Ok(value) = HeaderValue::from_str(&target) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        Behaviour::Unavailable503Date => {
            let mut response = json_body(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"temporarily_unavailable"}"#.to_string(),
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
            );
            response
        }
        Behaviour::EntraV1 => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            json_body(
                StatusCode::OK,
                format!(
                    r#"{{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","expires_on":"{}","not_before":"{now}","resource":"api://demo","access_token":"{TOKEN}"}}"#,
                    now + 3599
                ),
            )
        }
        Behaviour::EntraInvalidSecret => entra_error(
            7000215,
            "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
        ),
        Behaviour::EntraExpiredSecret => entra_error(
            7000222,
            "AADSTS7000222: The provided client secret keys for app are expired.",
        ),
    }
}

/// Entra's error answer for a client secret it refuses.
fn entra_error(code: u64, description: &str) -> Response {
    json_body(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({
            "error": "invalid_client",
            "error_description": description,
            "error_codes": [code],
            "timestamp": "2026-11-28 05:00:00Z",
            "trace_id": "0e1f2a3b-0000-4000-8000-000000000001",
            "correlation_id": "0e1f2a3b-0000-4000-8000-000000000002",
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        })
        .to_string(),
    )
}
