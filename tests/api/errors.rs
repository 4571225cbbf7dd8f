//! Each documented error, produced for real and checked against the JSON contract.

use serde_json::Value;

use crate::support::{json, spawn_app};

fn assert_contract(body: &Value, code: &str) {
    assert_eq!(body["error"], code, "{body}");
    let description = body["error_description"].as_str().expect("a description");
    assert!(!description.is_empty());
}

#[tokio::test]
async fn an_unknown_connection_is_a_404() {
    let app = spawn_app().await;
    for path in [
        "/api/token/nope",
        "/api/token/..%2F..%2Fsecrets",
        "/api/token/%00",
        "/api/token/a/b",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert_contract(&json(response).await, "unknown_connection");
    }
    assert_eq!(app.idp.stats().await.token_requests, 0);
}

#[tokio::test]
async fn a_malformed_scope_is_a_400() {
    let app = spawn_app().await;
    let response = app.get("/api/token/demo?scope=read%22%5C").await;
    assert_eq!(response.status(), 400);
    assert_contract(&json(response).await, "invalid_request");
}

#[tokio::test]
async fn a_rejected_client_is_a_502_with_the_upstream_code() {
    let app = spawn_app().await;
    let response = app.token("wrong").await;
    assert_eq!(response.status(), 502);
    let body = json(response).await;
    assert_contract(&body, "upstream_rejected");
    assert_eq!(body["upstream_error"], "invalid_client");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.contains("'wrong'"),
        "names the connection: {description}"
    );
    assert!(
        !description.contains("client authentication failed"),
        "no upstream text"
    );
}

#[tokio::test]
async fn a_resource_the_provider_does_not_know_is_a_502_invalid_target() {
    let app = spawn_app().await;
    let response = app.token("badresource").await;
    assert_eq!(response.status(), 502);
    let body = json(response).await;
    assert_contract(&body, "upstream_rejected");
    assert_eq!(body["upstream_error"], "invalid_target");
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_a_503() {
    let app = spawn_app().await;
    let response = app.token("down").await;
    assert_eq!(response.status(), 503);
    let body = json(response).await;
    assert_contract(&body, "upstream_unavailable");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("'down'")
    );
}

#[tokio::test]
async fn a_secret_missing_from_key_vault_is_a_503_secret_unavailable() {
    let app = spawn_app().await;
    let response = app.token("nosecret").await;
    assert_eq!(response.status(), 503);
    let body = json(response).await;
    assert_contract(&body, "secret_unavailable");
    let description = body["error_description"].as_str().unwrap();
    // The caller learns the connection and the step; the Key Vault object is for the log.
    assert!(
        description.contains("'nosecret'") && description.contains("Key Vault"),
        "{description}"
    );
    assert!(!description.contains("absent-secret"), "{description}");
    app.log_records_when(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("absent-secret") && m.contains("not found"))
    })
    .await;
    assert_eq!(app.idp.stats().await.token_requests, 0);
}

#[tokio::test]
async fn a_disabled_or_forbidden_secret_is_a_503_that_names_the_step_not_the_secret() {
    let app = spawn_app().await;
    app.azure.vault.set_denied("basic-secret", true);
    app.azure.vault.set_enabled("post-secret", false);
    for connection in ["demo", "posty"] {
        let response = app.token(connection).await;
        assert_eq!(response.status(), 503, "{connection}");
        let body = json(response).await;
        assert_contract(&body, "secret_unavailable");
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.contains(&format!("'{connection}'")),
            "{description}"
        );
        assert!(
            !description.contains("Key Vault Secrets User"),
            "{description}"
        );
        assert!(!description.contains("-secret"), "{description}");
    }
    // The operator's hints are in the log.
    app.log_records_when(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("basic-secret") && m.contains("Key Vault Secrets User"))
    })
    .await;
    app.log_records_when(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("post-secret") && m.contains("SecretDisabled"))
    })
    .await;
    assert_eq!(app.idp.stats().await.token_requests, 0);
}

#[tokio::test]
async fn an_identity_endpoint_failure_is_a_503_secret_unavailable() {
    let app = spawn_app().await;
    app.azure.identity.set_failure(Some(400));
    let response = app.token("demo").await;
    assert_eq!(response.status(), 503);
    let body = json(response).await;
    assert_contract(&body, "secret_unavailable");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("managed identity"),
        "{body}"
    );
}

#[tokio::test]
async fn other_paths_and_methods_get_json_errors_never_empty_bodies() {
    let app = spawn_app().await;
    let response = app.get("/api/other").await;
    assert_eq!(response.status(), 404);
    assert_contract(&json(response).await, "not_found");
    let response = app
        .http
        .delete(app.url("/api/token/demo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, POST");
    assert_contract(&json(response).await, "invalid_request");
}
