//! What labels a request in the broker's log lines: the host's invocation id (so that the
//! broker's lines join the host's own in Application Insights), the method and the path, cut
//! to a length fit for a log line.

use axum::http::HeaderValue;
use axum::http::request::Parts;

/// What identifies a request in its log lines: the host's invocation id (so the broker's lines
/// join the host's own in Application Insights), the method and the path; never the query
/// string, which may hold the function key (`code=`), and never a header.
pub(super) struct RequestLabel<'a> {
    pub(super) invocation_id: &'a str,
    pub(super) method: &'a str,
    pub(super) path: &'a str,
}

/// The host's invocation id header, cut to a length fit for a log line.
pub(super) fn invocation_id(invocation: Option<&HeaderValue>) -> &str {
    invocation
        .and_then(|value| value.to_str().ok())
        .map(|value| truncate(value, 64))
        .unwrap_or_default()
}

/// The span that labels a request's log lines: the host's invocation id, the method, the path.
pub(super) fn request_span(parts: &Parts, invocation: &str) -> tracing::Span {
    tracing::info_span!(
        "request",
        invocation_id = invocation,
        method = parts.method.as_str(),
        path = truncate(parts.uri.path(), 200),
    )
}

/// The span of a request whose trace is exported (OpenTelemetry): a server span named by its
/// route, continuing the caller's `traceparent`, with the request span's own fields so that
/// log lines read the same. Never the query (it may carry the function key) nor a header.
pub(super) fn exported_span(parts: &Parts, invocation: &str, route: &str) -> tracing::Span {
    let method = parts.method.as_str();
    let path = truncate(parts.uri.path(), 200);
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        invocation_id = invocation,
        method,
        path,
        http.request.method = method,
        http.route = route,
        url.path = path,
        http.response.status_code = tracing::field::Empty,
    );
    crate::observe::otel::continue_trace(&span, &parts.headers);
    span
}

pub(super) fn truncate(text: &str, max: usize) -> &str {
    // A string of at most `max` bytes has at most `max` characters: nothing to count.
    if text.len() <= max {
        return text;
    }
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}
