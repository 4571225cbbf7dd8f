//! What the token source hands the cache: a token as the identity provider issued it, or why
//! there is none. A leaf module, so that the cache and the OAuth client both depend on it and
//! not on each other.

use std::time::Duration;

use secrecy::SecretString;

use crate::credentials::CredentialError;

/// The longest lifetime the broker believes: a token endpoint that says "never expires"
/// (`expires_in` of `i64::MAX`, `1e19`) gets this, and so does everything longer. Time
/// arithmetic on the monotonic clock stays far from overflow, and a token is refreshed at least
/// daily whatever the provider claims.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest lifetime: two seconds, so that a token handed out in its last second of
/// hand-out window still has `expires_in >= 1` when the caller reads it.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(2);

/// A lifetime as the cache uses it: within `[MIN_LIFETIME, MAX_LIFETIME]`.
pub(crate) fn clamp_lifetime(lifetime: Duration) -> Duration {
    lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME)
}

/// A token as the token endpoint issued it.
pub struct FreshToken {
    pub access_token: SecretString,
    pub token_type: String,
    /// How long the token lives; the cache clamps it to `[MIN_LIFETIME, MAX_LIFETIME]`.
    pub lifetime: Duration,
    pub refresh_in: Option<Duration>,
    /// The granted scope when the server said, else the requested one (RFC 6749 §5.1).
    pub scope: Option<String>,
}

/// Why no token could be obtained. Every message names the connection and the step, and
/// none carries a secret, a token, a Key Vault object name or the upstream's raw body: the
/// details an operator needs go to the log where the failure happens.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("unknown connection '{0}'")]
    UnknownConnection(String),
    /// The token endpoint answered 3xx or 4xx (other than 429): it will not issue a token for
    /// this request, and asking again will not change that.
    #[error(
        "the token endpoint of connection '{connection}' rejected the request ({}){}",
        match code { Some(code) => format!("'{code}'"), None => format!("HTTP {status}") },
        if *remembered { " (a recent answer, repeated without asking again)" } else { "" }
    )]
    Rejected {
        connection: String,
        /// The HTTP status it answered with.
        status: u16,
        /// The OAuth error code, when the body was an OAuth error (RFC 6749 §5.2).
        code: Option<String>,
        /// The answer came from the negative cache, not from a new request.
        remembered: bool,
    },
    /// The token endpoint could not be reached, timed out, or answered 5xx or 429.
    #[error("the token endpoint of connection '{connection}' is unavailable: {detail}")]
    Unavailable {
        connection: String,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// The token endpoint answered with success, but not with a usable token.
    #[error(
        "the token endpoint of connection '{connection}' answered, but not with a usable token: {detail}"
    )]
    InvalidResponse { connection: String, detail: String },
    #[error(
        "the client credential of connection '{connection}' is unavailable: {} failed (the broker's log says why)",
        source.step()
    )]
    Secret {
        connection: String,
        #[source]
        source: CredentialError,
    },
    /// A bug: a panic while fetching, caught so that the cache entry stays usable.
    #[error(
        "the token fetch of connection '{connection}' failed unexpectedly (a bug; the broker's log has it)"
    )]
    Internal { connection: String },
}

/// Why a connection's provider is not asked for a while: its own `Retry-After` on a 429 or
/// 503, a circuit opened by repeated failures, or a client it refused. The token client's
/// guard decides one; with the shared tier, every instance of a fleet applies it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Hold {
    AskedToWait,
    CircuitOpen,
    Rejected { status: u16, code: Option<String> },
}

impl Hold {
    /// The hold's kind as metrics name it.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Hold::AskedToWait => "retry_after",
            Hold::CircuitOpen => "circuit_open",
            Hold::Rejected { .. } => "rejected",
        }
    }

    /// What a caller is told while the hold lasts (`retry_after` more): the answer the
    /// instance that met the provider's refusal gives, on every instance alike.
    pub(crate) fn error(&self, connection: &str, retry_after: Duration) -> TokenError {
        let connection = connection.to_string();
        match self {
            Hold::CircuitOpen => TokenError::Unavailable {
                connection,
                detail: "it failed repeatedly, so calls fail fast for a while (circuit open)"
                    .to_string(),
                retry_after: Some(retry_after),
            },
            Hold::AskedToWait => TokenError::Unavailable {
                connection,
                detail:
                    "it asked the broker to wait (Retry-After), so it is not asked again before then"
                        .to_string(),
                retry_after: Some(retry_after),
            },
            Hold::Rejected { status, code } => TokenError::Rejected {
                connection,
                status: *status,
                code: code.clone(),
                remembered: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_clamped_to_the_documented_range() {
        assert_eq!(clamp_lifetime(Duration::MAX), MAX_LIFETIME);
        assert_eq!(clamp_lifetime(Duration::ZERO), MIN_LIFETIME);
        assert_eq!(
            clamp_lifetime(Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        assert_eq!(
            clamp_lifetime(Duration::from_secs(3599)),
            Duration::from_secs(3599)
        );
    }

    #[test]
    fn a_secret_error_shown_to_callers_names_no_key_vault_object() {
        let error = TokenError::Secret {
            connection: "contoso".into(),
            source: CredentialError::Forbidden {
                kind: crate::credentials::ObjectKind::Secret,
                name: "contoso-secret".into(),
                code: "ForbiddenByRbac".into(),
            },
        };
        let text = error.to_string();
        assert!(text.contains("contoso"), "{text}");
        assert!(!text.contains("contoso-secret"), "{text}");
        assert!(!text.contains("ForbiddenByRbac"), "{text}");
        assert!(!text.contains("role"), "{text}");
    }
}
