//! The HTTP API, as the Azure Functions host forwards it: `GET /` for readiness,
//! `GET|POST /api/token/{connection}` for tokens, `POST /api/token/{connection}/invalidate`
//! to drop a token a backend refused, `GET /api/health` for operators (see
//! `health`). Everything else is a JSON 404.
//!
//! The token route is matched by hand rather than by axum's router because the host matches
//! routes case-insensitively (`/API/Token/x` reaches us as the client typed it) and because an
//! unknown or malformed connection name must be a plain `unknown_connection`, never a 5xx.

mod invalidate;
mod label;
mod limits;
mod token;

use invalidate::{invalidate_request, invalidation_route};
use label::{exported_span, invocation_id, request_span};
use limits::{HeadFacts, check_limits, discard, expects_continue, read_body, refused};
use token::{hit_now, token_request, token_route};

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, Request, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::{self, BoxFuture, Either};
use serde::Serialize;
use tracing::Instrument;

use crate::app_state::AppState;
use crate::cache::panic_message;
use crate::error::ApiError;
use crate::health;
use crate::observe::stats::Registry;
use crate::rotation;

/// The broker as one HTTP service: every request goes to [`traced`].
///
/// Not an axum `Router`: the routes are matched by hand (above), so a router would only add
/// its per-request work (cloning its boxed service, recording path parameters, wrapping the
/// handler), which measured about a tenth of a cache hit's cost (BENCHMARKS.md).
#[derive(Clone)]
pub(crate) struct BrokerService {
    // One `Arc` for the whole state: it is cloned for every request, and one reference count
    // is one cache line shared by the workers, where the fields' own counts would be eight.
    state: Arc<AppState>,
}

/// The broker's service over `state`: what `startup` hands to `axum::serve`.
pub(crate) fn service(state: AppState) -> BrokerService {
    BrokerService {
        state: Arc::new(state),
    }
}

impl tower_service::Service<Request<Body>> for BrokerService {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        future::Ready<Result<Response, Infallible>>,
        BoxFuture<'static, Result<Response, Infallible>>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The request is taken apart here, not inside the future: a future holds its
        // arguments and its locals side by side, and it is allocated for every request.
        let (parts, body) = request.into_parts();
        // A cache hit has nothing to wait for: it is answered here, without the allocated
        // future, its panic guard and its span, which cost a hit about a tenth of its work
        // (BENCHMARKS.md, "Counted"). Anything else takes the full path below.
        // At DEBUG every request gets its span and "finished" line: the full path writes them.
        // So does every request whose trace is exported (OpenTelemetry): a span each. That is
        // checked first: `enabled!` under per-layer filters leaves the exporter's "not
        // interested" on the thread for the next span, and would hide the request's span from it.
        let fast = self.state.observers.otel.is_none() && !tracing::enabled!(tracing::Level::DEBUG);
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            fast.then(|| hit_now(&self.state, &parts)).flatten()
        })) {
            Ok(Some(response)) => {
                let stats = &self.state.observers.stats;
                stats.record_response(response.status().as_u16(), None);
                Either::Left(future::ready(Ok(response)))
            }
            Ok(None) => Either::Right(Box::pin(traced(self.state.clone(), parts, body))),
            Err(panic) => {
                let head = HeadFacts::scan(&parts.headers);
                let span = || request_span(&parts, invocation_id(head.invocation));
                let error = panicked(panic.as_ref(), span());
                let stats = &self.state.observers.stats;
                Either::Left(future::ready(Ok(finish(Err(error), stats, &parts, span))))
            }
        }
    }
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
    let request_span = || request_span(&parts, invocation);
    let exported = state
        .observers
        .otel
        .as_ref()
        .is_some_and(|otel| otel.traces());
    let span = if exported {
        exported_span(&parts, invocation, route_template(parts.uri.path()))
    } else if tracing::enabled!(tracing::Level::DEBUG) {
        request_span()
    } else {
        tracing::Span::none()
    };
    let debug = !span.is_none();
    let started = debug.then(tokio::time::Instant::now);
    let handler = dispatch(state, &parts, &head, body, invocation).instrument(span.clone());
    let span_made = || {
        if span.is_none() {
            request_span()
        } else {
            span.clone()
        }
    };
    let outcome = answer_even_on_panic(handler, span_made).await;
    let response = finish(outcome, &state.observers.stats, &parts, span_made);
    if exported {
        exported_answer(state, &parts, &span, response.status().as_u16());
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

/// A handler's outcome as the answer sent: counted (but for the host's readiness probes of
/// `/`, every 25 ms at start and then its health pings, which no one asked for), and an
/// error's line written in the request's span, from the error itself.
fn finish(
    outcome: Result<Response, ApiError>,
    stats: &Registry,
    parts: &Parts,
    span: impl FnOnce() -> tracing::Span,
) -> Response {
    let counted = parts.uri.path() != "/";
    match outcome {
        Ok(response) => {
            if counted {
                stats.record_response(response.status().as_u16(), None);
            }
            response
        }
        Err(error) => {
            if counted {
                stats.record_response(error.status().as_u16(), Some(error.code()));
            }
            let span = span();
            let _entered = span.enter();
            error.log();
            error.into_response()
        }
    }
}

/// The route template of `path`, as OpenTelemetry's `http.route` names it.
fn route_template(path: &str) -> &'static str {
    match token_route(path) {
        Some(rest) if invalidation_route(rest).is_some() => "/api/token/{connection}/invalidate",
        Some(_) => "/api/token/{connection}",
        None if path.eq_ignore_ascii_case(crate::health::PATH) => crate::health::PATH,
        None if path.eq_ignore_ascii_case(crate::rotation::PATH) => crate::rotation::PATH,
        None if path == "/" => "/",
        None => "other",
    }
}

/// An answer as OpenTelemetry sees it: the request span's status, and the request counted
/// by route, connection and status.
fn exported_answer(state: &AppState, parts: &Parts, span: &tracing::Span, status: u16) {
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    if let Some(otel) = &state.observers.otel {
        let path = parts.uri.path();
        let connection = token_route(path)
            .map(|rest| invalidation_route(rest).unwrap_or(rest))
            .and_then(|name| state.connection(name))
            .map(|(_, served)| served.settings.name.as_str());
        otel.request(route_template(path), connection, status);
    }
}

/// A panic anywhere in a request is a bug, but the caller still gets the documented JSON
/// answer (500 `internal_error`) instead of a dropped connection, and the worker lives on.
///
/// Not an `async fn`: one would hold `handler` twice (as its argument, and inside the
/// unwind-catching future), and this future is allocated for every request.
fn answer_even_on_panic(
    handler: impl std::future::Future<Output = Result<Response, ApiError>>,
    span: impl FnOnce() -> tracing::Span,
) -> impl std::future::Future<Output = Result<Response, ApiError>> {
    AssertUnwindSafe(handler)
        .catch_unwind()
        .map(move |outcome| outcome.unwrap_or_else(|panic| Err(panicked(panic.as_ref(), span()))))
}

/// The error answering a request whose handler panicked, the panic logged in the request's
/// span.
fn panicked(panic: &(dyn std::any::Any + Send), span: tracing::Span) -> ApiError {
    let _entered = span.enter();
    tracing::error!(panic = panic_message(panic), "request handler panicked");
    ApiError::Internal(
        "the broker failed unexpectedly on this request (a bug; its log has the details)"
            .to_string(),
    )
}

async fn dispatch(
    state: &AppState,
    parts: &Parts,
    head: &HeadFacts<'_>,
    body: Body,
    invocation_id: &str,
) -> Result<Response, ApiError> {
    if let Err(error) = check_limits(parts, head) {
        // Whatever the limit, a body still arriving is read away first; but a client that
        // waits for `100 Continue` has sent nothing yet, and reading would invite it to.
        let drained = !expects_continue(&parts.headers)
            && Box::pin(discard(body, head.content_length, 0)).await;
        return Err(refused(error, drained));
    }
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    // Token requests first: nearly every request is one.
    if let Some(connection) = token_route(uri.path()) {
        if let Some(connection) = invalidation_route(connection) {
            if method != Method::POST {
                return Err(ApiError::MethodNotAllowed("POST"));
            }
            return Box::pin(invalidate_request(
                state,
                connection,
                parts,
                head.callers,
                body,
                invocation_id,
            ))
            .await;
        }
        if method != Method::GET && method != Method::POST {
            return Err(ApiError::MethodNotAllowed("GET, POST"));
        }
        return token_request(state, connection, parts, head.callers, body, invocation_id).await;
    }
    if uri.path() == "/" {
        // The host polls `/` every 25 ms until it answers; nothing here may wait.
        return Ok((
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(Ready { status: "ready" }),
        )
            .into_response());
    }
    if uri.path().eq_ignore_ascii_case(rotation::PATH) {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed("POST"));
        }
        // Rare paths are boxed: their state would otherwise make every request's future
        // (allocated per request) as large as the largest of them.
        let bytes = Box::pin(read_body(body, headers)).await?;
        return Box::pin(rotation::handle(state, &bytes)).await;
    }
    if uri.path().eq_ignore_ascii_case(health::PATH) {
        if method != Method::GET {
            return Err(ApiError::MethodNotAllowed("GET"));
        }
        return Ok(health::answer(state));
    }
    Err(ApiError::NotFound)
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
}

#[cfg(test)]
mod tests;
