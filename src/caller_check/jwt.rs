//! `jwt` mode: the caller's own access token for the broker's audience, checked against the
//! issuer's keys. Fits both shapes of Entra token: v1 (`iss https://sts.windows.net/{tid}/`,
//! `aud api://...`, `appid`) and v2 (`iss https://login.microsoftonline.com/{tid}/v2.0`,
//! `aud` = the client id, `azp`), so `issuer` and `audience` are lists.

use crate::observe::stats::Registry;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::caller::{Caller, CallerError, CallerHeaders, bearer};
use super::claimed::{Claimed, delegated};
use super::jwks::{HttpKeySource, KeyError, KeySource, KeyStore};

/// Signature algorithms a caller token may use, by their JOSE names: asymmetric only. `none`
/// and the HMAC family (whose "key" would be public JWKS material) are refused here, before a
/// key is looked up, whatever the library underneath would do.
const ALLOWED_ALGORITHMS: &[(&str, Algorithm)] = &[
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// What a caller token must say.
pub(crate) struct JwtSettings {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub tenant: Option<String>,
    pub clock_skew: Duration,
}

/// Validates bearer tokens against an issuer's keys.
pub(crate) struct JwtValidator<S = HttpKeySource> {
    settings: JwtSettings,
    keys: Arc<KeyStore<S>>,
}

/// The JOSE header, read by hand so that every `alg` (`none` included) reaches the allow-list.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    oid: Option<String>,
    /// v2 tokens: the client id of the caller.
    azp: Option<String>,
    /// v1 tokens: the client id of the caller.
    appid: Option<String>,
    /// RFC 9068 JWT access tokens (oidc-provider and others): the client id.
    client_id: Option<String>,
    sub: Option<String>,
    tid: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    /// Entra's delegated scopes: present only when a user signed in through the client.
    /// Read as any JSON value, since only its presence matters (other issuers use arrays).
    scp: Option<serde_json::Value>,
    /// Entra's optional `idtyp` claim: `app` for app-only tokens, `user` for delegated ones.
    idtyp: Option<String>,
}

impl<S: KeySource> JwtValidator<S> {
    pub(crate) fn new(settings: JwtSettings, source: S, stats: Arc<Registry>) -> Self {
        Self {
            settings,
            keys: KeyStore::new(source, stats),
        }
    }

    pub(crate) async fn authenticate(
        &self,
        headers: CallerHeaders<'_>,
    ) -> Result<Caller, CallerError> {
        self.validate(bearer(headers.authorization)?).await
    }

    async fn validate(&self, token: &str) -> Result<Caller, CallerError> {
        let invalid = CallerError::InvalidToken;
        let header = jose_header(token)?;
        let algorithm = ALLOWED_ALGORITHMS
            .iter()
            .find(|(name, _)| *name == header.alg)
            .map(|(_, algorithm)| *algorithm)
            .ok_or(invalid("the bearer token's algorithm is not accepted"))?;
        let kid = header
            .kid
            .as_deref()
            .ok_or(invalid("the bearer token has no key id"))?;
        let jwk = self.keys.key(kid).await.map_err(|error| match error {
            KeyError::UnknownKid => invalid("the bearer token was signed by an unknown key"),
            KeyError::Unavailable { retry_after } => CallerError::KeysUnavailable { retry_after },
        })?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| invalid("unusable signing key"))?;
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_issuer(&self.settings.issuers);
        validation.set_audience(&self.settings.audiences);
        validation.leeway = self.settings.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                invalid(match error.kind() {
                    ErrorKind::ExpiredSignature => "the bearer token has expired",
                    ErrorKind::ImmatureSignature => "the bearer token is not valid yet",
                    ErrorKind::InvalidAudience => "the bearer token is for another audience",
                    ErrorKind::InvalidIssuer => "the bearer token is from another issuer",
                    ErrorKind::InvalidSignature => "the bearer token's signature does not verify",
                    ErrorKind::MissingRequiredClaim(_) => "the bearer token lacks a required claim",
                    _ => "the bearer token is not valid",
                })
            })?
            .claims;
        if let Some(tenant) = &self.settings.tenant
            && !claims
                .tid
                .as_deref()
                .is_some_and(|tid| tid.eq_ignore_ascii_case(tenant))
        {
            return Err(invalid("the bearer token is from another tenant"));
        }
        let mut for_a_user = delegated(claims.scp.is_some(), claims.idtyp.as_deref());
        let client_id = match claims.azp.or(claims.appid) {
            Some(entra) => Some(entra),
            None => {
                // RFC 9068 §2.2: `sub` is the client itself in a client-credentials token and
                // the resource owner otherwise, so another `sub` marks a user's token.
                if let (Some(client), Some(subject)) = (&claims.client_id, &claims.sub) {
                    for_a_user |= client != subject;
                }
                claims.client_id
            }
        };
        Claimed {
            object_id: claims.oid,
            client_id,
            subject: claims.sub,
            roles: claims.roles,
            delegated: for_a_user,
        }
        .caller()
        .ok_or(invalid("the bearer token names no caller"))
    }
}

/// The header of a compact JWS: three base64url parts, the first a JSON object.
fn jose_header(token: &str) -> Result<JoseHeader, CallerError> {
    let malformed = CallerError::InvalidToken("the bearer token is not a well-formed JWT");
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed.clone())?;
    serde_json::from_slice(&json).map_err(|_| malformed)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{Value, json};

    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const V1_ISSUER: &str = "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/";
    const V2_ISSUER: &str =
        "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0";
    const APP_ID_URI: &str = "api://token-broker";
    const BROKER_CLIENT_ID: &str = "6e1f3a2b-0000-4000-8000-00000000b20c";

    /// A P-256 key generated per test, published as a one-key set.
    struct TestKey {
        key: token_broker_doubles::entra_keys::SigningKey,
        jwks: JwkSet,
    }

    impl TestKey {
        fn new() -> Self {
            let key = token_broker_doubles::entra_keys::SigningKey::generate().unwrap();
            let jwks = serde_json::from_value(key.jwks().clone()).unwrap();
            Self { key, jwks }
        }

        fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(self.key.kid().to_string());
            let private = EncodingKey::from_ec_der(self.key.private_key_pkcs8_der());
            jsonwebtoken::encode(&header, claims, &private).unwrap()
        }
    }

    struct StaticSource(JwkSet);

    impl KeySource for StaticSource {
        async fn fetch(&self) -> Result<JwkSet, String> {
            Ok(self.0.clone())
        }
    }

    fn entra_validator(key: &TestKey, tenant: Option<&str>) -> JwtValidator<StaticSource> {
        JwtValidator::new(
            JwtSettings {
                issuers: vec![V1_ISSUER.to_string(), V2_ISSUER.to_string()],
                audiences: vec![APP_ID_URI.to_string(), BROKER_CLIENT_ID.to_string()],
                tenant: tenant.map(str::to_string),
                clock_skew: Duration::from_secs(60),
            },
            StaticSource(key.jwks.clone()),
            Default::default(),
        )
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// An Entra v1 app token: `appid` names the client.
    fn v1(oid: &str, appid: &str, tid: &str) -> Value {
        json!({"iss": V1_ISSUER, "aud": APP_ID_URI, "appid": appid, "oid": oid, "sub": oid,
               "tid": tid, "ver": "1.0", "idtyp": "app", "iat": now(), "nbf": now(),
               "exp": now() + 3600})
    }

    /// An Entra v2 app token: `azp` names the client, `aud` is the broker's client id.
    fn v2(oid: &str, azp: &str, tid: &str) -> Value {
        json!({"iss": V2_ISSUER, "aud": BROKER_CLIENT_ID, "azp": azp, "oid": oid, "sub": oid,
               "tid": tid, "ver": "2.0", "idtyp": "app", "roles": ["Tokens.Contoso"],
               "iat": now(), "nbf": now(), "exp": now() + 3600})
    }

    #[tokio::test]
    async fn v1_and_v2_entra_tokens_name_the_object_id_and_the_client_id() {
        let key = TestKey::new();
        let validator = entra_validator(&key, Some(TENANT));
        let caller = validator
            .validate(&key.sign(&v1("oid-apim", "client-apim", TENANT)))
            .await
            .unwrap();
        assert_eq!(caller.ids, ["oid-apim", "client-apim"]);
        let caller = validator
            .validate(&key.sign(&v2("oid-apim", "client-apim", TENANT)))
            .await
            .unwrap();
        assert_eq!(caller.ids, ["oid-apim", "client-apim"]);
        assert_eq!(caller.roles, ["Tokens.Contoso"]);
    }

    #[tokio::test]
    async fn a_delegated_token_names_the_user_and_not_the_client_it_came_through() {
        let key = TestKey::new();
        let validator = entra_validator(&key, Some(TENANT));
        // A user's token obtained through client-apim: v1 and v2 shapes, with and without
        // the optional `idtyp` claim.
        let mut v1_user = v1("oid-user", "client-apim", TENANT);
        v1_user["scp"] = json!("user_impersonation");
        v1_user["idtyp"] = json!("user");
        let mut v2_user = v2("oid-user", "client-apim", TENANT);
        v2_user["scp"] = json!("Tokens.Read");
        v2_user.as_object_mut().unwrap().remove("idtyp");
        // `idtyp: user` alone is enough.
        let mut v2_typed = v2("oid-user", "client-apim", TENANT);
        v2_typed["idtyp"] = json!("user");
        for claims in [v1_user, v2_user, v2_typed] {
            let caller = validator.validate(&key.sign(&claims)).await.unwrap();
            assert_eq!(caller.ids, ["oid-user"], "{claims}");
        }
        // An app-only token without the optional claim still names its client.
        let mut app = v2("oid-apim", "client-apim", TENANT);
        app.as_object_mut().unwrap().remove("idtyp");
        let caller = validator.validate(&key.sign(&app)).await.unwrap();
        assert_eq!(caller.ids, ["oid-apim", "client-apim"]);
    }

    #[tokio::test]
    async fn an_rfc_9068_token_names_its_client_only_when_sub_is_the_client() {
        let key = TestKey::new();
        let issuer = "https://idp.example";
        let validator = JwtValidator::new(
            JwtSettings {
                issuers: vec![issuer.to_string()],
                audiences: vec![APP_ID_URI.to_string()],
                tenant: None,
                clock_skew: Duration::from_secs(60),
            },
            StaticSource(key.jwks.clone()),
            Default::default(),
        );
        let token = |sub: &str| {
            json!({"iss": issuer, "aud": APP_ID_URI, "client_id": "client-apim", "sub": sub,
                   "scope": "read", "iat": now(), "exp": now() + 3600})
        };
        let app = validator
            .validate(&key.sign(&token("client-apim")))
            .await
            .unwrap();
        assert_eq!(app.ids, ["client-apim"]);
        let user = validator
            .validate(&key.sign(&token("alice")))
            .await
            .unwrap();
        assert_eq!(user.ids, ["alice"]);
    }

    #[tokio::test]
    async fn another_tenant_issuer_or_audience_is_refused() {
        let key = TestKey::new();
        let validator = entra_validator(&key, Some(TENANT));
        let other_tenant = "00000000-0000-0000-0000-000000000bad";
        assert_eq!(
            validator
                .validate(&key.sign(&v2("o", "c", other_tenant)))
                .await
                .unwrap_err(),
            CallerError::InvalidToken("the bearer token is from another tenant")
        );
        let mut token = v2("o", "c", TENANT);
        token["iss"] = json!("https://login.microsoftonline.com/other/v2.0");
        assert_eq!(
            validator.validate(&key.sign(&token)).await.unwrap_err(),
            CallerError::InvalidToken("the bearer token is from another issuer")
        );
        let mut token = v1("o", "c", TENANT);
        token["aud"] = json!("api://something-else");
        assert_eq!(
            validator.validate(&key.sign(&token)).await.unwrap_err(),
            CallerError::InvalidToken("the bearer token is for another audience")
        );
        // Without `tenant` configured, `tid` is not checked.
        assert!(
            entra_validator(&key, None)
                .validate(&key.sign(&v2("o", "c", other_tenant)))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn none_and_hmac_signed_with_the_public_key_are_refused_by_the_allow_list() {
        let key = TestKey::new();
        let validator = entra_validator(&key, None);
        let claims = v2("o", "c", TENANT);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let kid = key.key.kid();
        let none = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": kid}).to_string());
        let mut tokens = vec![
            format!("{none}.{payload}."),
            format!("{none}.{payload}.c2ln"),
        ];
        let pem = key.key.public_key_pem();
        for secret in [pem.as_bytes(), key.key.public_key_raw()] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(kid.to_string());
            tokens.push(
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap(),
            );
        }
        for token in tokens {
            assert_eq!(
                validator.validate(&token).await.unwrap_err(),
                CallerError::InvalidToken("the bearer token's algorithm is not accepted"),
                "{token}"
            );
        }
    }

    #[test]
    fn a_token_that_is_not_three_parts_is_malformed() {
        for token in ["a.b", "a.b.c.d", "!!.b.c", "e30"] {
            assert!(jose_header(token).is_err(), "{token}");
        }
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        assert_eq!(jose_header(&format!("{header}.x.")).unwrap().alg, "none");
    }
}
