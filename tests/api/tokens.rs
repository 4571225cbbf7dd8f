use std::time::Duration;

use jsonwebtoken::{DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
use serde_json::Value;

use crate::helpers::{
    MANAGED_IDENTITY_CLIENT_ID, RESOURCE, Setup, json, post_secret, spawn_app, spawn_app_with,
};

/// Verifies an access token against the provider's published JWKS.
async fn verify(app: &crate::helpers::TestApp, token: &str) -> Value {
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
    assert!(app.terminate().success());
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

#[tokio::test]
async fn two_hundred_concurrent_cold_requests_cause_one_token_request() {
    let app = spawn_app().await;
    let requests = (0..200).map(|_| app.token("posty"));
    let responses = futures_util::future::join_all(requests).await;
    let mut tokens = std::collections::HashSet::new();
    for response in responses {
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
        "single flight: 200 concurrent cold requests -> {} token request(s)",
        stats.token_requests
    );
    assert_eq!(stats.token_requests, 1);
    assert_eq!(app.azure.vault.reads(), 1);
    // The audit trail tells the same story: 200 tokens handed out, all one token; the one
    // caller whose request started the fetch is the `miss`, the callers that waited for that
    // same fetch are `joined`, any later one a hit (hits are counted per interval).
    let total = app.audit_count_when(|_| true, 200).await;
    assert_eq!(total, 200, "the records account for exactly the 200 tokens");
    let audit = app.audit_records();
    let fingerprints: std::collections::HashSet<&str> = audit
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(fingerprints.len(), 1, "one token in every record");
    let count = |cache: &str| -> u64 {
        audit
            .iter()
            .filter(|r| r["cache"] == cache)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    let (misses, joined, hits) = (count("miss"), count("joined"), count("hit"));
    println!("single flight: audit accounts {misses} miss, {joined} joined, {hits} hits");
    assert_eq!(
        misses, 1,
        "single flight: exactly one caller's request started the fetch"
    );
    assert_eq!(misses + joined + hits, 200);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_ahead_without_callers_waiting() {
    // The provider issues 6 s tokens for this client: a refresh is due after 3 to 4.5 s, and a
    // token is handed out until 5 s. Callers every 50 ms for 6 s must always get a token from
    // memory (no miss after the first) and see it change without an error.
    let mut app = spawn_app().await;
    let mut seen = Vec::<String>::new();
    for _ in 0..120 {
        let response = app.token("short").await;
        assert_eq!(response.status(), 200);
        let token = json(response).await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        if seen.last() != Some(&token) {
            seen.push(token);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.terminate().success());
    let audit = app.audit_records();
    let handed_out: u64 = audit.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(handed_out, 120, "the audit counts every token");
    let misses = audit.iter().filter(|r| r["cache"] == "miss").count();
    assert_eq!(
        misses, 1,
        "only the very first request waited for the provider"
    );
    assert!(
        seen.len() >= 2,
        "the token was refreshed: {} distinct",
        seen.len()
    );
    let stats = app.idp.stats().await;
    assert_eq!(
        stats.token_requests as usize,
        seen.len(),
        "one request per refresh"
    );
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
    let fields = |request: &crate::helpers::IdpTokenRequest| -> Vec<String> {
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
