//! Who is asking: the step between the HTTP request and the token cache.
//!
//! A function key is a shared string; a broker that hands out credentials for other APIs
//! should know *which* caller it serves. In `jwt` mode the caller presents its own Entra (or
//! any OpenID) access token for the broker's audience; in `easy_auth` mode App Service
//! Authentication has already validated it and injected `X-MS-CLIENT-PRINCIPAL`. Each
//! connection then names the callers or roles allowed to use it.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;
use url::Url;

use crate::config::{CallerMode, CallerSettings, ConnectionSettings};
use crate::error::ApiError;
use crate::http_client::LazyClient;

/// Signature algorithms a caller token may use: asymmetric only. `none` and the HMAC family
/// (whose "key" would be public JWKS material) are refused.
const ALLOWED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Shortest time between two JWKS downloads: an unknown `kid` triggers a download (that is
/// how key rotation is noticed), and this bounds what random `kid`s can make the broker do.
const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// JWKS are re-read at least this often even when every `kid` is known.
const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

/// The authenticated caller.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// `oid`, else `azp`/`appid`, else `sub`; `None` in mode `none`.
    pub id: Option<String>,
    pub roles: Vec<String>,
}

impl Caller {
    /// How the audit line names the caller.
    pub fn audit_name(&self) -> &str {
        self.id.as_deref().unwrap_or("function-key")
    }
}

/// Authenticates callers the configured way.
pub enum CallerCheck {
    /// The function key (checked by the host) is the only gate.
    FunctionKeyOnly,
    Jwt(Box<JwtValidator>),
    EasyAuth,
}

impl CallerCheck {
    pub fn new(settings: &CallerSettings, http: Arc<LazyClient>) -> Self {
        match &settings.mode {
            CallerMode::None => CallerCheck::FunctionKeyOnly,
            CallerMode::EasyAuth => CallerCheck::EasyAuth,
            CallerMode::Jwt {
                issuer,
                audience,
                jwks_uri,
                clock_skew,
            } => CallerCheck::Jwt(Box::new(JwtValidator {
                http,
                issuer: issuer.clone(),
                audience: audience.clone(),
                configured_jwks_uri: jwks_uri.clone(),
                clock_skew: *clock_skew,
                keys: RwLock::new(None),
                refresh: Mutex::new(()),
            })),
        }
    }

    /// Who sent `headers`, or 401 `invalid_token`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        match self {
            CallerCheck::FunctionKeyOnly => Ok(Caller::default()),
            CallerCheck::Jwt(validator) => validator.authenticate(headers).await,
            CallerCheck::EasyAuth => easy_auth_caller(headers),
        }
    }
}

/// Whether `caller` may use `connection`: listed by id, or holding a listed role. A
/// connection that lists neither is open to every authenticated caller.
pub fn authorize(caller: &Caller, connection: &ConnectionSettings) -> Result<(), ApiError> {
    if connection.allowed_callers.is_empty() && connection.allowed_roles.is_empty() {
        return Ok(());
    }
    let by_id = caller.id.as_ref().is_some_and(|id| {
        connection
            .allowed_callers
            .iter()
            .any(|allowed| allowed == id)
    });
    let by_role = caller
        .roles
        .iter()
        .any(|role| connection.allowed_roles.contains(role));
    if by_id || by_role {
        Ok(())
    } else {
        Err(ApiError::AccessDenied(format!(
            "the caller is not allowed to use connection '{}'",
            connection.name
        )))
    }
}

/// Validates bearer tokens against an issuer's keys.
pub struct JwtValidator {
    http: Arc<LazyClient>,
    issuer: String,
    audience: String,
    configured_jwks_uri: Option<Url>,
    clock_skew: Duration,
    keys: RwLock<Option<Keys>>,
    /// Serialises downloads so that a burst of unknown `kid`s causes one.
    refresh: Mutex<()>,
}

struct Keys {
    set: Arc<JwkSet>,
    fetched_at: Instant,
}

#[derive(Deserialize)]
struct Claims {
    oid: Option<String>,
    azp: Option<String>,
    appid: Option<String>,
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: Url,
}

fn invalid_token(reason: &str) -> ApiError {
    ApiError::InvalidToken(reason.to_string())
}

impl JwtValidator {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = bearer(headers)?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid_token("the bearer token is not a well-formed JWT"))?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(invalid_token(
                "the bearer token's algorithm is not accepted",
            ));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| invalid_token("the bearer token has no key id"))?;
        let key = self.key(kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = self.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            invalid_token(match error.kind() {
                ErrorKind::ExpiredSignature => "the bearer token has expired",
                ErrorKind::ImmatureSignature => "the bearer token is not valid yet",
                ErrorKind::InvalidAudience => "the bearer token is for another audience",
                ErrorKind::InvalidIssuer => "the bearer token is from another issuer",
                ErrorKind::InvalidSignature => "the bearer token's signature does not verify",
                ErrorKind::MissingRequiredClaim(_) => "the bearer token lacks a required claim",
                _ => "the bearer token is not valid",
            })
        })?;
        let claims = data.claims;
        let id = claims
            .oid
            .or(claims.azp)
            .or(claims.appid)
            .or(claims.sub)
            .ok_or_else(|| invalid_token("the bearer token names no caller"))?;
        Ok(Caller {
            id: Some(id),
            roles: claims.roles,
        })
    }

    /// The decoding key for `kid`, downloading the JWKS when `kid` is unknown (rotation).
    async fn key(&self, kid: &str) -> Result<DecodingKey, ApiError> {
        if let Some(set) = self.current_keys(false).await
            && let Some(jwk) = set.find(kid)
        {
            return DecodingKey::from_jwk(jwk).map_err(|_| invalid_token("unusable signing key"));
        }
        let set = self.refresh_keys().await.ok_or_else(|| {
            ApiError::Internal("the caller token issuer's keys cannot be read".to_string())
        })?;
        let jwk = set
            .find(kid)
            .ok_or_else(|| invalid_token("the bearer token was signed by an unknown key"))?;
        DecodingKey::from_jwk(jwk).map_err(|_| invalid_token("unusable signing key"))
    }

    /// The cached key set; `None` when absent or older than `JWKS_MAX_AGE`.
    async fn current_keys(&self, any_age: bool) -> Option<Arc<JwkSet>> {
        let keys = self.keys.read().await;
        let keys = keys.as_ref()?;
        (any_age || keys.fetched_at.elapsed() < JWKS_MAX_AGE).then(|| keys.set.clone())
    }

    /// Downloads the key set, at most once per `JWKS_MIN_INTERVAL`; concurrent callers share
    /// one download. Keeps the old set when the download fails.
    async fn refresh_keys(&self) -> Option<Arc<JwkSet>> {
        let _one_at_a_time = self.refresh.lock().await;
        let last = self.keys.read().await.as_ref().map(|k| k.fetched_at);
        if let Some(last) = last {
            let since = last.elapsed();
            if since < JWKS_MIN_INTERVAL {
                tokio::time::sleep(JWKS_MIN_INTERVAL - since).await;
            }
        }
        match self.download().await {
            Ok(set) => {
                tracing::info!(
                    keys = set.keys.len(),
                    "downloaded caller token signing keys"
                );
                let set = Arc::new(set);
                *self.keys.write().await = Some(Keys {
                    set: set.clone(),
                    fetched_at: Instant::now(),
                });
                Some(set)
            }
            Err(reason) => {
                tracing::warn!(%reason, "cannot download caller token signing keys");
                self.current_keys(true).await
            }
        }
    }

    async fn download(&self) -> Result<JwkSet, String> {
        let jwks_uri = match &self.configured_jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    self.issuer.trim_end_matches('/')
                );
                self.get_json::<Discovery>(&discovery).await?.jwks_uri
            }
        };
        self.get_json::<JwkSet>(jwks_uri.as_str()).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let http = self.http.get().map_err(str::to_string)?;
        let response = http
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|_| format!("{url} unreachable"))?;
        if !response.status().is_success() {
            return Err(format!(
                "{url} answered HTTP {}",
                response.status().as_u16()
            ));
        }
        let body = response
            .bytes()
            .await
            .map_err(|_| format!("{url} answer incomplete"))?;
        serde_json::from_slice(&body).map_err(|_| format!("{url} answer is not the expected JSON"))
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(ApiError::MissingToken)?
        .to_str()
        .map_err(|_| invalid_token("the Authorization header is not text"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| invalid_token("the Authorization header is not a bearer token"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(invalid_token(
            "the Authorization header is not a bearer token",
        ));
    }
    Ok(token.trim())
}

/// The principal App Service Authentication injected (`X-MS-CLIENT-PRINCIPAL`, base64 JSON).
#[derive(Deserialize)]
struct ClientPrincipal {
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

/// Only safe where App Service Authentication is on: the platform then strips any
/// client-supplied copy of the header. Without it, the header is whatever the client sent.
fn easy_auth_caller(headers: &HeaderMap) -> Result<Caller, ApiError> {
    let encoded = headers
        .get("x-ms-client-principal")
        .ok_or(ApiError::MissingToken)?
        .to_str()
        .map_err(|_| invalid_token("X-MS-CLIENT-PRINCIPAL is not text"))?;
    let decoded = BASE64
        .decode(encoded.trim())
        .map_err(|_| invalid_token("X-MS-CLIENT-PRINCIPAL is not base64"))?;
    let principal: ClientPrincipal = serde_json::from_slice(&decoded)
        .map_err(|_| invalid_token("X-MS-CLIENT-PRINCIPAL is not a client principal"))?;
    let claim = |types: &[&str]| {
        principal
            .claims
            .iter()
            .find(|c| types.contains(&c.typ.as_str()))
            .map(|c| c.val.clone())
    };
    let id = claim(&[OBJECT_ID_CLAIM, "oid"])
        .or_else(|| claim(&["azp", "appid"]))
        .or_else(|| {
            headers
                .get("x-ms-client-principal-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .ok_or_else(|| invalid_token("X-MS-CLIENT-PRINCIPAL names no caller"))?;
    let role_type = principal.role_typ.as_deref().unwrap_or(ROLE_CLAIM);
    let roles = principal
        .claims
        .iter()
        .filter(|c| c.typ == role_type || c.typ == "roles" || c.typ == ROLE_CLAIM)
        .map(|c| c.val.clone())
        .collect();
    Ok(Caller {
        id: Some(id),
        roles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(json: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-ms-client-principal",
            BASE64.encode(json).parse().unwrap(),
        );
        headers
    }

    #[test]
    fn easy_auth_reads_the_object_id_and_roles() {
        let headers = principal(
            r#"{"auth_typ":"aad","claims":[{"typ":"http://schemas.microsoft.com/identity/claims/objectidentifier","val":"oid-1"},{"typ":"roles","val":"Tokens.Contoso"}],"name_typ":"name","role_typ":"roles"}"#,
        );
        let caller = easy_auth_caller(&headers).unwrap();
        assert_eq!(caller.id.as_deref(), Some("oid-1"));
        assert_eq!(caller.roles, ["Tokens.Contoso"]);
    }

    #[test]
    fn easy_auth_without_the_header_is_unauthenticated() {
        assert!(matches!(
            easy_auth_caller(&HeaderMap::new()),
            Err(ApiError::MissingToken)
        ));
        assert!(matches!(
            easy_auth_caller(&principal("not json")),
            Err(ApiError::InvalidToken(_))
        ));
    }

    #[test]
    fn bearer_parsing_is_strict_about_the_scheme() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer(&headers).is_err());
        headers.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers).unwrap(), "abc");
    }
}
