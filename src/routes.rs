//! The HTTP API, as the Azure Functions host forwards it: `GET /` for readiness,
//! `GET|POST /api/token/{connection}` for tokens, `GET /api/health` for operators (see
//! `health`). Everything else is a JSON 404.
//!
//! The token route is matched by hand rather than by axum's router because the host matches
//! routes case-insensitively (`/API/Token/x` reaches us as the client typed it) and because an
//! unknown or malformed connection name must be a plain `unknown_connection`, never a 5xx.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use secrecy::ExposeSecret;
use serde::Serialize;
use tracing::Instrument;

use crate::app_state::AppState;
use crate::cache::{CacheKey, CacheOutcome, CachedToken, panic_message};
use crate::caller_check;
use crate::config::ScopeToken;
use crate::error::{ApiError, ErrorLog};
use crate::health;
use crate::rotation;
use crate::stats::{self, ErrorCode};

/// The host's invocation id header, which the broker's log lines carry.
static INVOCATION_ID: HeaderName = HeaderName::from_static("x-azure-functions-invocationid");

/// Most scopes one request may name, and the longest `scope` value accepted.
const MAX_SCOPES: usize = 32;
const MAX_SCOPE_PARAMETER: usize = 2048;
/// Longest path and query accepted (the host and front ends allow more; tokens need less).
const MAX_URI: usize = 4096;
/// Most header bytes accepted, names and values together.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest body accepted: token requests need none, Key Vault events are a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest body read (and thrown away) so that its 413 can be read: a client, or the Functions
/// host's HTTP client in front of the broker, that is still sending when the answer comes sees
/// a reset instead of the answer if the connection closes under it. A body declared or found
/// larger gets its 413 at once with `Connection: close`.
pub const MAX_DRAINED_BYTES: u64 = 8 * 1024 * 1024;
/// Longest the rest of a refused body is read for: a client that trickles costs no more.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The broker as one HTTP service: every request goes to [`traced`].
///
/// Not an axum `Router`: the routes are matched by hand (above), so a router would only add
/// its per-request work (cloning its boxed service, recording path parameters, wrapping the
/// handler), which measured about a tenth of a cache hit's cost (BENCHMARKS.md).
#[derive(Clone)]
pub struct BrokerService {
    // One `Arc` for the whole state: it is cloned for every request, and one reference count
    // is one cache line shared by the workers, where the fields' own counts would be eight.
    state: Arc<AppState>,
}

/// The broker's service over `state`: what `startup` hands to `axum::serve`.
pub fn service(state: AppState) -> BrokerService {
    BrokerService {
        state: Arc::new(state),
    }
}

impl tower_service::Service<Request<Body>> for BrokerService {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The request is taken apart here, not inside the future: a future holds its
        // arguments and its locals side by side, and it is allocated for every request.
        let (parts, body) = request.into_parts();
        Box::pin(traced(self.state.clone(), parts, body))
    }
}

/// What identifies a request in its log lines: the host's invocation id (so the broker's lines
/// join the host's own in Application Insights), the method and the path; never the query
/// string, which may hold the function key (`code=`), and never a header.
struct RequestLabel<'a> {
    invocation_id: &'a str,
    method: &'a str,
    path: &'a str,
}

/// The host's invocation id header, cut to a length fit for a log line.
fn invocation_id(invocation: Option<&HeaderValue>) -> &str {
    invocation
        .and_then(|value| value.to_str().ok())
        .map(|value| truncate(value, 64))
        .unwrap_or_default()
}

/// Labels a request's log lines with a span: the host's invocation id, the method, the path.
///
/// A span costs a formatted copy of its fields per request, and a cache hit writes no log line
/// at all, so the span is made only when a line will use it: at DEBUG and below for every
/// request (its "finished processing request" line), else only for an error answer's line
/// or a panic. The host logs each invocation with status and duration; tokens get their audit
/// record either way.
async fn traced(state: Arc<AppState>, parts: Parts, body: Body) -> Result<Response, Infallible> {
    // The head stays here and is lent to the handler, so that a span made after the handler
    // (for an error line or a panic) can still read it without a copy made per request.
    let state = state.as_ref();
    let head = HeadFacts::scan(&parts.headers);
    let invocation = invocation_id(head.invocation);
    let request_span = || {
        tracing::info_span!(
            "request",
            invocation_id = invocation,
            method = parts.method.as_str(),
            path = truncate(parts.uri.path(), 200),
        )
    };
    let span = if tracing::enabled!(tracing::Level::DEBUG) {
        request_span()
    } else {
        tracing::Span::none()
    };
    // The host's readiness probes of `/` (every 25 ms at start, then its health pings) are not
    // requests anyone made: they stay out of the counts.
    let readiness_probe = parts.uri.path() == "/";
    let debug = !span.is_none();
    let started = debug.then(tokio::time::Instant::now);
    let handler = dispatch(state, &parts, &head, body, invocation).instrument(span.clone());
    let response = answer_even_on_panic(handler, || {
        if span.is_none() {
            request_span()
        } else {
            span.clone()
        }
    })
    .await;
    if !readiness_probe {
        let code = response.extensions().get::<ErrorCode>().map(|code| code.0);
        stats::record_response(response.status().as_u16(), code);
    }
    if let Some(log) = response.extensions().get::<ErrorLog>() {
        let span = if span.is_none() {
            request_span()
        } else {
            span.clone()
        };
        let _entered = span.enter();
        log.write(response.status());
    }
    if let Some(started) = started {
        let _entered = span.enter();
        tracing::debug!(
            status = response.status().as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            "finished processing request"
        );
    }
    Ok(response)
}

/// A panic anywhere in a request is a bug, but the caller still gets the documented JSON
/// answer (500 `internal_error`) instead of a dropped connection, and the worker lives on.
///
/// Not an `async fn`: one would hold `handler` twice (as its argument, and inside the
/// unwind-catching future), and this future is allocated for every request.
fn answer_even_on_panic(
    handler: impl std::future::Future<Output = Response>,
    span: impl FnOnce() -> tracing::Span,
) -> impl std::future::Future<Output = Response> {
    AssertUnwindSafe(handler)
        .catch_unwind()
        .map(move |outcome| {
            outcome.unwrap_or_else(|panic| {
                let span = span();
                let _entered = span.enter();
                tracing::error!(
                    panic = panic_message(panic.as_ref()),
                    "request handler panicked"
                );
                ApiError::Internal(
                    "the broker failed unexpectedly on this request (a bug; its log has the details)"
                        .to_string(),
                )
                .into_response()
            })
        })
}

fn truncate(text: &str, max: usize) -> &str {
    // A string of at most `max` bytes has at most `max` characters: nothing to count.
    if text.len() <= max {
        return text;
    }
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

async fn dispatch(
    state: &AppState,
    parts: &Parts,
    head: &HeadFacts<'_>,
    body: Body,
    invocation_id: &str,
) -> Response {
    if let Err(error) = check_limits(parts, head) {
        // Whatever the limit, a body still arriving is read away first; but a client that
        // waits for `100 Continue` has sent nothing yet, and reading would invite it to.
        let drained = !expects_continue(&parts.headers)
            && Box::pin(discard(body, head.content_length, 0)).await;
        return refused(error, drained);
    }
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    // Token requests first: nearly every request is one.
    if let Some(connection) = token_route(uri.path()) {
        if method != Method::GET && method != Method::POST {
            return ApiError::MethodNotAllowed("GET, POST").into_response();
        }
        return token_request(state, connection, parts, body, invocation_id).await;
    }
    if uri.path() == "/" {
        // The host polls `/` every 25 ms until it answers; nothing here may wait.
        return (
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(Ready { status: "ready" }),
        )
            .into_response();
    }
    if uri.path().eq_ignore_ascii_case(rotation::PATH) {
        if method != Method::POST {
            return ApiError::MethodNotAllowed("POST").into_response();
        }
        // Rare paths are boxed: their state would otherwise make every request's future
        // (allocated per request) as large as the largest of them.
        return match Box::pin(read_body(body, headers)).await {
            Ok(bytes) => Box::pin(rotation::handle(state, &bytes)).await,
            Err(refusal) => refusal,
        };
    }
    if uri.path().eq_ignore_ascii_case(health::PATH) {
        if method != Method::GET {
            return ApiError::MethodNotAllowed("GET").into_response();
        }
        return health::answer(state);
    }
    ApiError::NotFound.into_response()
}

/// `GET|POST /api/token/{connection}`.
async fn token_request(
    state: &AppState,
    connection: &str,
    parts: &Parts,
    body: Body,
    invocation_id: &str,
) -> Response {
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    let label = RequestLabel {
        invocation_id,
        method: method.as_str(),
        path: truncate(uri.path(), 200),
    };
    let form = if method == Method::POST {
        let bytes = match Box::pin(read_body(body, headers)).await {
            Ok(bytes) => bytes,
            Err(refusal) => return refusal,
        };
        match form_body(headers, bytes) {
            Ok(form) => form,
            Err(error) => return error.into_response(),
        }
    } else {
        Vec::new()
    };
    match serve_token(state, connection, uri.query(), &form, headers, &label).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// The body, at most [`MAX_BODY_BYTES`]; past that, the 413 (after reading the rest away, see
/// [`discard`]).
async fn read_body(body: Body, headers: &HeaderMap) -> Result<Vec<u8>, Response> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return Err(ApiError::InvalidRequest(
                "the request body ended before it was complete".to_string(),
            )
            .into_response());
        };
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            let seen = bytes.len() + chunk.len();
            drop(bytes);
            let drained = discard(
                Body::from_stream(stream),
                declared_length(headers),
                seen as u64,
            )
            .await;
            return Err(refused(body_too_large(), drained));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Reads the rest of a refused body and throws it away, so that the client can read the
/// answer: `true` when the body ended within [`MAX_DRAINED_BYTES`] (counting `seen`, what was
/// read before) and [`DRAIN_TIME`]. Memory stays one chunk, whatever is sent.
async fn discard(body: Body, declared: Option<u64>, seen: u64) -> bool {
    if declared.is_some_and(|length| length > MAX_DRAINED_BYTES) {
        return false;
    }
    let mut stream = body.into_data_stream();
    let mut total = seen;
    let drained = async {
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { return false };
            total += chunk.len() as u64;
            if total > MAX_DRAINED_BYTES {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIME, drained)
        .await
        .unwrap_or(false)
}

/// A refusal's answer; when the body was not all read, the connection ends with it (the
/// unread rest cannot be told from the next request).
fn refused(error: ApiError, drained: bool) -> Response {
    let mut response = error.into_response();
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn body_too_large() -> ApiError {
    ApiError::TooLarge {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        what: "the request body is larger than the broker accepts (64 KiB)",
    }
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A POST's body: empty, or an `application/x-www-form-urlencoded` form (RFC 6749 token
/// requests are forms) whose `scope` is honoured like the query's. Any other body is refused
/// rather than silently ignored.
fn form_body(headers: &HeaderMap, bytes: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(ApiError::InvalidRequest(
            "a POST body must be an application/x-www-form-urlencoded form (or empty)".to_string(),
        ));
    }
    Ok(bytes)
}

/// What the broker reads from a request's headers, found in one pass over them rather than a
/// hashed look-up for each.
struct HeadFacts<'a> {
    /// Names and values together, with the separators a request line carries.
    bytes: usize,
    content_length: Option<u64>,
    invocation: Option<&'a HeaderValue>,
}

impl<'a> HeadFacts<'a> {
    fn scan(headers: &'a HeaderMap) -> Self {
        let mut facts = Self {
            bytes: 0,
            content_length: None,
            invocation: None,
        };
        for (name, value) in headers {
            facts.bytes += name.as_str().len() + value.len() + 4;
            if name == header::CONTENT_LENGTH {
                facts.content_length = value.to_str().ok().and_then(|v| v.parse().ok());
            } else if name == INVOCATION_ID && facts.invocation.is_none() {
                facts.invocation = Some(value);
            }
        }
        facts
    }
}

/// Refuses requests larger than a token request can need, before any work is done.
fn check_limits(request: &Parts, head: &HeadFacts<'_>) -> Result<(), ApiError> {
    let uri_length = request
        .uri
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_length > MAX_URI {
        return Err(ApiError::TooLarge {
            status: StatusCode::URI_TOO_LONG,
            what: "the request URI is longer than the broker accepts (4096 bytes)",
        });
    }
    if head.bytes > MAX_HEADER_BYTES {
        return Err(ApiError::TooLarge {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            what: "the request headers are larger than the broker accepts (16 KiB)",
        });
    }
    if head
        .content_length
        .is_some_and(|length| length > MAX_BODY_BYTES as u64)
    {
        return Err(body_too_large());
    }
    Ok(())
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
}

/// The connection segment of `/api/token/{connection}`, prefix matched case-insensitively.
fn token_route(path: &str) -> Option<&str> {
    const PREFIX: &str = "/api/token/";
    let head = path.get(..PREFIX.len())?;
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let connection = &path[PREFIX.len()..];
    Some(connection.strip_suffix('/').unwrap_or(connection))
}

async fn serve_token(
    state: &AppState,
    name: &str,
    query: Option<&str>,
    form: &[u8],
    headers: &HeaderMap,
    label: &RequestLabel<'_>,
) -> Result<Response, ApiError> {
    // Who is asking comes first: an unauthenticated caller learns nothing, not even which
    // connections exist.
    let caller = state.callers.authenticate(headers).await?;
    // Configured names are valid by construction: anything malformed, a traversal attempt
    // included, is simply not a configured connection.
    let (key_name, connection) = state.connection(name).ok_or(ApiError::UnknownConnection)?;
    caller_check::authorize(&caller, connection)?;
    // The default key is borrowed: cloning it would touch three reference counts per request.
    let scoped;
    let key = match requested_scopes(query, form)? {
        None => &state.default_keys[key_name],
        Some(scopes) => {
            if let Some(refused) = scopes
                .iter()
                .find(|s| !connection.allowed_scopes.contains(s))
            {
                return Err(ApiError::InvalidScope(format!(
                    "scope '{refused}' is not allowed for connection '{}'",
                    connection.name
                )));
            }
            scoped = CacheKey::new(key_name, scopes);
            &scoped
        }
    };

    let handing_out = HandingOut {
        state,
        key_name,
        connection,
        key,
        caller: &caller,
        label,
    };
    // A hit this worker thread handed out lately needs no lock (`TokenCache::serve_hit`).
    let now = tokio::time::Instant::now();
    if let Some(response) = state.cache.serve_hit(key, now, |token| {
        handing_out.answer(token, CacheOutcome::Hit, now)
    }) {
        return Ok(response);
    }
    // The slow path, boxed: a hit never pays for the size of its state.
    let (token, outcome) = Box::pin(state.cache.get(key))
        .await
        .map_err(|error| ApiError::from(error.as_ref()))?;
    Ok(handing_out.answer(&token, outcome, tokio::time::Instant::now()))
}

/// What a token answer is accounted to: the connection, the key, the caller, the request.
struct HandingOut<'a> {
    state: &'a AppState,
    key_name: &'a crate::config::ConnectionName,
    connection: &'a crate::config::ConnectionSettings,
    key: &'a CacheKey,
    caller: &'a caller_check::Caller,
    label: &'a RequestLabel<'a>,
}

impl HandingOut<'_> {
    /// The answer carrying `token`, counted, audited and observed for `/api/health`.
    fn answer(&self, token: &Arc<CachedToken>, outcome: CacheOutcome, now: Instant) -> Response {
        // In the stats, an answer that waited for a fetch is a miss, whoever started it.
        stats::record_cache_outcome(match outcome {
            CacheOutcome::Joined => "miss",
            other => other.as_str(),
        });
        if let Some(observed) = self.state.observed.get(self.key_name) {
            observed.handed_out(token.expires_on, outcome == CacheOutcome::Stale);
        }
        let record = crate::audit::AuditRecord {
            connection: &self.connection.name,
            caller: self.caller.audit_name(),
            scopes: self.key.scopes_display(),
            cache: outcome.as_str(),
            expires_on: token.expires_on,
            fingerprint: &token.fingerprint,
            count: 1,
            invocation_id: self.label.invocation_id,
            method: self.label.method,
            path: self.label.path,
        };
        // Hits are counted and written once per interval; a fetch or a stale answer is worth
        // a record of its own, at once.
        if outcome == CacheOutcome::Hit {
            crate::audit::record_hit(token, &record);
        } else {
            crate::audit::record(&record);
        }
        let mut response = Response::new(Body::from(answer_body(token, token.expires_in(now))));
        // A copy of headers made once: no name is hashed per request.
        *response.headers_mut() = TOKEN_ANSWER_HEADERS.clone();
        response
    }
}

/// The headers of every token answer: JSON, and never stored by a cache (RFC 6749 §5.1).
static TOKEN_ANSWER_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(|| {
    HeaderMap::from_iter([
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::PRAGMA, HeaderValue::from_static("no-cache")),
    ])
});

thread_local! {
    /// The last answer body this worker thread wrote: the token's id, its `expires_in`, and
    /// the bytes. The same token within the same second has the same body, so a hit reuses
    /// it (a reference count on memory only this thread touches) instead of writing a
    /// kilobyte again. It holds the token, like the cache, until the thread answers with
    /// another token.
    static LAST_ANSWER: std::cell::RefCell<Option<(u64, u64, Bytes)>> =
        const { std::cell::RefCell::new(None) };
}

/// The answer's JSON for `token` with `expires_in`: built once per token (prefix and suffix)
/// and once per second per worker thread (the whole), never per request.
fn answer_body(token: &CachedToken, expires_in: u64) -> Bytes {
    LAST_ANSWER.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((id, seconds, body)) = last.as_ref()
            && *id == token.id
            && *seconds == expires_in
        {
            return body.clone();
        }
        let (prefix, suffix) = token.answer_parts();
        // The token leaves the broker here, in the response body and nowhere else.
        let prefix = prefix.expose_secret();
        let mut body = Vec::with_capacity(prefix.len() + 20 + suffix.len());
        body.extend_from_slice(prefix);
        body.extend_from_slice(itoa::Buffer::new().format(expires_in).as_bytes());
        body.extend_from_slice(suffix);
        let body = Bytes::from(body);
        *last = Some((token.id, expires_in, body.clone()));
        body
    })
}

/// The `scope` parameters of the query and of a POST form, as a scope list; `None` when absent
/// or empty. Repeated parameters are joined, as are the comma-joined values the Functions host
/// makes of them.
fn requested_scopes(query: Option<&str>, form: &[u8]) -> Result<Option<Vec<ScopeToken>>, ApiError> {
    // Most requests name no scope: nothing to parse when the word is not there at all.
    if form.is_empty() && query.is_none_or(|query| !query.contains("scope")) {
        return Ok(None);
    }
    let query = query.unwrap_or_default().as_bytes();
    let mut scopes = Vec::new();
    let mut length = 0;
    let parameters = url::form_urlencoded::parse(query).chain(url::form_urlencoded::parse(form));
    for (name, value) in parameters {
        if name != "scope" {
            continue;
        }
        length += value.len();
        if length > MAX_SCOPE_PARAMETER {
            return Err(ApiError::InvalidRequest(format!(
                "the scope parameter is longer than {MAX_SCOPE_PARAMETER} bytes"
            )));
        }
        for scope in value.split([' ', ',']).filter(|s| !s.is_empty()) {
            let scope = ScopeToken::parse(scope).ok_or_else(|| {
                ApiError::InvalidRequest(
                    "the scope parameter holds a character RFC 6749 does not allow in a scope"
                        .to_string(),
                )
            })?;
            scopes.push(scope);
        }
    }
    if scopes.len() > MAX_SCOPES {
        return Err(ApiError::InvalidRequest(format!(
            "at most {MAX_SCOPES} scopes may be requested"
        )));
    }
    Ok((!scopes.is_empty()).then_some(scopes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_route_prefix_is_case_insensitive() {
        assert_eq!(token_route("/api/token/contoso"), Some("contoso"));
        assert_eq!(token_route("/API/Token/Contoso"), Some("Contoso"));
        assert_eq!(token_route("/api/token/contoso/"), Some("contoso"));
        assert_eq!(token_route("/api/tokens/contoso"), None);
        assert_eq!(token_route("/api/token"), None);
    }

    #[test]
    fn traversal_is_just_an_invalid_name() {
        let name = token_route("/api/token/../../secrets").unwrap();
        assert!(crate::config::ConnectionName::parse(name).is_none());
    }

    #[test]
    fn scopes_are_split_on_spaces_and_host_commas() {
        let scopes = requested_scopes(Some("scope=a%20b&code=key&scope=c,d"), b"").unwrap();
        let scopes: Vec<String> = scopes.unwrap().iter().map(|s| s.to_string()).collect();
        assert_eq!(scopes, ["a", "b", "c", "d"]);
        assert_eq!(requested_scopes(Some("scope="), b"").unwrap(), None);
        assert_eq!(requested_scopes(None, b"").unwrap(), None);
        assert!(requested_scopes(Some("scope=a%22b"), b"").is_err());
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_with_a_json_500() {
        let response =
            answer_even_on_panic(async { panic!("a bug in a handler") }, tracing::Span::none).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "internal_error");
        assert!(body["error_description"].as_str().unwrap().contains("bug"));
    }

    #[test]
    fn a_form_body_scope_counts_like_the_query_scope() {
        let text = |scopes: Vec<ScopeToken>| -> Vec<String> {
            scopes.iter().map(|s| s.to_string()).collect()
        };
        let scopes = requested_scopes(None, b"grant_type=client_credentials&scope=read+write");
        assert_eq!(text(scopes.unwrap().unwrap()), ["read", "write"]);
        let both = requested_scopes(Some("scope=a"), b"scope=b")
            .unwrap()
            .unwrap();
        assert_eq!(text(both), ["a", "b"]);
        assert!(requested_scopes(None, b"scope=a%22b").is_err());
    }
}
