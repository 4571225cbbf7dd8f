//! Secret rotation without downtime: the Key Vault double gains a version mid-run and the
//! real oidc-provider changes the client's secret mid-run.

use serde_json::{Value, json};

use crate::support::{
    ROTATION_V1, ROTATION_V2, Setup, TestApp, json as body_json, spawn_app, spawn_app_with,
};

/// Invokes `function-rotation` the way the Functions host does (JSON payload format).
async fn deliver(app: &TestApp, event: Value) -> Value {
    app.deliver_event(event).await
}

/// A Key Vault event as real traffic sends it: PascalCase data.
fn new_version_event(secret: &str, version: &str) -> Value {
    json!({
        "id": "7e3e4b44-0000-4000-8000-000000000001",
        "topic": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        "subject": secret,
        "eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
        "data": { "Id": format!("https://kv.vault.azure.net/secrets/{secret}/{version}"), "VaultName": "kv",
                  "ObjectType": "Secret", "ObjectName": secret, "Version": version, "NBF": null, "EXP": null },
        "dataVersion": "1", "metadataVersion": "1", "eventTime": "2026-11-28T05:00:00Z"
    })
}

async fn rotate_at_provider(app: &mut TestApp) {
    app.idp
        .restart(|clients| {
            let client = clients
                .iter_mut()
                .find(|c| c.client_id == "broker-rotating")
                .unwrap();
            client.client_secret = ROTATION_V2.to_string();
        })
        .await;
}

#[tokio::test]
async fn a_rotation_already_in_key_vault_causes_no_error_for_callers() {
    let mut app = spawn_app().await;
    let first = app.token("rotating").await;
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap());
    // The secret is rotated everywhere, but the broker still holds v1 in memory (TTL).
    app.azure.vault.set_secret("rotating-secret", ROTATION_V2);
    rotate_at_provider(&mut app).await;
    // A new scope set needs a new token: v1 is refused, Key Vault is re-read, v2 works.
    let response = app.get("/api/token/rotating?scope=read").await;
    let status = response.status();
    assert_eq!(status, 200, "{}", response.text().await.unwrap());
    let stats = app.idp.stats().await;
    assert_eq!(
        (stats.token_errors, stats.token_issued),
        (1, 1),
        "one refusal, one retry"
    );
    assert_eq!(app.azure.vault.reads(), 2);
}

#[tokio::test]
async fn the_previous_version_keeps_working_until_the_provider_accepts_the_new_one() {
    let mut app = spawn_app().await;
    assert_eq!(app.token("rotating").await.status(), 200);
    // v2 lands in Key Vault before the provider knows it; the event makes the broker read it.
    let version = app.azure.vault.set_secret("rotating-secret", ROTATION_V2);
    deliver(&app, new_version_event("rotating-secret", &version)).await;
    let response = app.token("rotating").await;
    assert_eq!(
        response.status(),
        200,
        "v2 refused, v1 still accepted: no error"
    );
    let stats = app.idp.stats().await;
    assert_eq!((stats.token_errors, stats.token_issued), (1, 2));
    // Now the provider accepts only v2: the next fetch switches to it, still without error.
    rotate_at_provider(&mut app).await;
    deliver(&app, new_version_event("rotating-secret", &version)).await;
    assert_eq!(app.token("rotating").await.status(), 200);
}

#[tokio::test]
async fn a_key_vault_event_makes_a_rotation_take_effect_at_once() {
    let mut app = spawn_app().await;
    let before = body_json(app.token("rotating").await).await["access_token"].clone();
    let version = app.azure.vault.set_secret("rotating-secret", ROTATION_V2);
    rotate_at_provider(&mut app).await;
    // The event arrives as a JSON string this time, with camelCase keys as in the docs.
    let mut event = new_version_event("rotating-secret", &version);
    event["data"] = json!({ "id": "x", "vaultName": "kv", "objectType": "Secret", "objectName": "rotating-secret", "version": version });
    let body = deliver(&app, Value::String(event.to_string())).await;
    let log = body["Logs"][0].as_str().unwrap();
    assert!(
        log.contains("dropped 1 cached token") && log.contains("rotating"),
        "{log}"
    );
    let after = body_json(app.token("rotating").await).await["access_token"].clone();
    assert_ne!(before, after, "the cached token minted with v1 was dropped");
    let stats = app.idp.stats().await;
    assert_eq!(
        (stats.token_errors, stats.token_issued),
        (0, 1),
        "v2 used straight away"
    );
}

#[tokio::test]
async fn unrelated_events_are_acknowledged_and_change_nothing() {
    let app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    let body = deliver(&app, new_version_event("some-other-secret", "v")).await;
    assert!(
        body["Logs"][0].as_str().unwrap().starts_with("ignored"),
        "{body}"
    );
    let mut event = new_version_event("basic-secret", "v");
    event["eventType"] = json!("Microsoft.KeyVault.KeyNewVersionCreated");
    let body = deliver(&app, event).await;
    assert!(
        body["Logs"][0].as_str().unwrap().starts_with("ignored"),
        "{body}"
    );
    app.token("demo").await;
    assert_eq!(
        app.idp.stats().await.token_requests,
        1,
        "the cached token was kept"
    );
    let response = app
        .http
        .post(app.url("/function-rotation"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// `Data.event` as the Functions host sends an event the binding holds as a string: the JSON
/// text encoded as a JSON string once more (a string of a string).
fn as_the_host_sends_a_string(event: &Value) -> Value {
    Value::String(Value::String(event.to_string()).to_string())
}

#[tokio::test]
async fn a_double_encoded_rotation_event_makes_the_broker_read_key_vault_again() {
    let mut app = spawn_app().await;
    assert_eq!(app.token("rotating").await.status(), 200);
    assert_eq!(app.token("rotating").await.status(), 200);
    assert_eq!(app.azure.vault.reads(), 1, "the secret is cached");
    let version = app.azure.vault.set_secret("rotating-secret", ROTATION_V1);
    let body = deliver(
        &app,
        as_the_host_sends_a_string(&new_version_event("rotating-secret", &version)),
    )
    .await;
    let log = body["Logs"][0].as_str().unwrap();
    assert!(log.contains("dropped 1 cached token"), "{log}");
    assert_eq!(app.token("rotating").await.status(), 200);
    assert_eq!(app.azure.vault.reads(), 2, "Key Vault was read again");
    // The hit's record is written at the end of its interval, here at SIGTERM.
    assert!(app.terminate().await.success());
    let mut caches: Vec<String> = app
        .audit_records()
        .iter()
        .map(|record| record["cache"].as_str().unwrap().to_string())
        .collect();
    caches.sort();
    assert_eq!(caches, ["hit", "miss", "miss"]);
}

#[tokio::test]
async fn after_a_rejection_a_rotation_event_makes_the_repaired_secret_work_at_once() {
    let app = spawn_app_with(Setup {
        extra_config: r#"
[connections.repair]
token_url = "{token_url}"
client_id = "broker-rotating"
client_secret = { key_vault_secret = "repair-secret" }
negative_cache_seconds = 300
"#
        .to_string(),
        ..Setup::default()
    })
    .await;
    app.azure
        .vault
        .set_secret("repair-secret", "a mistyped secret");
    let refused = app.token("repair").await;
    assert_eq!(refused.status(), 502, "{}", refused.text().await.unwrap());
    let asked = app.idp.stats().await.token_requests;
    // The negative cache answers now, without asking the provider.
    assert_eq!(app.token("repair").await.status(), 502);
    assert_eq!(app.idp.stats().await.token_requests, asked);

    // An event as an object, so that only the negative cache stands in the way.
    let version = app.azure.vault.set_secret("repair-secret", ROTATION_V1);
    deliver(&app, new_version_event("repair-secret", &version)).await;
    let repaired = app.token("repair").await;
    assert_eq!(repaired.status(), 200, "{}", repaired.text().await.unwrap());
}

#[tokio::test]
async fn near_expiry_and_expired_reminders_change_nothing_but_a_warning() {
    let app = spawn_app().await;
    let before = body_json(app.token("rotating").await).await["access_token"].clone();
    let reads = app.azure.vault.reads();
    for event_type in [
        "Microsoft.KeyVault.SecretNearExpiry",
        "Microsoft.KeyVault.SecretExpired",
    ] {
        let mut event = new_version_event("rotating-secret", "v1");
        event["eventType"] = json!(event_type);
        let outcome = deliver(&app, event).await;
        let log = outcome["Logs"][0].as_str().unwrap().to_string();
        assert!(log.contains("nothing changed"), "{log}");
    }
    let after = body_json(app.token("rotating").await).await["access_token"].clone();
    assert_eq!(before, after, "the cached token was kept");
    let stats = app.idp.stats().await;
    assert_eq!(stats.token_requests, 1, "no new token request: {stats:?}");
    assert_eq!(app.azure.vault.reads(), reads, "no Key Vault re-read");
    let warning = |r: &Value| {
        r["level"] == "WARN" && r["message"].as_str().unwrap_or("").contains("near expiry")
    };
    let records = app.log_records_when(warning).await;
    let warnings = records.iter().filter(|r| warning(r)).count();
    assert_eq!(warnings, 2, "one warning per reminder");
}
