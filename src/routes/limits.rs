//! What a request may carry, checked before any work is done: URI, headers and body sizes,
//! and a refused body read away (within bounds) so that its 413 arrives intact.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use futures_util::StreamExt;

use crate::caller_check::{self, CallerHeaders};
use crate::error::ApiError;

/// The host's invocation id header, which the broker's log lines carry.
pub(super) static INVOCATION_ID: HeaderName =
    HeaderName::from_static("x-azure-functions-invocationid");

/// Longest path and query accepted (the host and front ends allow more; tokens need less).
pub(super) const MAX_URI: usize = 4096;

/// Most header bytes accepted, names and values together.
pub(super) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Largest body accepted: token requests need none, Key Vault events are a few hundred bytes.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest body read (and thrown away) so that its 413 can be read: a client, or the Functions
/// host's HTTP client in front of the broker, that is still sending when the answer comes sees
/// a reset instead of the answer if the connection closes under it. A body declared or found
/// larger gets its 413 at once with `Connection: close`.
pub(crate) const MAX_DRAINED_BYTES: u64 = 8 * 1024 * 1024;

/// Longest the rest of a refused body is read for: a client that trickles costs no more.
pub(super) const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The body, at most [`MAX_BODY_BYTES`]; past that, the 413 (after reading the rest away, see
/// [`discard`]).
pub(super) async fn read_body(body: Body, headers: &HeaderMap) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return Err(ApiError::InvalidRequest(
                "the request body ended before it was complete".to_string(),
            ));
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
pub(super) async fn discard(body: Body, declared: Option<u64>, seen: u64) -> bool {
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

/// A refusal made before the body was read: when the body was not all read away (`drained`),
/// the connection ends with the answer (the unread rest cannot be told from the next request).
pub(super) fn refused(mut error: ApiError, drained: bool) -> ApiError {
    debug_assert!(
        matches!(error, ApiError::TooLarge { .. }),
        "only a request too large is refused before its body is read"
    );
    if let ApiError::TooLarge { unread_body, .. } = &mut error {
        *unread_body = !drained;
    }
    error
}

pub(super) fn body_too_large() -> ApiError {
    ApiError::TooLarge {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        what: "the request body is larger than the broker accepts (64 KiB)",
        unread_body: false,
    }
}

pub(super) fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// What the broker reads from a request's headers, found in one pass over them rather than a
/// hashed look-up for each.
pub(super) struct HeadFacts<'a> {
    /// Names and values together, with the separators a request line carries.
    pub(super) bytes: usize,
    pub(super) content_length: Option<u64>,
    pub(super) invocation: Option<&'a HeaderValue>,
    /// What the caller check reads: it gets these values, never the whole map.
    pub(super) callers: CallerHeaders<'a>,
}

static CLIENT_PRINCIPAL: HeaderName = HeaderName::from_static(caller_check::CLIENT_PRINCIPAL);
static CLIENT_PRINCIPAL_ID: HeaderName = HeaderName::from_static(caller_check::CLIENT_PRINCIPAL_ID);

impl<'a> HeadFacts<'a> {
    pub(super) fn scan(headers: &'a HeaderMap) -> Self {
        let mut facts = Self {
            bytes: 0,
            content_length: None,
            invocation: None,
            callers: CallerHeaders::default(),
        };
        for (name, value) in headers {
            facts.bytes += name.as_str().len() + value.len() + 4;
            if name == header::CONTENT_LENGTH {
                facts.content_length = value.to_str().ok().and_then(|v| v.parse().ok());
            } else if name == INVOCATION_ID {
                facts.invocation.get_or_insert(value);
            } else if name == header::AUTHORIZATION {
                facts.callers.authorization.get_or_insert(value);
            } else if name == CLIENT_PRINCIPAL {
                facts.callers.client_principal.get_or_insert(value);
            } else if name == CLIENT_PRINCIPAL_ID {
                facts.callers.client_principal_id.get_or_insert(value);
            }
        }
        facts
    }
}

/// Refuses requests larger than a token request can need, before any work is done.
pub(super) fn check_limits(request: &Parts, head: &HeadFacts<'_>) -> Result<(), ApiError> {
    let uri_length = request
        .uri
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_length > MAX_URI {
        return Err(ApiError::TooLarge {
            status: StatusCode::URI_TOO_LONG,
            what: "the request URI is longer than the broker accepts (4096 bytes)",
            unread_body: false,
        });
    }
    if head.bytes > MAX_HEADER_BYTES {
        return Err(ApiError::TooLarge {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            what: "the request headers are larger than the broker accepts (16 KiB)",
            unread_body: false,
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
