//! Who may get which token: caller tokens issued by the real oidc-provider, and Entra-shaped
//! tokens signed by the Entra key double.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures_util::future::join_all;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json as json_value};
use token_broker_doubles::entra_keys::{EntraKeysDouble, KeysFault};

use crate::support::{RESOURCE, Setup, TestApp, json, jwt_callers, spawn_app_with};

async fn jwt_app() -> crate::support::TestApp {
    spawn_app_with(Setup {
        extra_config: jwt_callers("{issuer}", None, 60),
        ..Setup::default()
    })
    .await
}

async fn assert_invalid_token(response: reqwest::Response, why: &str) {
    assert_eq!(response.status(), 401, "{why}");
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let body = json(response).await;
    assert_eq!(body["error"], "invalid_token", "{why}: {body}");
}

#[tokio::test]
async fn a_valid_caller_gets_a_token_and_is_named_in_the_audit_line() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    let response = app.get_as("/api/token/guarded", &bearer).await;
    assert_eq!(response.status(), 200);
    // Connections listing `*` serve any authenticated caller.
    assert_eq!(app.get_as("/api/token/demo", &bearer).await.status(), 200);
    let callers: Vec<String> = app
        .audit_records_when(2)
        .await
        .iter()
        .map(|r| r["caller"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(callers, ["caller-app", "caller-app"]);
}

#[tokio::test]
async fn a_request_without_a_bearer_token_is_401_with_a_challenge() {
    let app = jwt_app().await;
    let response = app.token("demo").await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"token-broker\""
    );
    // An unauthenticated caller does not learn which connections exist.
    assert_eq!(app.token("no-such-connection").await.status(), 401);
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token_for("caller-app", RESOURCE).await;
    assert_invalid_token(
        app.get_as("/api/token/demo", &bearer).await,
        "wrong audience",
    )
    .await;
}

#[tokio::test]
async fn a_token_from_another_issuer_is_refused_even_with_a_valid_signature() {
    // The keys are the provider's, but the broker expects another issuer.
    let app = spawn_app_with(Setup {
        extra_config: jwt_callers(
            "https://login.example.com/tenant/v2.0",
            Some("{jwks_uri}"),
            60,
        ),
        ..Setup::default()
    })
    .await;
    let bearer = app.idp.caller_token("caller-app").await;
    assert_invalid_token(app.get_as("/api/token/demo", &bearer).await, "wrong issuer").await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let app = spawn_app_with(Setup {
        extra_config: jwt_callers("{issuer}", None, 0),
        ..Setup::default()
    })
    .await;
    let bearer = app.idp.caller_token("caller-short").await; // lives 1 s
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(bearer.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let exp = claims["exp"].as_u64().unwrap();
    // Wait for the real clock to pass the token's expiry (at most about 2 s).
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= exp
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let response = app.get_as("/api/token/demo", &bearer).await;
    assert_eq!(response.status(), 401);
    let body = json(response).await;
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
}

#[tokio::test]
async fn a_tampered_signature_or_payload_is_refused() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    let parts: Vec<&str> = bearer.split('.').collect();
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[10] ^= 0x01;
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(signature)
    );
    assert_invalid_token(app.get_as("/api/token/demo", &tampered).await, "signature").await;
    // A payload claiming to be another caller, with the original signature.
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap())
        .unwrap()
        .replace("caller-app", "caller-adm");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload),
        parts[2]
    );
    assert_invalid_token(app.get_as("/api/token/guarded", &forged).await, "payload").await;
}

/// A 401 that the broker's own algorithm allow-list gave, not a header it could not parse.
async fn assert_refused_by_the_allow_list(response: reqwest::Response, why: &str) {
    assert_eq!(response.status(), 401, "{why}");
    let body = json(response).await;
    assert_eq!(body["error"], "invalid_token", "{why}: {body}");
    assert_eq!(
        body["error_description"], "the bearer token's algorithm is not accepted",
        "{why}: {body}"
    );
}

#[tokio::test]
async fn unsigned_and_hmac_tokens_made_with_the_public_key_are_refused_by_the_allow_list() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    let kid = jsonwebtoken::decode_header(&bearer).unwrap().kid.unwrap();
    let payload = bearer.split('.').nth(1).unwrap();
    // `alg: none` with the provider's real key id: well formed, so only the allow-list stops it.
    let none = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
    assert_refused_by_the_allow_list(
        app.get_as("/api/token/demo", &format!("{none}.{payload}."))
            .await,
        "alg none",
    )
    .await;
    // HS256 really signed with the provider's public key as the HMAC secret, in the forms a
    // confused verifier would use: the published JWK as served, and the raw modulus.
    let jwks: Value = reqwest::get(&app.idp.jwks_uri)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["kid"] == kid.as_str())
        .unwrap();
    let modulus = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    for secret in [jwk.to_string().into_bytes(), modulus] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
        assert_refused_by_the_allow_list(app.get_as("/api/token/demo", &token).await, "HS256")
            .await;
    }
}

#[tokio::test]
async fn an_unknown_key_id_after_a_key_rotation_is_found_by_reloading_the_jwks() {
    let mut app = jwt_app().await;
    let before = app.idp.caller_token("caller-app").await;
    assert_eq!(app.get_as("/api/token/demo", &before).await.status(), 200);
    // The provider restarts with new signing keys (same issuer): a rotation.
    app.idp.restart(|_| {}).await;
    let after = app.idp.caller_token("caller-app").await;
    let kid = |token: &str| jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    assert_ne!(kid(&before), kid(&after), "the provider rotated its key");
    assert_eq!(app.get_as("/api/token/demo", &after).await.status(), 200);
    // The retired key's tokens no longer verify.
    assert_eq!(app.get_as("/api/token/demo", &before).await.status(), 401);
}

#[tokio::test]
async fn a_caller_not_listed_is_denied_and_a_listed_role_is_allowed() {
    let app = jwt_app().await;
    let plain = app.idp.caller_token("caller-app").await;
    let admin = app.idp.caller_token("caller-admin").await;
    let denied = app.get_as("/api/token/byrole", &plain).await;
    assert_eq!(denied.status(), 403);
    assert_eq!(json(denied).await["error"], "access_denied");
    assert_eq!(app.get_as("/api/token/byrole", &admin).await.status(), 200);
    let denied = app.get_as("/api/token/guarded", &admin).await;
    assert_eq!(denied.status(), 403);
    assert_eq!(
        app.idp.stats().await.token_requests,
        2 + 1,
        "two caller tokens and one broker token"
    );
}

/// The check comes before the cache: a token already in memory for a connection is no
/// reason to hand it to a caller the connection does not list.
#[tokio::test]
async fn a_caller_not_listed_is_denied_even_when_the_token_is_cached() {
    let mut app = jwt_app().await;
    let listed = app.idp.caller_token("caller-app").await;
    let unlisted = app.idp.caller_token("caller-admin").await;
    let served = app.get_as("/api/token/guarded", &listed).await;
    assert_eq!(served.status(), 200);
    let cached = json(served).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    // Cached now: the listed caller gets it again without a token request.
    let again = json(app.get_as("/api/token/guarded", &listed).await).await;
    assert_eq!(again["access_token"], cached.as_str());
    let token_requests = app.idp.stats().await.token_requests;

    let denied = app.get_as("/api/token/guarded", &unlisted).await;
    assert_eq!(denied.status(), 403);
    let text = denied.text().await.unwrap();
    assert!(
        !text.contains(&cached),
        "the cached token is not in the refusal"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], "access_denied");
    assert!(body.get("access_token").is_none(), "{body}");
    assert_eq!(
        app.idp.stats().await.token_requests,
        token_requests,
        "nothing was fetched for the denied caller"
    );
    // One more for the listed caller, then shutdown writes every record (hits are counted
    // per caller and token): only the listed caller's three tokens are accounted for.
    assert_eq!(
        app.get_as("/api/token/guarded", &listed).await.status(),
        200
    );
    assert!(app.terminate().await.success());
    let mut handed_out = std::collections::BTreeMap::<(String, String), u64>::new();
    for record in app.audit_records() {
        *handed_out
            .entry((
                record["caller"].as_str().unwrap().to_string(),
                record["cache"].as_str().unwrap().to_string(),
            ))
            .or_default() += record["count"].as_u64().unwrap();
    }
    assert_eq!(
        handed_out,
        std::collections::BTreeMap::from([
            (("caller-app".to_string(), "hit".to_string()), 2),
            (("caller-app".to_string(), "miss".to_string()), 1),
        ])
    );
}

#[tokio::test]
async fn a_forged_easy_auth_header_is_ignored_in_jwt_mode() {
    let app = jwt_app().await;
    let principal = STANDARD.encode(
        r#"{"auth_typ":"aad","claims":[{"typ":"oid","val":"caller-app"},{"typ":"roles","val":"Tokens.Contoso"}],"role_typ":"roles"}"#,
    );
    let forged = |path: &str| {
        app.request(path)
            .header("X-MS-CLIENT-PRINCIPAL", principal.clone())
            .header("X-MS-CLIENT-PRINCIPAL-ID", "caller-app")
    };
    // Alone, the header authenticates nobody.
    assert_eq!(
        forged("/api/token/guarded").send().await.unwrap().status(),
        401
    );
    // Beside a valid token, the token names the caller: caller-admin is not caller-app...
    let admin = app.idp.caller_token("caller-admin").await;
    let response = forged("/api/token/guarded")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(json(response).await["error"], "access_denied");
    // ...and caller-app does not gain the role the header claims.
    let plain = app.idp.caller_token("caller-app").await;
    let response = forged("/api/token/byrole")
        .bearer_auth(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn a_scope_outside_allowed_scopes_is_invalid_scope() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    let response = app.get_as("/api/token/guarded?scope=write", &bearer).await;
    assert_eq!(response.status(), 400);
    assert_eq!(json(response).await["error"], "invalid_scope");
    assert_eq!(
        app.get_as("/api/token/guarded?scope=read", &bearer)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn easy_auth_mode_takes_the_caller_from_the_platform_header() {
    let app = spawn_app_with(Setup {
        extra_config: format!(
            "\n[callers]\nmode = \"easy_auth\"\n{}",
            crate::support::GUARDED
        ),
        // App Service Authentication is on: the platform says so.
        extra_env: vec![("WEBSITE_AUTH_ENABLED".to_string(), "True".to_string())],
        ..Setup::default()
    })
    .await;
    let principal = |oid: &str| {
        STANDARD.encode(format!(
            r#"{{"auth_typ":"aad","claims":[{{"typ":"http://schemas.microsoft.com/identity/claims/objectidentifier","val":"{oid}"}}],"name_typ":"name","role_typ":"roles"}}"#
        ))
    };
    let send = |oid: &str| {
        app.request("/api/token/guarded")
            .header("X-MS-CLIENT-PRINCIPAL", principal(oid))
            .send()
    };
    assert_eq!(send("caller-app").await.unwrap().status(), 200);
    assert_eq!(send("someone-else").await.unwrap().status(), 403);
    assert_eq!(app.token("guarded").await.status(), 401);
}

/// Review finding 10, Easy Auth: only Entra's principals are read, and a listed client id
/// admits the application's own calls, not its users'.
#[tokio::test]
async fn easy_auth_reads_only_entra_principals_and_a_client_id_admits_app_only_calls() {
    let app = spawn_app_with(Setup {
        extra_config: format!(
            "\n[callers]\nmode = \"easy_auth\"\n{}",
            crate::support::GUARDED
        ),
        extra_env: vec![("WEBSITE_AUTH_ENABLED".to_string(), "True".to_string())],
        ..Setup::default()
    })
    .await;
    const OID: &str = "http://schemas.microsoft.com/identity/claims/objectidentifier";
    const SCOPE: &str = "http://schemas.microsoft.com/identity/claims/scope";
    let send = |json: String| {
        app.request("/api/token/guarded")
            .header("X-MS-CLIENT-PRINCIPAL", STANDARD.encode(json))
            .send()
    };
    // `caller-app` is listed; the platform maps Entra's claims as it does for an access token.
    let app_only = format!(
        r#"{{"auth_typ":"aad","claims":[{{"typ":"{OID}","val":"sp-object-id"}},{{"typ":"azp","val":"caller-app"}},{{"typ":"idtyp","val":"app"}}],"name_typ":"name","role_typ":"roles"}}"#
    );
    assert_eq!(send(app_only).await.unwrap().status(), 200);
    let user = format!(
        r#"{{"auth_typ":"aad","claims":[{{"typ":"{OID}","val":"user-object-id"}},{{"typ":"azp","val":"caller-app"}},{{"typ":"{SCOPE}","val":"Tokens.Read"}}],"name_typ":"name","role_typ":"roles"}}"#
    );
    let response = send(user).await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(json(response).await["error"], "access_denied");
    // Another provider's principal naming the listed id, or one naming no provider, is not
    // an Entra caller at all.
    for provider in [r#""auth_typ":"google","#, r#""auth_typ":"github","#, ""] {
        let principal = format!(
            r#"{{{provider}"claims":[{{"typ":"oid","val":"caller-app"}},{{"typ":"azp","val":"caller-app"}}],"name_typ":"name","role_typ":"roles"}}"#
        );
        let response = send(principal).await.unwrap();
        assert_eq!(response.status(), 401, "{provider}");
        let body = json(response).await;
        assert_eq!(body["error"], "invalid_token", "{provider}: {body}");
        assert_eq!(
            body["error_description"],
            "X-MS-CLIENT-PRINCIPAL is not from Microsoft Entra (auth_typ is not aad)",
            "{body}"
        );
    }
}

/// Sends `count` requests for the guarded connection with `bearer(i)` at once; returns each
/// status, body and wait.
async fn concurrently(
    app: &TestApp,
    count: usize,
    bearer: impl Fn(usize) -> String,
) -> Vec<(u16, Value, Duration)> {
    join_all((0..count).map(|i| {
        let bearer = bearer(i);
        async move {
            let start = Instant::now();
            let response = app.get_as("/api/token/guarded", &bearer).await;
            let status = response.status().as_u16();
            (status, json(response).await, start.elapsed())
        }
    }))
    .await
}

#[tokio::test]
async fn forty_concurrent_cold_callers_share_one_key_set_download() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    let before = app.idp.key_stats().await;
    let results = concurrently(&app, 40, |_| bearer.clone()).await;
    for (status, body, _) in &results {
        assert_eq!(*status, 200, "{body}");
    }
    let slowest = results.iter().map(|(_, _, waited)| *waited).max().unwrap();
    assert!(
        slowest < Duration::from_secs(3),
        "slowest waited {slowest:?}"
    );
    let after = app.idp.key_stats().await;
    assert_eq!(
        after.jwks_requests - before.jwks_requests,
        1,
        "one JWKS download"
    );
    assert_eq!(
        after.discovery_requests - before.discovery_requests,
        1,
        "one discovery"
    );
}

#[tokio::test]
async fn twenty_callers_with_unknown_key_ids_are_refused_at_once_with_one_reload() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    assert_eq!(
        app.get_as("/api/token/guarded", &bearer).await.status(),
        200
    );
    let loaded = app.idp.key_stats().await.jwks_requests;
    assert_eq!(loaded, 1);
    let rest = bearer.split_once('.').unwrap().1.to_string();
    let results = concurrently(&app, 20, |i| {
        let header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"RS256","typ":"JWT","kid":"made-up-{i}"}}"#
        ));
        format!("{header}.{rest}")
    })
    .await;
    for (status, body, _) in &results {
        assert_eq!(*status, 401, "{body}");
        assert_eq!(
            body["error_description"], "the bearer token was signed by an unknown key",
            "{body}"
        );
    }
    let slowest = results.iter().map(|(_, _, waited)| *waited).max().unwrap();
    assert!(
        slowest < Duration::from_secs(3),
        "slowest waited {slowest:?}"
    );
    assert_eq!(
        app.idp.key_stats().await.jwks_requests - loaded,
        1,
        "twenty unknown key ids cause one reload"
    );
    // The keys held still serve.
    assert_eq!(
        app.get_as("/api/token/guarded", &bearer).await.status(),
        200
    );
}

// ---- Entra-shaped tokens ---------------------------------------------------------------

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The broker's own app registration: v2 tokens carry its client id as `aud`.
const BROKER_CLIENT_ID: &str = "6e1f3a2b-5c4d-4e3f-8a9b-0c1d2e3f4a5b";
/// API Management's identity: a client id and an object id, different GUIDs.
const APIM_CLIENT_ID: &str = "0b7e5f1a-2c3d-4e5f-9a8b-7c6d5e4f3a2b";
const APIM_OBJECT_ID: &str = "d4c3b2a1-9f8e-4d7c-8b6a-5f4e3d2c1b0a";
/// Another app in the same tenant.
const OTHER_CLIENT_ID: &str = "11111111-2222-4333-8444-555555555555";
const OTHER_OBJECT_ID: &str = "99999999-8888-4777-8666-555555555555";
/// A user of the tenant who can sign in through API Management's client.
const USER_OBJECT_ID: &str = "5e3f2a1b-7c6d-4e5f-a0b1-c2d3e4f5a6b7";

fn v1_issuer() -> String {
    format!("https://sts.windows.net/{TENANT}/")
}

fn v2_issuer() -> String {
    format!("https://login.microsoftonline.com/{TENANT}/v2.0")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An Entra v1 app-only token (`accessTokenAcceptedVersion` 1): `appid` names the client,
/// `oid` and `sub` its service principal, `roles` the app roles granted to it.
fn v1_token(client_id: &str, object_id: &str, tid: &str) -> Value {
    json_value!({
        "iss": v1_issuer(), "aud": "api://token-broker", "appid": client_id, "appidacr": "2",
        "oid": object_id, "sub": object_id, "tid": tid, "idtyp": "app", "ver": "1.0",
        "roles": ["Tokens.Contoso"], "iat": now(), "nbf": now(), "exp": now() + 3600,
    })
}

/// An Entra v2 app-only token: `azp` names the client, `aud` is the broker's client id.
fn v2_token(client_id: &str, object_id: &str, tid: &str) -> Value {
    json_value!({
        "iss": v2_issuer(), "aud": BROKER_CLIENT_ID, "azp": client_id, "azpacr": "2",
        "oid": object_id, "sub": object_id, "tid": tid, "idtyp": "app", "ver": "2.0",
        "roles": ["Tokens.Contoso"], "iat": now(), "nbf": now(), "exp": now() + 3600,
    })
}

/// An Entra v1 delegated token: the user `object_id` signed in through `client_id`, which
/// `appid` names as in an app token; `scp` holds the delegated scopes, `sub` is pairwise.
fn v1_user_token(client_id: &str, object_id: &str) -> Value {
    json_value!({
        "iss": v1_issuer(), "aud": "api://token-broker", "appid": client_id, "appidacr": "0",
        "oid": object_id, "sub": "mJ2nQ8tWv1XyZa3bC4dE5fG6hI7jK8lM9nO0pQ1rS2t", "tid": TENANT,
        "scp": "user_impersonation", "amr": ["pwd", "mfa"], "upn": "alice@contoso.example",
        "unique_name": "alice@contoso.example", "name": "Alice", "ver": "1.0",
        "iat": now(), "nbf": now(), "exp": now() + 3600,
    })
}

/// An Entra v2 delegated token, with the optional `idtyp` claim (`user`) configured.
fn v2_user_token(client_id: &str, object_id: &str) -> Value {
    json_value!({
        "iss": v2_issuer(), "aud": BROKER_CLIENT_ID, "azp": client_id, "azpacr": "0",
        "oid": object_id, "sub": "Xk3pL9qR2sT5uV8wY1zA4bC7dE0fG3hI6jK9lM2nO5p", "tid": TENANT,
        "scp": "Tokens.Read", "idtyp": "user", "preferred_username": "alice@contoso.example",
        "name": "Alice", "ver": "2.0", "iat": now(), "nbf": now(), "exp": now() + 3600,
    })
}

fn sign(keys: &EntraKeysDouble, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(keys.key().kid().to_string());
    let key = EncodingKey::from_ec_der(keys.key().private_key_pkcs8_der());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// `[callers]` as an Entra tenant's broker would write it, with keys from `jwks_uri` (or
/// discovery at `issuer_override` when given), a connection only APIM may use (by client id)
/// and one only the user may use (by object id).
fn entra_callers(jwks_uri: Option<&str>, issuer_override: Option<&str>) -> String {
    let issuers = match issuer_override {
        Some(issuer) => format!("\"{issuer}\""),
        None => format!("[\"{}\", \"{}\"]", v1_issuer(), v2_issuer()),
    };
    let jwks = jwks_uri
        .map(|uri| format!("jwks_uri = \"{uri}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[callers]
mode = "jwt"
issuer = {issuers}
audience = ["api://token-broker", "{BROKER_CLIENT_ID}"]
tenant = "{TENANT}"
{jwks}
[connections.apim]
token_url = "{{token_url}}"
client_id = "broker-post"
client_secret = {{ key_vault_secret = "post-secret" }}
auth_method = "client_secret_post"
scopes = ["read"]
allowed_callers = ["{APIM_CLIENT_ID}"]

[connections.signed-in]
token_url = "{{token_url}}"
client_id = "broker-post"
client_secret = {{ key_vault_secret = "post-secret" }}
auth_method = "client_secret_post"
scopes = ["read"]
allowed_callers = ["{USER_OBJECT_ID}"]
"#
    )
}

async fn entra_app(keys: &EntraKeysDouble) -> TestApp {
    spawn_app_with(Setup {
        extra_config: entra_callers(Some(&keys.jwks_uri()), None),
        ..Setup::default()
    })
    .await
}

/// The leeway the clock-skew test configures: tokens are minted 20 s inside it or 45 s outside
/// it, so that neither the machine's pace nor a second's rounding can move a case across.
const SKEW_SECONDS: u64 = 30;

#[tokio::test]
async fn nbf_and_exp_are_checked_with_the_configured_clock_skew() {
    let keys = EntraKeysDouble::start().await.unwrap();
    let app = spawn_app_with(Setup {
        extra_config: format!(
            r#"
[callers]
mode = "jwt"
issuer = "{issuer}"
audience = "{BROKER_CLIENT_ID}"
tenant = "{TENANT}"
jwks_uri = "{jwks_uri}"
clock_skew_seconds = {SKEW_SECONDS}
"#,
            issuer = v2_issuer(),
            jwks_uri = keys.jwks_uri(),
        ),
        ..Setup::default()
    })
    .await;
    let hour = 3600;
    let within = SKEW_SECONDS - 10;
    let beyond = SKEW_SECONDS + 15;
    let with_times = |nbf: u64, exp: u64| {
        let mut claims = v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT);
        claims["iat"] = nbf.into();
        claims["nbf"] = nbf.into();
        claims["exp"] = exp.into();
        sign(&keys, &claims)
    };
    // Not valid yet, but within the leeway of a clock that runs behind: accepted.
    let early = with_times(now() + within, now() + hour);
    assert_eq!(app.get_as("/api/token/demo", &early).await.status(), 200);
    // Just expired, but within the leeway of a clock that runs ahead: accepted.
    let late = with_times(now() - hour, now() - within);
    assert_eq!(app.get_as("/api/token/demo", &late).await.status(), 200);
    // Beyond the leeway either way: refused, saying which.
    for (token, why) in [
        (with_times(now() + beyond, now() + hour), "not valid yet"),
        (with_times(now() - hour, now() - beyond), "expired"),
    ] {
        let response = app.get_as("/api/token/demo", &token).await;
        assert_eq!(response.status(), 401, "{why}");
        let body = json(response).await;
        assert!(
            body["error_description"].as_str().unwrap().contains(why),
            "{why}: {body}"
        );
    }
    let audit = app.audit_records_when(1).await;
    assert_eq!(audit[0]["caller"], APIM_OBJECT_ID, "{}", audit[0]);
}

#[tokio::test]
async fn v1_and_v2_entra_tokens_are_accepted_and_a_client_id_in_allowed_callers_matches() {
    let keys = EntraKeysDouble::start().await.unwrap();
    let mut app = entra_app(&keys).await;
    for token in [
        v1_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT),
        v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT),
    ] {
        let response = app.get_as("/api/token/apim", &sign(&keys, &token)).await;
        assert_eq!(response.status(), 200, "{token}");
    }
    // The audit line names the caller by its object id (the hit's once SIGTERM writes it).
    assert!(app.terminate().await.success());
    let callers: Vec<Value> = app
        .audit_records()
        .iter()
        .map(|record| record["caller"].clone())
        .collect();
    assert_eq!(callers, [APIM_OBJECT_ID, APIM_OBJECT_ID]);
    assert_eq!(keys.downloads(), 1);
}

/// Review finding 10: a client id in `allowed_callers` names the application itself, not
/// every user who signs in through it.
#[tokio::test]
async fn a_user_signed_in_through_the_listed_client_is_denied_unless_the_user_is_listed() {
    let keys = EntraKeysDouble::start().await.unwrap();
    let mut app = entra_app(&keys).await;
    for token in [
        v1_user_token(APIM_CLIENT_ID, USER_OBJECT_ID),
        v2_user_token(APIM_CLIENT_ID, USER_OBJECT_ID),
    ] {
        let bearer = sign(&keys, &token);
        let response = app.get_as("/api/token/apim", &bearer).await;
        assert_eq!(response.status(), 403, "{token}");
        let body = json(response).await;
        assert_eq!(body["error"], "access_denied", "{body}");
        assert!(body.get("access_token").is_none(), "{body}");
        // Listed by its object id, the user is served.
        let response = app.get_as("/api/token/signed-in", &bearer).await;
        assert_eq!(response.status(), 200, "{token}");
    }
    // An app-only token without the optional `idtyp` claim still matches its client id, and
    // API Management itself is not the user.
    let mut untyped = v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT);
    untyped.as_object_mut().unwrap().remove("idtyp");
    let bearer = sign(&keys, &untyped);
    assert_eq!(app.get_as("/api/token/apim", &bearer).await.status(), 200);
    let denied = app.get_as("/api/token/signed-in", &bearer).await;
    assert_eq!(denied.status(), 403);
    // The audit lines name the user by object id, never the client the user came through.
    assert!(app.terminate().await.success());
    let callers: std::collections::BTreeSet<String> = app
        .audit_records()
        .iter()
        .map(|record| record["caller"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        callers,
        std::collections::BTreeSet::from([APIM_OBJECT_ID.to_string(), USER_OBJECT_ID.to_string()])
    );
}

#[tokio::test]
async fn another_client_of_the_tenant_is_denied_and_another_tenant_is_refused() {
    let keys = EntraKeysDouble::start().await.unwrap();
    let app = entra_app(&keys).await;
    for token in [
        v1_token(OTHER_CLIENT_ID, OTHER_OBJECT_ID, TENANT),
        v2_token(OTHER_CLIENT_ID, OTHER_OBJECT_ID, TENANT),
    ] {
        let response = app.get_as("/api/token/apim", &sign(&keys, &token)).await;
        assert_eq!(response.status(), 403, "{token}");
        assert_eq!(json(response).await["error"], "access_denied");
    }
    // APIM's client id, but issued for another tenant (`tid`): not a token this broker takes.
    let foreign = v2_token(
        APIM_CLIENT_ID,
        APIM_OBJECT_ID,
        "00000000-0000-4000-8000-0000000000ff",
    );
    let response = app.get_as("/api/token/apim", &sign(&keys, &foreign)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        json(response).await["error_description"],
        "the bearer token is from another tenant"
    );
}

#[tokio::test]
async fn an_hmac_token_signed_with_the_entra_public_key_is_refused_by_the_allow_list() {
    let keys = EntraKeysDouble::start().await.unwrap();
    let app = entra_app(&keys).await;
    let claims = v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT);
    let pem = keys.key().public_key_pem();
    for secret in [pem.as_bytes(), keys.key().public_key_raw()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(keys.key().kid().to_string());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap();
        assert_refused_by_the_allow_list(app.get_as("/api/token/apim", &token).await, "HS256")
            .await;
    }
}

/// A 503 `caller_keys_unavailable` with a `Retry-After`, as documented.
async fn assert_keys_unavailable(response: reqwest::Response) {
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body = json(response).await;
    assert_eq!(body["error"], "caller_keys_unavailable", "{body}");
}

#[tokio::test]
async fn unreadable_keys_are_503_and_a_failed_download_backs_off() {
    let keys = EntraKeysDouble::start().await.unwrap();
    keys.set_fault(Some(KeysFault::Status(500)));
    let app = entra_app(&keys).await;
    let token = sign(&keys, &v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT));
    assert_keys_unavailable(app.get_as("/api/token/apim", &token).await).await;
    assert_eq!(keys.downloads(), 1);
    // During the backoff callers are answered at once, without another download.
    assert_keys_unavailable(app.get_as("/api/token/apim", &token).await).await;
    assert_eq!(keys.downloads(), 1);
}

#[tokio::test]
async fn an_oversized_key_set_is_not_read() {
    let keys = EntraKeysDouble::start().await.unwrap();
    keys.set_fault(Some(KeysFault::Oversized(5 * 1024 * 1024)));
    let app = entra_app(&keys).await;
    let token = sign(&keys, &v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT));
    assert_keys_unavailable(app.get_as("/api/token/apim", &token).await).await;
    app.log_records_when(|record| {
        record["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("more than 262144 bytes"))
    })
    .await;
}

#[tokio::test]
async fn keys_held_keep_serving_when_a_reload_fails() {
    let keys = EntraKeysDouble::start().await.unwrap();
    let app = entra_app(&keys).await;
    let token = sign(&keys, &v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT));
    assert_eq!(app.get_as("/api/token/apim", &token).await.status(), 200);
    keys.set_fault(Some(KeysFault::Status(503)));
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"rotated-in"}"#);
    let unknown = format!("{header}.{}", token.split_once('.').unwrap().1);
    assert_eq!(app.get_as("/api/token/apim", &unknown).await.status(), 401);
    assert_eq!(keys.downloads(), 2, "the unknown key id caused one reload");
    assert_eq!(app.get_as("/api/token/apim", &token).await.status(), 200);
}

#[tokio::test]
async fn a_discovered_key_set_url_in_clear_text_is_not_followed() {
    let keys = EntraKeysDouble::start().await.unwrap();
    keys.set_discovered_jwks_uri(Some(format!(
        "http://keys.example.invalid{}",
        token_broker_doubles::entra_keys::JWKS_PATH
    )));
    let app = spawn_app_with(Setup {
        extra_config: entra_callers(None, Some(keys.base_url())),
        ..Setup::default()
    })
    .await;
    let mut claims = v2_token(APIM_CLIENT_ID, APIM_OBJECT_ID, TENANT);
    claims["iss"] = json_value!(keys.base_url());
    let token = sign(&keys, &claims);
    assert_keys_unavailable(app.get_as("/api/token/apim", &token).await).await;
    assert_eq!(keys.discovery_requests(), 1);
    assert_eq!(keys.downloads(), 0);
    // Discovery naming an acceptable URL works.
    keys.set_discovered_jwks_uri(None);
    let app = spawn_app_with(Setup {
        extra_config: entra_callers(None, Some(keys.base_url())),
        ..Setup::default()
    })
    .await;
    assert_eq!(app.get_as("/api/token/apim", &token).await.status(), 200);
    assert_eq!(keys.downloads(), 1);
}

// ---- failing closed at startup ----------------------------------------------------------

/// Runs the binary with `args` against `config`, with `env`; returns success and stderr+stdout.
fn run_broker(args: &[&str], config: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"));
    command
        .args(args)
        .env_clear()
        .env("TOKEN_BROKER_CONFIG", &path)
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", "0")
        .env("CALLER_SECRET_SETTING", "s");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    (output.status.success(), text)
}

fn minimal_config(callers: &str, lists: &str) -> String {
    format!(
        r#"
[callers]
{callers}

[connections.contoso]
token_url = "https://login.contoso.com/oauth2/token"
client_id = "contoso"
client_secret = {{ app_setting = "CALLER_SECRET_SETTING" }}
{lists}
"#
    )
}

const JWT_MODE: &str = r#"mode = "jwt"
issuer = "https://login.microsoftonline.com/t/v2.0"
audience = "api://token-broker""#;

#[test]
fn a_connection_without_allowed_callers_stops_jwt_and_easy_auth_modes_from_starting() {
    let jwt = minimal_config(JWT_MODE, "");
    let easy_auth = minimal_config("mode = \"easy_auth\"", "");
    for (config, env) in [
        (&jwt, vec![]),
        (&easy_auth, vec![("WEBSITE_AUTH_ENABLED", "true")]),
    ] {
        for args in [&["check"][..], &["serve"][..]] {
            let (ok, output) = run_broker(args, config, &env);
            assert!(!ok, "{args:?} must fail: {output}");
            assert!(
                output.contains("connections.contoso.allowed_callers"),
                "{args:?}: {output}"
            );
        }
    }
    let (ok, output) = run_broker(
        &["check"],
        &minimal_config(JWT_MODE, r#"allowed_callers = ["*"]"#),
        &[],
    );
    assert!(ok, "{output}");
}

#[test]
fn easy_auth_refuses_to_start_unless_app_service_authentication_is_on() {
    let config = minimal_config(
        "mode = \"easy_auth\"",
        r#"allowed_roles = ["Tokens.Contoso"]"#,
    );
    for env in [vec![], vec![("WEBSITE_AUTH_ENABLED", "False")]] {
        for args in [&["check"][..], &["serve"][..]] {
            let (ok, output) = run_broker(args, &config, &env);
            assert!(!ok, "{args:?} {env:?} must fail: {output}");
            assert!(
                output.contains("WEBSITE_AUTH_ENABLED"),
                "{args:?}: {output}"
            );
        }
    }
    let (ok, output) = run_broker(&["check"], &config, &[("WEBSITE_AUTH_ENABLED", "True")]);
    assert!(ok, "{output}");
}
