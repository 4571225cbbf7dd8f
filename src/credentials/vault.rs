//! The Azure SDK clients of the configured Key Vault (secrets, keys, certificates) and the
//! managed identity credential they share, built on first use so that startup does no TLS or
//! credential work.
//!
//! azure_identity keeps the identity's token until five minutes before the expiry it was told,
//! and offers no way to drop it: a token Key Vault refuses before then (401: revoked, or a
//! clock that drifted) would be sent again on every read until then, a day for App Service's
//! tokens. So the credential is renewable, and a Key Vault answer of 401 renews it and sends
//! the request once more, with a token the identity endpoint gives anew.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, Request, RetryOptions, StatusCode, Transport,
};
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
    /// Where reads are counted (`key_vault_reads`, `key_vault_failures`).
    pub(crate) stats: Arc<crate::observe::stats::Registry>,
    /// Shared with the TLS signing keys, which outlive any one call.
    clients: OnceLock<Result<Arc<Clients>, String>>,
}

pub(crate) struct Clients {
    /// The managed identity (or developer CLI) credential every client authenticates with;
    /// federation asks it for its own tokens too. Renewed when Key Vault refuses its token.
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
        stats: Arc<crate::observe::stats::Registry>,
    ) -> Self {
        Self {
            settings: settings.clone(),
            identity: identity.clone(),
            http,
            stats,
            clients: OnceLock::new(),
        }
    }

    pub(crate) fn clients(&self) -> Result<&Arc<Clients>, CredentialError> {
        self.clients
            .get_or_init(|| self.build().map(Arc::new))
            .as_ref()
            .map_err(|detail| {
                tracing::error!(%detail, "key vault client unavailable");
                CredentialError::Client
            })
    }

    fn build(&self) -> Result<Clients, String> {
        let http = self.http.get().map_err(str::to_string)?;
        let renewable = {
            let (settings, identity, http) =
                (self.settings.clone(), self.identity.clone(), http.clone());
            Arc::new(
                RenewableCredential::new(move || {
                    azure_credential(
                        &identity,
                        settings.managed_identity_client_id.clone(),
                        &http,
                    )
                })
                .map_err(|error| format!("cannot build the credential: {error}"))?,
            )
        };
        let credential: Arc<dyn TokenCredential> = renewable.clone();
        let uri = self.settings.uri.as_str();
        let verify = Some(self.settings.verify_challenge_resource);
        let failed =
            |error: azure_core::Error| format!("cannot build the Key Vault client: {error}");
        let options = || {
            let mut options = sdk_client_options(http);
            options
                .per_call_policies
                .push(Arc::new(RenewOnUnauthorized(renewable.clone())));
            options
        };
        let secrets = SecretClient::new(
            uri,
            credential.clone(),
            Some(SecretClientOptions {
                client_options: options(),
                verify_challenge_resource: verify,
                ..Default::default()
            }),
        )
        .map_err(failed)?;
        let keys = KeyClient::new(
            uri,
            credential.clone(),
            Some(KeyClientOptions {
                client_options: options(),
                verify_challenge_resource: verify,
                ..Default::default()
            }),
        )
        .map_err(failed)?;
        let certificates = CertificateClient::new(
            uri,
            credential.clone(),
            Some(CertificateClientOptions {
                client_options: options(),
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

type BuildCredential =
    dyn Fn() -> azure_core::Result<Arc<dyn TokenCredential>> + Send + Sync + 'static;

/// A credential that can be replaced by a new one (with an empty token cache).
pub(crate) struct RenewableCredential {
    current: parking_lot::Mutex<Arc<dyn TokenCredential>>,
    /// Bumped by each renewal: a request renews only the credential it was sent with, so a
    /// burst of refused requests costs one renewal.
    generation: AtomicU64,
    build: Box<BuildCredential>,
}

impl RenewableCredential {
    fn new(
        build: impl Fn() -> azure_core::Result<Arc<dyn TokenCredential>> + Send + Sync + 'static,
    ) -> azure_core::Result<Self> {
        Ok(Self {
            current: parking_lot::Mutex::new(build()?),
            generation: AtomicU64::new(0),
            build: Box::new(build),
        })
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Replaces the credential, unless another request did since `generation`; returns
    /// whether the credential in use now differs from the one of `generation`.
    fn renew(&self, generation: u64) -> bool {
        let mut current = self.current.lock();
        if self.generation() != generation {
            return true;
        }
        match (self.build)() {
            Ok(fresh) => {
                *current = fresh;
                self.generation.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(error) => {
                tracing::warn!(reason = %error, "the managed identity credential could not be built again");
                false
            }
        }
    }
}

impl std::fmt::Debug for RenewableCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewableCredential")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TokenCredential for RenewableCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let current = self.current.lock().clone();
        current.get_token(scopes, options).await
    }
}

/// A Key Vault client's policy: a request Key Vault still answers 401 after the SDK's own
/// challenge handling (its token refused) renews the credential and is sent once more. The
/// SDK's authorization policy dropped its copy of the token on the 401, so the retry asks the
/// renewed credential, which asks the identity endpoint.
#[derive(Debug)]
struct RenewOnUnauthorized(Arc<RenewableCredential>);

#[async_trait]
impl Policy for RenewOnUnauthorized {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let generation = self.0.generation();
        let response = next[0].send(ctx, request, &next[1..]).await?;
        if response.status() != StatusCode::Unauthorized || !self.0.renew(generation) {
            return Ok(response);
        }
        tracing::warn!(
            "key vault refused the managed identity's token; retrying once with a new token"
        );
        request.body_mut().reset().await?;
        next[0].send(ctx, request, &next[1..]).await
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

/// The broker's managed identity (the user-assigned one `client_id` names, else the system-
/// assigned one) or, on a laptop, the developer's Azure CLI login: the one place an Azure
/// identity credential is built, for the Key Vault clients and for Redis's Entra tokens alike,
/// with the same HTTP client and retry bounds.
pub(crate) fn azure_credential(
    identity: &IdentitySettings,
    client_id: Option<String>,
    http: &reqwest::Client,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    Ok(match identity {
        IdentitySettings::ManagedIdentity => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.map(UserAssignedId::ClientId),
                client_options: sdk_client_options(http),
            };
            ManagedIdentityCredential::new(Some(options))?
        }
        IdentitySettings::DeveloperCli => AzureCliCredential::new(None)?,
    })
}
