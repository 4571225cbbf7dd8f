//! The test provider's mutual TLS (RFC 8705) with the vault double's client certificates,
//! used the way a client uses them: the certificate's secret (PEM, key and chain) as its TLS
//! identity on the provider's mTLS alias. What the broker's mTLS tests rely on: a
//! `tls_client_auth` client needs a certificate the client CA issued for its subject, a
//! `self_signed_tls_client_auth` client one registered in its `jwks`, bound tokens name the
//! certificate, and a revoked certificate counts as none.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use token_broker_doubles::{
    AzureDoubles, CertificateIssuer, CertificateSpec, KeyKind, KeyVaultDouble, SecretContentType,
};

use crate::support::{
    CALLER_SECRET, Idp, IdpClient, IdpTls, certificate_jwk, json as body_json, x5t_s256,
};

fn pem_certificate(key: KeyKind, issuer: CertificateIssuer) -> CertificateSpec {
    CertificateSpec {
        key,
        exportable: true,
        content_type: SecretContentType::Pem,
        issuer,
    }
}

/// A client trusting the tests' CA that presents `identity` (a certificate's PEM secret).
fn client(vault: &KeyVaultDouble, identity: Option<&str>) -> reqwest::Client {
    let ca = std::fs::read(vault.ca_file()).unwrap();
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
    if let Some(identity) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// Asks `endpoint` for a token for `client_id`, authenticated by the TLS certificate alone.
async fn token(client: &reqwest::Client, endpoint: &str, client_id: &str) -> reqwest::Response {
    client
        .post(endpoint)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", "read"),
        ])
        .send()
        .await
        .unwrap()
}

/// The claims of a JWT, unverified.
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn the_provider_authenticates_vault_certificates_on_its_mtls_alias_and_binds_tokens_to_them()
{
    let dir = tempfile::tempdir().unwrap();
    let azure = AzureDoubles::start(dir.path(), None).await.unwrap();
    let vault = &azure.vault;
    let self_signed_spec = pem_certificate(KeyKind::EcP256, CertificateIssuer::SelfSigned);
    let issued_spec = pem_certificate(KeyKind::Rsa, CertificateIssuer::TestCa);
    vault.create_client_certificate("mtls-self", self_signed_spec);
    vault.create_client_certificate("mtls-issued", issued_spec);
    let clients = vec![
        IdpClient {
            jwks: Some(
                json!({ "keys": [certificate_jwk(&vault.public_key("mtls-self").unwrap())] }),
            ),
            certificate_bound: true,
            ..IdpClient::new("self-signed-app", "unused", "self_signed_tls_client_auth")
        },
        IdpClient {
            tls_client_auth_subject_dn: Some("CN=mtls-issued".to_string()),
            certificate_bound: true,
            ..IdpClient::new("issued-app", "unused", "tls_client_auth")
        },
        IdpClient::new("caller-app", CALLER_SECRET, "client_secret_post"),
    ];
    let mut idp = Idp::start_tls(dir.path(), &clients, IdpTls::of_vault(vault)).await;
    assert!(
        idp.issuer.starts_with("https://127.0.0.1:"),
        "{}",
        idp.issuer
    );
    let alias = idp.mtls_token_endpoint.clone().expect("an mTLS alias");
    let discovery = body_json(
        client(vault, None)
            .get(format!("{}/.well-known/openid-configuration", idp.issuer))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(discovery["mtls_endpoint_aliases"]["token_endpoint"], alias);
    assert_eq!(
        discovery["tls_client_certificate_bound_access_tokens"],
        true
    );
    // The support's own requests reach the provider over HTTPS.
    idp.caller_token("caller-app").await;

    let self_signed = vault.certificate_secret("mtls-self").unwrap();
    let issued = vault.certificate_secret("mtls-issued").unwrap();
    for (client_id, name, identity) in [
        ("self-signed-app", "mtls-self", &self_signed),
        ("issued-app", "mtls-issued", &issued),
    ] {
        let response = token(&client(vault, Some(identity)), &alias, client_id).await;
        assert_eq!(response.status(), 200, "{client_id}");
        let access_token = body_json(response).await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            claims(&access_token)["cnf"]["x5t#S256"],
            x5t_s256(&vault.certificate_der(name).unwrap()),
            "{client_id}'s token is bound to its certificate"
        );
    }
    for (client_id, identity, why) in [
        (
            "self-signed-app",
            Some(&issued),
            "a certificate it did not register",
        ),
        (
            "issued-app",
            Some(&self_signed),
            "a certificate the client CA did not issue",
        ),
        ("issued-app", None, "no certificate"),
    ] {
        let response = token(
            &client(vault, identity.map(|s| s.as_str())),
            &alias,
            client_id,
        )
        .await;
        assert_eq!(response.status(), 401, "{client_id} with {why}");
        assert_eq!(body_json(response).await["error"], "invalid_client");
    }
    let main_listener = token(
        &client(vault, Some(&issued)),
        &idp.token_endpoint,
        "issued-app",
    )
    .await;
    assert_eq!(
        main_listener.status(),
        401,
        "the main listener asks for no certificate"
    );

    // A renewal (a new key, the same subject), and the old certificate revoked.
    let old = vault.certificate_der("mtls-issued").unwrap();
    vault.create_client_certificate("mtls-issued", issued_spec);
    let renewed = vault.certificate_secret("mtls-issued").unwrap();
    assert_ne!(renewed, issued);
    idp.revoke(&x5t_s256(&old)).await;
    let refused = token(&client(vault, Some(&issued)), &alias, "issued-app").await;
    assert_eq!(
        refused.status(),
        401,
        "a revoked certificate counts as none"
    );
    let accepted = token(&client(vault, Some(&renewed)), &alias, "issued-app").await;
    assert_eq!(
        accepted.status(),
        200,
        "the renewed one is issued for the subject"
    );

    let requests = idp.token_requests().await;
    let on_alias: Vec<_> = requests.iter().filter(|request| request.mtls).collect();
    assert_eq!(on_alias.len(), 7, "{requests:?}");
    assert_eq!(
        on_alias[5].certificate.as_deref(),
        Some(x5t_s256(&old).as_str())
    );
    assert_eq!(on_alias[5].status, 401);
    assert_eq!(on_alias[4].certificate, None, "no certificate presented");
    let stats = idp.stats().await;
    assert_eq!(stats.mtls_connections, 7, "one per client: {stats:?}");
    assert_eq!(
        stats.mtls_connections_with_certificate, 6,
        "all but the one without a certificate: {stats:?}"
    );

    idp.restart(|_| {}).await;
    assert_eq!(idp.mtls_token_endpoint.as_deref(), Some(alias.as_str()));
    let after_restart = token(&client(vault, Some(&renewed)), &alias, "issued-app").await;
    assert_eq!(after_restart.status(), 200);
    let revoked = token(&client(vault, Some(&issued)), &alias, "issued-app").await;
    assert_eq!(revoked.status(), 401, "a restart forgets no revocation");
}
