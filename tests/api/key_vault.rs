//! Key Vault trouble with a copy of the secret in memory: a dead vault never holds a token
//! fetch up and is not asked again on every fetch, and a secret Key Vault refuses for good
//! (disabled, access revoked) stops being used after the documented grace period. And the
//! promises about re-reads, each shown with the vault double holding a read until the test
//! lets it go: a re-read is given up after 2 s and the copy serves, one caller at a time
//! re-reads while the others get the copy, a read that answers in time is used, a cold read
//! is bounded by the connection's deadline, and Key Vault calls retry at most 3 times.

use std::time::{Duration, Instant};

use serde_json::json;
use token_broker_doubles::Fault;

use crate::support::{Setup, TestApp, json as body_json, spawn_app, spawn_app_with};

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

/// Connections that share `demo`'s secret (each its own token cache entry), and one with a
/// short deadline for a vault that hangs before any copy is in memory.
const SHARING: &str = r#"
[connections.twin0]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = { key_vault_secret = "basic-secret" }

[connections.twin1]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = { key_vault_secret = "basic-secret" }

[connections.twin2]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = { key_vault_secret = "basic-secret" }

[connections.twin3]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = { key_vault_secret = "basic-secret" }

[connections.cold]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = { key_vault_secret = "cold-secret" }
timeout_seconds = 1
deadline_seconds = 3
"#;

async fn sharing_app() -> TestApp {
    spawn_app_with(Setup {
        extra_config: SHARING.to_string(),
        ..Setup::default()
    })
    .await
}

/// How long the broker waits for a re-read with a copy in memory (`REREAD_WAIT`), and the
/// slack a loaded machine may add to an answer that waited for it.
const REREAD_WAIT: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_millis(2500);

/// A vault that takes the re-read and never answers: the caller gets its token with the copy
/// in memory once the re-read's 2 s are up, not later, and not sooner (the bound is a real
/// timeout, so it is the one place this file measures time).
#[tokio::test]
async fn a_hanging_re_read_is_given_up_after_two_seconds_and_the_copy_serves() {
    let app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.azure.vault.reads(), 1);
    app.azure.vault.set_fault(Some(Fault::Hold));
    secret_changed(&app, "basic-secret").await;
    let (before, idp_before) = (
        app.azure.vault.requests(),
        app.idp.stats().await.token_requests,
    );

    let started = Instant::now();
    let response = app.token("demo").await;
    let waited = started.elapsed();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert!(
        waited >= REREAD_WAIT - Duration::from_millis(50),
        "the re-read was given its 2 s: {waited:?}"
    );
    assert!(waited < REREAD_WAIT + SLACK, "and no more: {waited:?}");
    assert_eq!(
        app.azure.vault.requests() - before,
        1,
        "one re-read, and it hung"
    );
    assert_eq!(app.azure.vault.reads(), 1, "the vault answered no secret");
    assert_eq!(
        app.idp.stats().await.token_requests - idp_before,
        1,
        "a new token was fetched with the copy in memory"
    );
    app.log_records_when(|r| {
        r["message"] == "key vault re-read failed; using the copy in memory"
            && r["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("no answer within 2s"))
    })
    .await;
    app.azure.vault.set_fault(None);
    app.azure.vault.release_held();
}

/// While one caller's re-read hangs, the others are answered from the copy at once, and the
/// vault sees that one read only: the request count shows no one else went to it.
#[tokio::test]
async fn one_caller_re_reads_while_the_others_get_the_copy_at_once() {
    let app = sharing_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    app.azure.vault.set_fault(Some(Fault::Hold));
    secret_changed(&app, "basic-secret").await;
    let before = app.azure.vault.requests();

    let first = tokio::spawn(app.request("/api/token/demo").send());
    assert!(
        app.azure
            .vault
            .wait_for_requests(before + 1, Duration::from_secs(30))
            .await,
        "the first caller's re-read reached the vault"
    );
    assert!(
        app.azure
            .vault
            .wait_for_held(1, Duration::from_secs(10))
            .await
    );
    assert_eq!(app.azure.vault.held(), 1);
    // Four other connections on the same secret, each with a fetch of its own to make.
    let others = futures_util::future::join_all(
        (0..4).map(|n| app.request(&format!("/api/token/twin{n}")).send()),
    )
    .await;
    for response in others {
        assert_eq!(response.unwrap().status(), 200);
    }
    assert!(
        !first.is_finished(),
        "the four were answered while the first caller's re-read was still held"
    );
    assert_eq!(
        app.azure.vault.requests(),
        before + 1,
        "the four did not go to the vault: one caller at a time re-reads"
    );
    app.azure.vault.set_fault(None);
    app.azure.vault.release_held();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}

/// A re-read that answers within its 2 s is used: the bound cuts a hanging vault short, not a
/// slow one. The vault holds the read until the test lets it answer; the new version it then
/// returns is what the broker goes on with, and no copy is served.
#[tokio::test]
async fn a_re_read_that_answers_within_the_bound_is_used() {
    let app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    // A new version with the same value, so the provider still accepts it.
    let new_version = app
        .azure
        .vault
        .set_secret("basic-secret", crate::support::TRICKY_SECRET);
    app.azure.vault.set_fault(Some(Fault::Hold));
    secret_changed(&app, "basic-secret").await;
    let before = app.azure.vault.requests();
    let caller = tokio::spawn(app.request("/api/token/demo").send());
    assert!(
        app.azure
            .vault
            .wait_for_requests(before + 1, Duration::from_secs(30))
            .await
    );
    app.azure.vault.set_fault(None);
    app.azure.vault.release_held();
    assert_eq!(caller.await.unwrap().unwrap().status(), 200);
    assert_eq!(app.azure.vault.reads(), 2);
    app.log_records_when(|r| {
        r["message"] == "key vault object has a new version" && r["to"] == new_version.as_str()
    })
    .await;
    assert!(
        !app.logs()
            .iter()
            .any(|line| line.contains("using the copy in memory")),
        "the answer was used, not the copy"
    );
}

/// Without a copy in memory there is nothing to serve meanwhile: a hanging vault costs the
/// caller the connection's `deadline_seconds` (3 s here), never more, and the answer is a
/// clean 503.
#[tokio::test]
async fn a_hanging_vault_without_a_copy_costs_a_caller_the_deadline_and_no_more() {
    let app = sharing_app().await;
    app.azure
        .vault
        .set_secret("cold-secret", crate::support::TRICKY_SECRET);
    app.azure.vault.set_fault(Some(Fault::Hold));
    let started = Instant::now();
    let response = app.token("cold").await;
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body = body_json(response).await;
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("'cold'")),
        "{body}"
    );
    let deadline = Duration::from_secs(3);
    assert!(
        waited >= deadline - Duration::from_millis(50),
        "the deadline passed: {waited:?}"
    );
    assert!(waited < deadline + SLACK, "and no more: {waited:?}");
    // The vault was asked and never answered. (Whether the double still holds the read when
    // the caller has its answer depends on when it notices the broker gave up on it, so that
    // is not asserted.)
    assert!(app.azure.vault.requests() >= 1, "the vault was asked");
    assert_eq!(app.azure.vault.reads(), 0, "and answered no secret");
    assert_eq!(
        app.idp.stats().await.token_requests,
        0,
        "no token request without a secret"
    );
    app.azure.vault.set_fault(None);
    app.azure.vault.release_held();
}

/// Key Vault calls retry at most 3 times: a vault answering 503 to every read is asked 4 times
/// per read (after the one challenge), and the failure is then remembered for the cold backoff
/// instead of being asked again per request.
#[tokio::test]
async fn a_failing_vault_is_asked_four_times_per_read_and_not_again_within_the_backoff() {
    let app = spawn_app().await;
    app.azure.vault.set_fault(Some(Fault::Unavailable));
    let response = app.token("demo").await;
    assert_eq!(response.status(), 503);
    assert_eq!(body_json(response).await["error"], "secret_unavailable");
    assert_eq!(app.azure.vault.challenges(), 1);
    assert_eq!(
        app.azure.vault.requests(),
        1 + 4,
        "the challenge, the read and its 3 retries"
    );
    let response = app.token("demo").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        app.azure.vault.requests(),
        5,
        "within the backoff the failure is answered from memory"
    );
}
