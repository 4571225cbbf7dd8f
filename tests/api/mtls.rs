//! Mutual-TLS client authentication (RFC 8705) end to end: the broker presents Key Vault
//! certificates (exportable keys in PEM and PKCS #12, and keys that sign inside the vault, RSA
//! and EC) to the real oidc-provider's mTLS endpoint, over TLS, and hands out the tokens it
//! binds to them. Every broker runs at trace level and its whole log is scanned for the keys,
//! the secrets, the signatures and the tokens.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use token_broker_doubles::{
    AzureDoubles, CertificateIssuer, CertificateSpec, KeyKind, SecretContentType, TlsGate,
};

use crate::support::{
    Idp, IdpClient, IdpTls, Launch, OtlpReceiver, Started, certificate_jwk, contains_jwt, sigterm,
    x5t_s256,
};

/// A certificate of the vault, the provider client it authenticates, and how it is made.
struct Certificate {
    name: &'static str,
    spec: CertificateSpec,
    method: &'static str,
}

const fn certificate(
    name: &'static str,
    key: KeyKind,
    exportable: bool,
    content_type: SecretContentType,
    issuer: CertificateIssuer,
) -> Certificate {
    Certificate {
        name,
        spec: CertificateSpec {
            key,
            exportable,
            content_type,
            issuer,
        },
        method: match issuer {
            CertificateIssuer::TestCa => "tls_client_auth",
            CertificateIssuer::SelfSigned => "self_signed_tls_client_auth",
        },
    }
}

/// Every kind the broker must present: exportable PEM and PKCS #12 (RSA, EC), and keys that
/// stay in the vault (RSA, EC P-256, EC P-384), CA-issued and self-signed.
const CERTIFICATES: &[Certificate] = &[
    certificate(
        "ca-rsa-pem",
        KeyKind::Rsa,
        true,
        SecretContentType::Pem,
        CertificateIssuer::TestCa,
    ),
    certificate(
        "ca-ec-pfx",
        KeyKind::EcP256,
        true,
        SecretContentType::Pkcs12,
        CertificateIssuer::TestCa,
    ),
    certificate(
        "self-rsa-vault",
        KeyKind::Rsa,
        false,
        SecretContentType::Pkcs12,
        CertificateIssuer::SelfSigned,
    ),
    certificate(
        "self-ec-vault",
        KeyKind::EcP256,
        false,
        SecretContentType::Pem,
        CertificateIssuer::SelfSigned,
    ),
    certificate(
        "ca-ec384-vault",
        KeyKind::EcP384,
        false,
        SecretContentType::Pkcs12,
        CertificateIssuer::TestCa,
    ),
];

/// A self-signed certificate the provider does not know.
const UNREGISTERED: Certificate = certificate(
    "self-unregistered",
    KeyKind::EcP256,
    false,
    SecretContentType::Pem,
    CertificateIssuer::SelfSigned,
);

/// The vault, the provider over TLS with its mTLS alias, and one broker.
struct Rig {
    azure: AzureDoubles,
    idp: Idp,
    broker: Started,
    http: reqwest::Client,
    _gate: TlsGate,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start() -> Rig {
        Self::start_with(Vec::new()).await
    }

    /// With `env` added to the broker's environment.
    async fn start_with(env: Vec<(String, String)>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let azure = AzureDoubles::start(dir.path(), None).await.unwrap();
        for certificate in CERTIFICATES.iter().chain([&UNREGISTERED]) {
            azure
                .vault
                .create_client_certificate(certificate.name, certificate.spec);
        }
        let clients: Vec<IdpClient> = CERTIFICATES
            .iter()
            .map(|certificate| {
                let client = IdpClient {
                    certificate_bound: true,
                    ..IdpClient::new(certificate.name, "unused", certificate.method)
                };
                if certificate.method == "tls_client_auth" {
                    IdpClient {
                        tls_client_auth_subject_dn: Some(format!("CN={}", certificate.name)),
                        ..client
                    }
                } else {
                    let registered = azure.vault.public_key(certificate.name).unwrap();
                    IdpClient {
                        jwks: Some(json!({ "keys": [certificate_jwk(&registered)] })),
                        ..client
                    }
                }
            })
            .chain([IdpClient {
                // Registered with another certificate than the one the broker presents.
                jwks: Some(json!({
                    "keys": [certificate_jwk(&azure.vault.public_key("self-ec-vault").unwrap())]
                })),
                ..IdpClient::new(UNREGISTERED.name, "unused", UNREGISTERED.method)
            }])
            .collect();
        let idp = Idp::start_tls(dir.path(), &clients, IdpTls::of_vault(&azure.vault)).await;
        let gate = TlsGate::start(dir.path(), azure.vault.client_ca_file())
            .await
            .unwrap();
        let mtls_endpoint = idp.mtls_token_endpoint.clone().unwrap();
        let mut config = String::from(
            "[key_vault]\nuri = \"${KEY_VAULT_URI}\"\nverify_challenge_resource = false\n",
        );
        for certificate in CERTIFICATES.iter().chain([&UNREGISTERED]) {
            config += &connection(
                certificate.name,
                &format!("token_url = \"{mtls_endpoint}\""),
                certificate,
                certificate.name,
            );
        }
        // The same client, its token endpoint read from the issuer's discovery document.
        config += &connection(
            "discovered",
            &format!("issuer = \"{}\"", idp.issuer),
            &CERTIFICATES[0],
            CERTIFICATES[0].name,
        );
        config += &connection(
            "absent",
            &format!("token_url = \"{mtls_endpoint}\""),
            &CERTIFICATES[0],
            "absent-certificate",
        );
        // Behind a gateway that refuses, in the TLS handshake, what its client CA did not issue.
        for (name, certificate) in [
            ("gated-self", &CERTIFICATES[3]),
            ("gated-ca", &CERTIFICATES[0]),
        ] {
            config += &connection(
                name,
                &format!("token_url = \"{}\"", gate.token_url()),
                certificate,
                certificate.name,
            );
        }
        let broker = launch(dir.path(), &config, &azure, env).await;
        Rig {
            _gate: gate,
            http: reqwest::Client::new(),
            azure,
            idp,
            broker,
            _dir: dir,
        }
    }

    async fn token(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/api/token/{path}", self.broker.address))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn access_token(&self, path: &str) -> String {
        let (status, body) = self.token(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    fn thumbprint(&self, name: &str) -> String {
        x5t_s256(&self.azure.vault.certificate_der(name).unwrap())
    }

    fn logs(&self) -> Vec<String> {
        self.broker.logs.lock().unwrap().clone()
    }

    /// Whether a log line holding every one of `parts` arrives within 10 s (the broker writes
    /// its log from a thread of its own).
    async fn logged(&self, parts: &[&str]) -> bool {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self
                .logs()
                .iter()
                .any(|line| parts.iter().all(|part| line.contains(part)))
            {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn deliver_certificate_event(&self, name: &str, version: &str) -> Value {
        let event = json!({
            "id": "7e3e4b44-0000-4000-8000-000000000021",
            "topic": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
            "subject": name,
            "eventType": "Microsoft.KeyVault.CertificateNewVersionCreated",
            "data": { "Id": format!("https://kv.vault.azure.net/certificates/{name}/{version}"),
                      "VaultName": "kv", "ObjectType": "Certificate", "ObjectName": name,
                      "Version": version, "NBF": null, "EXP": null },
            "dataVersion": "1", "metadataVersion": "1", "eventTime": "2026-12-02T05:00:00Z"
        });
        let response = self
            .http
            .post(format!("{}/function-rotation", self.broker.address))
            .json(&json!({ "Data": { "event": event }, "Metadata": {} }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Stops the broker (SIGTERM: it flushes its log on the way out) and returns the log lines
    /// holding a private key, a certificate's secret, a Key Vault signature or a token. The
    /// keys are the vault's own, so they are known whether or not they were exportable; PEM
    /// and base64 bodies are searched in pieces of 64 characters.
    async fn leaks(&mut self) -> Vec<String> {
        sigterm(&self.broker.child);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while matches!(self.broker.child.try_wait(), Ok(None))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        for reader in std::mem::take(&mut self.broker.readers) {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        let vault = &self.azure.vault;
        let mut needles: Vec<String> = vault.signatures();
        for certificate in CERTIFICATES.iter().chain([&UNREGISTERED]) {
            let key = vault.certificate_private_key_pem(certificate.name).unwrap();
            let secret = vault.certificate_secret(certificate.name).unwrap();
            for text in [key, secret] {
                needles.extend(
                    text.lines()
                        .filter(|line| !line.starts_with("-----"))
                        .flat_map(|line| {
                            line.as_bytes()
                                .chunks(64)
                                .map(|chunk| String::from_utf8(chunk.to_vec()).unwrap())
                                .collect::<Vec<_>>()
                        })
                        .filter(|piece| piece.len() >= 32),
                );
            }
        }
        assert!(needles.len() > 40, "the scan has something to look for");
        self.logs()
            .into_iter()
            .filter(|line| contains_jwt(line) || needles.iter().any(|n| line.contains(n.as_str())))
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.broker.child.kill();
        let _ = self.broker.child.wait();
    }
}

fn connection(name: &str, endpoint: &str, certificate: &Certificate, vault_name: &str) -> String {
    format!(
        "\n[connections.{name}]\n{endpoint}\nclient_id = \"{client}\"\nauth_method = \"{method}\"\nclient_certificate = {{ key_vault_certificate = \"{vault_name}\" }}\nscopes = [\"read\"]\nallowed_scopes = [\"read\", \"write\"]\nmax_retries = 0\n",
        client = certificate.name,
        method = certificate.method,
    )
}

async fn launch(
    dir: &Path,
    config: &str,
    azure: &AzureDoubles,
    extra_env: Vec<(String, String)>,
) -> Started {
    let path = dir.join("broker.toml");
    std::fs::write(&path, config).unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("IDENTITY_ENDPOINT".into(), azure.identity.endpoint()),
        ("IDENTITY_HEADER".into(), azure.identity.header().into()),
        ("KEY_VAULT_URI".into(), azure.vault.uri()),
        (
            "SSL_CERT_FILE".into(),
            azure.vault.ca_file().display().to_string(),
        ),
    ];
    env.extend(extra_env);
    Launch {
        config: &path,
        env,
        log_level: "trace",
    }
    .start()
    .await
}

/// The claims of a JWT, unverified.
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn every_kind_of_vault_certificate_authenticates_by_mtls_and_gets_tokens_bound_to_it() {
    let mut rig = Rig::start().await;
    for certificate in CERTIFICATES {
        let token = rig.access_token(certificate.name).await;
        assert_eq!(
            claims(&token)["cnf"]["x5t#S256"],
            rig.thumbprint(certificate.name),
            "{}: bound to the vault's certificate",
            certificate.name
        );
        let request = rig.idp.token_requests().await.pop().unwrap();
        assert!(request.mtls, "{}: at the mTLS alias", certificate.name);
        assert_eq!(
            request.certificate.as_deref(),
            Some(rig.thumbprint(certificate.name).as_str())
        );
        assert_eq!(request.field("client_id"), Some(certificate.name));
        for absent in ["client_secret", "client_assertion", "client_assertion_type"] {
            assert_eq!(
                request.field(absent),
                None,
                "{}: {absent}",
                certificate.name
            );
        }
        assert!(!request.basic);
        // An exportable key signs in memory; one that stays in the vault signs there, once for
        // this fetch's one new connection.
        let signs = rig.azure.vault.signs_by(certificate.name);
        assert_eq!(
            signs,
            usize::from(!certificate.spec.exportable),
            "{}",
            certificate.name
        );
    }
    assert_eq!(
        rig.azure.vault.certificate_secret_reads(),
        2,
        "only the exportable certificates' secrets are read"
    );

    // `issuer` instead of `token_url`: the discovery document's mTLS alias is used.
    let token = rig.access_token("discovered").await;
    assert_eq!(
        claims(&token)["cnf"]["x5t#S256"],
        rig.thumbprint("ca-rsa-pem")
    );
    assert!(rig.idp.token_requests().await.pop().unwrap().mtls);
    let alias = rig.idp.mtls_token_endpoint.clone().unwrap();
    assert!(
        rig.logged(&["token endpoint discovered", &alias]).await,
        "the alias was chosen"
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_key_in_the_vault_signs_once_per_new_connection_and_never_per_cache_hit() {
    let mut rig = Rig::start().await;
    for _ in 0..25 {
        rig.access_token("self-ec-vault").await;
    }
    let stats = rig.idp.stats().await;
    assert_eq!(stats.token_requests, 1, "one fetch, then cache hits");
    assert_eq!(rig.azure.vault.signs_by("self-ec-vault"), 1);
    assert_eq!(stats.mtls_connections, 1);

    // Another scope is another fetch, on the pooled connection: no new handshake, no sign.
    rig.access_token("self-ec-vault?scope=write").await;
    let stats = rig.idp.stats().await;
    assert_eq!(stats.token_requests, 2);
    assert_eq!(stats.mtls_connections, 1, "the connection was reused");
    assert_eq!(rig.azure.vault.signs_by("self-ec-vault"), 1);
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_renewal_announced_by_event_is_presented_on_a_new_connection() {
    let mut rig = Rig::start().await;
    let name = "ca-ec384-vault";
    let old = rig.thumbprint(name);
    let first = rig.access_token(name).await;
    assert_eq!(claims(&first)["cnf"]["x5t#S256"], old);
    assert_eq!(rig.idp.stats().await.mtls_connections, 1);

    let spec = CERTIFICATES.iter().find(|c| c.name == name).unwrap().spec;
    let version = rig.azure.vault.create_client_certificate(name, spec);
    let new = rig.thumbprint(name);
    assert_ne!(old, new);
    let outcome = rig.deliver_certificate_event(name, &version).await;
    assert!(outcome["Logs"].to_string().contains(name), "{outcome}");

    // The token bound to the old certificate was dropped; the next fetch presents the new one,
    // first time, on a new connection (the old one is still open and idle, but not reused).
    let second = rig.access_token(name).await;
    assert_eq!(claims(&second)["cnf"]["x5t#S256"], new);
    let stats = rig.idp.stats().await;
    assert_eq!(
        (stats.token_issued, stats.token_errors),
        (2, 0),
        "{stats:?}"
    );
    assert_eq!(
        stats.mtls_connections, 2,
        "a new connection for the new version"
    );
    let requests = rig.idp.token_requests().await;
    assert_eq!(
        requests.last().unwrap().certificate.as_deref(),
        Some(new.as_str())
    );
    assert_eq!(
        rig.azure.vault.signs_by(name),
        2,
        "one handshake per version"
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn an_unannounced_renewal_is_found_when_the_provider_refuses_the_old_certificate() {
    let mut rig = Rig::start().await;
    let name = "ca-rsa-pem";
    let old = rig.thumbprint(name);
    rig.access_token(name).await;
    let spec = CERTIFICATES.iter().find(|c| c.name == name).unwrap().spec;
    rig.azure.vault.create_client_certificate(name, spec);
    let new = rig.thumbprint(name);
    rig.idp.revoke(&old).await;

    // No event: the provider refuses the old certificate, the broker reads the certificate
    // again, finds the new version and presents it on a new connection.
    let token = rig.access_token(&format!("{name}?scope=write")).await;
    assert_eq!(claims(&token)["cnf"]["x5t#S256"], new);
    let requests = rig.idp.token_requests().await;
    let statuses: Vec<(u16, Option<&str>)> = requests
        .iter()
        .map(|r| (r.status, r.certificate.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (200, Some(old.as_str())),
            (401, Some(old.as_str())),
            (200, Some(new.as_str()))
        ]
    );
    assert!(
        rig.logged(&["client credential refused; retrying once with another version"])
            .await
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_missing_or_forbidden_certificate_is_a_503_and_a_refused_one_a_502() {
    let mut rig = Rig::start().await;
    let (status, body) = rig.token("absent").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "secret_unavailable", "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(description.contains("'absent'"), "{description}");
    assert!(
        description.contains("reading the certificate from Key Vault"),
        "{description}"
    );
    assert!(!description.contains("absent-certificate"), "{description}");

    rig.azure.vault.set_denied("self-rsa-vault", true);
    let (status, body) = rig.token("self-rsa-vault").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "secret_unavailable", "{body}");
    assert_eq!(
        rig.idp.stats().await.token_requests,
        0,
        "no certificate, no request"
    );

    // A certificate the provider does not hold: invalid_client, the certificate read again,
    // no other version, so a 502 that names the provider's code.
    let (status, body) = rig.token(UNREGISTERED.name).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "upstream_rejected", "{body}");
    assert_eq!(body["upstream_error"], "invalid_client", "{body}");
    let stats = rig.idp.stats().await;
    assert_eq!(
        (stats.token_issued, stats.token_errors),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_key_vault_that_will_not_sign_the_handshake_is_a_503_that_spares_the_provider_and_its_breaker()
 {
    let mut rig = Rig::start().await;
    // The certificate reads, its key does not sign (Key Vault Crypto User missing): the
    // handshake fails inside the broker, the provider is never asked.
    rig.azure.vault.set_sign_denied("self-rsa-vault", true);
    for attempt in 0..7 {
        let (status, body) = rig.token("self-rsa-vault").await;
        assert_eq!(status, 503, "{attempt}: {body}");
        assert_eq!(body["error"], "secret_unavailable", "{attempt}: {body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.contains("signing with Key Vault"),
            "{description}"
        );
        assert!(!description.contains("Crypto User"), "{description}");
    }
    // The operator is told which role signing needs.
    assert!(
        rig.logged(&["self-rsa-vault", "ForbiddenByRbac", "Key Vault Crypto User"])
            .await
    );
    let stats = rig.idp.stats().await;
    assert_eq!(stats.token_requests, 0, "{stats:?}");
    assert!(
        rig.logged(&[
            "the client certificate's key could not sign the TLS handshake",
            "self-rsa-vault"
        ])
        .await
    );
    // Seven failures, more than the breaker's five: it stayed closed, so the repaired role
    // works at once.
    rig.azure.vault.set_sign_denied("self-rsa-vault", false);
    let token = rig.access_token("self-rsa-vault").await;
    assert_eq!(
        claims(&token)["cnf"]["x5t#S256"],
        rig.thumbprint("self-rsa-vault")
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn a_certificate_refused_in_the_tls_handshake_is_a_502_invalid_client_not_an_outage() {
    let mut rig = Rig::start().await;
    // The gate lets the CA-issued certificate through (and, with no provider behind it,
    // answers 503): the handshake was not the problem.
    let (status, body) = rig.token("gated-ca").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "upstream_unavailable", "{body}");
    // The self-signed one is refused in the handshake: the provider's side said no to the
    // credential, as invalid_client would, so the certificate is read again, nothing else is
    // found, and the answer is a 502, remembered, never retried as an outage.
    for _ in 0..3 {
        let (status, body) = rig.token("gated-self").await;
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["error"], "upstream_rejected", "{body}");
        assert_eq!(body["upstream_error"], "invalid_client", "{body}");
    }
    assert!(
        rig.logged(&[
            "the token endpoint's TLS layer refused the client certificate",
            "gated-self"
        ])
        .await
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}

#[tokio::test]
async fn opentelemetry_names_the_discovered_endpoint_and_counts_the_handshake_signatures() {
    let receiver = OtlpReceiver::start().await;
    let mut rig = Rig::start_with(vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            receiver.endpoint.clone(),
        ),
        ("OTEL_METRIC_EXPORT_INTERVAL".to_string(), "300".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ])
    .await;
    // The issuer and its mTLS alias share a host: only the port tells them apart.
    let alias_port = url::Url::parse(rig.idp.mtls_token_endpoint.as_deref().unwrap())
        .unwrap()
        .port()
        .unwrap()
        .to_string();
    let issuer_port = url::Url::parse(&rig.idp.issuer)
        .unwrap()
        .port()
        .unwrap()
        .to_string();
    assert_ne!(alias_port, issuer_port);
    rig.access_token("discovered").await;
    rig.access_token("self-ec-vault").await;
    let exported = receiver
        .wait_for(std::time::Duration::from_secs(20), |receiver| {
            let span = receiver.spans().into_iter().any(|span| {
                span.name == "POST token endpoint"
                    && span.attribute("connection") == Some("discovered")
            });
            let signed = receiver.points().0.iter().any(|point| {
                point.metric == "token_broker.key_vault.operations"
                    && point.attribute("operation") == Some("sign")
                    && point.attribute("result") == Some("ok")
            });
            span && signed
        })
        .await;
    assert!(
        exported,
        "the provider span and the sign count were exported"
    );
    let span = receiver
        .spans()
        .into_iter()
        .find(|span| {
            span.name == "POST token endpoint" && span.attribute("connection") == Some("discovered")
        })
        .unwrap();
    assert_eq!(
        span.attribute("server.port"),
        Some(alias_port.as_str()),
        "the endpoint called, not the issuer: {span:?}"
    );
    assert_eq!(rig.leaks().await, Vec::<String>::new());
}
