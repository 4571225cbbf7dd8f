//! Hostile input: every refusal is a clear 4xx JSON error, never a 5xx or a crash.

use crate::helpers::{json, spawn_app};

async fn assert_refused(response: reqwest::Response, status: u16) {
    assert_eq!(response.status(), status);
    let body = json(response).await;
    assert!(
        body["error"].is_string() && body["error_description"].is_string(),
        "{body}"
    );
}

#[tokio::test]
async fn oversized_requests_are_refused_with_json() {
    let app = spawn_app().await;
    let long = "a".repeat(5000);
    assert_refused(app.get(&format!("/api/token/demo?x={long}")).await, 414).await;
    let response = app
        .request("/api/token/demo")
        .header("x-padding", "b".repeat(17 * 1024))
        .send()
        .await
        .unwrap();
    assert_refused(response, 431).await;
    let scopes = (0..40)
        .map(|i| format!("s{i}"))
        .collect::<Vec<_>>()
        .join("%20");
    assert_refused(
        app.get(&format!("/api/token/demo?scope={scopes}")).await,
        400,
    )
    .await;
    // The broker is still healthy.
    assert_eq!(app.token("demo").await.status(), 200);
    // A body the broker refuses unread ends its connection, so this one goes last.
    let response = app
        .http
        .post(app.url("/api/token/demo"))
        .body(vec![b'c'; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_refused(response, 413).await;
}

#[tokio::test]
async fn header_injection_and_traversal_go_nowhere() {
    let app = spawn_app().await;
    for path in [
        "/api/token/demo?scope=read%0d%0aX-Injected:%201",
        "/api/token/demo?scope=read%00",
        "/api/token/demo?scope=%E2%9C%93",
    ] {
        assert_refused(app.get(path).await, 400).await;
    }
    for path in [
        "/api/token/..%2f..%2fetc%2fpasswd",
        "/api/token/%2e%2e",
        "/api/token/demo%0d%0a",
        "/api/token/demo%20",
    ] {
        assert_refused(app.get(path).await, 404).await;
    }
    assert_eq!(app.idp.stats().await.token_requests, 0);
}

#[tokio::test]
async fn no_request_input_reaches_an_outgoing_url() {
    // Parameters that name other endpoints are ignored: the token goes to the configured URL.
    let app = spawn_app().await;
    let response = app
        .get("/api/token/demo?token_url=http://127.0.0.1:1/x&resource=http://evil&audience=x&client_id=y")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.idp.stats().await.token_requests, 1);
}
