//! The Azure paths production takes, end to end: a user-assigned managed identity, Key Vault
//! challenge verification on (the vault under `vault.azure.net`, reached through an egress
//! proxy), both challenge forms, a managed identity token the vault refuses before the expiry
//! the broker was told, and a SIGTERM that arrives while a request is in flight.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use token_broker_doubles::fault_proxy::Fault;
use token_broker_doubles::{ChallengeForm, key_vault};

use crate::key_vault::secret_changed;
use crate::support::{MANAGED_IDENTITY_CLIENT_ID, Setup, json, spawn_app, spawn_app_with};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn the_user_assigned_identity_is_named_and_its_token_reused_while_valid() {
    let app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    secret_changed(&app, "basic-secret").await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.azure.vault.reads(), 2, "Key Vault was read twice");
    assert_eq!(
        app.azure.identity.requested_client_ids(),
        [Some(MANAGED_IDENTITY_CLIENT_ID.to_string())],
        "one identity token (valid 24 h) served both reads, asked for the configured identity"
    );

    // The double refuses what an app with only that identity would get refused for, so the
    // assertion above could fail: no client id (a system-assigned identity), or another one.
    let endpoint = app.azure.identity.endpoint();
    for client_id in [None, Some("00000000-0000-0000-0000-000000000bad")] {
        let mut query = vec![
            ("api-version", "2019-08-01"),
            ("resource", "https://vault.azure.net"),
        ];
        query.extend(client_id.map(|id| ("client_id", id)));
        let url = url::Url::parse_with_params(&endpoint, &query).unwrap();
        let response = reqwest::Client::new()
            .get(url)
            .header("x-identity-header", app.azure.identity.header())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "client_id {client_id:?}");
    }
}

#[tokio::test]
async fn a_broker_naming_another_identity_gets_no_secret() {
    let app = spawn_app_with(Setup {
        extra_env: vec![(
            "MANAGED_IDENTITY_CLIENT_ID".into(),
            "00000000-0000-0000-0000-000000000bad".into(),
        )],
        ..Setup::default()
    })
    .await;
    let response = app.token("demo").await;
    assert_eq!(response.status(), 503);
    assert_eq!(json(response).await["error"], "secret_unavailable");
    let asked = app.azure.identity.requested_client_ids();
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|id| id.as_deref() == Some("00000000-0000-0000-0000-000000000bad")),
        "{asked:?}"
    );
    assert_eq!(app.azure.vault.reads(), 0);
}

#[tokio::test]
async fn both_challenge_forms_work_with_challenge_verification_on() {
    for form in [ChallengeForm::Resource, ChallengeForm::Scope] {
        let app = spawn_app().await;
        app.azure.vault.set_challenge_form(form);
        let response = app.token("demo").await;
        assert_eq!(response.status(), 200, "{form:?}");
        assert_eq!(app.azure.vault.challenges(), 1, "{form:?}");
        assert_eq!(app.azure.vault.reads(), 1, "{form:?}");
        assert_eq!(app.azure.identity.requests(), 1, "{form:?}");
        let public = format!("{}:443", key_vault::PUBLIC_HOST);
        assert!(app.vault_proxy.tunnels(&public) >= 1, "{form:?}");
    }
}

/// Verification is really on: a vault outside the challenge's resource (`vault.azure.net`)
/// gets its challenge answered by nothing, and no identity token is even asked for.
#[tokio::test]
async fn challenge_verification_refuses_a_vault_outside_the_challenge_resource() {
    let app = spawn_app_with(Setup {
        extra_env: vec![(
            "KEY_VAULT_URI".into(),
            format!("https://{}", key_vault::FOREIGN_HOST),
        )],
        ..Setup::default()
    })
    .await;
    let response = app.token("demo").await;
    assert_eq!(response.status(), 503);
    assert_eq!(json(response).await["error"], "secret_unavailable");
    let foreign = format!("{}:443", key_vault::FOREIGN_HOST);
    assert!(
        app.vault_proxy.tunnels(&foreign) >= 1,
        "the vault was reached"
    );
    assert!(app.azure.vault.challenges() >= 1, "and challenged");
    assert_eq!(app.azure.identity.requests(), 0, "no token was got for it");
    assert_eq!(app.azure.vault.reads(), 0);
}

/// The identity endpoint issues tokens for a day, as App Service does, so azure_identity keeps
/// the token (it renews one only in its last five minutes). The vault then stops accepting it
/// (ended in the identity double: revoked, or a clock that drifted) while the broker still
/// takes it for valid. The refusal grace is 0, so a broker that kept sending the refused token
/// could only answer 503: the 200 is the broker having asked for a new token and read again.
#[tokio::test]
async fn a_token_the_vault_refuses_before_its_expiry_is_replaced_and_the_read_recovers() {
    let app = spawn_app_with(Setup {
        extra_config: "\n[cache]\nsecret_refusal_grace_seconds = 0\n".to_string(),
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.azure.identity.requests(), 1);
    let first = app.azure.vault.accepted_tokens();
    assert_eq!(first.len(), 1);
    let expires_on = app.azure.identity.issued().lock().unwrap()[&first[0]].expires_on;
    assert!(
        expires_on > unix_now() + 23 * 3600,
        "a day's token, far outside azure_identity's five-minute renewal window"
    );

    assert_eq!(app.azure.identity.expire_issued(), 1);
    let (challenges, vault_requests) = (app.azure.vault.challenges(), app.azure.vault.requests());
    secret_changed(&app, "basic-secret").await;
    let response = app.token("demo").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert!(
        app.azure.vault.requests() - vault_requests >= 2,
        "the old token was sent and refused first"
    );
    assert_eq!(
        app.azure.vault.challenges(),
        challenges,
        "every refusal was of a token, not of a request without one"
    );
    assert_eq!(
        app.azure.identity.requests(),
        2,
        "one new identity token, no more"
    );
    assert_eq!(app.azure.vault.reads(), 2, "the secret was read again");
    let accepted = app.azure.vault.accepted_tokens();
    assert_eq!(accepted.len(), 2);
    assert_ne!(accepted[1], accepted[0], "the read used the new token");
    app.log_records_when(|r| {
        r["message"]
            == "key vault refused the managed identity's token; retrying once with a new token"
    })
    .await;
    assert!(
        !app.logs()
            .iter()
            .any(|line| line.contains("using the copy in memory")),
        "the read itself succeeded: no copy was needed"
    );

    // The new token serves the reads after it: no further identity request.
    secret_changed(&app, "basic-secret").await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.azure.vault.reads(), 3);
    assert_eq!(app.azure.identity.requests(), 2);
}

const HELD: &str = r#"
[connections.held]
token_url = "{proxy_url}/token"
client_id = "broker-post"
client_secret = { key_vault_secret = "post-secret" }
auth_method = "client_secret_post"
timeout_seconds = 60
deadline_seconds = 60
"#;

/// The host stops a worker with SIGTERM: a request already in flight is answered, its audit
/// record written, and the process exits cleanly.
#[tokio::test]
async fn sigterm_with_a_request_in_flight_loses_nothing() {
    let mut app = spawn_app_with(Setup {
        proxy: true,
        extra_config: HELD.to_string(),
        ..Setup::default()
    })
    .await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.set_default(Fault::Hold);
    let in_flight = tokio::spawn(app.request("/api/token/held").send());
    assert!(
        proxy.wait_for_requests(1, Duration::from_secs(30)).await,
        "the request's token fetch never reached the provider"
    );
    app.send_sigterm().await;
    app.log_records_when(|r| {
        r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutdown signal received"))
    })
    .await;
    assert!(!in_flight.is_finished(), "still in flight at the signal");
    app.proxy.as_ref().unwrap().release_held();

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let token = json(response).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let status = app
        .wait_for_exit(Duration::from_secs(30))
        .await
        .expect("the broker exited after finishing the request");
    assert!(status.success(), "{status}");
    let audit = app.audit_records_when(1).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["connection"], "held");
    let fingerprint: String = Sha256::digest(token.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        audit[0]["fingerprint"], fingerprint,
        "the record is the answered token's"
    );
    app.log_records_when(|r| r["message"] == "stopped").await;
}
