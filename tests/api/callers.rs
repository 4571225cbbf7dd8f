//! Who may get which token: caller tokens issued by the real oidc-provider.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::helpers::{RESOURCE, Setup, json, jwt_callers, spawn_app_with};

async fn jwt_app() -> crate::helpers::TestApp {
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
    // Open connections serve any authenticated caller.
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

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused() {
    let app = jwt_app().await;
    let bearer = app.idp.caller_token("caller-app").await;
    let payload = bearer.split('.').nth(1).unwrap();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        assert_invalid_token(app.get_as("/api/token/demo", &token).await, "alg none").await;
    }
    // HMAC with the public key material as the "secret" is refused too.
    let hs = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT","kid":"x"}"#);
    let token = format!("{hs}.{payload}.c2lnbmF0dXJl");
    assert_invalid_token(app.get_as("/api/token/demo", &token).await, "HS256").await;
}

#[tokio::test]
async fn an_unknown_key_id_after_a_key_rotation_is_found_by_reloading_the_jwks() {
    let mut app = jwt_app().await;
    let before = app.idp.caller_token("caller-app").await;
    assert_eq!(app.get_as("/api/token/demo", &before).await.status(), 200);
    // The provider restarts with new signing keys (same issuer): a rotation.
    app.idp.restart(|_| {});
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

#[tokio::test]
async fn a_forged_easy_auth_header_is_ignored_in_jwt_mode() {
    let app = jwt_app().await;
    let principal = STANDARD.encode(
        r#"{"auth_typ":"aad","claims":[{"typ":"oid","val":"caller-app"},{"typ":"roles","val":"Tokens.Contoso"}],"role_typ":"roles"}"#,
    );
    let response = app
        .request("/api/token/guarded")
        .header("X-MS-CLIENT-PRINCIPAL", principal)
        .header("X-MS-CLIENT-PRINCIPAL-ID", "caller-app")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
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
            crate::helpers::GUARDED
        ),
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
