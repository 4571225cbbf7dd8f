//! `POST /api/token/{connection}/invalidate`: a token a backend refused is dropped only when it
//! is the cached one, at most once per interval, for callers allowed to use the connection,
//! and audited by fingerprint only.

use serde_json::Value;

use crate::support::{Setup, TestApp, json, jwt_callers, spawn_app, spawn_app_with};

/// `POST /api/token/{connection}/invalidate` with `form`, as the host forwards it.
async fn invalidate(app: &TestApp, connection: &str, form: &str) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/api/token/{connection}/invalidate")))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-functions-key", crate::support::FUNCTION_KEY)
        .body(form.to_string())
        .send()
        .await
        .unwrap()
}

fn form_of(token: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("access_token", token)
        .finish()
}

async fn access_token(app: &TestApp, path: &str) -> String {
    let body = json(app.get(path).await).await;
    body["access_token"].as_str().expect("a token").to_string()
}

#[tokio::test]
async fn only_the_cached_token_is_dropped_once_per_interval_and_the_next_request_fetches_once() {
    let app = spawn_app().await;
    let first = access_token(&app, "/api/token/demo").await;

    // A token that is not the cached one (a stale caller's, or anyone's guess) drops nothing.
    let response = invalidate(&app, "demo", &form_of("eyJ.not.the-cached-token")).await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(
        body,
        serde_json::json!({"invalidated": false, "reason": "not_current"})
    );
    assert_eq!(access_token(&app, "/api/token/demo").await, first);
    assert_eq!(app.idp.stats().await.token_requests, 1);

    // The cached token: dropped, and the next requests share one new fetch.
    let response = invalidate(&app, "demo", &form_of(&first)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        json(response).await,
        serde_json::json!({"invalidated": true})
    );
    let after: Vec<String> =
        futures_util::future::join_all((0..20).map(|_| access_token(&app, "/api/token/demo")))
            .await;
    assert!(
        after
            .iter()
            .all(|token| token == &after[0] && token != &first)
    );
    assert_eq!(
        app.idp.stats().await.token_requests,
        2,
        "one fetch for twenty callers after the invalidation"
    );

    // The new token, refused at once again: too soon, nothing dropped, and a Retry-After.
    let response = invalidate(&app, "demo", &form_of(&after[0])).await;
    assert_eq!(response.status(), 200);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(
        json(response).await,
        serde_json::json!({"invalidated": false, "reason": "too_soon"})
    );
    assert_eq!(access_token(&app, "/api/token/demo").await, after[0]);
    assert_eq!(app.idp.stats().await.token_requests, 2);

    // Another key of the same connection is its own: its token is dropped independently.
    let write = access_token(&app, "/api/token/demo?scope=write").await;
    let response = invalidate(&app, "demo", &format!("scope=write&{}", form_of(&write))).await;
    assert_eq!(json(response).await["invalidated"], true);

    // Audited by fingerprint, never the token.
    let invalidated =
        |record: &Value| record["target"] == "audit" && record["message"] == "token invalidated";
    let audit = app
        .log_records_when(|record| invalidated(record) && record["scopes"] == "write")
        .await;
    let invalidated: Vec<&Value> = audit.iter().filter(|record| invalidated(record)).collect();
    assert_eq!(invalidated.len(), 2, "{invalidated:?}");
    let refused = audit
        .iter()
        .filter(|record| record["message"] == "token invalidation refused")
        .count();
    assert_eq!(refused, 2, "a token not current, and one too soon");
    assert_eq!(invalidated[0]["connection"], "demo");
    assert_eq!(invalidated[0]["count"], 0);
    assert_eq!(invalidated[0]["fingerprint"].as_str().unwrap().len(), 12);
    let text = app.logs().join("\n");
    assert!(!text.contains(&first) && !text.contains(&after[0]));
}

#[tokio::test]
async fn an_invalidation_without_a_token_a_get_or_another_body_is_refused() {
    let app = spawn_app().await;
    let response = invalidate(&app, "demo", "scope=read").await;
    assert_eq!(response.status(), 400);
    assert_eq!(json(response).await["error"], "invalid_request");
    let response = app.get("/api/token/demo/invalidate").await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let response = invalidate(&app, "nosuch", &form_of("x")).await;
    assert_eq!(response.status(), 404);
    let response = invalidate(
        &app,
        "demo",
        &format!("audience=https://x.example&{}", form_of("x")),
    )
    .await;
    assert_eq!(json(response).await["error"], "invalid_target");
    // A token in the query is not read: it would reach access logs.
    let response = app
        .http
        .post(app.url("/api/token/demo/invalidate?access_token=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn a_caller_not_allowed_to_use_the_connection_cannot_invalidate_its_token() {
    let app = spawn_app_with(Setup {
        extra_config: jwt_callers("{issuer}", None, 0),
        ..Setup::default()
    })
    .await;
    let allowed = app.idp.caller_token("caller-app").await;
    let token = json(app.get_as("/api/token/guarded", &allowed).await).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let other = app.idp.caller_token("caller-admin").await;
    let post = |bearer: String| {
        app.http
            .post(app.url("/api/token/guarded/invalidate"))
            .bearer_auth(bearer)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_of(&token))
            .send()
    };
    let refused = post(other).await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(json(refused).await["error"], "access_denied");
    let unauthenticated = app
        .http
        .post(app.url("/api/token/guarded/invalidate"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_of(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let dropped = post(allowed).await.unwrap();
    assert_eq!(json(dropped).await["invalidated"], true);
}
