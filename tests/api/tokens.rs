use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jsonwebtoken::{DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
use serde_json::Value;
use token_broker_doubles::fault_proxy::Fault;

use crate::support::{
    MANAGED_IDENTITY_CLIENT_ID, RESOURCE, Setup, TestApp, json, post_secret, spawn_app,
    spawn_app_with,
};

/// Verifies an access token against the provider's published JWKS.
async fn verify(app: &crate::support::TestApp, token: &str) -> Value {
    let jwks: JwkSet = reqwest::get(&app.idp.jwks_uri)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = decode_header(token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in JWKS");
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[RESOURCE]);
    validation.set_issuer(&[&app.idp.issuer]);
    decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .expect("token verifies against the provider's JWKS")
        .claims
}

#[tokio::test]
async fn a_token_is_served_and_verifies_against_the_providers_jwks() {
    let app = spawn_app().await;
    let response = app.token("demo").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["pragma"], "no-cache");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body = json(response).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "read");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let expires_on = body["expires_on"].as_u64().unwrap();
    let claims = verify(&app, body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["client_id"], "broker-basic");
    assert!(claims["exp"].as_u64().unwrap().abs_diff(expires_on) <= 2);
    // The secret came from Key Vault through the challenge flow and the managed identity:
    // production's path, with the vault under `vault.azure.net` reached through the egress
    // proxy (challenge verification on) and the user-assigned identity named.
    assert_eq!(app.azure.vault.challenges(), 1);
    assert_eq!(app.azure.vault.reads(), 1);
    assert_eq!(app.azure.identity.requests(), 1);
    assert_eq!(
        app.azure.identity.requested_client_ids(),
        [Some(MANAGED_IDENTITY_CLIENT_ID.to_string())]
    );
    assert!(app.vault_proxy.tunnels("tests.vault.azure.net:443") >= 1);
    assert_eq!(app.vault_proxy.refused(), 0);
}

#[tokio::test]
async fn client_secret_post_works_with_a_secret_full_of_reserved_characters() {
    let app = spawn_app().await;
    let body = json(app.token("posty").await).await;
    let claims = verify(&app, body["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["client_id"], "broker-post");
    assert_eq!(body["scope"], "read write");
}

#[tokio::test]
async fn an_app_setting_secret_works_without_key_vault() {
    let app = spawn_app().await;
    let body = json(app.token("setting").await).await;
    verify(&app, body["access_token"].as_str().unwrap()).await;
    assert_eq!(app.azure.vault.requests(), 0);
}

#[tokio::test]
async fn a_second_request_is_a_cache_hit() {
    let mut app = spawn_app().await;
    let first = json(app.token("demo").await).await;
    let second = json(app.token("DEMO").await).await;
    assert_eq!(first["access_token"], second["access_token"]);
    assert_eq!(app.idp.stats().await.token_requests, 1);
    assert_eq!(
        app.azure.vault.reads(),
        1,
        "the secret is read once, not per request"
    );
    // Hits are recorded once per interval: SIGTERM writes the one counted so far.
    assert!(app.terminate().await.success());
    let audit = app.audit_records();
    let outcomes: Vec<&str> = audit.iter().map(|r| r["cache"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["miss", "hit"]);
    for record in &audit {
        assert_eq!(record["connection"], "demo");
        assert_eq!(record["scopes"], "read");
        assert_eq!(record["expires_on"], first["expires_on"]);
        assert_eq!(record["fingerprint"].as_str().unwrap().len(), 12);
        assert_eq!(record["count"], 1);
    }
    assert_eq!(
        audit[0]["span"]["invocation_id"],
        "3f2b8c1e-0000-4000-8000-000000000001"
    );
}

#[tokio::test]
async fn a_requested_scope_overrides_the_default_and_is_cached_apart() {
    let app = spawn_app().await;
    // The connection's default (`scopes = ["read"]`), then the same scope asked for.
    let default = json(app.get("/api/token/demo").await).await;
    assert_eq!(default["scope"], "read");
    let read = json(app.get("/api/token/demo?scope=read").await).await;
    assert_eq!(
        read["access_token"], default["access_token"],
        "asking for the default's scope is the default's cache entry"
    );
    let both = json(app.get("/api/token/demo?scope=write%20read").await).await;
    let both_again = json(app.get("/api/token/demo?scope=read+write").await).await;
    assert_eq!(both["scope"], "read write");
    assert_ne!(read["access_token"], both["access_token"]);
    assert_ne!(default["access_token"], both["access_token"]);
    assert_eq!(
        both["access_token"], both_again["access_token"],
        "scope order does not matter"
    );
    assert_eq!(
        app.idp.stats().await.token_requests,
        2,
        "one request for the default (read), one for read write"
    );
}

/// The broker's debug line for a caller that waits for a fetch another caller started.
fn waiting_on(connection: &'static str) -> impl Fn(&Value) -> bool {
    move |record| {
        record["message"] == "waiting for the token fetch in flight"
            && record["connection"] == connection
    }
}

/// The audited tokens of `connection` by cache outcome (`miss`, `joined`, `hit`, `stale`).
fn outcomes(audit: &[Value], connection: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for record in audit.iter().filter(|r| r["connection"] == connection) {
        *counts
            .entry(record["cache"].as_str().unwrap().to_string())
            .or_default() += record["count"].as_u64().unwrap();
    }
    counts
}

/// A connection behind the fault proxy, whose token request a test holds until it lets go.
const HELD: &str = r#"
[connections.held]
token_url = "{proxy_url}/token"
client_id = "broker-post"
client_secret = { key_vault_secret = "post-secret" }
auth_method = "client_secret_post"
timeout_seconds = 60
deadline_seconds = 60

[connections.ahead]
token_url = "{proxy_url}/token"
client_id = "broker-short"
client_secret = { key_vault_secret = "short-secret" }
timeout_seconds = 60
deadline_seconds = 60
"#;

async fn held_app() -> TestApp {
    spawn_app_with(Setup {
        proxy: true,
        extra_config: HELD.to_string(),
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn two_hundred_concurrent_cold_requests_cause_one_token_request() {
    const CALLERS: usize = 200;
    let app = held_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    // The token request is held at the proxy until every caller is known to wait for it, so
    // that "concurrent" is a fact of the run rather than a matter of timing.
    proxy.set_default(Fault::Hold);
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| tokio::spawn(app.request("/api/token/held").send()))
        .collect();
    assert!(
        proxy.wait_for_requests(1, Duration::from_secs(30)).await,
        "the token request never reached the provider"
    );
    app.log_count_when(waiting_on("held"), CALLERS - 1).await;
    assert_eq!(
        (proxy.requests(), proxy.forwarded()),
        (1, 0),
        "one token request, still held, while {} callers wait",
        CALLERS - 1
    );
    proxy.release_held();
    let mut tokens = std::collections::HashSet::new();
    for caller in callers {
        let response = caller.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        tokens.insert(
            json(response).await["access_token"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(tokens.len(), 1);
    let stats = app.idp.stats().await;
    println!(
        "single flight: {CALLERS} concurrent cold requests -> {} token request(s)",
        stats.token_requests
    );
    assert_eq!((stats.token_requests, proxy.requests()), (1, 1));
    assert_eq!(app.azure.vault.reads(), 1);
    // The audit trail tells the same story: 200 tokens handed out, all one token; the one
    // caller whose request started the fetch is the `miss`, the 199 that waited for that same
    // fetch are `joined`.
    let total = app
        .audit_count_when(|r| r["connection"] == "held", CALLERS as u64)
        .await;
    assert_eq!(
        total, CALLERS as u64,
        "the records account for exactly the tokens"
    );
    let audit = app.audit_records();
    let fingerprints: std::collections::HashSet<&str> = audit
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(fingerprints.len(), 1, "one token in every record");
    let counts = outcomes(&audit, "held");
    println!("single flight: audit accounts {counts:?}");
    assert_eq!(
        counts,
        BTreeMap::from([
            ("joined".to_string(), CALLERS as u64 - 1),
            ("miss".to_string(), 1)
        ]),
        "single flight: one caller started the fetch, every other one joined it"
    );
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_ahead_without_callers_waiting() {
    // The provider issues 6 s tokens for this client: a refresh is due after 3 to 4.5 s, and a
    // token is handed out until 5 s. The refresh is held at the proxy: callers go on getting
    // the cached token from memory while it is in flight, none of them waits for it.
    let mut app = held_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    let token = |body: Value| body["access_token"].as_str().unwrap().to_string();
    // Callers are answered at once or not at all: one that waited for the held refresh would
    // hang until it is released.
    let call = || async {
        let response = tokio::time::timeout(Duration::from_secs(2), app.token("ahead"))
            .await
            .expect("a caller waited for the refresh");
        assert_eq!(response.status(), 200);
        json(response).await
    };
    let sent = Instant::now();
    let first = token(call().await);
    proxy.set_default(Fault::Hold);
    let mut calls = 1;
    while proxy.requests() < 2 {
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "no refresh within the token's hand-out window"
        );
        assert_eq!(token(call().await), first);
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The refresh has reached the provider and is held. Until the token's 5 s are up (counted
    // from before its fetch, so on the safe side) callers keep getting it.
    let mut while_held = 0;
    while while_held < 5 && sent.elapsed() < Duration::from_millis(4800) {
        assert_eq!(token(call().await), first);
        calls += 1;
        while_held += 1;
    }
    assert!(while_held > 0, "no caller came while the refresh was held");
    assert_eq!(proxy.forwarded(), 1, "the refresh was held throughout");
    proxy.release_held();
    let refreshed = loop {
        let current = token(call().await);
        calls += 1;
        if current != first {
            break current;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the released refresh never replaced the token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(refreshed, first);
    let upstream = (proxy.requests(), proxy.forwarded());
    assert!(app.terminate().await.success());
    let audit = app.audit_records();
    let handed_out: u64 = audit.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(handed_out, calls, "the audit counts every token");
    let counts = outcomes(&audit, "ahead");
    assert_eq!(
        counts,
        BTreeMap::from([("hit".to_string(), calls - 1), ("miss".to_string(), 1)]),
        "only the very first request waited for the provider; no caller joined the refresh"
    );
    assert_eq!(upstream, (2, 2), "one request per refresh");
}

#[tokio::test]
async fn a_scope_in_a_post_form_is_honoured_and_any_other_body_is_refused() {
    let app = spawn_app().await;
    let post = |body: &'static str, content_type: &'static str| {
        app.http
            .post(app.url("/api/token/demo"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let response = post(
        "scope=write",
        "application/x-www-form-urlencoded; charset=utf-8",
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["scope"], "write");
    let response = post("scope=admin", "application/x-www-form-urlencoded")
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        400,
        "a form scope is checked like a query scope"
    );
    assert_eq!(json(response).await["error"], "invalid_scope");
    let response = post(r#"{"scope":"write"}"#, "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "not silently ignored");
    assert_eq!(json(response).await["error"], "invalid_request");
    let response = post("", "application/json").await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "an empty body is a plain token request"
    );
    assert_eq!(json(response).await["scope"], "read");
}

/// A connection with every optional form field: `audience`, `resource` and `extra_params`,
/// values with characters a form must encode.
const SHAPED: &str = r#"
[connections.shaped]
token_url = "{token_url}"
client_id = "broker-post"
client_secret = { key_vault_secret = "post-secret" }
auth_method = "client_secret_post"
scopes = ["read", "write"]
audience = "https://api.contoso.example/v1?x=1&y=2"
resource = "api://demo"
extra_params = { tenant = "contoso", "x-note" = "a b&c=d/é+%" }
"#;

#[tokio::test]
async fn audience_resource_and_extra_params_reach_the_provider_as_configured() {
    let app = spawn_app_with(Setup {
        extra_config: SHAPED.to_string(),
        ..Setup::default()
    })
    .await;
    let response = app.token("shaped").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let claims = verify(&app, json(response).await["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["aud"], RESOURCE, "the provider honoured `resource`");
    assert_eq!(app.token("demo").await.status(), 200);

    let requests = app.idp.token_requests().await;
    assert_eq!(requests.len(), 2, "{requests:?}");
    let (shaped, demo) = (&requests[0], &requests[1]);
    assert_eq!(shaped.status, 200);
    let fields = |request: &crate::support::IdpTokenRequest| -> Vec<String> {
        let mut names: Vec<String> = request.form.as_ref().unwrap().keys().cloned().collect();
        names.sort();
        names
    };
    assert_eq!(
        fields(shaped),
        [
            "audience",
            "client_id",
            "client_secret",
            "grant_type",
            "resource",
            "scope",
            "tenant",
            "x-note"
        ],
        "{shaped:?}"
    );
    assert_eq!(shaped.field("grant_type"), Some("client_credentials"));
    assert_eq!(shaped.field("scope"), Some("read write"));
    assert_eq!(
        shaped.field("audience"),
        Some("https://api.contoso.example/v1?x=1&y=2")
    );
    assert_eq!(shaped.field("resource"), Some("api://demo"));
    assert_eq!(shaped.field("tenant"), Some("contoso"));
    assert_eq!(shaped.field("x-note"), Some("a b&c=d/é+%"));
    assert_eq!(shaped.field("client_id"), Some("broker-post"));
    assert_eq!(
        shaped.field("client_secret"),
        Some(post_secret().as_str()),
        "client_secret_post: the secret in the body, every reserved character intact"
    );
    assert!(!shaped.basic, "and no Basic credentials beside it");
    // A connection without them sends none of them (and its secret only as Basic).
    assert_eq!(fields(demo), ["grant_type", "scope"], "{demo:?}");
    assert!(demo.basic);
}

/// A connection that serves two resources and two audiences of one provider.
const TARGETED: &str = r#"
[connections.targeted]
token_url = "{token_url}"
client_id = "broker-post"
client_secret = { key_vault_secret = "post-secret" }
auth_method = "client_secret_post"
scopes = ["read"]
resource = "api://demo"
allowed_resources = ["api://demo", "api://token-broker"]
audience = "https://orders.example"
allowed_audiences = ["https://orders.example", "https://billing.example"]
"#;

/// The `aud` claim of a JWT access token, read without verifying it (the provider's
/// signature is checked by `verify` elsewhere; here only the audience it chose matters).
fn audience_of(token: &Value) -> Value {
    use base64::Engine;
    let token = token["access_token"].as_str().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<Value>(&payload).unwrap()["aud"].clone()
}

#[tokio::test]
async fn a_requested_resource_or_audience_from_the_allowed_lists_is_sent_cached_apart_and_audited()
{
    let app = spawn_app_with(Setup {
        extra_config: TARGETED.to_string(),
        ..Setup::default()
    })
    .await;
    let default = json(app.get("/api/token/targeted").await).await;
    assert_eq!(audience_of(&default), "api://demo");
    let other = json(
        app.get("/api/token/targeted?resource=api%3A%2F%2Ftoken-broker")
            .await,
    )
    .await;
    assert_eq!(
        audience_of(&other),
        "api://token-broker",
        "the provider issued for the chosen resource"
    );
    assert_ne!(other["access_token"], default["access_token"]);
    let again = json(
        app.get("/api/token/targeted?resource=api://token-broker")
            .await,
    )
    .await;
    assert_eq!(again["access_token"], other["access_token"], "cached apart");
    let named_default = json(app.get("/api/token/targeted?resource=api://demo").await).await;
    assert_eq!(
        named_default["access_token"], default["access_token"],
        "naming the default is the default's entry"
    );
    let billing = app
        .http
        .post(app.url("/api/token/targeted"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("audience=https%3A%2F%2Fbilling.example")
        .send()
        .await
        .unwrap();
    let billing = json(billing).await;
    assert_ne!(billing["access_token"], default["access_token"]);

    for outside in [
        "/api/token/targeted?resource=api://elsewhere",
        "/api/token/targeted?audience=https://evil.example",
        "/api/token/targeted?resource=api://demo&resource=api://token-broker",
        "/api/token/demo?resource=api://demo",
    ] {
        let response = app.get(outside).await;
        assert_eq!(response.status(), 400, "{outside}");
        assert_eq!(json(response).await["error"], "invalid_target", "{outside}");
    }

    let requests = app.idp.token_requests().await;
    assert_eq!(
        requests.len(),
        3,
        "default, one resource, one audience: {requests:?}"
    );
    assert_eq!(requests[0].field("resource"), Some("api://demo"));
    assert_eq!(
        requests[0].field("audience"),
        Some("https://orders.example")
    );
    assert_eq!(requests[1].field("resource"), Some("api://token-broker"));
    assert_eq!(
        requests[1].field("audience"),
        Some("https://orders.example")
    );
    assert_eq!(requests[2].field("resource"), Some("api://demo"));
    assert_eq!(
        requests[2].field("audience"),
        Some("https://billing.example")
    );

    let audit = app.audit_records_when(3).await;
    let named = |field: &str, value: &str| {
        audit
            .iter()
            .any(|record| record["connection"] == "targeted" && record[field] == value)
    };
    assert!(named("resource", "api://token-broker"), "{audit:?}");
    assert!(named("audience", "https://billing.example"), "{audit:?}");
    assert!(named("resource", "api://demo"), "{audit:?}");
}
