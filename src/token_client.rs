//! The client-credentials exchange with a connection's token endpoint.
//!
//! oauth2 builds the request (form body, RFC 6749 §2.3.1 Basic encoding) and parses the answer;
//! the HTTP transport is the broker's one reqwest client, handed to oauth2 as a closure so that
//! there is a single HTTP stack in the binary. The closure also catches what oauth2 cannot
//! classify on its own: throttling, server errors and timeouts, with their `Retry-After`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::http::{HeaderMap, StatusCode, header};
use oauth2::{
    AsyncHttpClient, AuthType, ClientId, ClientSecret as OAuthClientSecret, EndpointNotSet,
    EndpointSet, HttpRequest, HttpResponse, RequestTokenError, Scope, StandardRevocableToken,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AuthMethod, ConnectionSettings};
use crate::http_client::LazyClient;
use crate::secret_source::{ClientSecret, SecretError, SecretStore};
use crate::token_cache::{CacheKey, TokenSource};
use crate::token_response::BrokerTokenResponse;
use crate::upstream_guard::{GuardSettings, Refusal, UpstreamGuard};

/// Largest token-endpoint answer the broker reads; real ones are a few KiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

type OAuthClient = oauth2::Client<
    OAuthErrorBody,
    BrokerTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A token as the token endpoint issued it.
pub struct FreshToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub lifetime: Duration,
    pub refresh_in: Option<Duration>,
    /// The granted scope when the server said, else the requested one (RFC 6749 §5.1).
    pub scope: Option<String>,
}

/// Why no token could be obtained. Every message names the connection and the step, and
/// none carries a secret, a token or the upstream's raw body.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown connection '{0}'")]
    UnknownConnection(String),
    #[error(
        "the token endpoint of connection '{connection}' rejected the request with '{code}'{}",
        if *remembered { " (a recent answer, repeated without asking again)" } else { "" }
    )]
    Rejected {
        connection: String,
        code: String,
        /// The answer came from the negative cache, not from a new request.
        remembered: bool,
    },
    #[error("the token endpoint of connection '{connection}' is unavailable: {detail}")]
    Unavailable {
        connection: String,
        detail: String,
        retry_after: Option<Duration>,
    },
    #[error("the client secret of connection '{connection}' could not be read: {source}")]
    Secret {
        connection: String,
        #[source]
        source: SecretError,
    },
}

/// Performs token requests for the configured connections.
pub struct TokenClient {
    secrets: Arc<SecretStore>,
    /// Connections by lower-cased name, as in `Settings`, each with its own HTTP client and
    /// guard so that one identity provider's trouble stays its own.
    upstreams: BTreeMap<String, Upstream>,
}

struct Upstream {
    connection: ConnectionSettings,
    http: LazyClient,
    guard: UpstreamGuard,
}

/// Longest `Retry-After` the broker waits out itself before retrying; beyond it the caller
/// gets the 503 with the hint instead of a long wait.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
/// Full-jitter backoff: a random wait up to `BACKOFF_BASE * 2^attempt`, at most `BACKOFF_CAP`.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

impl TokenClient {
    pub fn new(
        secrets: Arc<SecretStore>,
        connections: &BTreeMap<String, ConnectionSettings>,
    ) -> Self {
        let mut upstreams = BTreeMap::new();
        for (key, connection) in connections {
            let guard = UpstreamGuard::new(GuardSettings {
                breaker_failures: connection.breaker_failures,
                breaker_open: connection.breaker_open,
                negative_cache: connection.negative_cache,
            });
            let upstream = Upstream {
                http: LazyClient::new(connection.connect_timeout),
                connection: connection.clone(),
                guard,
            };
            upstreams.insert(key.clone(), upstream);
        }
        Self { secrets, upstreams }
    }

    /// A rotation event named `connection` (lower-cased name): a rejection remembered by its
    /// negative cache no longer holds, so the repaired secret is tried at the next request.
    pub fn connection_rotated(&self, connection: &str) {
        if let Some(upstream) = self.upstreams.get(connection) {
            upstream.guard.clear_rejection();
        }
    }

    /// A token for the connection with `scopes`, within the connection's deadline; every
    /// outcome is reported to the connection's guard.
    async fn fetch_within_deadline(
        &self,
        upstream: &Upstream,
        scopes: &[String],
    ) -> Result<FreshToken, TokenError> {
        let connection = &upstream.connection;
        if let Err(refusal) = upstream.guard.admit() {
            return Err(refusal_error(connection, refusal));
        }
        let outcome =
            match tokio::time::timeout(connection.deadline, self.request_token(upstream, scopes))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(TokenError::Unavailable {
                    connection: connection.name.clone(),
                    detail: format!(
                        "no token within the {}s deadline",
                        connection.deadline.as_secs()
                    ),
                    retry_after: None,
                }),
            };
        let guard = &upstream.guard;
        match &outcome {
            Ok(_) => guard.record_success(),
            Err(TokenError::Unavailable { .. }) => {
                guard.record_unavailable();
            }
            Err(TokenError::Rejected { code, .. })
                if code == "invalid_client" || code == "unauthorized_client" =>
            {
                guard.record_rejected(code)
            }
            Err(_) => guard.record_answered(),
        }
        outcome
    }

    /// A token for `connection` with `scopes`. When the token endpoint refuses the client
    /// secret, Key Vault is read again and one other version (rotated or previous) is tried,
    /// so a rotation never surfaces as an error to callers.
    async fn request_token(
        &self,
        upstream: &Upstream,
        scopes: &[String],
    ) -> Result<FreshToken, TokenError> {
        let connection = &upstream.connection;
        let secret_error = |source| TokenError::Secret {
            connection: connection.name.clone(),
            source,
        };
        let secret = self
            .secrets
            .client_secret(&connection.client_secret)
            .await
            .map_err(secret_error)?;
        let first = self.exchange_with_retries(upstream, scopes, &secret).await;
        let rejection = match first {
            Err(Failure::Rejected(body)) if body.means_bad_secret() => body,
            other => return other.map_err(|failure| failure.into_error(connection)),
        };
        let Some(alternative) = self
            .secrets
            .after_rejection(&connection.client_secret, &secret)
            .await
        else {
            return Err(Failure::Rejected(rejection).into_error(connection));
        };
        tracing::info!(
            connection = %connection.name,
            rejected_version = secret.version.as_deref().unwrap_or("unknown"),
            trying_version = alternative.version.as_deref().unwrap_or("unknown"),
            "client secret refused; retrying once with another version"
        );
        self.exchange_with_retries(upstream, scopes, &alternative)
            .await
            .map_err(|failure| failure.into_error(connection))
    }

    /// Exchanges, retrying connection errors, timeouts, 5xx and 429 with exponential backoff
    /// and full jitter (honouring `Retry-After`), while the retry budget allows.
    async fn exchange_with_retries(
        &self,
        upstream: &Upstream,
        scopes: &[String],
        secret: &ClientSecret,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        let mut attempt = 0;
        loop {
            let failure = match self.exchange(upstream, scopes, secret).await {
                Err(failure @ Failure::Unavailable { .. }) => failure,
                other => return other,
            };
            let Failure::Unavailable { retry_after, .. } = &failure else {
                return Err(failure);
            };
            let backoff = full_jitter(attempt);
            let wait = retry_after.map_or(backoff, |hint| hint.max(backoff));
            if attempt >= connection.max_retries
                || wait > MAX_RETRY_WAIT
                || !upstream.guard.take_retry()
            {
                return Err(failure);
            }
            attempt += 1;
            tracing::info!(
                connection = %connection.name,
                attempt,
                wait_ms = wait.as_millis() as u64,
                "retrying the token request"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One client-credentials exchange with one secret.
    async fn exchange(
        &self,
        upstream: &Upstream,
        scopes: &[String],
        secret: &ClientSecret,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        let started = tokio::time::Instant::now();
        let client: OAuthClient = oauth2::Client::new(ClientId::new(connection.client_id.clone()))
            // The only place the secret is exposed: oauth2 encodes it into the request.
            .set_client_secret(OAuthClientSecret::new(
                secret.value.expose_secret().to_string(),
            ))
            .set_token_uri(TokenUrl::from_url(connection.token_url.clone()))
            .set_auth_type(match connection.auth_method {
                AuthMethod::ClientSecretBasic => AuthType::BasicAuth,
                AuthMethod::ClientSecretPost => AuthType::RequestBody,
            });
        let mut request = client
            .exchange_client_credentials()
            .add_scopes(scopes.iter().cloned().map(Scope::new));
        if let Some(audience) = &connection.audience {
            request = request.add_extra_param("audience", audience.clone());
        }
        if let Some(resource) = &connection.resource {
            request = request.add_extra_param("resource", resource.clone());
        }
        for (name, value) in &connection.extra_params {
            request = request.add_extra_param(name.clone(), value.clone());
        }
        let http = upstream.http.get().map_err(|detail| Failure::Unavailable {
            detail: detail.to_string(),
            retry_after: None,
        })?;
        let transport = OAuthTransport {
            http,
            timeout: connection.timeout,
        };
        let result = request.request_async(&transport).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(response) => {
                tracing::info!(connection = %connection.name, elapsed_ms, "token endpoint issued a token");
                Ok(fresh_token(response, connection, scopes))
            }
            Err(error) => {
                let failure = classify(connection, error);
                tracing::warn!(connection = %connection.name, elapsed_ms, reason = %failure, "token request failed");
                Err(failure)
            }
        }
    }
}

impl TokenSource for TokenClient {
    fn fetch(self: Arc<Self>, key: CacheKey) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        Box::pin(async move {
            let upstream = self
                .upstreams
                .get(key.connection())
                .ok_or_else(|| TokenError::UnknownConnection(key.connection().to_string()))?;
            self.fetch_within_deadline(upstream, key.scopes()).await
        })
    }
}

fn fresh_token(
    response: BrokerTokenResponse,
    connection: &ConnectionSettings,
    scopes: &[String],
) -> FreshToken {
    let scope = response
        .granted_scope()
        .map(str::to_string)
        .or_else(|| (!scopes.is_empty()).then(|| scopes.join(" ")));
    FreshToken {
        access_token: SecretString::from(response.access_token().secret().as_str()),
        // RFC 6750 spells it "Bearer"; callers paste this into an Authorization header.
        token_type: match response.token_type() {
            BasicTokenType::Bearer => "Bearer".to_string(),
            BasicTokenType::Mac => "MAC".to_string(),
            BasicTokenType::Extension(other) => other.clone(),
        },
        lifetime: response
            .expires_in()
            .filter(|lifetime| !lifetime.is_zero())
            .unwrap_or(connection.default_lifetime),
        refresh_in: response.refresh_in(),
        scope,
    }
}

/// What went wrong on the wire, before oauth2 looked at the body.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed")]
    Connect,
    #[error("HTTP {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    #[error("answer larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("request failed")]
    Other,
}

/// oauth2's view of the broker's HTTP client, with the connection's time bound.
struct OAuthTransport<'a> {
    http: &'a reqwest::Client,
    timeout: Duration,
}

impl<'c> AsyncHttpClient<'c> for OAuthTransport<'_> {
    type Error = TransportError;
    type Future = BoxFuture<'c, Result<HttpResponse, TransportError>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(self.http, request, self.timeout))
    }
}

/// Sends one oauth2-built request through the shared reqwest client.
async fn send(
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
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(TransportError::Status {
            status,
            retry_after: retry_after(response.headers()),
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| transport_error(&error, timeout))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(TransportError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let mut answer = HttpResponse::new(body);
    *answer.status_mut() = status;
    *answer.headers_mut() = response.headers().clone();
    Ok(answer)
}

fn transport_error(error: &reqwest::Error, timeout: Duration) -> TransportError {
    if error.is_timeout() {
        TransportError::Timeout(timeout)
    } else if error.is_connect() {
        TransportError::Connect
    } else {
        TransportError::Other
    }
}

/// `Retry-After` in delay-seconds form; the HTTP-date form is rare from token endpoints and
/// is treated as unknown.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// A random wait in `[0, min(cap, base * 2^attempt))`: "full jitter", so that callers that
/// failed together do not retry together.
fn full_jitter(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(10))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::random_range(0.0..1.0))
}

/// The error for a call the guard refused without asking the identity provider.
fn refusal_error(connection: &ConnectionSettings, refusal: Refusal) -> TokenError {
    match refusal {
        Refusal::CircuitOpen { retry_after } => TokenError::Unavailable {
            connection: connection.name.clone(),
            detail: "it failed repeatedly, so calls fail fast for a while (circuit open)"
                .to_string(),
            retry_after: Some(retry_after),
        },
        Refusal::RecentlyRejected { code, .. } => TokenError::Rejected {
            connection: connection.name.clone(),
            code,
            remembered: true,
        },
    }
}

/// An OAuth error answer (RFC 6749 §5.2) with Entra's `error_codes`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct OAuthErrorBody {
    error: String,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u64>,
}

impl std::fmt::Display for OAuthErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&oauth_error_code(&self.error))
    }
}

impl oauth2::ErrorResponse for OAuthErrorBody {}

/// Entra's codes for an invalid (7000215) and an expired (7000222) client secret.
const ENTRA_BAD_SECRET_CODES: &[u64] = &[7000215, 7000222];

impl OAuthErrorBody {
    /// Whether a different client secret might succeed.
    fn means_bad_secret(&self) -> bool {
        self.error == "invalid_client"
            || self
                .error_codes
                .iter()
                .any(|code| ENTRA_BAD_SECRET_CODES.contains(code))
    }
}

/// One failed exchange, before it becomes a `TokenError`.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("rejected with '{0}'")]
    Rejected(OAuthErrorBody),
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl Failure {
    fn into_error(self, connection: &ConnectionSettings) -> TokenError {
        match self {
            Failure::Rejected(body) => TokenError::Rejected {
                connection: connection.name.clone(),
                code: oauth_error_code(&body.error),
                remembered: false,
            },
            Failure::Unavailable {
                detail,
                retry_after,
            } => TokenError::Unavailable {
                connection: connection.name.clone(),
                detail,
                retry_after,
            },
        }
    }
}

fn classify(
    connection: &ConnectionSettings,
    error: RequestTokenError<TransportError, OAuthErrorBody>,
) -> Failure {
    let unavailable = |detail: String, retry_after| Failure::Unavailable {
        detail,
        retry_after,
    };
    match error {
        RequestTokenError::ServerResponse(body) => {
            if let Some(description) = &body.error_description {
                // The IdP's own words help the operator (Entra puts AADSTS codes here); they
                // go to the log, trimmed, and never to the caller.
                tracing::warn!(
                    connection = %connection.name,
                    upstream_description = %printable_prefix(description, 300),
                    "token endpoint error description"
                );
            }
            Failure::Rejected(body)
        }
        RequestTokenError::Request(TransportError::Status {
            status,
            retry_after,
        }) => unavailable(format!("it answered HTTP {}", status.as_u16()), retry_after),
        RequestTokenError::Request(transport) => unavailable(transport.to_string(), None),
        RequestTokenError::Parse(_, _) => unavailable(
            "its answer is not a valid OAuth token response".to_string(),
            None,
        ),
        RequestTokenError::Other(_) => {
            unavailable("it answered with an empty error".to_string(), None)
        }
    }
}

/// An upstream error code as the broker repeats it: RFC 6749 restricts codes to printable
/// ASCII without `"` and `\`; anything else is replaced so it cannot smuggle text into logs
/// or the caller's JSON.
fn oauth_error_code(code: &str) -> String {
    let valid = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| (0x20..=0x7E).contains(&b) && b != b'"' && b != b'\\');
    if valid {
        code.to_string()
    } else {
        "unrecognised_error".to_string()
    }
}

fn printable_prefix(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_client_and_entra_secret_codes_mean_a_bad_secret() {
        let parse = |body: &str| serde_json::from_str::<OAuthErrorBody>(body).unwrap();
        assert!(parse(r#"{"error":"invalid_client"}"#).means_bad_secret());
        assert!(
            parse(r#"{"error":"unauthorized_client","error_codes":[7000222]}"#).means_bad_secret()
        );
        assert!(!parse(r#"{"error":"invalid_scope","error_codes":[70011]}"#).means_bad_secret());
    }

    #[test]
    fn upstream_error_codes_are_passed_only_when_well_formed() {
        assert_eq!(oauth_error_code("invalid_client"), "invalid_client");
        assert_eq!(oauth_error_code("bad\"code"), "unrecognised_error");
        assert_eq!(oauth_error_code("line\nbreak"), "unrecognised_error");
        assert_eq!(oauth_error_code(&"x".repeat(65)), "unrecognised_error");
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
