//! Configuration tests of a connection's credential: private_key_jwt keys and managed identity federation.

use super::*;

/// `FULL` with one more connection, written after the standard ones.
fn with_connection(connection: &str) -> String {
    format!(
        "{FULL}\n[connections.secretless]\ntoken_url = \"https://idp.example/oauth/token\"\nclient_id = \"app\"\n{connection}\n"
    )
}

#[test]
fn private_key_jwt_takes_its_defaults_from_the_key_and_the_token_url() {
    let text = with_connection(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"signing\" }",
    );
    let settings = parse_with(&text, &full_env()).expect("valid");
    let connection = &settings.connections["secretless"];
    assert_eq!(connection.auth_method, AuthMethod::PrivateKeyJwt);
    let CredentialSource::Assertion(assertion) = &connection.credential else {
        panic!("{:?}", connection.credential);
    };
    assert_eq!(assertion.key, AssertionKey::KeyVaultKey("signing".into()));
    assert_eq!(assertion.algorithm, None, "chosen from the key at run time");
    assert_eq!(assertion.audience, "https://idp.example/oauth/token");
    assert_eq!(assertion.lifetime, Duration::from_secs(300));
    assert_eq!(assertion.key_id, None);

    let text = with_connection(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_certificate = \"entra-cert\" }\nsigning_algorithm = \"RS256\"\nassertion_audience = \"https://tenant.auth0.com/\"\nassertion_lifetime_seconds = 600\nassertion_key_id = \"k1\"",
    );
    let settings = parse_with(&text, &full_env()).expect("valid");
    let CredentialSource::Assertion(assertion) = &settings.connections["secretless"].credential
    else {
        panic!("not an assertion");
    };
    assert_eq!(
        assertion.key,
        AssertionKey::KeyVaultCertificate("entra-cert".into())
    );
    assert_eq!(assertion.algorithm, Some(SigningAlgorithm::Rs256));
    assert_eq!(assertion.audience, "https://tenant.auth0.com/");
    assert_eq!(assertion.lifetime, Duration::from_secs(600));
    assert_eq!(assertion.key_id.as_deref(), Some("k1"));
}

#[test]
fn check_refuses_private_key_jwt_without_a_key_beside_a_secret_or_with_an_unknown_algorithm() {
    let refused = |connection: &str, expected: &str| {
        let error = parse_with(&with_connection(connection), &full_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    };
    refused(
        "auth_method = \"private_key_jwt\"",
        "connections.secretless.client_assertion_key: required by auth_method = \"private_key_jwt\"",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }\nclient_secret = { key_vault_secret = \"s\" }",
        "connections.secretless.client_secret: not used with auth_method = \"private_key_jwt\"",
    );
    refused(
        "auth_method = \"managed_identity_federation\"\nclient_secret = { key_vault_secret = \"s\" }",
        "connections.secretless.client_secret: not used with auth_method = \"managed_identity_federation\"",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }\nsigning_algorithm = \"HS256\"",
        "connections.secretless.signing_algorithm: must be one of RS256",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_certificate = \"c\" }\nsigning_algorithm = \"ES256\"",
        "connections.secretless.signing_algorithm: a certificate credential signs with its RSA key",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }\nassertion_lifetime_seconds = 601",
        "connections.secretless.assertion_lifetime_seconds: 1 to 600",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_secret = \"k\" }",
        "connections.secretless.client_assertion_key: must be { key_vault_key",
    );
    refused(
        "client_secret = { key_vault_secret = \"s\" }\nclient_assertion_key = { key_vault_key = \"k\" }",
        "connections.secretless.client_assertion_key: only used with auth_method = \"private_key_jwt\"",
    );
    refused(
        "client_secret = { key_vault_secret = \"s\" }\nfederation_audience = \"api://x\"",
        "connections.secretless.federation_audience: only used with auth_method = \"managed_identity_federation\"",
    );
}

/// `FULL` with a `managed_identity_federation` connection to `token_url`.
fn with_federation(token_url: &str) -> String {
    format!(
        "{FULL}\n[connections.secretless]\ntoken_url = \"{token_url}\"\nclient_id = \"app\"\nauth_method = \"managed_identity_federation\"\n"
    )
}

const ENTRA_TOKEN_URL: &str = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token";

#[test]
fn the_federation_token_goes_to_entra_or_loopback_only() {
    for token_url in [
        "https://idp.example/oauth/token",
        "https://login.microsoftonline.com.idp.example/tenant/oauth2/v2.0/token",
        "https://login.microsoftonline.de/tenant/oauth2/v2.0/token",
    ] {
        let error = parse_with(&with_federation(token_url), &full_env())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("connections.secretless.token_url: must be an Entra token endpoint (host login.microsoftonline.com, login.microsoftonline.us, login.partner.microsoftonline.cn, login.chinacloudapi.cn) or loopback"),
            "{token_url}: {error}"
        );
        assert!(!error.contains("idp.example"), "{error}");
    }
    for token_url in [
        ENTRA_TOKEN_URL,
        "https://login.microsoftonline.us/tenant/oauth2/v2.0/token",
        "https://login.partner.microsoftonline.cn/tenant/oauth2/v2.0/token",
        "https://login.chinacloudapi.cn/tenant/oauth2/v2.0/token",
        "http://127.0.0.1:8400/tenant/oauth2/v2.0/token",
    ] {
        let settings = parse_with(&with_federation(token_url), &full_env());
        assert!(settings.is_ok(), "{token_url}: {:?}", settings.err());
    }
    // Other methods send their own credential, meant for that provider: any https host.
    let text = with_connection(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }",
    );
    assert!(parse_with(&text, &full_env()).is_ok());
}

#[test]
fn managed_identity_federation_needs_a_user_assigned_identity() {
    let settings = parse_with(&with_federation(ENTRA_TOKEN_URL), &full_env()).expect("valid");
    match &settings.connections["secretless"].credential {
        CredentialSource::Federation { audience } => {
            assert_eq!(audience, DEFAULT_FEDERATION_AUDIENCE)
        }
        other => panic!("{other:?}"),
    }
    let text = with_federation(ENTRA_TOKEN_URL)
        .replace("managed_identity_client_id = \"${MI_CLIENT_ID}\"", "");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(
        error.contains("connections.secretless.auth_method: \"managed_identity_federation\" needs a user-assigned identity"),
        "{error}"
    );
}
