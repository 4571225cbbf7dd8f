//! The client-credentials exchange with a connection's token endpoint.
//!
//! oauth2 builds the request (form body, RFC 6749 §2.3.1 Basic encoding) and parses the answer;
//! the HTTP transport is the broker's one reqwest client, handed to oauth2 as a closure so that
//! there is a single HTTP stack in the binary. The closure also catches what oauth2 cannot
//! classify on its own: throttling, server errors and timeouts, with their `Retry-After`.

mod discovery;
mod failure;
mod mutual_tls;
mod oauth_error;
mod retry;
mod transport;

use discovery::Discovered;
use failure::{Failure, classify, hold_of, refusal_error};
use mutual_tls::MutualTls;
use oauth_error::{OAuthErrorBody, oauth_error_code};
use retry::{with_retries, within_deadline};
use transport::OAuthTransport;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use oauth2::basic::{BasicRevocationErrorResponse, BasicTokenIntrospectionResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret as OAuthClientSecret, EndpointNotSet, EndpointSet, Scope,
    StandardRevocableToken, TokenUrl,
};
use secrecy::ExposeSecret;
use tokio::time::Instant;

use crate::cache::{CacheKey, TokenSource};
use crate::config::{AuthMethod, ConnectionName, ConnectionSettings};
use crate::credentials::{ClientCredential, Credentials};
use crate::http_client::LazyClient;
use crate::observe::Observers;
use crate::observe::otel::Otel;
use crate::observe::stats;
use crate::token::{FreshToken, Hold, TokenError};
use crate::token_response::BrokerTokenResponse;
use crate::upstream_guard::{BreakerState, GuardSettings, Refusal, Rejection, UpstreamGuard};
use tracing::Instrument as _;

/// RFC 7523 §2.2's `client_assertion_type` for a JWT (or an Entra federated token).
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

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
pub(crate) struct TokenClient {
    credentials: Arc<Credentials>,
    /// Connections by lower-cased name, as in `Settings`, each with its own HTTP client and
    /// guard so that one identity provider's trouble stays its own.
    upstreams: BTreeMap<ConnectionName, Upstream>,
    /// Where fetches are counted, and each connection's last fetch observed for health.
    stats: Arc<stats::Registry>,
    /// Fetches, provider calls and holds for OpenTelemetry, when it is on.
    otel: Option<Arc<Otel>>,
}

struct Upstream {
    connection: ConnectionSettings,
    http: LazyClient,
    /// The client presenting the connection's certificate (mutual-TLS methods only).
    mutual_tls: MutualTls,
    /// The token endpoint read from `issuer`'s discovery document, when configured so.
    discovered: Discovered,
    guard: UpstreamGuard,
}

impl TokenClient {
    pub(crate) fn new(
        credentials: Arc<Credentials>,
        connections: &BTreeMap<ConnectionName, ConnectionSettings>,
        observers: &Observers,
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
                mutual_tls: MutualTls::new(connection.connect_timeout),
                discovered: Discovered::default(),
                connection: connection.clone(),
                guard,
            };
            upstreams.insert(key.clone(), upstream);
        }
        Self {
            credentials,
            upstreams,
            stats: observers.stats.clone(),
            otel: observers.otel.clone(),
        }
    }

    /// A rotation event named `connection` (lower-cased name): a rejection remembered by its
    /// negative cache no longer holds, so the repaired secret is tried at the next request.
    pub(crate) fn connection_rotated(&self, connection: &str) {
        if let Some(upstream) = self.upstreams.get(connection) {
            upstream.guard.clear_rejection();
        }
    }

    /// Where `connection`'s (lower-cased name) circuit breaker stands; read-only.
    pub(crate) fn breaker(&self, connection: &str) -> Option<BreakerState> {
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
        key: &CacheKey,
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
            return Err(self.refused(connection, refusal));
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
            return Err(self.refused(connection, refusal));
        }
        let guard = &upstream.guard;
        // A panic past admission must still report an outcome, or a half-open circuit would
        // wait for its trial call forever; the cache turns the panic into a 500 for callers.
        let outcome = AssertUnwindSafe(within_deadline(
            deadline,
            connection.deadline.as_secs(),
            self.request_token(upstream, key, secret),
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
            // Key Vault's failure, not the provider's: the trial, if this was one, is released.
            Err(Failure::Credential(_)) => guard.record_neutral(),
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

    /// The error for a call the guard refused, counted as a hold for OpenTelemetry.
    fn refused(&self, connection: &ConnectionSettings, refusal: Refusal) -> TokenError {
        if let Some(otel) = &self.otel {
            otel.hold(
                &connection.name,
                hold_of(refusal.clone()).0.kind(),
                "instance",
            );
        }
        refusal_error(connection, refusal)
    }

    /// A token for `connection` with `scopes`. When the token endpoint refuses the client
    /// credential (401, `invalid_client`, Entra's bad-secret codes), Key Vault is read again
    /// and one other version of the secret, key or certificate (rotated or previous) is tried,
    /// so a rotation never surfaces as an error to callers.
    async fn request_token(
        &self,
        upstream: &Upstream,
        key: &CacheKey,
        secret: ClientCredential,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        let first = self.exchange_with_retries(upstream, key, &secret).await;
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
        self.exchange_with_retries(upstream, key, &alternative)
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
        key: &CacheKey,
        credential: &ClientCredential,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        with_retries(
            &connection.name,
            connection.max_retries,
            || upstream.guard.take_retry(),
            |attempt| async move {
                if attempt == 0 {
                    return self.exchange(upstream, key, credential).await;
                }
                match self.credentials.renewed(connection, credential).await {
                    Ok(None) => self.exchange(upstream, key, credential).await,
                    Ok(Some(renewed)) => self.exchange(upstream, key, &renewed).await,
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
        key: &CacheKey,
        credential: &ClientCredential,
    ) -> Result<FreshToken, Failure> {
        let connection = &upstream.connection;
        let started = Instant::now();
        let unavailable = |detail: &str| Failure::Unavailable {
            detail: detail.to_string(),
            retry_after: None,
        };
        let token_url = match &connection.issuer {
            None => connection.token_url.url().clone(),
            Some(issuer) => {
                let http = upstream.http.get().map_err(unavailable)?;
                upstream
                    .discovered
                    .token_url(http, &connection.name, issuer, connection.timeout)
                    .await?
            }
        };
        let client: OAuthClient = oauth2::Client::new(ClientId::new(connection.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(token_url.clone()));
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
            // RFC 8705 §2: the certificate authenticates; the form names the client only.
            ClientCredential::Certificate(_) => client.set_auth_type(AuthType::RequestBody),
        };
        let scopes = key.scopes();
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
        // The request's choice from the connection's allowed lists, else its default.
        if let Some(audience) = key.audience().or(connection.audience.as_deref()) {
            request = request.add_extra_param("audience", audience.to_string());
        }
        if let Some(resource) = key.resource().or(connection.resource.as_deref()) {
            request = request.add_extra_param("resource", resource.to_string());
        }
        for (name, value) in &connection.extra_params {
            request = request.add_extra_param(name.clone(), value.clone());
        }
        if let ClientCredential::Certificate(certificate) = credential {
            // A failure left by an earlier handshake is not this attempt's.
            certificate.take_sign_failure();
        }
        let http = match credential {
            ClientCredential::Certificate(certificate) => upstream
                .mutual_tls
                .client(&connection.name, certificate)
                .map_err(|detail| unavailable(&detail))?,
            _ => upstream.http.get().map_err(unavailable)?.clone(),
        };
        let transport = OAuthTransport {
            http: &http,
            timeout: connection.timeout,
        };
        let result = match &self.otel {
            None => request.request_async(&transport).await,
            Some(otel) => {
                let span = if otel.traces() {
                    provider_span(connection, &token_url)
                } else {
                    tracing::Span::none()
                };
                let result = request
                    .request_async(&transport)
                    .instrument(span.clone())
                    .await;
                let (status, error_type) = call_outcome(&result);
                if let Some(status) = status {
                    span.record("http.response.status_code", status);
                }
                if error_type.is_some() || status.is_some_and(|status| status >= 400) {
                    span.record("otel.status_code", "error");
                }
                // The endpoint called: for an `issuer` connection, the one discovered.
                let url = &token_url;
                otel.provider_call(
                    url.host_str().unwrap_or_default(),
                    url.port_or_known_default(),
                    status,
                    error_type,
                    started.elapsed(),
                );
                result
            }
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let sign_failure = match (&result, credential) {
            (Err(_), ClientCredential::Certificate(certificate)) => certificate.take_sign_failure(),
            _ => None,
        };
        if let Some(source) = sign_failure {
            tracing::warn!(connection = %connection.name, elapsed_ms, reason = %source, "the client certificate's key could not sign the TLS handshake");
            return Err(Failure::Credential(source));
        }
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

impl TokenSource for TokenClient {
    fn hold(&self, connection: &str) -> Option<(Hold, std::time::Duration)> {
        let refusal = self.upstreams.get(connection)?.guard.check().err()?;
        Some(hold_of(refusal))
    }

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
            let started = tokio::time::Instant::now();
            let result = self.fetch_within_deadline(upstream, &key, finish_by).await;
            let fetched = fetch_result(&result);
            self.stats
                .record_fetch(key.connection(), fetched, started.elapsed());
            if let Some(otel) = &self.otel {
                otel.fetch(
                    &upstream.connection.name,
                    fetched.as_str(),
                    started.elapsed(),
                );
            }
            result
        })
    }
}

/// The client span of one request to a token endpoint (exported traces only): method, server,
/// and the status recorded when the answer comes. Never the form, which holds the credential.
fn provider_span(connection: &ConnectionSettings, url: &url::Url) -> tracing::Span {
    tracing::info_span!(
        "provider_attempt",
        otel.name = "POST token endpoint",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        connection = %connection.name,
        http.request.method = "POST",
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port_or_known_default().map(i64::from),
        http.response.status_code = tracing::field::Empty,
    )
}

/// The HTTP status of one token-endpoint call, or why it had none (`error.type`).
fn call_outcome<T>(
    result: &Result<T, oauth2::RequestTokenError<transport::TransportError, OAuthErrorBody>>,
) -> (Option<u16>, Option<&'static str>) {
    use oauth2::RequestTokenError;
    use transport::TransportError;
    match result {
        Ok(_) => (Some(200), None),
        Err(RequestTokenError::ServerResponse(_)) => (Some(200), None),
        Err(RequestTokenError::Request(TransportError::Status { status, .. })) => {
            (Some(status.as_u16()), None)
        }
        Err(RequestTokenError::Request(TransportError::Timeout(_))) => (None, Some("timeout")),
        Err(RequestTokenError::Request(TransportError::Connect)) => (None, Some("connect")),
        Err(RequestTokenError::Request(TransportError::TooLarge)) => (Some(200), Some("too_large")),
        Err(RequestTokenError::Request(TransportError::Other)) => (None, Some("other")),
        Err(RequestTokenError::Request(TransportError::CertificateRefused(_))) => {
            (None, Some("tls_certificate_refused"))
        }
        Err(RequestTokenError::Parse(..)) => (Some(200), Some("parse")),
        Err(RequestTokenError::Other(_)) => (None, Some("other")),
    }
}

/// How the stats line counts a fetch's result.
fn fetch_result<T>(result: &Result<T, TokenError>) -> stats::FetchResult {
    use stats::FetchResult;
    match result {
        Ok(_) => FetchResult::Ok,
        Err(TokenError::Rejected { .. }) => FetchResult::Rejected,
        Err(TokenError::Unavailable { .. }) => FetchResult::Unavailable,
        Err(TokenError::InvalidResponse { .. }) => FetchResult::InvalidResponse,
        Err(TokenError::Secret { .. }) => FetchResult::SecretUnavailable,
        Err(TokenError::Internal { .. } | TokenError::UnknownConnection(_)) => {
            FetchResult::Internal
        }
    }
}

#[cfg(test)]
mod tests;
