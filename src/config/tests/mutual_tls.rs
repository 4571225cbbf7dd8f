//! Configuration tests of the mutual-TLS methods (RFC 8705): the certificate they need, the
//! https they need, and `issuer` in place of `token_url`.

use super::*;

/// `FULL` with one more connection whose endpoint lines are `endpoint`.
fn with(endpoint: &str, connection: &str) -> String {
    format!("{FULL}\n[connections.mtls]\n{endpoint}\nclient_id = \"app\"\n{connection}\n")
}

const TOKEN_URL: &str = "token_url = \"https://idp.example/oauth/token\"";
const CERTIFICATE: &str = "client_certificate = { key_vault_certificate = \"tls-client\" }";

#[test]
fn both_mutual_tls_methods_take_a_key_vault_certificate_and_send_no_secret() {
    for (method, expected) in [
        ("tls_client_auth", AuthMethod::TlsClientAuth),
        (
            "self_signed_tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth,
        ),
    ] {
        let text = with(
            TOKEN_URL,
            &format!("auth_method = \"{method}\"\n{CERTIFICATE}"),
        );
        let settings = parse_with(&text, &full_env()).expect("valid");
        let connection = &settings.connections["mtls"];
        assert_eq!(connection.auth_method, expected);
        assert!(connection.auth_method.is_mutual_tls());
        let CredentialSource::ClientCertificate { certificate_name } = &connection.credential
        else {
            panic!("{:?}", connection.credential);
        };
        assert_eq!(certificate_name, "tls-client");
        assert_eq!(connection.issuer, None);
        assert_eq!(
            connection.vault_objects(),
            vec!["certificate/tls-client".to_string()],
            "a CertificateNewVersionCreated event for it reaches the connection"
        );
    }
}

#[test]
fn an_issuer_stands_in_for_the_token_url_of_a_mutual_tls_connection() {
    let text = with(
        "issuer = \"https://idp.example/realms/banking\"",
        &format!("auth_method = \"tls_client_auth\"\n{CERTIFICATE}"),
    );
    let settings = parse_with(&text, &full_env()).expect("valid");
    let connection = &settings.connections["mtls"];
    assert_eq!(
        connection.issuer.as_ref().map(EndpointUrl::as_str),
        Some("https://idp.example/realms/banking")
    );
    assert_eq!(
        connection.token_url.as_str(),
        "https://idp.example/realms/banking",
        "the issuer is the connection's identity until the endpoint is discovered"
    );
}

#[test]
fn check_refuses_mutual_tls_without_a_certificate_over_http_or_beside_a_secret() {
    let refused = |endpoint: &str, connection: &str, expected: &str| {
        let error = parse_with(&with(endpoint, connection), &full_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    };
    refused(
        TOKEN_URL,
        "auth_method = \"tls_client_auth\"",
        "connections.mtls.client_certificate: required by auth_method = \"tls_client_auth\"",
    );
    refused(
        TOKEN_URL,
        "auth_method = \"self_signed_tls_client_auth\"",
        "connections.mtls.client_certificate: required by auth_method = \"self_signed_tls_client_auth\"",
    );
    refused(
        TOKEN_URL,
        &format!(
            "auth_method = \"tls_client_auth\"\n{CERTIFICATE}\nclient_secret = {{ key_vault_secret = \"s\" }}"
        ),
        "connections.mtls.client_secret: not used with auth_method = \"tls_client_auth\"",
    );
    refused(
        TOKEN_URL,
        "auth_method = \"tls_client_auth\"\nclient_certificate = { key_vault_key = \"k\" }",
        "connections.mtls.client_certificate: must be { key_vault_certificate",
    );
    refused(
        TOKEN_URL,
        "auth_method = \"tls_client_auth\"\nclient_certificate = { key_vault_certificate = \"not/a/name\" }",
        "connections.mtls.client_certificate.key_vault_certificate: a Key Vault object name",
    );
    refused(
        TOKEN_URL,
        &format!(
            "auth_method = \"tls_client_auth\"\n{CERTIFICATE}\nclient_assertion_key = {{ key_vault_key = \"k\" }}"
        ),
        "connections.mtls.client_assertion_key: only used with auth_method = \"private_key_jwt\"",
    );
    refused(
        TOKEN_URL,
        &format!("client_secret = {{ key_vault_secret = \"s\" }}\n{CERTIFICATE}"),
        "connections.mtls.client_certificate: only used with auth_method = \"tls_client_auth\" or \"self_signed_tls_client_auth\"",
    );
    refused(
        "token_url = \"http://127.0.0.1:8080/token\"",
        &format!("auth_method = \"tls_client_auth\"\n{CERTIFICATE}"),
        "connections.mtls.token_url: must be https",
    );
    refused(
        "issuer = \"http://localhost:8080\"",
        &format!("auth_method = \"self_signed_tls_client_auth\"\n{CERTIFICATE}"),
        "connections.mtls.issuer: must be https",
    );
    refused(
        "issuer = \"https://idp.example\"",
        "client_secret = { key_vault_secret = \"s\" }",
        "connections.mtls.issuer: only used with auth_method = \"tls_client_auth\" or \"self_signed_tls_client_auth\"",
    );
    refused(
        &format!("{TOKEN_URL}\nissuer = \"https://idp.example\""),
        &format!("auth_method = \"tls_client_auth\"\n{CERTIFICATE}"),
        "connections.mtls.issuer: set token_url or issuer, not both",
    );
    refused(
        "",
        &format!("auth_method = \"tls_client_auth\"\n{CERTIFICATE}"),
        "connections.mtls.token_url: required",
    );
}
