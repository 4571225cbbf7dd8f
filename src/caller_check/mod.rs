//! Who is asking: the step between the HTTP request and the token cache.
//!
//! A function key is a shared string; a broker that hands out credentials for other APIs
//! should know *which* caller it serves. In `jwt` mode the caller presents its own Entra (or
//! any OpenID) access token for the broker's audience ([`jwt`], keys from [`jwks`]); in
//! `easy_auth` mode App Service Authentication has already validated it and injected
//! `X-MS-CLIENT-PRINCIPAL` ([`easy_auth`]). Each connection then names the callers or roles
//! allowed to use it. Failures are a [`CallerError`], which `error.rs` maps to the HTTP contract.

mod caller;
mod claimed;
mod easy_auth;
mod jwks;
mod jwt;

use std::sync::Arc;

use crate::config::{ANY_CALLER, CallerMode, CallerSettings, ConnectionSettings};
use crate::http_client::LazyClient;

pub(crate) use caller::{
    CLIENT_PRINCIPAL, CLIENT_PRINCIPAL_ID, Caller, CallerError, CallerHeaders,
};
pub(crate) use jwt::JwtValidator;

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

    /// Whether [`Self::authenticate_now`] can answer: in every mode but `jwt`.
    pub(crate) fn answers_at_once(&self) -> bool {
        !matches!(self, CallerCheck::Jwt(_))
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
}
