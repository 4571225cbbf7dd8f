//! Hostile input: every refusal is a clear 4xx JSON error, never a 5xx or a crash.

use crate::support::{Setup, json, spawn_app, spawn_app_with};

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
    let response = app
        .http
        .post(app.url("/api/token/demo"))
        .body(vec![b'c'; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_refused(response, 413).await;
    assert_eq!(app.token("demo").await.status(), 200);
}

/// Sends a chunked POST of `size` bytes over a plain TCP connection and returns the status
/// line and body of the answer, or the I/O error the client saw (a reset, a broken pipe).
async fn chunked_post(address: &str, size: usize) -> std::io::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address.trim_start_matches("http://")).await?;
    stream
        .write_all(
            b"POST /api/token/demo HTTP/1.1\r\nHost: broker\r\nx-functions-key: k\r\n\
              Content-Type: application/x-www-form-urlencoded\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let chunk = vec![b'c'; 16 * 1024];
    for _ in 0..size / chunk.len() {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await?;
        stream.write_all(&chunk).await?;
        stream.write_all(b"\r\n").await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

#[tokio::test]
async fn an_oversized_body_gets_its_413_json_never_a_reset() {
    let app = spawn_app().await;
    // 30 callers at once, each sending 2 MiB with its length declared: every one reads its
    // 413, none sees the connection closed under it.
    let posts = (0..30).map(|_| {
        app.http
            .post(app.url("/api/token/demo"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(vec![b'c'; 2 * 1024 * 1024])
            .send()
    });
    let mut resets = 0;
    for outcome in futures_util::future::join_all(posts).await {
        match outcome {
            Ok(response) => assert_refused(response, 413).await,
            Err(_) => resets += 1,
        }
    }
    assert_eq!(
        resets, 0,
        "{resets} of 30 callers saw a reset instead of the 413"
    );
    // The same without a declared length (chunked): the limit is found while reading.
    for _ in 0..5 {
        let (status, body) = chunked_post(&app.address, 2 * 1024 * 1024)
            .await
            .expect("the 413 is read, not a reset");
        assert!(status.contains(" 413 "), "{status}");
        let body: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
        assert_eq!(body["error"], "invalid_request", "{body}");
    }
    // Far beyond the bound that is read away (8 MiB), a body costs bounded time: the answer
    // (or the closed connection) comes at once, and the broker serves on.
    let started = std::time::Instant::now();
    let _ = chunked_post(&app.address, 64 * 1024 * 1024).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.token("demo").await.status(), 200);
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
    // Parameters that name other endpoints are ignored: the token goes to the configured URL,
    // for the configured client.
    let app = spawn_app().await;
    let response = app
        .get("/api/token/demo?token_url=http://127.0.0.1:1/x&client_id=y&grant_type=password")
        .await;
    assert_eq!(response.status(), 200);
    let requests = app.idp.token_requests().await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].field("grant_type"), Some("client_credentials"));
    assert_eq!(requests[0].field("token_url"), None);
    // An audience or resource reaches the provider only from the connection's allowed lists
    // (`demo` has none): anything else is refused before any request is made.
    for path in [
        "/api/token/demo?resource=http://evil",
        "/api/token/demo?audience=x",
    ] {
        assert_refused(app.get(path).await, 400).await;
    }
    assert_eq!(app.idp.stats().await.token_requests, 1);
}

/// A hostile or broken token endpoint, one connection per behaviour: every answer is a
/// documented JSON answer, a token handed out lives `0 < expires_in <= 24 h`, nothing is
/// retried that a retry cannot cure, and the broker neither panics nor loses the key.
#[tokio::test]
async fn a_hostile_token_endpoint_gets_documented_answers_and_no_panic() {
    use token_broker_doubles::{Behaviour, HostileIdp};

    let hostile = HostileIdp::start().await.unwrap();
    let mut extra = String::new();
    for behaviour in Behaviour::ALL {
        // Answers that take the rotation path get a secret of their own, so that the Key
        // Vault reads counted for them are theirs.
        let secret = match behaviour {
            Behaviour::Empty401 => "hostile-401-secret",
            Behaviour::EntraInvalidSecret => "hostile-7000215-secret",
            Behaviour::EntraExpiredSecret => "hostile-7000222-secret",
            _ => "basic-secret",
        };
        extra.push_str(&format!(
            "\n[connections.{name}]\ntoken_url = \"{url}\"\nclient_id = \"broker-basic\"\nclient_secret = {{ key_vault_secret = \"{secret}\" }}\n",
            name = behaviour.name(),
            url = hostile.token_url(behaviour),
        ));
    }
    let app = spawn_app_with(Setup {
        extra_config: extra,
        ..Setup::default()
    })
    .await;
    for secret in [
        "hostile-401-secret",
        "hostile-7000215-secret",
        "hostile-7000222-secret",
    ] {
        app.azure.vault.set_secret(secret, "v1");
    }

    let mut first_round: Vec<u16> = Vec::new();
    for behaviour in Behaviour::ALL {
        let reads_before = app.azure.vault.reads();
        let response = app.token(behaviour.name()).await;
        let status = response.status().as_u16();
        assert_eq!(
            response.headers()["cache-control"],
            "no-store",
            "{behaviour:?}"
        );
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        let body = json(response).await;
        let requests = hostile.requests(behaviour);
        match behaviour {
            Behaviour::HugeExpiresIn | Behaviour::FloatExpiresIn => {
                assert_eq!(status, 200, "{behaviour:?}: {body}");
                let expires_in = body["expires_in"].as_u64().unwrap();
                assert!(
                    expires_in > 0 && expires_in <= 86_400,
                    "{behaviour:?}: {body}"
                );
                assert_eq!(requests, 1);
            }
            Behaviour::NegativeExpiresIn | Behaviour::ZeroExpiresIn => {
                // "Not given": the connection's default lifetime (300 s) applies.
                assert_eq!(status, 200, "{behaviour:?}: {body}");
                let expires_in = body["expires_in"].as_u64().unwrap();
                assert!(expires_in > 0 && expires_in <= 300, "{behaviour:?}: {body}");
            }
            Behaviour::Html200
            | Behaviour::Huge200
            | Behaviour::NoAccessToken
            | Behaviour::EmptyAccessToken => {
                assert_eq!(status, 502, "{behaviour:?}: {body}");
                assert_eq!(body["error"], "upstream_invalid_response", "{behaviour:?}");
                assert_eq!(requests, 1, "{behaviour:?}: not retried");
            }
            Behaviour::Empty401 => {
                assert_eq!(status, 502, "{body}");
                assert_eq!(body["error"], "upstream_rejected");
                assert!(body.get("upstream_error").is_none(), "{body}");
                assert!(
                    body["error_description"]
                        .as_str()
                        .unwrap()
                        .contains("HTTP 401")
                );
                assert_eq!(requests, 1, "not retried: the secret has no other version");
                assert_eq!(
                    app.azure.vault.reads() - reads_before,
                    2,
                    "a 401 takes the rotation path: the secret is read again"
                );
            }
            Behaviour::NotFound404 | Behaviour::Waf403 | Behaviour::Redirect302 => {
                assert_eq!(status, 502, "{behaviour:?}: {body}");
                assert_eq!(body["error"], "upstream_rejected", "{behaviour:?}");
                assert_eq!(requests, 1, "{behaviour:?}: not retried");
                assert_eq!(
                    hostile.redirect_target_hits(),
                    0,
                    "{behaviour:?}: the redirect was not followed"
                );
            }
            Behaviour::EntraV1 => {
                // `expires_in` as a string, as Entra's v1 endpoint sends it, is the lifetime.
                assert_eq!(status, 200, "{body}");
                let expires_in = body["expires_in"].as_u64().unwrap();
                assert!((3590..=3599).contains(&expires_in), "{body}");
                assert_eq!(requests, 1);
            }
            Behaviour::EntraInvalidSecret | Behaviour::EntraExpiredSecret => {
                assert_eq!(status, 502, "{behaviour:?}: {body}");
                assert_eq!(body["error"], "upstream_rejected", "{behaviour:?}");
                assert_eq!(body["upstream_error"], "invalid_client", "{behaviour:?}");
                let description = body["error_description"].as_str().unwrap();
                assert!(
                    !description.contains("AADSTS"),
                    "{behaviour:?}: the IdP's own words stay in the log: {description}"
                );
                assert_eq!(requests, 1, "{behaviour:?}: no other version to try");
                assert_eq!(
                    app.azure.vault.reads() - reads_before,
                    2,
                    "{behaviour:?}: a refused secret takes the rotation path: read again"
                );
            }
            Behaviour::Unavailable503Date => {
                assert_eq!(status, 503, "{body}");
                assert_eq!(body["error"], "upstream_unavailable");
                assert_eq!(requests, 3, "first try and max_retries (2) retries");
                let retry_after = retry_after.expect("a Retry-After for callers");
                assert!((1..=60).contains(&retry_after), "{retry_after}");
            }
        }
        assert!(
            body["error_description"].is_string() || status == 200,
            "{body}"
        );
        first_round.push(status);
    }

    // A second round: every key still answers (no poisoned entry, no dropped connection).
    let before = hostile.total_requests();
    for (behaviour, first) in Behaviour::ALL.into_iter().zip(first_round) {
        let response = app.token(behaviour.name()).await;
        let status = response.status().as_u16();
        let body = json(response).await;
        assert_eq!(
            status, first,
            "{behaviour:?}: the same answer again: {body}"
        );
    }
    assert_eq!(
        hostile.requests(Behaviour::Empty401),
        1,
        "a refused secret is remembered (negative cache)"
    );
    assert_eq!(
        hostile.requests(Behaviour::HugeExpiresIn),
        1,
        "the clamped token is a hit"
    );
    assert!(
        hostile.total_requests() > before,
        "the failing ones were asked again"
    );
    assert_eq!(
        (
            hostile.requests(Behaviour::Redirect302),
            hostile.redirect_target_hits()
        ),
        (2, 0),
        "asked twice, and its redirect target never"
    );
    for behaviour in [Behaviour::EntraInvalidSecret, Behaviour::EntraExpiredSecret] {
        assert_eq!(
            hostile.requests(behaviour),
            1,
            "{behaviour:?}: the refusal is remembered (negative cache)"
        );
    }
    let records = app
        .log_records_when(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("configuration error"))
        })
        .await;
    assert!(
        !records.iter().any(|r| r.to_string().contains("panicked")),
        "no panic in the log"
    );
    assert!(
        app.logs().iter().all(|line| !line.contains("panicked at")),
        "no panic on stderr"
    );
}
