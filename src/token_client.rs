//! The client-credentials exchange with a connection's token endpoint.
//!
//! oauth2 builds the request (form body, RFC 6749 §2.3.1 Basic encoding) and parses the answer;
//! the HTTP transport is the broker's one reqwest client, handed to oauth2 as a closure so that
//! there is a single HTTP stack in the binary. The closure also catches what oauth2 cannot
//! classify on its own: throttling, server errors and timeouts, with their `Retry-After`.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use oauth2::basic::{BasicRevocationErrorResponse, BasicTokenIntrospectionResponse};
use oauth2::http::{HeaderMap, StatusCode, header};
use oauth2::{
    AsyncHttpClient, AuthType, ClientId, ClientSecret as OAuthClientSecret, EndpointNotSet,
    EndpointSet, HttpRequest, HttpResponse, RequestTokenError, Scope, StandardRevocableToken,
    TokenUrl,
};
use secrecy::ExposeSecret;
use tokio::time::Instant;

use crate::cache::{CacheKey, TokenSource};
use crate::config::{AuthMethod, ConnectionName, ConnectionSettings, ScopeToken};
use crate::credentials::{ClientCredential, Credentials};
use crate::http_client::LazyClient;
use crate::token::{FreshToken, TokenError};
use crate::token_response::BrokerTokenResponse;
use crate::upstream_guard::{BreakerState, GuardSettings, Refusal, Rejection, UpstreamGuard};

/// RFC 7523 §2.2's `client_assertion_type` for a JWT (or an Entra federated token).
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Largest token-endpoint answer the broker reads; real ones are a few KiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Largest error answer the broker reads for its OAuth error code; the rest is not read.
const MAX_ERROR_BYTES: usize = 16 * 1024;

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

/// Performs token requests for the configured connections.
pub struct TokenClient {
    credentials: Arc<Credentials>,
    /// Connections by lower-cased name, as in `Settings`, each with its own HTTP client and
    /// guard so that one identity provider's trouble stays its own.
    upstreams: BTreeMap<ConnectionName, Upstream>,
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
        credentials: Arc<Credentials>,
        connections: &BTreeMap<ConnectionName, ConnectionSettings>,
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
        Self {
            credentials,
            upstreams,
        }
    }

    /// A rotation event named `connection` (lower-cased name): a rejection remembered by its
    /// negative cache no longer holds, so the repaired secret is tried at the next request.
    pub fn connection_rotated(&self, connection: &str) {
        if let Some(upstream) = self.upstreams.get(connection) {
            upstream.guard.clear_rejection();
        }
    }

    /// Where `connection`'s (lower-cased name) circuit breaker stands; read-only.
    pub fn breaker(&self, connection: &str) -> Option<BreakerState> {
        self.upstreams.get(connection).map(|u| u.guard.breaker())
    }

    /// A token for the connection with `scopes`, within the connection's deadline.
    ///
    /// The credential is had (a secret read, an assertion signed) only when the guard would
    /// let the call through, but outside the guard's accounting: a Key Vault failure says
    /// nothing about the identity provider, so it neither opens nor closes the circuit (nor
    /// does a retry's assertion that cannot be signed). Every outcome of a call the guard
    /// admitted is reported to it, a deadline that runs out included; one shortened by the
    /// caller's wait for another instance (`finish_by`) is reported as telling nothing.
    async fn fetch_within_deadline(
        &self,
        upstream: &Upstream,
        scopes: &[ScopeToken],
        finish_by: Option<Instant>,
    ) -> Result<FreshToken, TokenError> {
        let connection = &upstream.connection;
        let own = Instant::now() + connection.deadline;
        let deadline = finish_by.map_or(own, |by| by.min(own));
        let shortened = deadline < own;
        let out_of_time = || TokenError::Unavailable {
            connection: connection.name.clone(),
            detail: format!(
                "no token within the {}s deadline",
                connection.deadline.as_secs()
            ),
            retry_after: None,
        };
        // The guard first: while it would refuse, no credential is made (no Key Vault read,
        // no sign). It is asked again below, since the credential takes time.
        if let Err(refusal) = upstream.guard.check() {
            return Err(refusal_error(connection, refusal));
        }
        let secret = tokio::time::timeout_at(deadline, self.credentials.credential(connection))
            .await
            .map_err(|_| out_of_time())?
            .map_err(|source| {
                tracing::warn!(connection = %connection.name, reason = %source, "client credential unavailable");
                TokenError::Secret {
                    connection: connection.name.clone(),
                    source,
                }
            })?;
        if let Err(refusal) = upstream.guard.admit() {
            return Err(refusal_error(connection, refusal));
        }
        let guard = &upstream.guard;
        // A panic past admission must still report an outcome, or a half-open circuit would
        // wait for its trial call forever; the cache turns the panic into a 500 for callers.
        let outcome = AssertUnwindSafe(within_deadline(
            deadline,
            connection.deadline.as_secs(),
            self.request_token(upstream, scopes, secret),
        ))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            guard.record_unavailable();
            std::panic::resume_unwind(panic)
        });
        match &outcome {
            Ok(_) => guard.record_success(),
            // A deadline shortened by the time the caller spent waiting for another instance
            // says nothing about the provider: the trial, if this was one, is simply released.
            Err(Failure::OutOfTime { .. } | Failure::NoRetryCredential) if shortened => {
                guard.record_neutral()
            }
            Err(Failure::OutOfTime { .. } | Failure::NoRetryCredential) => {
                guard.record_unavailable();
            }
            Err(Failure::Unavailable { retry_after, .. }) => {
                guard.record_unavailable();
                if let Some(wait) = retry_after {
                    guard.asked_to_wait(*wait);
                }
            }
            Err(Failure::Invalid { .. }) => {
                guard.record_unavailable();
            }
            Err(rejected @ Failure::Rejected { status, body }) if rejected.means_bad_secret() => {
                guard.record_rejected(Rejection {
                    status: *status,
                    code: body.as_ref().map(|body| oauth_error_code(&body.error)),
                })
            }
            Err(Failure::Rejected { .. }) => guard.record_answered(),
        }
        outcome.map_err(|failure| failure.into_error(connection))
    }

    /// A token for `connection` with `scopes`. When the token endpoint refuses the client
    /// credential (401, `invalid_client`, Entra's bad-secret codes), Key Vault is read again
    /// and one other version of the secret, key or certificate (rotated or previous) is tried,
    /// so a rotation never surfaces as an error to callers.
    async fn request_token(
        &self,
        upstream: &Upstream,
        scopes: &[ScopeToken],
        secret: ClientCredential,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        let first = self.exchange_with_retries(upstream, scopes, &secret).await;
        let rejection = match first {
            Err(rejected @ Failure::Rejected { .. }) if rejected.means_bad_secret() => rejected,
            other => return other,
        };
        let Some(alternative) = self.credentials.after_rejection(connection, &secret).await else {
            return Err(rejection);
        };
        tracing::info!(
            connection = %connection.name,
            rejected_version = secret.version().unwrap_or("unknown"),
            trying_version = alternative.version().unwrap_or("unknown"),
            "client credential refused; retrying once with another version"
        );
        self.exchange_with_retries(upstream, scopes, &alternative)
            .await
    }

    /// Exchanges, retrying connection errors, timeouts, 5xx and 429 with exponential backoff
    /// and full jitter (honouring `Retry-After`), while the retry budget allows. A rejection
    /// (3xx, 4xx) or an unusable success answer is never retried: asking again cannot help.
    ///
    /// A retry never replays a client assertion: providers treat its `jti` as single-use
    /// (RFC 7523 §3), and one that saw the first attempt would refuse the second. Each retry
    /// sends a newly signed one (a new `jti`; `iat`, `nbf` and `exp` from the moment it is
    /// signed) from the same key version. If it cannot be signed, the retry is not made.
    async fn exchange_with_retries(
        &self,
        upstream: &Upstream,
        scopes: &[ScopeToken],
        credential: &ClientCredential,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        with_retries(
            &connection.name,
            connection.max_retries,
            || upstream.guard.take_retry(),
            |attempt| async move {
                if attempt == 0 {
                    return self.exchange(upstream, scopes, credential).await;
                }
                match self.credentials.renewed(connection, credential).await {
                    Ok(None) => self.exchange(upstream, scopes, credential).await,
                    Ok(Some(renewed)) => self.exchange(upstream, scopes, &renewed).await,
                    Err(error) => {
                        tracing::warn!(connection = %connection.name, reason = %error, "the client assertion could not be signed again for a retry");
                        Err(Failure::NoRetryCredential)
                    }
                }
            },
        )
        .await
    }

    /// One client-credentials exchange with one credential.
    async fn exchange(
        &self,
        upstream: &Upstream,
        scopes: &[ScopeToken],
        credential: &ClientCredential,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        let started = Instant::now();
        let client: OAuthClient = oauth2::Client::new(ClientId::new(connection.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(connection.token_url.url().clone()));
        let client = match credential {
            // The only place a secret is exposed: oauth2 encodes it into the request.
            ClientCredential::Secret(secret) => client
                .set_client_secret(OAuthClientSecret::new(
                    secret.value.expose_secret().to_string(),
                ))
                .set_auth_type(match connection.auth_method {
                    AuthMethod::ClientSecretPost => AuthType::RequestBody,
                    _ => AuthType::BasicAuth,
                }),
            // Without a client secret, `RequestBody` puts only `client_id` in the form
            // (RFC 7523 §2.2 lets it stand beside the assertion); the assertion follows.
            ClientCredential::Assertion(_) => client.set_auth_type(AuthType::RequestBody),
        };
        let mut request = client.exchange_client_credentials().add_scopes(
            scopes
                .iter()
                .map(|scope| Scope::new(scope.as_str().to_string())),
        );
        if let ClientCredential::Assertion(assertion) = credential {
            request = request
                .add_extra_param("client_assertion_type", JWT_BEARER_ASSERTION)
                // The only place an assertion is exposed: oauth2 encodes it into the form.
                .add_extra_param(
                    "client_assertion",
                    assertion.value.expose_secret().to_string(),
                );
        }
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
            Ok(response) if !response.has_access_token() => {
                let failure = Failure::Invalid {
                    detail: "the answer's access_token is empty".to_string(),
                };
                tracing::warn!(connection = %connection.name, elapsed_ms, reason = %failure, "token request failed");
                Err(failure)
            }
            Ok(response) => {
                tracing::info!(connection = %connection.name, elapsed_ms, "token endpoint issued a token");
                Ok(response.into_fresh_token(connection.default_lifetime, scopes))
            }
            Err(error) => {
                let failure = classify(connection, error);
                tracing::warn!(connection = %connection.name, elapsed_ms, reason = %failure, "token request failed");
                Err(failure)
            }
        }
    }
}

/// The retry loop of `exchange_with_retries`, apart from the exchange it drives so that its
/// policy (what is retried, how long it waits, when it stops) can be tested with a fake
/// exchange and tokio's paused clock. `take_retry` spends one unit of the retry budget.
async fn with_retries<T, Attempt>(
    connection: &str,
    max_retries: u32,
    mut take_retry: impl FnMut() -> bool,
    mut exchange: impl FnMut(u32) -> Attempt,
) -> Result<T, Failure>
where
    Attempt: std::future::Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0;
    let mut previous = None;
    loop {
        let failure = match exchange(attempt).await {
            Err(failure @ Failure::Unavailable { .. }) => failure,
            // The retry could not be made: the answer is the last attempt's.
            Err(Failure::NoRetryCredential) if previous.is_some() => {
                return Err(previous.expect("checked"));
            }
            other => return other,
        };
        let Failure::Unavailable { retry_after, .. } = &failure else {
            return Err(failure);
        };
        let wait = retry_wait(attempt, *retry_after);
        if attempt >= max_retries || wait > MAX_RETRY_WAIT || !take_retry() {
            return Err(failure);
        }
        attempt += 1;
        previous = Some(failure);
        tracing::info!(
            connection = %connection,
            attempt,
            wait_ms = wait.as_millis() as u64,
            "retrying the token request"
        );
        tokio::time::sleep(wait).await;
    }
}

/// `outcome`, unless `deadline` passes first: then the deadline's `Unavailable`.
async fn within_deadline<T>(
    deadline: Instant,
    deadline_seconds: u64,
    outcome: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, outcome)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::OutOfTime {
                detail: format!("no token within the {deadline_seconds}s deadline"),
            })
        })
}

impl TokenSource for TokenClient {
    fn fetch(self: Arc<Self>, key: CacheKey) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        self.fetch_by(key, None)
    }

    fn fetch_by(
        self: Arc<Self>,
        key: CacheKey,
        finish_by: Option<Instant>,
    ) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        Box::pin(async move {
            let upstream = self
                .upstreams
                .get(key.connection())
                .ok_or_else(|| TokenError::UnknownConnection(key.connection().to_string()))?;
            let fetch = self.fetch_within_deadline(upstream, key.scopes(), finish_by);
            crate::stats::timed_fetch(key.connection(), fetch).await
        })
    }
}

/// What went wrong on the wire, before oauth2 looked at the body.
#[derive(Debug, thiserror::Error)]
enum TransportError {
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

/// Sends one oauth2-built request through the shared reqwest client. Only a 200 goes on to
/// oauth2 for parsing; any other status becomes `TransportError::Status` with the OAuth error
/// in its body, if any, read within `MAX_ERROR_BYTES`.
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
async fn read_bounded(
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

fn transport_error(error: &reqwest::Error, timeout: Duration) -> TransportError {
    if error.is_timeout() {
        TransportError::Timeout(timeout)
    } else if error.is_connect() {
        TransportError::Connect
    } else {
        TransportError::Other
    }
}

/// `Retry-After` in either form RFC 9110 §10.2.3 allows: delay-seconds, or an HTTP-date
/// (a date in the past means "now").
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// How long to wait before retry `attempt + 1`: the server's `Retry-After` when it gave one
/// and it is longer, else a random wait in `[0, min(cap, base * 2^attempt))` ("full jitter",
/// so that callers that failed together do not retry together).
fn retry_wait(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(10))
        .min(BACKOFF_CAP);
    let backoff = ceiling.mul_f64(rand::random_range(0.0..1.0));
    retry_after.map_or(backoff, |hint| hint.max(backoff))
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
        Refusal::AskedToWait { retry_after } => TokenError::Unavailable {
            connection: connection.name.clone(),
            detail:
                "it asked the broker to wait (Retry-After), so it is not asked again before then"
                    .to_string(),
            retry_after: Some(retry_after),
        },
        Refusal::RecentlyRejected { rejection, .. } => TokenError::Rejected {
            connection: connection.name.clone(),
            status: rejection.status,
            code: rejection.code,
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
    /// A 3xx or 4xx answer (other than 429), or an OAuth error in a 200.
    #[error("rejected with HTTP {status}{}", body.as_ref().map(|b| format!(" '{b}'")).unwrap_or_default())]
    Rejected {
        status: u16,
        body: Option<OAuthErrorBody>,
    },
    /// Unreachable, timed out, 5xx or 429: worth retrying.
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// A 200 that is not a token.
    #[error("{detail}")]
    Invalid { detail: String },
    /// The deadline passed before the exchange ended.
    #[error("{detail}")]
    OutOfTime { detail: String },
    /// A retry could not be made: its newly signed assertion could not be had. Never the
    /// outcome of a fetch (the previous attempt's failure is); says nothing of the provider.
    #[error("the client assertion could not be signed again for a retry")]
    NoRetryCredential,
}

impl Failure {
    /// Whether another client secret might succeed: a 401 (RFC 6749 §5.2 uses it for client
    /// authentication failures, whatever the body says) or an OAuth error that says so.
    fn means_bad_secret(&self) -> bool {
        match self {
            Failure::Rejected { status, body } => {
                *status == 401 || body.as_ref().is_some_and(OAuthErrorBody::means_bad_secret)
            }
            _ => false,
        }
    }

    fn into_error(self, connection: &ConnectionSettings) -> TokenError {
        match self {
            Failure::Rejected { status, body } => TokenError::Rejected {
                connection: connection.name.clone(),
                status,
                code: body.map(|body| oauth_error_code(&body.error)),
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
            Failure::Invalid { detail } => TokenError::InvalidResponse {
                connection: connection.name.clone(),
                detail,
            },
            Failure::OutOfTime { detail } => TokenError::Unavailable {
                connection: connection.name.clone(),
                detail,
                retry_after: None,
            },
            failure @ Failure::NoRetryCredential => TokenError::Unavailable {
                connection: connection.name.clone(),
                detail: failure.to_string(),
                retry_after: None,
            },
        }
    }
}

/// Sorts a failed exchange by HTTP status first: 429 and 5xx are unavailable (retried),
/// any other non-200 is a rejection (not retried), and a 200 that is not a token is invalid.
fn classify(
    connection: &ConnectionSettings,
    error: RequestTokenError<TransportError, OAuthErrorBody>,
) -> Failure {
    let unavailable = |detail: String, retry_after| Failure::Unavailable {
        detail,
        retry_after,
    };
    let invalid = |detail: &str| Failure::Invalid {
        detail: detail.to_string(),
    };
    match error {
        RequestTokenError::Request(TransportError::Status {
            status,
            retry_after,
            error,
        }) => {
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                return unavailable(format!("it answered HTTP {}", status.as_u16()), retry_after);
            }
            log_description(connection, error.as_ref());
            if error.is_none()
                && status != StatusCode::BAD_REQUEST
                && status != StatusCode::UNAUTHORIZED
            {
                // Not an OAuth answer: a wrong token_url (404), a firewall or WAF (403), a
                // redirect to a login page. Asking again will not help; the operator must look.
                tracing::warn!(
                    connection = %connection.name,
                    status = status.as_u16(),
                    "the token endpoint answered without an OAuth error: likely a configuration error (token_url, network or firewall rules)"
                );
            }
            Failure::Rejected {
                status: status.as_u16(),
                body: error,
            }
        }
        RequestTokenError::ServerResponse(body) => {
            log_description(connection, Some(&body));
            Failure::Rejected {
                status: 200,
                body: Some(body),
            }
        }
        RequestTokenError::Request(TransportError::TooLarge) => {
            invalid("the answer is larger than the broker reads")
        }
        RequestTokenError::Request(transport) => unavailable(transport.to_string(), None),
        RequestTokenError::Parse(_, body) => {
            match serde_json::from_slice::<OAuthErrorBody>(&body) {
                // Some servers send their OAuth error with a 200.
                Ok(error) => {
                    log_description(connection, Some(&error));
                    Failure::Rejected {
                        status: 200,
                        body: Some(error),
                    }
                }
                Err(_) => invalid("the answer is not a valid OAuth token response"),
            }
        }
        RequestTokenError::Other(_) => invalid("the answer is not JSON or is empty"),
    }
}

/// The IdP's own words help the operator (Entra puts AADSTS codes here); they go to the log,
/// trimmed, and never to the caller.
fn log_description(connection: &ConnectionSettings, error: Option<&OAuthErrorBody>) {
    if let Some(description) = error.and_then(|error| error.error_description.as_deref()) {
        tracing::warn!(
            connection = %connection.name,
            upstream_description = %printable_prefix(description, 300),
            "token endpoint error description"
        );
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
    fn retry_after_is_read_in_seconds_and_as_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_400); // 07:26:40 GMT
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(80)));
        headers.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:00:00 GMT".parse().unwrap(),
        );
        assert_eq!(
            retry_after(&headers, now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        headers.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
    }

    #[test]
    fn the_retry_wait_honours_retry_after_and_stays_within_the_jitter_ceiling() {
        for attempt in 0..12 {
            let wait = retry_wait(attempt, None);
            assert!(wait < BACKOFF_CAP, "{attempt}: {wait:?}");
            assert!(
                wait < BACKOFF_BASE * 2u32.pow(attempt.min(4)),
                "{attempt}: {wait:?}"
            );
        }
        assert_eq!(
            retry_wait(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn a_401_means_a_bad_secret_whatever_its_body_and_other_rejections_do_not() {
        let rejected = |status, body: Option<&str>| Failure::Rejected {
            status,
            body: body.map(|b| serde_json::from_str(b).unwrap()),
        };
        assert!(rejected(401, None).means_bad_secret());
        assert!(rejected(400, Some(r#"{"error":"invalid_client"}"#)).means_bad_secret());
        assert!(!rejected(400, Some(r#"{"error":"invalid_scope"}"#)).means_bad_secret());
        assert!(!rejected(403, None).means_bad_secret());
        assert!(!rejected(404, None).means_bad_secret());
    }

    /// The retry loop driven by a fake exchange on tokio's paused clock: what each attempt
    /// answers comes from `answers` (the last one repeats), and every attempt is counted.
    mod retry_loop {
        use super::super::*;
        use std::cell::{Cell, RefCell};
        use std::collections::VecDeque;

        fn unavailable(retry_after: Option<u64>) -> Failure {
            Failure::Unavailable {
                detail: "it answered HTTP 503".to_string(),
                retry_after: retry_after.map(Duration::from_secs),
            }
        }

        /// One scripted answer of the fake exchange.
        type Answer = fn() -> Result<&'static str, Failure>;

        /// A fake exchange answering from a script; `attempts` counts its calls.
        struct Fake {
            answers: RefCell<VecDeque<Answer>>,
            attempts: Cell<u32>,
            /// How long each attempt takes before it answers.
            takes: Duration,
        }

        impl Fake {
            fn new(answers: &[Answer]) -> Self {
                Self {
                    answers: RefCell::new(answers.iter().copied().collect()),
                    attempts: Cell::new(0),
                    takes: Duration::ZERO,
                }
            }

            fn exchange(&self) -> impl std::future::Future<Output = Result<&'static str, Failure>> {
                self.attempts.set(self.attempts.get() + 1);
                let mut answers = self.answers.borrow_mut();
                let answer = if answers.len() > 1 {
                    answers.pop_front().unwrap()
                } else {
                    answers[0]
                };
                let takes = self.takes;
                async move {
                    tokio::time::sleep(takes).await;
                    answer()
                }
            }
        }

        async fn run(fake: &Fake, max_retries: u32, budget: u32) -> Result<&'static str, Failure> {
            let budget = Cell::new(budget);
            let take_retry = || {
                let left = budget.get();
                budget.set(left.saturating_sub(1));
                left > 0
            };
            with_retries("test", max_retries, take_retry, |_| fake.exchange()).await
        }

        #[tokio::test(start_paused = true)]
        async fn unavailable_answers_are_retried_up_to_max_retries() {
            let fake = Fake::new(&[|| Err(unavailable(None))]);
            let outcome = run(&fake, 2, 100).await;
            assert!(matches!(outcome, Err(Failure::Unavailable { .. })));
            assert_eq!(fake.attempts.get(), 3, "the first try and two retries");

            let fake = Fake::new(&[
                || Err(unavailable(None)),
                || Err(unavailable(None)),
                || Ok("token"),
            ]);
            assert_eq!(run(&fake, 2, 100).await.unwrap(), "token");
            assert_eq!(fake.attempts.get(), 3, "the third attempt succeeded");
        }

        #[tokio::test(start_paused = true)]
        async fn a_retry_whose_assertion_cannot_be_signed_ends_with_the_providers_own_answer() {
            // Attempt 1: the provider is unavailable and asks for a second; the retry's new
            // assertion cannot be signed. The outcome is the provider's answer, its hint kept,
            // not a failure charged to the provider, and nothing more is tried.
            let fake = Fake::new(&[
                || Err(unavailable(Some(1))),
                || Err(Failure::NoRetryCredential),
            ]);
            let outcome = run(&fake, 2, 100).await;
            assert!(
                matches!(
                    outcome,
                    Err(Failure::Unavailable { retry_after: Some(wait), .. }) if wait == Duration::from_secs(1)
                ),
                "{outcome:?}"
            );
            assert_eq!(fake.attempts.get(), 2);
        }

        #[tokio::test(start_paused = true)]
        async fn rejections_and_unusable_answers_are_not_retried() {
            let rejected: Answer = || {
                Err(Failure::Rejected {
                    status: 400,
                    body: None,
                })
            };
            let invalid: Answer = || {
                Err(Failure::Invalid {
                    detail: "not a token".to_string(),
                })
            };
            for answer in [rejected, invalid] {
                let fake = Fake::new(&[answer]);
                let started = Instant::now();
                let outcome = run(&fake, 5, 100).await;
                assert!(outcome.is_err());
                assert!(!matches!(outcome, Err(Failure::Unavailable { .. })));
                assert_eq!(fake.attempts.get(), 1, "asked once");
                assert_eq!(started.elapsed(), Duration::ZERO, "no wait");
            }
        }

        #[tokio::test(start_paused = true)]
        async fn a_retry_after_within_the_limit_is_waited_out_exactly() {
            let fake = Fake::new(&[|| Err(unavailable(Some(3))), || Ok("token")]);
            let started = Instant::now();
            assert_eq!(run(&fake, 2, 100).await.unwrap(), "token");
            // The jitter of a first retry is below 200 ms, so the server's 3 s decides.
            assert_eq!(started.elapsed(), Duration::from_secs(3));
            assert_eq!(fake.attempts.get(), 2);
        }

        #[tokio::test(start_paused = true)]
        async fn a_retry_after_above_the_limit_goes_back_to_the_caller_at_once() {
            let above = MAX_RETRY_WAIT.as_secs() + 1;
            assert_eq!(above, 6);
            let fake = Fake::new(&[|| Err(unavailable(Some(6))), || Ok("token")]);
            let started = Instant::now();
            match run(&fake, 2, 100).await {
                Err(Failure::Unavailable { retry_after, .. }) => {
                    assert_eq!(
                        retry_after,
                        Some(Duration::from_secs(above)),
                        "the hint is kept for the caller"
                    );
                }
                other => panic!("expected the 503 with its hint, got {other:?}"),
            }
            assert_eq!(fake.attempts.get(), 1, "not retried");
            assert_eq!(started.elapsed(), Duration::ZERO, "not waited out");
        }

        #[tokio::test(start_paused = true)]
        async fn an_empty_retry_budget_stops_retries_before_max_retries() {
            let fake = Fake::new(&[|| Err(unavailable(None))]);
            assert!(run(&fake, 5, 1).await.is_err());
            assert_eq!(fake.attempts.get(), 2, "one retry from a budget of one");
            let fake = Fake::new(&[|| Err(unavailable(None))]);
            assert!(run(&fake, 5, 0).await.is_err());
            assert_eq!(fake.attempts.get(), 1, "no budget, no retry");
        }

        #[tokio::test(start_paused = true)]
        async fn backoff_without_a_hint_stays_under_the_doubling_jitter_ceilings() {
            for _ in 0..20 {
                let fake = Fake::new(&[|| Err(unavailable(None))]);
                let started = Instant::now();
                assert!(run(&fake, 3, 100).await.is_err());
                assert_eq!(fake.attempts.get(), 4);
                // Ceilings 200, 400 and 800 ms for the three waits.
                assert!(
                    started.elapsed() < Duration::from_millis(1400),
                    "{:?}",
                    started.elapsed()
                );
            }
        }

        #[tokio::test(start_paused = true)]
        async fn the_deadline_bounds_retries_and_their_waits_together() {
            // Each attempt takes 1 s and asks for 1 s more: without the deadline, 100 retries
            // would take over three minutes.
            let mut fake = Fake::new(&[|| Err(unavailable(Some(1)))]);
            fake.takes = Duration::from_secs(1);
            let started = Instant::now();
            let outcome =
                within_deadline(started + Duration::from_secs(3), 3, run(&fake, 100, 100)).await;
            match outcome {
                Err(Failure::OutOfTime { detail }) => {
                    assert_eq!(detail, "no token within the 3s deadline");
                }
                other => panic!("expected the deadline's 503, got {other:?}"),
            }
            assert_eq!(
                started.elapsed(),
                Duration::from_secs(3),
                "the deadline, not later"
            );
            // Attempt 1 at 0 s, its wait to 2 s, attempt 2 cut off at 3 s.
            assert_eq!(fake.attempts.get(), 2);
        }
    }
}
