//! The doubles refuse what the real services refuse, so that a test passing against them
//! says something about Azure: Key Vault's `api-version` check and object ids under the name
//! the vault was called by, a certificate's secret behind the secrets API and the denial of
//! all three of a certificate's objects, its delay and hold faults, App Service's identity
//! selectors, and Entra's client-credentials scope rule and federated-credential matching.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use token_broker_doubles::entra_token::JWT_BEARER;
use token_broker_doubles::{
    AzureDoubles, CertificateIssuer, CertificateSpec, ConnectProxy, EntraTokenDouble, Fault,
    KeyKind, ManagedIdentityDouble, SecretContentType, key_vault,
};

use crate::support::json;

const IDENTITY: &str = "5e8c0a3e-7d41-4c1a-9b7e-00000000d0b1";
const EXCHANGE: &str = "api://AzureADTokenExchange";

/// The doubles, and a client that reaches the vault the way the broker does: as
/// `https://tests.vault.azure.net` through the CONNECT proxy, trusting the test CA.
struct Vault {
    azure: AzureDoubles,
    _proxy: ConnectProxy,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Vault {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let azure = AzureDoubles::start(dir.path(), Some(IDENTITY.to_string()))
            .await
            .unwrap();
        let proxy = ConnectProxy::start([(
            format!("{}:443", key_vault::PUBLIC_HOST),
            azure.vault.address(),
        )])
        .await
        .unwrap();
        let ca = std::fs::read(azure.vault.ca_file()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .proxy(reqwest::Proxy::https(proxy.url()).unwrap())
            .build()
            .unwrap();
        Self {
            azure,
            _proxy: proxy,
            client,
            _dir: dir,
        }
    }

    /// A token of the identity for `resource`, as azure_identity asks for one.
    async fn identity_token(&self, resource: &str) -> String {
        identity_token(&self.azure.identity, &[("client_id", IDENTITY)], resource)
            .await
            .unwrap()
    }

    async fn get(&self, url: &str, bearer: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send().await.unwrap()
    }
}

/// Asks the identity endpoint for a token for `resource`, selecting the identity with
/// `selectors`; the token, or the status of the refusal.
async fn identity_token(
    identity: &ManagedIdentityDouble,
    selectors: &[(&str, &str)],
    resource: &str,
) -> Result<String, u16> {
    let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
    query.extend_from_slice(selectors);
    let url = url::Url::parse_with_params(&identity.endpoint(), &query).unwrap();
    let response = reqwest::Client::new()
        .get(url)
        .header("x-identity-header", identity.header())
        .header("metadata", "true")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        return Err(status);
    }
    let body = json(response).await;
    assert!(body["expires_on"].is_string(), "as App Service sends it");
    Ok(body["access_token"].as_str().unwrap().to_string())
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn the_vault_double_refuses_a_missing_or_unknown_api_version_as_key_vault_does() {
    let vault = Vault::start().await;
    vault.azure.vault.set_secret("s", "value");
    let bearer = vault.identity_token("https://vault.azure.net").await;
    let base = vault.azure.vault.public_uri();
    for (query, unknown) in [
        ("", None),
        ("?api-version=", None),
        ("?api-version=2099-01-01", Some("2099-01-01")),
        ("?api-version=7.7-preview", Some("7.7-preview")),
    ] {
        let response = vault
            .get(&format!("{base}/secrets/s/{query}"), Some(&bearer))
            .await;
        assert_eq!(response.status(), 400, "{query:?}");
        let body = json(response).await;
        assert_eq!(body["error"]["code"], "BadParameter", "{query:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        match unknown {
            None => assert!(message.contains("api-version"), "{message}"),
            Some(version) => assert!(
                message.contains(&format!("({version}) is not recognized"))
                    && message.contains("(2025-07-01)"),
                "{message}"
            ),
        }
    }
    assert_eq!(vault.azure.vault.reads(), 0, "no secret was answered");
    // The version the SDK sends passes: the refusals above are about the version alone.
    let response = vault
        .get(
            &format!("{base}/secrets/s/?api-version=2025-07-01"),
            Some(&bearer),
        )
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn object_ids_are_under_the_host_the_vault_was_called_by() {
    let vault = Vault::start().await;
    let secret_version = vault.azure.vault.set_secret("s", "value");
    let key_version = vault.azure.vault.create_key("k", KeyKind::Rsa);
    let certificate_version = vault.azure.vault.create_certificate("c");
    let bearer = vault.identity_token("https://vault.azure.net").await;
    let public = vault.azure.vault.public_uri();
    assert_eq!(public, "https://tests.vault.azure.net");
    let answer = |path: String| {
        let vault = &vault;
        let bearer = bearer.clone();
        async move {
            let response = vault.get(&path, Some(&bearer)).await;
            assert_eq!(response.status(), 200, "{path}");
            json(response).await
        }
    };
    let v = "api-version=2025-07-01";
    let secret = answer(format!("{public}/secrets/s/?{v}")).await;
    assert_eq!(
        secret["id"],
        format!("{public}/secrets/s/{secret_version}"),
        "{secret}"
    );
    let key = answer(format!("{public}/keys/k/?{v}")).await;
    assert_eq!(key["key"]["kid"], format!("{public}/keys/k/{key_version}"));
    let certificate = answer(format!("{public}/certificates/c/?{v}")).await;
    assert_eq!(
        certificate["id"],
        format!("{public}/certificates/c/{certificate_version}")
    );
    assert_eq!(
        certificate["kid"],
        format!("{public}/keys/c/{certificate_version}")
    );
    assert_eq!(
        vault.azure.vault.public_key("k").unwrap().kid,
        format!("{public}/keys/k/{key_version}"),
        "what a verifier registers is what a caller under that name gets"
    );
    // Called by its loopback name, the same vault answers ids under that name.
    let ca = std::fs::read(vault.azure.vault.ca_file()).unwrap();
    let direct = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let local = vault.azure.vault.uri();
    assert!(local.starts_with("https://localhost:"), "{local}");
    let response = direct
        .get(format!("{local}/secrets/s/?{v}"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(
        json(response).await["id"],
        format!("{local}/secrets/s/{secret_version}")
    );
}

#[tokio::test]
async fn a_certificates_secret_is_read_through_the_secrets_api_and_denial_covers_all_three() {
    let vault = Vault::start().await;
    let spec = CertificateSpec {
        key: KeyKind::EcP384,
        exportable: true,
        content_type: SecretContentType::Pem,
        issuer: CertificateIssuer::TestCa,
    };
    let version = vault.azure.vault.create_client_certificate("c", spec);
    let bearer = vault.identity_token("https://vault.azure.net").await;
    let public = vault.azure.vault.public_uri();
    let v = "api-version=2025-07-01";

    let certificate = vault
        .get(&format!("{public}/certificates/c/?{v}"), Some(&bearer))
        .await;
    let certificate = json(certificate).await;
    assert_eq!(certificate["sid"], format!("{public}/secrets/c/{version}"));
    assert_eq!(certificate["policy"]["key_props"]["exportable"], true);
    assert_eq!(certificate["policy"]["key_props"]["crv"], "P-384");
    assert_eq!(certificate["policy"]["issuer"]["name"], "Unknown");
    let secret = vault
        .get(&format!("{public}/secrets/c/{version}?{v}"), Some(&bearer))
        .await;
    assert_eq!(secret.status(), 200);
    let secret = json(secret).await;
    assert_eq!(
        secret["value"].as_str(),
        vault.azure.vault.certificate_secret("c").as_deref()
    );
    assert_eq!(secret["contentType"], "application/x-pem-file");
    assert_eq!(secret["kid"], format!("{public}/keys/c/{version}"));
    assert_eq!(secret["managed"], true);
    let private_key = vault.azure.vault.certificate_private_key_pem("c").unwrap();
    assert!(
        secret["value"].as_str().unwrap().starts_with(&private_key),
        "an exportable certificate's PEM secret opens with its key"
    );
    assert_eq!(vault.azure.vault.reads(), 1);
    assert_eq!(vault.azure.vault.certificate_secret_reads(), 1);

    vault.azure.vault.set_denied("c", true);
    for (method, path) in [
        ("GET", format!("{public}/certificates/c/?{v}")),
        ("GET", format!("{public}/secrets/c/?{v}")),
        ("POST", format!("{public}/keys/c/{version}/sign?{v}")),
    ] {
        let request = match method {
            "GET" => vault.client.get(&path),
            _ => vault.client.post(&path).json(
                &serde_json::json!({ "alg": "ES384", "value": URL_SAFE_NO_PAD.encode([0u8; 48]) }),
            ),
        };
        let response = request.bearer_auth(&bearer).send().await.unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        assert_eq!(
            json(response).await["error"]["innererror"]["code"],
            "ForbiddenByRbac"
        );
    }
    assert_eq!(vault.azure.vault.certificate_secret_reads(), 1);
    assert_eq!(vault.azure.vault.signs(), 0);
}

#[tokio::test]
async fn the_vault_doubles_delay_and_hold_faults_hold_a_read_back_until_due() {
    let vault = Vault::start().await;
    vault.azure.vault.set_secret("s", "value");
    let bearer = vault.identity_token("https://vault.azure.net").await;
    let url = format!(
        "{}/secrets/s/?api-version=2025-07-01",
        vault.azure.vault.public_uri()
    );

    vault
        .azure
        .vault
        .set_fault(Some(Fault::Delay(Duration::from_millis(300))));
    let started = Instant::now();
    assert_eq!(vault.get(&url, Some(&bearer)).await.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered after the delay"
    );

    vault.azure.vault.set_fault(Some(Fault::Hold));
    let before = vault.azure.vault.requests();
    let held = tokio::spawn({
        let request = vault.client.get(&url).bearer_auth(&bearer);
        async move { request.send().await.map(|r| r.status().as_u16()) }
    });
    assert!(
        vault
            .azure
            .vault
            .wait_for_requests(before + 1, Duration::from_secs(30))
            .await,
        "the read reached the vault"
    );
    assert!(
        vault
            .azure
            .vault
            .wait_for_held(1, Duration::from_secs(10))
            .await
    );
    assert_eq!(vault.azure.vault.held(), 1);
    assert!(!held.is_finished(), "held");
    let reads = vault.azure.vault.reads();
    vault.azure.vault.set_fault(None);
    vault.azure.vault.release_held();
    assert_eq!(held.await.unwrap().unwrap(), 200, "answered once released");
    assert_eq!(vault.azure.vault.reads(), reads + 1);
    assert_eq!(vault.azure.vault.held(), 0);
}

#[tokio::test]
async fn the_identity_double_selects_the_user_assigned_identity_by_any_of_app_services_selectors() {
    let identity = ManagedIdentityDouble::start(0, Some(IDENTITY.to_string()))
        .await
        .unwrap();
    let assigned = identity.user_assigned().unwrap().clone();
    assert_ne!(
        assigned.object_id, assigned.client_id,
        "two GUIDs for one identity"
    );
    let resource = "https://vault.azure.net";
    let upper_resource_id = assigned.resource_id.to_uppercase();
    for selectors in [
        vec![("client_id", assigned.client_id.as_str())],
        vec![("principal_id", assigned.object_id.as_str())],
        vec![("object_id", assigned.object_id.as_str())],
        vec![("mi_res_id", assigned.resource_id.as_str())],
        // ARM resource ids are case-insensitive.
        vec![("mi_res_id", upper_resource_id.as_str())],
        vec![
            ("client_id", assigned.client_id.as_str()),
            ("principal_id", assigned.object_id.as_str()),
        ],
    ] {
        let token = identity_token(&identity, &selectors, resource)
            .await
            .unwrap_or_else(|status| panic!("{selectors:?}: {status}"));
        let claims = claims(&token);
        assert_eq!(claims["sub"], assigned.object_id.as_str(), "{claims}");
        assert_eq!(claims["oid"], assigned.object_id.as_str());
        assert_eq!(claims["appid"], assigned.client_id.as_str());
        assert_eq!(claims["aud"], resource);
        assert_eq!(claims["xms_mirid"], assigned.resource_id.as_str());
        let issued = identity.issued().lock().unwrap()[&token].clone();
        assert_eq!(issued.object_id, assigned.object_id);
        assert_eq!(issued.client_id.as_deref(), Some(IDENTITY));
    }
    let other = "00000000-0000-0000-0000-000000000bad";
    for selectors in [
        vec![],
        vec![("client_id", other)],
        vec![("principal_id", other)],
        vec![("object_id", other)],
        vec![(
            "mi_res_id",
            "/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/z",
        )],
        // The classic mistake: the client id given as the principal id.
        vec![("principal_id", assigned.client_id.as_str())],
        // Two selectors naming different identities.
        vec![
            ("client_id", assigned.client_id.as_str()),
            ("principal_id", other),
        ],
    ] {
        assert_eq!(
            identity_token(&identity, &selectors, resource).await,
            Err(400),
            "{selectors:?}"
        );
    }
}

/// A client-credentials request to the Entra double, as an app federating the identity sends it.
async fn exchange(
    entra: &EntraTokenDouble,
    client_id: &str,
    assertion: &str,
    scope: Option<&str>,
) -> (u16, Value) {
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
    ];
    form.extend(scope.map(|scope| ("scope", scope)));
    let response = reqwest::Client::new()
        .post(entra.token_url())
        .form(&form)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), json(response).await)
}

#[tokio::test]
async fn the_entra_double_wants_one_default_scope_and_matches_federation_by_the_object_id() {
    let identity = ManagedIdentityDouble::start(0, Some(IDENTITY.to_string()))
        .await
        .unwrap();
    let entra = EntraTokenDouble::start().await.unwrap();
    entra.trust_identity(identity.issued());
    let object_id = identity.object_id().to_string();
    entra.set_federated("by-object-id", &object_id, EXCHANGE);
    // Registered as docs/secretless.md warns not to: with the identity's client id as the subject.
    entra.set_federated("by-client-id", IDENTITY, EXCHANGE);
    entra.set_federated("by-upper-case", &object_id.to_uppercase(), EXCHANGE);
    let assertion = identity_token(&identity, &[("client_id", IDENTITY)], EXCHANGE)
        .await
        .unwrap();
    assert_eq!(claims(&assertion)["sub"], object_id.as_str());

    let (status, body) = exchange(
        &entra,
        "by-object-id",
        &assertion,
        Some("api://contoso/.default"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");

    let mut refusals = Vec::new();
    for (client_id, scope, expected_status, expected_error) in [
        (
            "by-object-id",
            Some("api://contoso/read"),
            400,
            "invalid_scope",
        ),
        (
            "by-object-id",
            Some("api://contoso/.default api://other/.default"),
            400,
            "invalid_scope",
        ),
        ("by-object-id", None, 400, "invalid_request"),
        (
            "by-client-id",
            Some("api://contoso/.default"),
            401,
            "invalid_client",
        ),
        (
            "by-upper-case",
            Some("api://contoso/.default"),
            401,
            "invalid_client",
        ),
    ] {
        let (status, body) = exchange(&entra, client_id, &assertion, scope).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (expected_status, Some(expected_error)),
            "{client_id} {scope:?}: {body}"
        );
        let code = body["error_codes"][0].as_u64().unwrap();
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("AADSTS{code}: ")),
            "{body}"
        );
        refusals.push(code);
    }
    assert_eq!(refusals, [1002012, 70011, 900144, 700213, 7002138]);

    // A token the identity endpoint no longer stands behind is refused too.
    assert!(identity.expire_issued() >= 1);
    let (status, body) = exchange(
        &entra,
        "by-object-id",
        &assertion,
        Some("api://contoso/.default"),
    )
    .await;
    assert_eq!(
        (status, &body["error_codes"][0]),
        (401, &Value::from(700024)),
        "{body}"
    );

    let forms: Vec<HashMap<String, String>> = entra.forms();
    assert_eq!(forms.len(), 7, "every request's form was recorded");
    assert_eq!(forms[0]["client_assertion"], assertion);
    assert_eq!(forms[0]["scope"], "api://contoso/.default");
    assert!(!forms[3].contains_key("scope"));
}
