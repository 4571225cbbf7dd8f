//! The token request on the wire: one HTTP stack (reqwest), bounded answers, and what went wrong before oauth2 read the body.

use super::oauth_error::OAuthErrorBody;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use oauth2::http::{HeaderMap, StatusCode, header};
use oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};

/// Largest token-endpoint answer the broker reads; real ones are a few KiB.
pub(super) const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Largest error answer the broker reads for its OAuth error code; the rest is not read.
pub(super) const MAX_ERROR_BYTES: usize = 16 * 1024;

/// What went wrong on the wire, before oauth2 looked at the body.
#[derive(Debug, thiserror::Error)]
pub(super) enum TransportError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed")]
    Connect,
    /// Any status but 200: oauth2 never sees these, so the status decides, not the body.
    #[error("HTTP {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        /// The body as an OAuth error, when it is one.
        error: Option<OAuthErrorBody>,
    },
    #[error("answer larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// The server's TLS layer refused the client certificate (mutual TLS), with this alert.
    #[error("the TLS handshake refused the client certificate (alert {0})")]
    CertificateRefused(String),
    #[error("request failed")]
    Other,
}

/// oauth2's view of the broker's HTTP client, with the connection's time bound.
pub(super) struct OAuthTransport<'a> {
    pub(super) http: &'a reqwest::Client,
    pub(super) timeout: Duration,
}

impl<'c> AsyncHttpClient<'c> for OAuthTransport<'_> {
    type Error = TransportError;
    type Future = BoxFuture<'c, Result<HttpResponse, TransportError>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(self.http, request, self.timeout))
    }
}

/// Sends one oauth2-built request through the shared reqwest client. Only a 200 goes on to
/// oauth2 for parsing; any other status becomes `TransportError::Status` with the OAuth error
/// in its body, if any, read within `MAX_ERROR_BYTES`.
pub(super) async fn send(
    http: &reqwest::Client,
    request: HttpRequest,
    timeout: Duration,
) -> Result<HttpResponse, TransportError> {
    let mut request = reqwest::Request::try_from(request).map_err(|_| TransportError::Other)?;
    *request.timeout_mut() = Some(timeout);
    let mut response = http
        .execute(request)
        .await
        .map_err(|error| transport_error(&error, timeout))?;
    let status = response.status();
    if status != StatusCode::OK {
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let error = if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
            read_bounded(&mut response, MAX_ERROR_BYTES, timeout)
                .await
                .ok()
                .and_then(|body| serde_json::from_slice::<OAuthErrorBody>(&body).ok())
        } else {
            None
        };
        return Err(TransportError::Status {
            status,
            retry_after,
            error,
        });
    }
    let body = read_bounded(&mut response, MAX_RESPONSE_BYTES, timeout).await?;
    let mut answer = HttpResponse::new(body);
    *answer.status_mut() = status;
    *answer.headers_mut() = response.headers().clone();
    Ok(answer)
}

/// The body, or `TooLarge` as soon as it passes `limit` bytes (the rest is never read).
pub(super) async fn read_bounded(
    response: &mut reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| transport_error(&error, timeout))?
    {
        if body.len() + chunk.len() > limit {
            return Err(TransportError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(super) fn transport_error(error: &reqwest::Error, timeout: Duration) -> TransportError {
    if let Some(alert) = certificate_alert(error) {
        TransportError::CertificateRefused(alert)
    } else if error.is_timeout() {
        TransportError::Timeout(timeout)
    } else if error.is_connect() {
        TransportError::Connect
    } else {
        TransportError::Other
    }
}

/// The TLS alert with which a server refused the client certificate, found anywhere in the
/// error's chain (rustls' error inside hyper's I/O error: in TLS 1.3 the alert may come only
/// when the answer is read, after the handshake seemed done).
fn certificate_alert(error: &reqwest::Error) -> Option<String> {
    use rustls::AlertDescription as A;
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired),
        )) = tls
        {
            return Some(format!("{alert:?}"));
        }
        current = error.source();
    }
    None
}

/// `Retry-After` in either form RFC 9110 §10.2.3 allows: delay-seconds, or an HTTP-date
/// (a date in the past means "now").
pub(super) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}
