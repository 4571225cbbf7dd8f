//! `easy_auth` mode: the caller App Service Authentication validated and injected as
//! `X-MS-CLIENT-PRINCIPAL` (base64 JSON). Configuration refuses this mode unless the platform
//! says authentication is on (`WEBSITE_AUTH_ENABLED`), because only then does the platform strip
//! client-supplied copies of the header; without it the header is whatever the client sent.
//!
//! Only principals from Microsoft Entra (`auth_typ` `aad`) are read: with several providers
//! configured, another provider's `oid` or `azp` is not an Entra object or client id, and could
//! equal one that `allowed_callers` lists.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::caller::{Caller, CallerError, CallerHeaders};
use super::claimed::{Claimed, delegated};

#[derive(Deserialize)]
struct ClientPrincipal {
    /// The identity provider that signed the caller in: `aad` for Microsoft Entra.
    auth_typ: Option<String>,
    #[serde(default)]
    claims: Vec<PrincipalClaim>,
    role_typ: Option<String>,
}

#[derive(Deserialize)]
struct PrincipalClaim {
    typ: String,
    val: String,
}

const OBJECT_ID_CLAIM: &str = "http://schemas.microsoft.com/identity/claims/objectidentifier";
const ROLE_CLAIM: &str = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role";
/// `scp` as the platform's claim mapping names it.
const SCOPE_CLAIM: &str = "http://schemas.microsoft.com/identity/claims/scope";
/// The provider name App Service Authentication gives Microsoft Entra.
const ENTRA_AUTH_TYPE: &str = "aad";

/// The caller named by the platform's headers.
pub(super) fn caller(headers: CallerHeaders<'_>) -> Result<Caller, CallerError> {
    let encoded = headers
        .client_principal
        .ok_or(CallerError::Missing)?
        .to_str()
        .map_err(|_| CallerError::InvalidToken("X-MS-CLIENT-PRINCIPAL is not text"))?;
    let decoded = BASE64
        .decode(encoded.trim())
        .map_err(|_| CallerError::InvalidToken("X-MS-CLIENT-PRINCIPAL is not base64"))?;
    let principal: ClientPrincipal = serde_json::from_slice(&decoded).map_err(|_| {
        CallerError::InvalidToken("X-MS-CLIENT-PRINCIPAL is not a client principal")
    })?;
    if !principal
        .auth_typ
        .as_deref()
        .is_some_and(|provider| provider.eq_ignore_ascii_case(ENTRA_AUTH_TYPE))
    {
        return Err(CallerError::InvalidToken(
            "X-MS-CLIENT-PRINCIPAL is not from Microsoft Entra (auth_typ is not aad)",
        ));
    }
    let claim = |types: &[&str]| {
        principal
            .claims
            .iter()
            .find(|c| types.contains(&c.typ.as_str()))
            .map(|c| c.val.clone())
    };
    let object_id = claim(&[OBJECT_ID_CLAIM, "oid"]);
    let client_id = claim(&["azp", "appid"]);
    let delegated = delegated(
        claim(&["scp", SCOPE_CLAIM]).is_some(),
        claim(&["idtyp"]).as_deref(),
    );
    let principal_id = headers
        .client_principal_id
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let role_type = principal.role_typ.as_deref().unwrap_or(ROLE_CLAIM);
    let roles = principal
        .claims
        .iter()
        .filter(|c| c.typ == role_type || c.typ == "roles" || c.typ == ROLE_CLAIM)
        .map(|c| c.val.clone())
        .collect();
    Claimed {
        object_id,
        client_id,
        subject: principal_id,
        roles,
        delegated,
    }
    .caller()
    .ok_or(CallerError::InvalidToken(
        "X-MS-CLIENT-PRINCIPAL names no caller",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn principal(json: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ms-client-principal",
            BASE64.encode(json).parse().unwrap(),
        );
        headers
    }

    #[test]
    fn easy_auth_reads_the_object_id_client_id_and_roles() {
        let headers = principal(
            r#"{"auth_typ":"aad","claims":[{"typ":"http://schemas.microsoft.com/identity/claims/objectidentifier","val":"oid-1"},{"typ":"azp","val":"client-1"},{"typ":"roles","val":"Tokens.Contoso"}],"name_typ":"name","role_typ":"roles"}"#,
        );
        let caller = caller(CallerHeaders::of(&headers)).unwrap();
        assert_eq!(caller.id.as_deref(), Some("oid-1"));
        assert_eq!(caller.ids, ["oid-1", "client-1"]);
        assert_eq!(caller.roles, ["Tokens.Contoso"]);
    }

    #[test]
    fn a_user_signed_in_through_a_listed_client_is_named_by_the_user_only() {
        for scope in ["scp", SCOPE_CLAIM] {
            let headers = principal(&format!(
                r#"{{"auth_typ":"aad","claims":[{{"typ":"{OBJECT_ID_CLAIM}","val":"user-oid"}},{{"typ":"azp","val":"client-1"}},{{"typ":"{scope}","val":"Tokens.Read"}}],"name_typ":"name","role_typ":"roles"}}"#
            ));
            assert_eq!(
                caller(CallerHeaders::of(&headers)).unwrap().ids,
                ["user-oid"],
                "{scope}"
            );
        }
        let headers = principal(
            r#"{"auth_typ":"aad","claims":[{"typ":"oid","val":"user-oid"},{"typ":"appid","val":"client-1"},{"typ":"idtyp","val":"user"}]}"#,
        );
        assert_eq!(
            caller(CallerHeaders::of(&headers)).unwrap().ids,
            ["user-oid"]
        );
    }

    #[test]
    fn a_principal_from_another_provider_is_refused() {
        let claims = r#""claims":[{"typ":"oid","val":"oid-1"},{"typ":"azp","val":"client-1"}]"#;
        for provider in [r#""auth_typ":"google","#, r#""auth_typ":"github","#, ""] {
            let headers = principal(&format!("{{{provider}{claims}}}"));
            assert_eq!(
                caller(CallerHeaders::of(&headers)).unwrap_err(),
                CallerError::InvalidToken(
                    "X-MS-CLIENT-PRINCIPAL is not from Microsoft Entra (auth_typ is not aad)"
                ),
                "{provider}"
            );
        }
    }

    #[test]
    fn easy_auth_without_the_header_is_unauthenticated() {
        assert_eq!(
            caller(CallerHeaders::default()).unwrap_err(),
            CallerError::Missing
        );
        assert!(matches!(
            caller(CallerHeaders::of(&principal("not json"))),
            Err(CallerError::InvalidToken(_))
        ));
    }
}
