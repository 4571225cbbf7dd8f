//! `GET /api/health`: every connection's last token, last fetch and circuit breaker, nothing
//! secret; `degraded` while an identity provider fails, `ok` again once it recovers.

use std::time::{Duration, Instant};

use serde_json::Value;
use token_broker_doubles::fault_proxy::Fault;

use crate::support::{Setup, TestApp, json, spawn_app_with};

/// A connection through the fault proxy whose circuit opens at the first failure.
const FLAKY: &str = r#"
[connections.flaky]
token_url = "{proxy_url}/token"
client_id = "broker-basic"
client_secret = { key_vault_secret = "basic-secret" }
timeout_seconds = 1
deadline_seconds = 3
max_retries = 0
breaker_failures = 1
breaker_open_seconds = 2
scopes = ["read"]
allowed_scopes = ["read", "write"]
"#;

async fn health(app: &TestApp) -> Value {
    let response = app.get("/api/health").await;
    assert_eq!(
        response.status(),
        200,
        "degraded or not, the broker answers"
    );
    assert_eq!(response.headers()["cache-control"], "no-store");
    json(response).await
}

#[test]
fn the_health_function_is_one_http_trigger_on_its_own_route() {
    let read = |path: &str| -> Value {
        let text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path));
        serde_json::from_str(&text.unwrap()).unwrap()
    };
    let function = read("function-health/function.json");
    let bindings = function["bindings"].as_array().unwrap();
    assert_eq!(
        bindings.len(),
        2,
        "forwarding needs one trigger and one output"
    );
    assert_eq!(bindings[0]["type"], "httpTrigger");
    assert_eq!(bindings[0]["authLevel"], "function");
    assert_eq!(bindings[0]["route"], "health");
    assert_eq!(bindings[0]["methods"], serde_json::json!(["get"]));
    assert_eq!(bindings[1]["type"], "http");
    // Not under token/{connection}: no connection can be called "health" by the host's routing.
    let token = read("function-token/function.json");
    assert!(
        !token["bindings"][0]["route"]
            .as_str()
            .unwrap()
            .starts_with("health")
    );
}

#[tokio::test]
async fn health_is_degraded_while_the_identity_provider_fails_and_ok_once_it_recovers() {
    let app = spawn_app_with(Setup {
        proxy: true,
        extra_config: FLAKY.to_string(),
        ..Setup::default()
    })
    .await;
    let proxy = app.proxy.as_ref().unwrap();
    let body = health(&app).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(
        body["connections"]["flaky"],
        serde_json::json!({"token": "none", "last_fetch": "never", "breaker": "closed"})
    );
    assert_eq!(app.token("flaky").await.status(), 200);
    let body = health(&app).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(
        body["connections"]["flaky"],
        serde_json::json!({"token": "fresh", "last_fetch": "ok", "breaker": "closed"})
    );

    // The provider fails: a fetch (a scope set not cached yet) fails and opens the circuit.
    proxy.set_default(Fault::Status {
        status: 503,
        retry_after: None,
    });
    assert_eq!(app.get("/api/token/flaky?scope=write").await.status(), 503);
    let body = health(&app).await;
    println!("while failing: {body}");
    assert_eq!(body["status"], "degraded", "{body}");
    let flaky = &body["connections"]["flaky"];
    assert_eq!(flaky["last_fetch"], "failed");
    assert_ne!(flaky["breaker"], "closed", "{flaky}");
    // The cached token still serves, and says so.
    assert_eq!(flaky["token"], "fresh");
    // Other connections are unaffected.
    assert_eq!(body["connections"]["demo"]["last_fetch"], "never");
    // Nothing secret, no scopes, no secret names.
    let text = body.to_string();
    for needle in [
        "basic-secret",
        "read",
        "write",
        "scope",
        "broker-basic",
        "token_url",
    ] {
        assert!(!text.contains(needle), "{needle} in {text}");
    }

    // The provider recovers: once the circuit lets a trial through, health is ok again.
    proxy.set_default(Fault::Pass);
    let started = Instant::now();
    loop {
        let status = app.get("/api/token/flaky?scope=write").await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the circuit never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = health(&app).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(
        body["connections"]["flaky"],
        serde_json::json!({"token": "fresh", "last_fetch": "ok", "breaker": "closed"})
    );
}

#[tokio::test]
async fn health_answers_get_only() {
    let app = spawn_app_with(Setup::default()).await;
    let response = app.http.post(app.url("/api/health")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET");
    assert_eq!(json(response).await["error"], "invalid_request");
    // The host matches routes case-insensitively.
    assert_eq!(app.get("/API/Health").await.status(), 200);
}
