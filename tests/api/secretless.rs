//! Secretless client authentication: `private_key_jwt` assertions signed inside Key Vault
//! (keys against the real oidc-provider, certificates against an Entra-shaped token endpoint),
//! and the managed identity as an Entra federated credential.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use token_broker_doubles::{EntraTokenDouble, KeyKind};

use crate::helpers::{IdpClient, Setup, TestApp, contains_jwt, json as body_json, spawn_app_with};

/// Connections signing with keys the tests create after start: Key Vault is read lazily.
const KEY_CONNECTIONS: &str = r#"
[connections.jwt-rs256]
token_url = "{token_url}"
client_id = "broker-jwt-rs256"
auth_method = "private_key_jwt"
client_assertion_key = { key_vault_key = "signing-rsa" }
scopes = ["read"]
allowed_scopes = ["read", "write"]

[connections.jwt-ps256]
token_url = "{token_url}"
client_id = "broker-jwt-ps256"
auth_method = "private_key_jwt"
client_assertion_key = { key_vault_key = "signing-rsa-pss" }
signing_algorithm = "PS256"
scopes = ["read"]

[connections.jwt-es256]
token_url = "{token_url}"
client_id = "broker-jwt-es256"
auth_method = "private_key_jwt"
client_assertion_key = { key_vault_key = "signing-ec" }
scopes = ["read"]

[connections.jwt-missing]
token_url = "{token_url}"
client_id = "broker-jwt-rs256"
auth_method = "private_key_jwt"
client_assertion_key = { key_vault_key = "absent-key" }
"#;

/// The public JWK as the README has users register it: Key Vault's, with only the members an
/// identity provider reads (its `key_ops` lists `sign`, which jose-based providers refuse on
/// a public key, and an HSM key's `kty` ends in `-HSM`).
fn registrable(jwk: &Value) -> Value {
    let mut public = serde_json::Map::new();
    for member in ["kty", "n", "e", "crv", "x", "y", "kid"] {
        if let Some(value) = jwk.get(member) {
            public.insert(member.to_string(), value.clone());
        }
    }
    Value::Object(public)
}

/// A `private_key_jwt` client of the provider, registered with `key`'s public JWK.
fn jwt_client(app: &TestApp, client_id: &'static str, key: &str, alg: &'static str) -> IdpClient {
    let jwk = app.azure.vault.public_key(key).expect("key created").jwk;
    assert!(
        jwk["key_ops"].is_array(),
        "the double answers as Key Vault: {jwk}"
    );
    IdpClient {
        jwks: Some(json!({ "keys": [registrable(&jwk)] })),
        signing_alg: Some(alg),
        ..IdpClient::new(client_id, "unused", "private_key_jwt")
    }
}

/// The standard app plus the key connections, with RSA, RSA (PSS) and EC P-256 keys in the
/// vault and the provider restarted to know their public halves.
async fn spawn_with_keys(extra: &str) -> TestApp {
    let mut app = spawn_app_with(Setup {
        extra_config: format!("{KEY_CONNECTIONS}{extra}"),
        ..Setup::default()
    })
    .await;
    app.azure.vault.create_key("signing-rsa", KeyKind::Rsa);
    app.azure.vault.create_key("signing-rsa-pss", KeyKind::Rsa);
    app.azure.vault.create_key("signing-ec", KeyKind::EcP256);
    let clients = vec![
        jwt_client(&app, "broker-jwt-rs256", "signing-rsa", "RS256"),
        jwt_client(&app, "broker-jwt-ps256", "signing-rsa-pss", "PS256"),
        jwt_client(&app, "broker-jwt-es256", "signing-ec", "ES256"),
    ];
    app.idp.restart(|registered| registered.extend(clients));
    app
}

#[tokio::test]
async fn private_key_jwt_signs_in_key_vault_with_rs256_ps256_and_es256_once_per_fetch() {
    let app = spawn_with_keys("").await;
    for (connection, key) in [
        ("jwt-rs256", "signing-rsa"),
        ("jwt-ps256", "signing-rsa-pss"),
        ("jwt-es256", "signing-ec"),
    ] {
        // The provider accepts only the registered algorithm and key: a 200 is the proof.
        let response = app.token(connection).await;
        assert_eq!(
            response.status(),
            200,
            "{connection}: {}",
            response.text().await.unwrap()
        );
        let body = body_json(response).await;
        assert!(
            body["access_token"].as_str().is_some_and(contains_jwt),
            "{body}"
        );
        assert_eq!(
            app.azure.vault.signs_by(key),
            1,
            "{connection}: one sign per fetch"
        );
        let again = app.token(connection).await;
        assert_eq!(again.status(), 200);
        assert_eq!(
            app.azure.vault.signs_by(key),
            1,
            "{connection}: none per cache hit"
        );
    }
    // Another scope set is another fetch: one more sign, with the key metadata from memory.
    let write = app.get("/api/token/jwt-rs256?scope=write").await;
    assert_eq!(write.status(), 200, "{}", write.text().await.unwrap());
    assert_eq!(app.azure.vault.signs_by("signing-rsa"), 2);
    let stats = app.idp.stats().await;
    assert_eq!(stats.token_errors, 0, "{stats:?}");
    assert_eq!(stats.token_issued, 4, "{stats:?}");
}

/// The provider knows only the key's newest version from now on.
fn rotate_key_at_provider(
    app: &mut TestApp,
    client_id: &'static str,
    key: &str,
    alg: &'static str,
) {
    let client = jwt_client(app, client_id, key, alg);
    app.idp.restart(|clients| {
        clients.retain(|c| c.client_id != client_id);
        clients.push(client);
    });
}

#[tokio::test]
async fn a_key_rotated_without_an_event_is_read_again_after_invalid_client_and_retried_once() {
    let mut app = spawn_with_keys("").await;
    let first = app.token("jwt-rs256").await;
    for l in app.logs() {
        if l.contains("upstream_description") || l.contains("jwt") {
            eprintln!("LOG {l}");
        }
    }
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap());
    let old = app.azure.vault.public_key("signing-rsa").unwrap().version;
    let new = app.azure.vault.create_key("signing-rsa", KeyKind::Rsa);
    assert_ne!(old, new);
    rotate_key_at_provider(&mut app, "broker-jwt-rs256", "signing-rsa", "RS256");

    // A scope not cached yet: the broker signs with the version it has in memory, the
    // provider refuses it, and the broker reads the key again and signs with the new one.
    let response = app.get("/api/token/jwt-rs256?scope=write").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let stats = app.idp.stats().await;
    assert_eq!(
        (stats.token_errors, stats.token_issued),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(
        app.azure.vault.signs_by("signing-rsa"),
        3,
        "old, refused old, new"
    );
    app.log_records_when(|r| {
        r["message"] == "client credential refused; retrying once with another version"
            && r["trying_version"] == new.as_str()
    })
    .await;
}

/// A `KeyNewVersionCreated` event as Event Grid delivers it to `function-rotation`.
async fn deliver_key_event(app: &TestApp, key: &str, version: &str) -> Value {
    let event = json!({
        "id": "7e3e4b44-0000-4000-8000-000000000002",
        "topic": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        "subject": key,
        "eventType": "Microsoft.KeyVault.KeyNewVersionCreated",
        "data": { "Id": format!("https://kv.vault.azure.net/keys/{key}/{version}"), "VaultName": "kv",
                  "ObjectType": "Key", "ObjectName": key, "Version": version, "NBF": null, "EXP": null },
        "dataVersion": "1", "metadataVersion": "1", "eventTime": "2026-11-28T05:00:00Z"
    });
    let response = app
        .http
        .post(app.url("/function-rotation"))
        .json(&json!({ "Data": { "event": event }, "Metadata": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    body_json(response).await
}

#[tokio::test]
async fn a_key_rotation_event_makes_the_next_fetch_sign_with_the_new_version_at_once() {
    let mut app = spawn_with_keys("").await;
    assert_eq!(app.token("jwt-es256").await.status(), 200);
    let new = app.azure.vault.create_key("signing-ec", KeyKind::EcP256);
    rotate_key_at_provider(&mut app, "broker-jwt-es256", "signing-ec", "ES256");

    let outcome = deliver_key_event(&app, "signing-ec", &new).await;
    let logs = outcome["Logs"].to_string();
    assert!(
        logs.contains("key 'signing-ec' will be read again") && logs.contains("jwt-es256"),
        "{logs}"
    );
    // The cached token was dropped: the next request fetches, signing with the new version
    // first time (no refusal at the provider).
    let response = app.token("jwt-es256").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let stats = app.idp.stats().await;
    assert_eq!(
        (stats.token_errors, stats.token_issued),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(app.azure.vault.signs_by("signing-ec"), 2);
}

#[tokio::test]
async fn a_missing_or_forbidden_signing_key_is_a_503_that_names_neither_the_key_nor_the_role() {
    let app = spawn_with_keys("").await;
    let response = app.token("jwt-missing").await;
    assert_eq!(response.status(), 503);
    let body = body_json(response).await;
    assert_eq!(body["error"], "secret_unavailable", "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.contains("'jwt-missing'") && description.contains("Key Vault"),
        "{description}"
    );
    assert!(!description.contains("absent-key"), "{description}");
    app.log_records_when(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("absent-key") && m.contains("not found"))
    })
    .await;

    app.azure.vault.set_denied("signing-ec", true);
    let response = app.token("jwt-es256").await;
    assert_eq!(response.status(), 503);
    let body = body_json(response).await;
    assert_eq!(body["error"], "secret_unavailable", "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        !description.contains("signing-ec") && !description.contains("Crypto"),
        "{description}"
    );
    app.log_records_when(|r| {
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("signing-ec") && m.contains("Key Vault Crypto User"))
    })
    .await;
    assert_eq!(
        app.idp.stats().await.token_requests,
        0,
        "no assertion without a key"
    );
    assert_eq!(app.azure.vault.signs(), 0);
}

#[tokio::test]
async fn entra_certificate_credentials_carry_the_sha256_thumbprint_and_a_fresh_jti_each_fetch() {
    let entra = EntraTokenDouble::start().await.unwrap();
    let token_url = entra.token_url();
    let app = spawn_app_with(Setup {
        extra_config: format!(
            r#"
[connections.entra-cert]
token_url = "{token_url}"
client_id = "entra-cert-app"
auth_method = "private_key_jwt"
client_assertion_key = {{ key_vault_certificate = "entra-cert" }}
scopes = ["api://contoso/.default"]
allowed_scopes = ["api://contoso/.default", "api://other/.default"]

[connections.entra-cert-rs256]
token_url = "{token_url}"
client_id = "entra-cert-app"
auth_method = "private_key_jwt"
client_assertion_key = {{ key_vault_certificate = "entra-cert" }}
signing_algorithm = "RS256"
assertion_lifetime_seconds = 120
scopes = ["api://contoso/.default"]
"#
        ),
        ..Setup::default()
    })
    .await;
    app.azure.vault.create_certificate("entra-cert");
    let certificate = app.azure.vault.public_key("entra-cert").unwrap();
    entra.set_certificate(
        "entra-cert-app",
        certificate.certificate.clone().unwrap(),
        certificate.spki.clone(),
    );

    for path in [
        "/api/token/entra-cert",
        "/api/token/entra-cert?scope=api://other/.default",
        "/api/token/entra-cert-rs256",
    ] {
        let response = app.get(path).await;
        assert_eq!(
            response.status(),
            200,
            "{path}: {}",
            response.text().await.unwrap()
        );
    }
    assert_eq!(entra.refusals(), Vec::<u64>::new());
    let accepted = entra.accepted();
    assert_eq!(accepted.len(), 3);
    let thumbprint = URL_SAFE_NO_PAD.encode(sha256(certificate.certificate.as_ref().unwrap()));
    for (index, (header, claims)) in accepted.iter().enumerate() {
        assert_eq!(header["x5t#S256"], thumbprint.as_str(), "{header}");
        assert_eq!(header["typ"], "JWT");
        assert!(
            header.get("kid").is_none(),
            "Entra matches the thumbprint: {header}"
        );
        assert_eq!(claims["aud"], token_url.as_str());
        assert_eq!(
            (&claims["iss"], &claims["sub"]),
            (&json!("entra-cert-app"), &json!("entra-cert-app"))
        );
        let lifetime = claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap();
        let (alg, expected_lifetime) = if index < 2 {
            ("PS256", 300)
        } else {
            ("RS256", 120)
        };
        assert_eq!(header["alg"], alg, "{header}");
        assert_eq!(lifetime, expected_lifetime, "{claims}");
    }
    assert_ne!(accepted[0].1["jti"], accepted[1].1["jti"]);
    assert_eq!(
        app.azure.vault.signs_by("entra-cert"),
        3,
        "the certificate's key signs"
    );

    // The certificate is renewed in Key Vault and Entra knows only the new one: the next
    // fetch's assertion (old thumbprint) is refused, the broker reads the certificate again
    // and the retry with the new one is accepted.
    app.azure.vault.create_certificate("entra-cert");
    let renewed = app.azure.vault.public_key("entra-cert").unwrap();
    entra.set_certificate(
        "entra-cert-app",
        renewed.certificate.clone().unwrap(),
        renewed.spki.clone(),
    );
    let response = app
        .get("/api/token/entra-cert?scope=api://contoso/.default%20api://other/.default")
        .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(entra.refusals(), vec![700027], "the old thumbprint, once");
    let renewed_thumbprint = URL_SAFE_NO_PAD.encode(sha256(renewed.certificate.as_ref().unwrap()));
    assert_eq!(
        entra.accepted()[3].0["x5t#S256"],
        renewed_thumbprint.as_str()
    );
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).to_vec()
}
