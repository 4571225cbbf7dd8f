//! Who is asking: the step between the HTTP request and the token cache.
//!
//! A function key is a shared string; a broker that hands out credentials for other APIs
//! should know *which* caller it serves. In `jwt` mode the caller presents its own Entra (or
//! any OpenID) access token for the broker's audience ([`jwt`], keys from [`jwks`]); in
//! `easy_auth` mode App Service Authentication has already validated it and injected
//! `X-MS-CLIENT-PRINCIPAL` ([`easy_auth`]). Each connection then names the callers or roles
//! allowed to use it. Failures are a [`CallerError`], which `error.rs` maps to the HTTP contract.

mod claimed;
mod easy_auth;
mod jwks;
mod jwt;

use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
use axum::http::HeaderMap;
use axum::http::HeaderValue;

use crate::config::{ANY_CALLER, CallerMode, CallerSettings, ConnectionSettings};
use crate::http_client::LazyClient;

pub(crate) use jwt::JwtValidator;

/// What the caller check reads of a request, and nothing more: the headers that can name a
/// caller. The HTTP edge finds them in the one pass it makes over a request's headers.
#[derive(Clone, Copy, Default)]
pub(crate) struct CallerHeaders<'a> {
    /// `Authorization` (`jwt` mode: the caller's bearer token).
    pub(crate) authorization: Option<&'a HeaderValue>,
    /// `X-MS-CLIENT-PRINCIPAL` and `X-MS-CLIENT-PRINCIPAL-ID` (`easy_auth` mode: set by App
    /// Service Authentication, which removes any copy a client sent).
    pub(crate) client_principal: Option<&'a HeaderValue>,
    pub(crate) client_principal_id: Option<&'a HeaderValue>,
}

/// The header names [`CallerHeaders`] holds the values of.
pub(crate) const CLIENT_PRINCIPAL: &str = "x-ms-client-principal";
pub(crate) const CLIENT_PRINCIPAL_ID: &str = "x-ms-client-principal-id";

impl<'a> CallerHeaders<'a> {
    /// The caller headers of `headers`, looked up one by one (tests; the edge scans).
    #[cfg(test)]
    pub(crate) fn of(headers: &'a HeaderMap) -> Self {
        Self {
            authorization: headers.get(axum::http::header::AUTHORIZATION),
            client_principal: headers.get(CLIENT_PRINCIPAL),
            client_principal_id: headers.get(CLIENT_PRINCIPAL_ID),
        }
    }
}

/// Why a caller is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CallerError {
    /// No credentials at all (401 without an error code, RFC 6750 §3.1).
    #[error("the request carries no caller credentials")]
    Missing,
    /// Credentials that do not validate (401 `invalid_token`).
    #[error("{0}")]
    InvalidToken(&'static str),
    /// A valid caller that may not use this connection (403 `access_denied`).
    #[error("the caller is not allowed to use connection '{connection}'")]
    Denied { connection: String },
    /// The issuer's signing keys cannot be read, so no token can be checked (503): the
    /// broker's or the issuer's trouble, not the caller's.
    #[error("the caller token issuer's signing keys cannot be read; try again shortly")]
    KeysUnavailable { retry_after: Duration },
}

/// The authenticated caller.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    /// How the audit line names the caller: the object id, else the client id (app-only
    /// tokens), else `sub`; `None` in mode `none`.
    pub id: Option<String>,
    /// Every identifier `allowed_callers` may name: the object id (`oid`) and, in app-only
    /// tokens, the client id (`azp` in v2 tokens, `appid` in v1, `client_id` in RFC 9068
    /// tokens), or `sub` for tokens that name neither. A delegated token's client id is left
    /// out: it names the application the user signed in through, not the caller ([`claimed`]).
    pub ids: Vec<String>,
    pub roles: Vec<String>,
}

impl Caller {
    /// How the audit line names the caller.
    pub(crate) fn audit_name(&self) -> &str {
        self.id.as_deref().unwrap_or("function-key")
    }
}

/// Authenticates callers the configured way.
pub(crate) enum CallerCheck {
    /// The function key (checked by the host) is the only gate.
    FunctionKeyOnly,
    Jwt(Box<JwtValidator>),
    EasyAuth,
}

impl CallerCheck {
    pub(crate) fn new(
        settings: &CallerSettings,
        http: Arc<LazyClient>,
        stats: Arc<crate::observe::stats::Registry>,
    ) -> Self {
        match &settings.mode {
            CallerMode::None => CallerCheck::FunctionKeyOnly,
            CallerMode::EasyAuth => CallerCheck::EasyAuth,
            CallerMode::Jwt {
                issuers,
                audiences,
                tenant,
                jwks_uri,
                clock_skew,
            } => CallerCheck::Jwt(Box::new(JwtValidator::new(
                jwt::JwtSettings {
                    issuers: issuers.clone(),
                    audiences: audiences.clone(),
                    tenant: tenant.clone(),
                    clock_skew: *clock_skew,
                },
                jwks::HttpKeySource::new(http, &issuers[0], jwks_uri.clone()),
                stats,
            ))),
        }
    }

    /// Who sent a request with these caller headers, when that needs no waiting: `None` in
    /// mode `jwt`, whose key set may have to be fetched first (see [`Self::authenticate`]).
    pub(crate) fn authenticate_now(
        &self,
        headers: CallerHeaders<'_>,
    ) -> Option<Result<Caller, CallerError>> {
        match self {
            CallerCheck::FunctionKeyOnly => Some(Ok(Caller::default())),
            CallerCheck::Jwt(_) => None,
            CallerCheck::EasyAuth => Some(easy_auth::caller(headers)),
        }
    }

    /// Who sent a request with these caller headers.
    pub(crate) async fn authenticate(
        &self,
        headers: CallerHeaders<'_>,
    ) -> Result<Caller, CallerError> {
        match self {
            // Boxed: its state (a key set download) would otherwise be in every request's
            // future, whatever the mode.
            CallerCheck::Jwt(validator) => Box::pin(validator.authenticate(headers)).await,
            _ => self
                .authenticate_now(headers)
                .unwrap_or_else(|| unreachable!("only mode jwt waits")),
        }
    }
}

/// Whether `caller` may use `connection`: `allowed_callers` holds `"*"` or one of the caller's
/// ids, or the caller holds one of `allowed_roles`. A connection that lists neither serves
/// only in mode `none`, where there is no caller to check (configuration refuses the rest).
pub(crate) fn authorize(
    caller: &Caller,
    connection: &ConnectionSettings,
) -> Result<(), CallerError> {
    if caller.id.is_none() {
        // Mode `none`: the function key was the gate.
        return Ok(());
    }
    let by_id = connection
        .allowed_callers
        .iter()
        .any(|allowed| allowed == ANY_CALLER || caller.ids.contains(allowed));
    let by_role = caller
        .roles
        .iter()
        .any(|role| connection.allowed_roles.contains(role));
    if by_id || by_role {
        Ok(())
    } else {
        Err(CallerError::Denied {
            connection: connection.name.clone(),
        })
    }
}

/// The bearer token of `Authorization`, strictly: scheme `Bearer` (any case) and one token.
fn bearer(authorization: Option<&HeaderValue>) -> Result<&str, CallerError> {
    let value = authorization
        .ok_or(CallerError::Missing)?
        .to_str()
        .map_err(|_| CallerError::InvalidToken("the Authorization header is not text"))?;
    let not_bearer = CallerError::InvalidToken("the Authorization header is not a bearer token");
    let (scheme, token) = value.split_once(' ').ok_or(not_bearer.clone())?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(not_bearer);
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(callers: &[&str], roles: &[&str]) -> ConnectionSettings {
        let text = format!(
            r#"
            [callers]
            mode = "jwt"
            issuer = "https://login.microsoftonline.com/t/v2.0"
            audience = "api://token-broker"
            [connections.c]
            token_url = "https://idp.example.com/token"
            client_id = "c"
            client_secret = {{ app_setting = "S" }}
            allowed_callers = {callers:?}
            allowed_roles = {roles:?}
            "#
        );
        let env = |name: &str| (name == "S").then(|| "s".to_string());
        let settings = crate::config::parse(&text, std::path::Path::new("t.toml"), &env)
            .expect("valid configuration");
        settings.connections["c"].clone()
    }

    fn caller(ids: &[&str], roles: &[&str]) -> Caller {
        Caller {
            id: ids.first().map(|id| id.to_string()),
            ids: ids.iter().map(|id| id.to_string()).collect(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn a_caller_is_allowed_by_object_id_or_client_id() {
        let by_client_id = connection(&["apim-client-id"], &[]);
        let apim = caller(&["apim-object-id", "apim-client-id"], &[]);
        assert_eq!(authorize(&apim, &by_client_id), Ok(()));
        let by_object_id = connection(&["apim-object-id"], &[]);
        assert_eq!(authorize(&apim, &by_object_id), Ok(()));
        let other = caller(&["other-object-id", "other-client-id"], &[]);
        assert_eq!(
            authorize(&other, &by_client_id),
            Err(CallerError::Denied {
                connection: "c".to_string()
            })
        );
    }

    #[test]
    fn a_star_serves_every_authenticated_caller_and_roles_are_matched() {
        let open = connection(&["*"], &[]);
        assert_eq!(authorize(&caller(&["anyone"], &[]), &open), Ok(()));
        let by_role = connection(&[], &["Tokens.Contoso"]);
        assert_eq!(
            authorize(&caller(&["x"], &["Tokens.Contoso"]), &by_role),
            Ok(())
        );
        assert!(authorize(&caller(&["x"], &["Other"]), &by_role).is_err());
    }

    #[test]
    fn bearer_parsing_is_strict_about_the_scheme() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            bearer(headers.get("authorization")),
            Err(CallerError::Missing)
        );
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(
            bearer(headers.get("authorization")),
            Err(CallerError::InvalidToken(_))
        ));
        headers.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer(headers.get("authorization")).unwrap(), "abc");
    }
}
