//! The Azure SDK clients of the configured Key Vault (secrets, keys, certificates) and the
//! managed identity credential they share, built on first use so that startup does no TLS or
//! credential work.

use std::sync::{Arc, OnceLock};

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_core::time::Duration as SdkDuration;
use azure_identity::{
    AzureCliCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
};
use azure_security_keyvault_certificates::{CertificateClient, CertificateClientOptions};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};

use super::error::{CredentialError, ObjectKind};
use crate::config::{IdentitySettings, KeyVaultSettings};
use crate::http_client::LazyClient;

/// The vault's clients, built once on first use.
pub(crate) struct Vault {
    settings: KeyVaultSettings,
    identity: IdentitySettings,
    http: Arc<LazyClient>,
    clients: OnceLock<Result<Clients, String>>,
}

pub(crate) struct Clients {
    /// The managed identity (or developer CLI) credential every client authenticates with;
    /// federation asks it for its own tokens too.
    pub(crate) credential: Arc<dyn TokenCredential>,
    pub(crate) secrets: SecretClient,
    pub(crate) keys: KeyClient,
    pub(crate) certificates: CertificateClient,
}

impl Vault {
    pub(crate) fn new(
        settings: &KeyVaultSettings,
        identity: &IdentitySettings,
        http: Arc<LazyClient>,
    ) -> Self {
        Self {
            settings: settings.clone(),
            identity: identity.clone(),
            http,
            clients: OnceLock::new(),
        }
    }

    pub(crate) fn clients(&self) -> Result<&Clients, CredentialError> {
        self.clients
            .get_or_init(|| self.build())
            .as_ref()
            .map_err(|detail| {
                tracing::error!(%detail, "key vault client unavailable");
                CredentialError::Client
            })
    }

    fn build(&self) -> Result<Clients, String> {
        let http = self.http.get().map_err(str::to_string)?;
        let credential = credential(&self.settings, &self.identity, http)
            .map_err(|error| format!("cannot build the credential: {error}"))?;
        let uri = self.settings.uri.as_str();
        let verify = Some(self.settings.verify_challenge_resource);
        let failed =
            |error: azure_core::Error| format!("cannot build the Key Vault client: {error}");
        let secrets = SecretClient::new(
            uri,
            credential.clone(),
            Some(SecretClientOptions {
                client_options: sdk_client_options(http),
                verify_challenge_resource: verify,
                ..Default::default()
            }),
        )
        .map_err(failed)?;
        let keys = KeyClient::new(
            uri,
            credential.clone(),
            Some(KeyClientOptions {
                client_options: sdk_client_options(http),
                verify_challenge_resource: verify,
                ..Default::default()
            }),
        )
        .map_err(failed)?;
        let certificates = CertificateClient::new(
            uri,
            credential.clone(),
            Some(CertificateClientOptions {
                client_options: sdk_client_options(http),
                verify_challenge_resource: verify,
                ..Default::default()
            }),
        )
        .map_err(failed)?;
        Ok(Clients {
            credential,
            secrets,
            keys,
            certificates,
        })
    }
}

/// Maps an SDK error to what an operator needs to know, without the raw response body.
pub(crate) fn classify(kind: ObjectKind, name: &str, error: &azure_core::Error) -> CredentialError {
    use azure_core::error::ErrorKind;
    match error.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            // Key Vault's inner code tells a disabled object from a missing role
            // (`Forbidden/SecretDisabled`, `Forbidden/ForbiddenByRbac`): the codes only, never
            // the message text.
            let inner = raw_response
                .as_ref()
                .and_then(|raw| {
                    serde_json::from_slice::<azure_core::error::ErrorResponse>(raw.body().as_ref())
                        .ok()
                })
                .and_then(|body| body.error?.inner_error?.code);
            let outer = error_code.clone().unwrap_or_else(|| status.to_string());
            let code = match inner {
                Some(inner) => format!("{outer}/{inner}"),
                None => outer,
            };
            match u16::from(*status) {
                404 => CredentialError::NotFound {
                    kind,
                    name: name.to_string(),
                },
                401 | 403 => CredentialError::Forbidden {
                    kind,
                    name: name.to_string(),
                    code,
                },
                // Key Vault answers 400 to a sign the key cannot make (wrong algorithm for
                // the key type, a key without the sign operation): a configuration error.
                400 if kind != ObjectKind::Secret => CredentialError::Unusable {
                    kind,
                    name: name.to_string(),
                    detail: format!("Key Vault answered HTTP 400 ({code})"),
                },
                _ => CredentialError::Unavailable {
                    kind,
                    name: name.to_string(),
                    detail: format!("HTTP {}", u16::from(*status)),
                },
            }
        }
        ErrorKind::Credential => CredentialError::Identity {
            purpose: "Key Vault",
        },
        ErrorKind::Connection | ErrorKind::Io => CredentialError::Unavailable {
            kind,
            name: name.to_string(),
            detail: "connection failed".to_string(),
        },
        _ => CredentialError::Unavailable {
            kind,
            name: name.to_string(),
            detail: "unexpected response".to_string(),
        },
    }
}

/// The SDK options every Azure client shares: the broker's one HTTP client, and retries
/// bounded so that a caller never waits for minutes on a sick vault.
pub(crate) fn sdk_client_options(http: &reqwest::Client) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http.clone()))),
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: SdkDuration::milliseconds(200),
            max_retries: 3,
            max_total_elapsed: SdkDuration::seconds(10),
            max_delay: SdkDuration::seconds(2),
        }),
        ..Default::default()
    }
}

/// The credential the Key Vault clients authenticate with.
fn credential(
    settings: &KeyVaultSettings,
    identity: &IdentitySettings,
    http: &reqwest::Client,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    Ok(match identity {
        IdentitySettings::ManagedIdentity => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: settings
                    .managed_identity_client_id
                    .clone()
                    .map(UserAssignedId::ClientId),
                client_options: sdk_client_options(http),
            };
            ManagedIdentityCredential::new(Some(options))?
        }
        IdentitySettings::DeveloperCli => AzureCliCredential::new(None)?,
    })
}
