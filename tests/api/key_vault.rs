//! Key Vault trouble with a copy of the secret in memory: a dead vault never holds a token
//! fetch up and is not asked again on every fetch, and a secret Key Vault refuses for good
//! (disabled, access revoked) stops being used after the documented grace period.

use serde_json::json;
use token_broker_doubles::Fault;

use crate::helpers::{Setup, TestApp, json as body_json, spawn_app, spawn_app_with};

/// Marks `secret` stale the way a Key Vault event does, so the next fetch reads Key Vault.
pub async fn secret_changed(app: &TestApp, secret: &str) {
    let event = json!({
        "id": "7e3e4b44-0000-4000-8000-00000000000a",
        "subject": secret,
        "eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
        "data": { "ObjectType": "Secret", "ObjectName": secret, "VaultName": "kv" },
        "dataVersion": "1", "metadataVersion": "1", "eventTime": "2026-11-28T05:00:00Z"
    });
    app.deliver_event(event).await;
}

#[tokio::test]
async fn a_dead_vault_is_tried_once_then_backed_off_while_the_copy_serves() {
    let app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    app.azure.vault.set_fault(Some(Fault::Unavailable));
    secret_changed(&app, "basic-secret").await;

    let before = app.azure.vault.requests();
    let response = app.token("demo").await;
    assert_eq!(response.status(), 200, "the copy in memory serves");
    let tried = app.azure.vault.requests() - before;
    assert!(tried >= 1, "the stale secret was re-read: {tried} requests");

    // Two more fetches (new scope sets) within the backoff: Key Vault is not asked again.
    let before = app.azure.vault.requests();
    for scope in ["write", "read%20write"] {
        let response = app.get(&format!("/api/token/demo?scope={scope}")).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    assert_eq!(app.azure.vault.requests() - before, 0, "re-reads back off");
    let audit = app.audit_records_when(4).await;
    let misses = audit.iter().filter(|r| r["cache"] == "miss").count();
    assert_eq!(misses, 4, "each of the four answers was a real fetch");
    app.log_records_when(|r| {
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("using the copy in memory"))
    })
    .await;
}

#[tokio::test]
async fn a_disabled_secret_is_used_within_the_grace_period() {
    let app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    app.azure.vault.set_enabled("basic-secret", false);
    secret_changed(&app, "basic-secret").await;
    let response = app.token("demo").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    app.log_records_when(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("SecretDisabled") || m.contains("Forbidden"))
    })
    .await;
}

#[tokio::test]
async fn a_disabled_or_revoked_secret_stops_being_used_after_the_grace_period() {
    let app = spawn_app_with(Setup {
        extra_config: "\n[cache]\nsecret_refusal_grace_seconds = 0\n".to_string(),
        ..Setup::default()
    })
    .await;
    for (connection, secret, refuse) in [
        (
            "demo",
            "basic-secret",
            (|app: &TestApp| app.azure.vault.set_enabled("basic-secret", false)) as fn(&TestApp),
        ),
        ("posty", "post-secret", |app: &TestApp| {
            app.azure.vault.set_denied("post-secret", true)
        }),
    ] {
        assert_eq!(app.token(connection).await.status(), 200);
        refuse(&app);
        secret_changed(&app, secret).await;
        let response = app.token(connection).await;
        assert_eq!(response.status(), 503, "{connection}");
        let body = body_json(response).await;
        assert_eq!(body["error"], "secret_unavailable", "{body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.contains(&format!("'{connection}'")),
            "{description}"
        );
        assert!(
            !description.contains(secret),
            "no Key Vault object name: {description}"
        );
    }
    let idp_requests = app.idp.stats().await.token_requests;
    assert_eq!(
        idp_requests, 2,
        "the refused secrets were never sent to the provider again"
    );
}
