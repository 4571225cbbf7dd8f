//! Who a caller is, what the check reads of a request to find out, and why a caller is not
//! served: the values every way of checking callers shares.

use std::time::Duration;

#[cfg(test)]
use axum::http::HeaderMap;
use axum::http::HeaderValue;

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

/// The bearer token of `Authorization`, strictly: scheme `Bearer` (any case) and one token.
pub(super) fn bearer(authorization: Option<&HeaderValue>) -> Result<&str, CallerError> {
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
