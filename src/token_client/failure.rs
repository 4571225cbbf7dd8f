//! What a failed token request means: the classification that decides between retrying,
//! remembering a refusal and passing it on.

use super::oauth_error::{OAuthErrorBody, oauth_error_code};
use super::transport::TransportError;
use std::time::Duration;

use oauth2::RequestTokenError;
use oauth2::http::StatusCode;

use crate::config::ConnectionSettings;
use crate::token::{Hold, TokenError};
use crate::upstream_guard::Refusal;

/// The error for a call the guard refused without asking the identity provider.
pub(super) fn refusal_error(connection: &ConnectionSettings, refusal: Refusal) -> TokenError {
    let (hold, retry_after) = hold_of(refusal);
    hold.error(&connection.name, retry_after)
}

/// A guard's refusal as the hold it stands for, and how much longer it lasts.
pub(super) fn hold_of(refusal: Refusal) -> (Hold, Duration) {
    match refusal {
        Refusal::CircuitOpen { retry_after } => (Hold::CircuitOpen, retry_after),
        Refusal::AskedToWait { retry_after } => (Hold::AskedToWait, retry_after),
        Refusal::RecentlyRejected {
            rejection,
            retry_after,
        } => (
            Hold::Rejected {
                status: rejection.status,
                code: rejection.code,
            },
            retry_after,
        ),
    }
}

/// One failed exchange, before it becomes a `TokenError`.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
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
    /// The client credential failed on the way: Key Vault did not sign the TLS handshake for a
    /// client certificate whose key it holds. Says nothing of the provider; not retried.
    #[error("{0}")]
    Credential(crate::credentials::CredentialError),
    /// A retry could not be made: its newly signed assertion could not be had. Never the
    /// outcome of a fetch (the previous attempt's failure is); says nothing of the provider.
    #[error("the client assertion could not be signed again for a retry")]
    NoRetryCredential,
}

impl Failure {
    /// Whether another client secret might succeed: a 401 (RFC 6749 §5.2 uses it for client
    /// authentication failures, whatever the body says) or an OAuth error that says so.
    pub(super) fn means_bad_secret(&self) -> bool {
        match self {
            Failure::Rejected { status, body } => {
                *status == 401 || body.as_ref().is_some_and(OAuthErrorBody::means_bad_secret)
            }
            _ => false,
        }
    }

    pub(super) fn into_error(self, connection: &ConnectionSettings) -> TokenError {
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
            Failure::Credential(source) => TokenError::Secret {
                connection: connection.name.clone(),
                source,
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
pub(super) fn classify(
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
        RequestTokenError::Request(TransportError::CertificateRefused(alert)) => {
            tracing::warn!(connection = %connection.name, %alert, "the token endpoint's TLS layer refused the client certificate");
            // As the provider's own invalid_client: the certificate is read again and another
            // version tried, else a 502; never retried as an outage.
            Failure::Rejected {
                status: StatusCode::UNAUTHORIZED.as_u16(),
                body: Some(OAuthErrorBody::certificate_refused(&alert)),
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
pub(super) fn log_description(connection: &ConnectionSettings, error: Option<&OAuthErrorBody>) {
    if let Some(description) = error.and_then(|error| error.error_description.as_deref()) {
        tracing::warn!(
            connection = %connection.name,
            upstream_description = %printable_prefix(description, 300),
            "token endpoint error description"
        );
    }
}

pub(super) fn printable_prefix(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}
