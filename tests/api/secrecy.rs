//! The secret never leaves: not in a response, not in a log line at any level.

use base64::Engine as _;

use crate::support::{Setup, TRICKY_SECRET, post_secret, setting_secret, spawn_app_with};

#[tokio::test]
async fn secrets_tokens_and_function_keys_never_reach_the_trace_log() {
    let app = spawn_app_with(Setup {
        rust_log: "trace",
        ..Setup::default()
    })
    .await;
    let function_key = "fk-Q2hlY2tUaGlzS2V5SXNOZXZlckxvZ2dlZA==";
    let mut responses = Vec::new();
    let mut tokens = Vec::new();
    for connection in [
        "demo", "posty", "setting", "wrong", "nosecret", "down", "nope",
    ] {
        for _ in 0..2 {
            let response = app
                .http
                .post(app.url(&format!("/api/token/{connection}?code={function_key}")))
                .header("x-functions-key", function_key)
                .header("X-Azure-Functions-InvocationId", "inv-1")
                .send()
                .await
                .unwrap();
            let text = response.text().await.unwrap();
            if let Ok(body) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(token) = body["access_token"].as_str()
            {
                tokens.push(token.to_string());
            }
            responses.push(text);
        }
    }
    assert_eq!(tokens.len(), 6, "three connections served tokens twice");
    let mut app = app;
    // Stop the broker so that every line it wrote is flushed before the scan.
    assert!(app.terminate().await.success());
    let logs = app.logs();
    assert!(
        logs.len() > 50,
        "trace logging produced {} lines",
        logs.len()
    );
    let secrets = [
        TRICKY_SECRET.to_string(),
        post_secret(),
        setting_secret(),
        "not-the-registered-secret".to_string(),
    ];
    let mut needles: Vec<(&str, String)> = secrets
        .iter()
        .map(|s| ("client secret", s.clone()))
        .collect();
    needles.extend(tokens.iter().map(|t| ("access token", t.clone())));
    needles.push(("function key", function_key.to_string()));
    // The managed identity's own tokens for Key Vault are credentials too.
    let identity_tokens: Vec<String> = app
        .azure
        .identity
        .issued()
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(!identity_tokens.is_empty());
    needles.extend(
        identity_tokens
            .into_iter()
            .map(|t| ("managed identity token", t)),
    );
    for (what, needle) in &needles {
        for line in &logs {
            assert!(
                !line.contains(needle.as_str()),
                "{what} found in log line: {line}"
            );
        }
    }
    for (what, needle) in needles.iter().filter(|(what, _)| *what == "client secret") {
        for response in &responses {
            assert!(
                !response.contains(needle.as_str()),
                "{what} found in a response"
            );
        }
    }
    // Basic credentials would appear base64-encoded; look for that form too.
    for line in &logs {
        assert!(
            !line.to_ascii_lowercase().contains("authorization: basic"),
            "{line}"
        );
        assert!(!line.contains("Basic "), "{line}");
    }
    // The Basic credential the demo connection really sends (RFC 6749 §2.3.1: base64 of the
    // form-encoded `client_id:secret`) is among what every test's leak scan looks for, and
    // no line holds any of them.
    let form = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let sent = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        form("broker-basic"),
        form(TRICKY_SECRET)
    ));
    assert!(app.credentials().contains(&sent));
    let leaks = app.leaks();
    assert!(leaks.is_empty(), "{}", leaks.join("\n"));
}
