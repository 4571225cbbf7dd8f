//! Secretless client authentication: `private_key_jwt` assertions signed inside Key Vault
//! (keys against the real oidc-provider, certificates against an Entra-shaped token endpoint),
//! and the managed identity as an Entra federated credential.

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use token_broker_doubles::{AzureDoubles, EntraTokenDouble, KeyKind};

use crate::support::{
    IdpClient, Launch, Setup, TestApp, contains_jwt, json as body_json, spawn_app_with,
};

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

/// The public JWK as docs/secretless.md has users register it: Key Vault's, with only the members an
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
    app.idp
        .restart(|registered| registered.extend(clients))
        .await;
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
    // The `kid` is the key id Key Vault answered, under the name the broker called it by
    // (through the egress proxy), not the double's loopback address: what users register.
    let requests = app.idp.token_requests().await;
    assert_eq!(requests.len(), 4);
    for request in &requests {
        let assertion = request.field("client_assertion").expect("an assertion");
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(assertion.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        let key = match request.field("client_id") {
            Some("broker-jwt-rs256") => "signing-rsa",
            Some("broker-jwt-ps256") => "signing-rsa-pss",
            _ => "signing-ec",
        };
        assert_eq!(
            header["kid"],
            app.azure.vault.public_key(key).unwrap().kid.as_str(),
            "{header}"
        );
        assert!(
            header["kid"]
                .as_str()
                .unwrap()
                .starts_with("https://tests.vault.azure.net/keys/"),
            "{header}"
        );
    }
}

/// The provider knows only the key's newest version from now on.
async fn rotate_key_at_provider(
    app: &mut TestApp,
    client_id: &'static str,
    key: &str,
    alg: &'static str,
) {
    let client = jwt_client(app, client_id, key, alg);
    app.idp
        .restart(|clients| {
            clients.retain(|c| c.client_id != client_id);
            clients.push(client);
        })
        .await;
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
    rotate_key_at_provider(&mut app, "broker-jwt-rs256", "signing-rsa", "RS256").await;

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
    app.deliver_event(event).await
}

#[tokio::test]
async fn a_key_rotation_event_makes_the_next_fetch_sign_with_the_new_version_at_once() {
    let mut app = spawn_with_keys("").await;
    assert_eq!(app.token("jwt-es256").await.status(), 200);
    let new = app.azure.vault.create_key("signing-ec", KeyKind::EcP256);
    rotate_key_at_provider(&mut app, "broker-jwt-es256", "signing-ec", "ES256").await;

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
allowed_scopes = ["api://contoso/.default", "api://other/.default", "api://third/.default"]

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
    // (Entra takes one `/.default` scope per client credentials request: another resource.)
    let response = app
        .get("/api/token/entra-cert?scope=api://third/.default")
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

/// A broker started on its own, for what the standard setup's configuration cannot express:
/// a `[key_vault]` naming a user-assigned identity. Killed when dropped.
struct OwnBroker {
    child: std::process::Child,
    address: String,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl OwnBroker {
    async fn start(config: &str, azure: &AzureDoubles, dir: &std::path::Path) -> Self {
        let config_path = dir.join("broker.toml");
        std::fs::write(&config_path, config).unwrap();
        let started = Launch {
            config: &config_path,
            env: vec![
                ("IDENTITY_ENDPOINT".into(), azure.identity.endpoint()),
                ("IDENTITY_HEADER".into(), azure.identity.header().into()),
                (
                    "SSL_CERT_FILE".into(),
                    azure.vault.ca_file().display().to_string(),
                ),
            ],
            log_level: "trace",
        }
        .start()
        .await;
        Self {
            child: started.child,
            address: started.address,
            logs: started.logs,
            readers: started.readers,
        }
    }

    async fn token(&self, connection: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("{}/api/token/{connection}", self.address))
            .header(
                "X-Azure-Functions-InvocationId",
                "3f2b8c1e-0000-4000-8000-000000000002",
            )
            .send()
            .await
            .unwrap()
    }

    /// Stops the broker (SIGTERM, so it flushes its log) and returns every line it wrote.
    fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn managed_identity_federation_sends_the_user_assigned_identitys_exchange_token() {
    const IDENTITY: &str = "5e8c0a3e-7d41-4c1a-9b7e-00000000fed1";
    const AUDIENCE: &str = "api://AzureADTokenExchange";
    let dir = tempfile::tempdir().unwrap();
    let azure = AzureDoubles::start(dir.path(), Some(IDENTITY.to_string()))
        .await
        .unwrap();
    let entra = EntraTokenDouble::start().await.unwrap();
    entra.trust_identity(azure.identity.issued());
    // Registered as docs/secretless.md says: the subject is the identity's object (principal) id.
    let object_id = azure.identity.object_id().to_string();
    assert_ne!(object_id, IDENTITY);
    entra.set_federated("entra-federated-app", &object_id, AUDIENCE);
    // And as it warns not to: with the identity's client id as the subject.
    entra.set_federated("entra-client-id-subject-app", IDENTITY, AUDIENCE);
    let config = format!(
        r#"
[key_vault]
uri = "{vault}"
managed_identity_client_id = "{IDENTITY}"
verify_challenge_resource = false

[connections.federated]
token_url = "{token_url}"
client_id = "entra-federated-app"
auth_method = "managed_identity_federation"
scopes = ["api://contoso/.default"]
allowed_scopes = ["api://contoso/.default", "api://other/.default"]

[connections.wrong-audience]
token_url = "{token_url}"
client_id = "entra-federated-app"
auth_method = "managed_identity_federation"
federation_audience = "api://AzureADTokenExchangeUSGov"
scopes = ["api://contoso/.default"]

[connections.client-id-subject]
token_url = "{token_url}"
client_id = "entra-client-id-subject-app"
auth_method = "managed_identity_federation"
scopes = ["api://contoso/.default"]
"#,
        vault = azure.vault.uri(),
        token_url = entra.token_url(),
    );
    let broker = OwnBroker::start(&config, &azure, dir.path()).await;

    let response = broker.token("federated").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert!(
        body_json(response).await["access_token"]
            .as_str()
            .is_some_and(contains_jwt)
    );
    let exchange_tokens: Vec<_> = azure
        .identity
        .issued()
        .lock()
        .unwrap()
        .values()
        .filter(|token| token.resource == AUDIENCE)
        .map(|token| token.client_id.clone())
        .collect();
    assert_eq!(
        exchange_tokens,
        vec![Some(IDENTITY.to_string())],
        "one token, from the user-assigned identity"
    );
    // Another scope is another exchange, with the identity's token from memory (the SDK
    // keeps it until five minutes before it expires).
    let other = reqwest::Client::new()
        .get(format!(
            "{}/api/token/federated?scope=api://other/.default",
            broker.address
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(entra.issued(), 2);
    assert_eq!(
        azure.identity.requests(),
        1,
        "the identity's token was reused"
    );

    // A token for another audience is not what the federated credential trusts.
    let refused = broker.token("wrong-audience").await;
    assert_eq!(refused.status(), 502);
    assert_eq!(body_json(refused).await["upstream_error"], "invalid_client");
    assert_eq!(entra.refusals(), vec![700212]);
    // A credential whose subject is the client id matches nothing the identity presents.
    let refused = broker.token("client-id-subject").await;
    assert_eq!(refused.status(), 502);
    assert_eq!(body_json(refused).await["upstream_error"], "invalid_client");
    assert_eq!(entra.refusals(), vec![700212, 700213]);
    // What went to Entra: the identity's token as the assertion, one `/.default` scope.
    for form in entra.forms() {
        assert_eq!(
            form.get("client_assertion_type").map(String::as_str),
            Some(token_broker_doubles::entra_token::JWT_BEARER)
        );
        assert!(!form.contains_key("client_secret"), "{:?}", form.keys());
        assert!(form["scope"].ends_with("/.default") && !form["scope"].contains(' '));
    }

    let issued: Vec<String> = azure
        .identity
        .issued()
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let logs = broker.stop();
    let leaks: Vec<&String> = logs
        .iter()
        .filter(|line| {
            contains_jwt(line) || issued.iter().any(|token| line.contains(token.as_str()))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "identity or access tokens in the log: {leaks:#?}"
    );
    assert!(
        logs.iter()
            .any(|line| line.contains("managed identity token for federation obtained")),
        "trace logs were written and scanned"
    );
}

#[tokio::test]
async fn a_retry_after_a_lost_answer_sends_a_newly_signed_assertion_never_a_replayed_jti() {
    // Entra (like Okta, Auth0 and Keycloak) refuses an assertion whose `jti` it has seen. The
    // first attempt reaches it, but its answer is lost on the way back (a gateway timeout):
    // the retry must carry a new assertion, or a transient fault becomes a refusal.
    let entra = EntraTokenDouble::start().await.unwrap();
    let token_url = entra.token_url();
    let url = url::Url::parse(&token_url).unwrap();
    let proxy = token_broker_doubles::FaultProxy::start(&format!(
        "http://{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap()
    ))
    .await
    .unwrap();
    proxy.push(token_broker_doubles::fault_proxy::Fault::LostAnswer(504), 1);
    let app = spawn_app_with(Setup {
        extra_config: format!(
            r#"
[connections.entra-lossy]
token_url = "{proxy}{path}"
client_id = "entra-cert-app"
auth_method = "private_key_jwt"
client_assertion_key = {{ key_vault_certificate = "entra-cert" }}
assertion_audience = "{token_url}"
scopes = ["api://contoso/.default"]
"#,
            proxy = proxy.url(),
            path = url.path(),
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

    let response = app.token("entra-lossy").await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(proxy.forwarded(), 2, "the lost attempt and the retry");
    assert_eq!(entra.refusals(), Vec::<u64>::new(), "no replay refused");
    let accepted = entra.accepted();
    assert_eq!(accepted.len(), 2);
    let (first, second) = (&accepted[0].1, &accepted[1].1);
    assert_ne!(first["jti"], second["jti"], "a new jti for the retry");
    assert!(second["iat"].as_u64() >= first["iat"].as_u64());
    assert!(second["exp"].as_u64().unwrap() > second["iat"].as_u64().unwrap());
    assert_eq!(app.azure.vault.signs(), 2, "one sign per attempt");
}

#[tokio::test]
async fn a_refused_client_or_a_provider_hold_costs_no_key_vault_sign_per_request() {
    let app = spawn_app_with(Setup {
        proxy: true,
        extra_config: format!(
            r#"{KEY_CONNECTIONS}
[connections.jwt-held]
token_url = "{{proxy_url}}/token"
client_id = "broker-jwt-rs256"
auth_method = "private_key_jwt"
client_assertion_key = {{ key_vault_key = "signing-held" }}
assertion_audience = "{{token_url}}"
"#
        ),
        ..Setup::default()
    })
    .await;
    // The provider does not know the client: every fetch is refused with invalid_client.
    app.azure.vault.create_key("signing-rsa", KeyKind::Rsa);
    for _ in 0..60 {
        let response = app.token("jwt-rs256").await;
        assert_eq!(response.status(), 502, "{}", response.text().await.unwrap());
    }
    let stats = app.idp.stats().await;
    assert_eq!(
        stats.token_requests, 1,
        "the negative cache answers: {stats:?}"
    );
    let signs = app.azure.vault.signs_by("signing-rsa");
    eprintln!("measured: {signs} Key Vault sign(s) for 60 refused requests");
    assert!(
        signs <= 3,
        "{signs} Key Vault signs for 60 refused requests"
    );

    // A provider that asks the broker to wait (503, Retry-After: 20) is not asked again
    // before then, and no assertion is signed for it meanwhile.
    app.azure.vault.create_key("signing-held", KeyKind::Rsa);
    let proxy = app.proxy.as_ref().unwrap();
    proxy.set_default(token_broker_doubles::fault_proxy::Fault::Status {
        status: 503,
        retry_after: Some(20),
    });
    for _ in 0..60 {
        let response = app.token("jwt-held").await;
        assert_eq!(response.status(), 503, "{}", response.text().await.unwrap());
    }
    assert_eq!(proxy.requests(), 1, "held off by Retry-After");
    let signs = app.azure.vault.signs_by("signing-held");
    eprintln!("measured: {signs} Key Vault sign(s) for 60 held requests");
    assert!(signs <= 3, "{signs} Key Vault signs for 60 held requests");
}
