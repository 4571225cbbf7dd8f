//! The last step of the data path: what a connection authenticates with at its token
//! endpoint. The token client asks [`Credentials`] for "what to send" and gets a
//! [`ClientCredential`]: a client secret, or a client assertion.
//!
//! - [`secret`]: client secrets from an app setting or Key Vault;
//! - [`assertion`]: `private_key_jwt` assertions signed inside Key Vault by a key or a
//!   certificate's key;
//! - [`federation`]: the managed identity's own token as an Entra federated credential;
//! - [`client_certificate`]: a certificate for mutual TLS (RFC 8705), its key in memory when
//!   exportable, else signing inside Key Vault ([`tls_key`]).
//!
//! Key Vault objects (secrets, and the public metadata of keys and certificates) share one
//! cache ([`cache`]): the same TTL, re-read backoff, refusal grace, re-read after a rejection
//! and invalidation by rotation events.

mod assertion;
mod cache;
mod client_certificate;
mod error;
mod federation;
mod secret;
mod tls_key;
pub(crate) mod vault;
mod vault_crypto;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use error::{CredentialError, ObjectKind};
pub(crate) use secret::ClientSecret;

use crate::config::{
    AssertionKey, AssertionSettings, ConnectionSettings, CredentialSource, IdentitySettings,
    KeyVaultSettings, SecretSource,
};
use crate::http_client::LazyClient;
use crate::observe::Observers;
use crate::observe::otel::Otel;
pub(crate) use assertion::ClientAssertion;
use assertion::SigningKey;
use cache::VaultCache;
pub(crate) use client_certificate::ClientCertificate;
use std::future::Future;
use tracing::Instrument as _;
use vault::{Clients, Vault};

/// What the token client sends to authenticate.
pub(crate) enum ClientCredential {
    /// Sent with Basic authentication or in the form body, per `auth_method`.
    Secret(Arc<ClientSecret>),
    /// Sent as `client_assertion` with the jwt-bearer `client_assertion_type`.
    Assertion(ClientAssertion),
    /// Presented in the TLS handshake; the form carries `client_id` alone.
    Certificate(Arc<ClientCertificate>),
}

impl ClientCredential {
    /// The Key Vault version it was made from, for log lines about rotation.
    pub(crate) fn version(&self) -> Option<&str> {
        match self {
            ClientCredential::Secret(secret) => secret.version.as_deref(),
            ClientCredential::Assertion(assertion) => assertion.version.as_deref(),
            ClientCredential::Certificate(certificate) => Some(certificate.version()),
        }
    }
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            ClientCredential::Secret(_) => "Secret",
            ClientCredential::Assertion(_) => "Assertion",
            ClientCredential::Certificate(_) => "Certificate",
        };
        write!(f, "{kind}(version {:?}, [REDACTED])", self.version())
    }
}

/// Makes credentials for connections, keeping Key Vault objects in memory.
pub(crate) struct Credentials {
    vault: Option<Vault>,
    /// Where Key Vault operations are counted and traced, when OpenTelemetry is on.
    otel: Option<Arc<Otel>>,
    secrets: VaultCache<ClientSecret>,
    keys: VaultCache<SigningKey>,
    certificates: VaultCache<SigningKey>,
    /// Mutual-TLS certificates with their keys (or Key Vault signers), by certificate name.
    client_certificates: VaultCache<ClientCertificate>,
}

impl Credentials {
    /// Builds the Key Vault clients lazily: no network call happens here, so that startup
    /// stays fast for the host's readiness probe.
    pub(crate) fn new(
        key_vault: Option<&KeyVaultSettings>,
        identity: &IdentitySettings,
        http: Arc<LazyClient>,
        ttl: Duration,
        refusal_grace: Duration,
        observers: &Observers,
    ) -> Self {
        let stats = observers.stats.clone();
        Self {
            vault: key_vault.map(|settings| Vault::new(settings, identity, http, stats)),
            otel: observers.otel.clone(),
            secrets: VaultCache::new(ObjectKind::Secret, ttl, refusal_grace),
            keys: VaultCache::new(ObjectKind::Key, ttl, refusal_grace),
            certificates: VaultCache::new(ObjectKind::Certificate, ttl, refusal_grace),
            client_certificates: VaultCache::new(ObjectKind::Certificate, ttl, refusal_grace),
        }
    }

    /// What `connection` sends this time: its secret (from memory when fresh), a freshly
    /// signed assertion (one Key Vault sign; key metadata from memory when fresh), or the
    /// managed identity's token.
    pub(crate) async fn credential(
        &self,
        connection: &ConnectionSettings,
    ) -> Result<ClientCredential, CredentialError> {
        match &connection.credential {
            CredentialSource::Secret(SecretSource::AppSetting { value, .. }) => {
                Ok(ClientCredential::Secret(secret::from_app_setting(value)))
            }
            CredentialSource::Secret(SecretSource::KeyVault { secret_name }) => {
                let vault = self.vault.as_ref();
                let secret = self
                    .secrets
                    .get(secret_name, || {
                        self.in_vault("get_secret", secret::read(vault, secret_name))
                    })
                    .await?;
                Ok(ClientCredential::Secret(secret))
            }
            CredentialSource::Assertion(settings) => {
                let clients = self.clients()?;
                let (cache, name) = self.key_cache(settings);
                let operation = match settings.key {
                    AssertionKey::KeyVaultKey(_) => "get_key",
                    AssertionKey::KeyVaultCertificate(_) => "get_certificate",
                };
                let key = cache
                    .get(name, || {
                        self.in_vault(operation, read_signing_key(clients, settings))
                    })
                    .await?;
                self.sign(clients, settings, connection, &key).await
            }
            CredentialSource::Federation { audience } => {
                let assertion = federation::assertion(self.clients()?, audience).await?;
                Ok(ClientCredential::Assertion(assertion))
            }
            CredentialSource::ClientCertificate { certificate_name } => {
                let clients = self.clients()?;
                let certificate = self
                    .client_certificates
                    .get(certificate_name, || {
                        self.in_vault(
                            "get_certificate",
                            client_certificate::read(clients, certificate_name, self.otel.clone()),
                        )
                    })
                    .await?;
                Ok(ClientCredential::Certificate(certificate))
            }
        }
    }

    /// A secret for the broker's own use (the shared cache's encryption key and Redis
    /// password): from its app setting, or from Key Vault through the same cache as client
    /// secrets.
    pub(crate) async fn secret(
        &self,
        source: &SecretSource,
    ) -> Result<Arc<ClientSecret>, CredentialError> {
        match source {
            SecretSource::AppSetting { value, .. } => Ok(secret::from_app_setting(value)),
            SecretSource::KeyVault { secret_name } => {
                let vault = self.vault.as_ref();
                self.secrets
                    .get(secret_name, || secret::read(vault, secret_name))
                    .await
            }
        }
    }

    /// The latest version of a secret for the broker's own use, read now and never a copy:
    /// for the shared cache's encryption key when its rotation is announced, where a copy
    /// served during a Key Vault outage would be mistaken for "the key is unchanged".
    pub(crate) async fn secret_now(
        &self,
        source: &SecretSource,
    ) -> Result<Arc<ClientSecret>, CredentialError> {
        match source {
            SecretSource::AppSetting { value, .. } => Ok(secret::from_app_setting(value)),
            SecretSource::KeyVault { secret_name } => {
                self.secrets.invalidate(secret_name);
                let vault = self.vault.as_ref();
                let read = secret::read(vault, secret_name).await?;
                Ok(Arc::new(read))
            }
        }
    }

    /// Called when the token endpoint refused `rejected`: re-reads Key Vault at once and
    /// offers a credential made from another version (rotated or previous), or `None` when
    /// there is nothing else to try.
    pub(crate) async fn after_rejection(
        &self,
        connection: &ConnectionSettings,
        rejected: &ClientCredential,
    ) -> Option<ClientCredential> {
        match &connection.credential {
            CredentialSource::Secret(SecretSource::KeyVault { secret_name }) => {
                let vault = self.vault.as_ref();
                self.secrets
                    .after_rejection(secret_name, rejected.version(), || {
                        secret::read(vault, secret_name)
                    })
                    .await
                    .map(ClientCredential::Secret)
            }
            CredentialSource::Assertion(settings) => {
                let clients = self.clients().ok()?;
                let (cache, name) = self.key_cache(settings);
                let key = cache
                    .after_rejection(name, rejected.version(), || {
                        read_signing_key(clients, settings)
                    })
                    .await?;
                self.sign(clients, settings, connection, &key)
                    .await
                    .inspect_err(|error| {
                        tracing::warn!(connection = %connection.name, reason = %error, "signing with another key version failed");
                    })
                    .ok()
            }
            CredentialSource::ClientCertificate { certificate_name } => {
                let clients = self.clients().ok()?;
                self.client_certificates
                    .after_rejection(certificate_name, rejected.version(), || {
                        client_certificate::read(clients, certificate_name, self.otel.clone())
                    })
                    .await
                    .map(ClientCredential::Certificate)
            }
            CredentialSource::Secret(SecretSource::AppSetting { .. })
            | CredentialSource::Federation { .. } => None,
        }
    }

    /// A credential to send instead of `sent` on a retry: a newly signed assertion (a new
    /// `jti`, times of the moment it is signed) from the key version that signed `sent`,
    /// since providers refuse a replayed `jti`; `None` when `sent` may be sent again as it is (a secret, the
    /// managed identity's token). One Key Vault sign.
    pub(crate) async fn renewed(
        &self,
        connection: &ConnectionSettings,
        sent: &ClientCredential,
    ) -> Result<Option<ClientCredential>, CredentialError> {
        let (
            ClientCredential::Assertion(ClientAssertion {
                signer: Some(key), ..
            }),
            CredentialSource::Assertion(settings),
        ) = (sent, &connection.credential)
        else {
            return Ok(None);
        };
        let clients = self.clients()?;
        self.sign(clients, settings, connection, key)
            .await
            .map(Some)
    }

    /// Makes the next use of the Key Vault object `name` of `kind` read it again (a rotation
    /// event arrived). Returns whether it was cached.
    pub(crate) fn invalidate(&self, kind: ObjectKind, name: &str) -> bool {
        match kind {
            ObjectKind::Secret => self.secrets.invalidate(name),
            ObjectKind::Key => self.keys.invalidate(name),
            ObjectKind::Certificate => {
                // One name may be both a signing certificate and a TLS one: both forget it.
                let signing = self.certificates.invalidate(name);
                self.client_certificates.invalidate(name) || signing
            }
        }
    }

    async fn sign(
        &self,
        clients: &Clients,
        settings: &AssertionSettings,
        connection: &ConnectionSettings,
        key: &Arc<SigningKey>,
    ) -> Result<ClientCredential, CredentialError> {
        let signed = assertion::sign(clients, settings, &connection.client_id, key);
        match self.in_vault("sign", signed).await {
            Ok(assertion) => Ok(ClientCredential::Assertion(assertion)),
            Err(error) => {
                if error.is_definitive() {
                    // The version may have been disabled or deleted, or the role removed:
                    // the next fetch reads the key again rather than trusting the copy.
                    let (cache, name) = self.key_cache(settings);
                    cache.invalidate(name);
                }
                Err(error)
            }
        }
    }

    /// One Key Vault operation, counted by kind and result and, when spans are exported, in
    /// a client span of its own under the request that needed it.
    async fn in_vault<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, CredentialError>>,
    ) -> Result<T, CredentialError> {
        let Some(otel) = &self.otel else {
            return work.await;
        };
        if !otel.traces() {
            let result = work.await;
            otel.key_vault(operation, if result.is_ok() { "ok" } else { "error" });
            return result;
        }
        let span = tracing::info_span!(
            "key_vault",
            otel.name = %format_args!("key_vault {operation}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            key_vault.operation = operation,
        );
        let result = work.instrument(span.clone()).await;
        if result.is_err() {
            span.record("otel.status_code", "error");
        }
        otel.key_vault(operation, if result.is_ok() { "ok" } else { "error" });
        result
    }

    fn key_cache<'a>(
        &'a self,
        settings: &'a AssertionSettings,
    ) -> (&'a VaultCache<SigningKey>, &'a str) {
        match &settings.key {
            AssertionKey::KeyVaultKey(name) => (&self.keys, name),
            AssertionKey::KeyVaultCertificate(name) => (&self.certificates, name),
        }
    }

    fn clients(&self) -> Result<&Arc<Clients>, CredentialError> {
        self.vault
            .as_ref()
            .ok_or(CredentialError::NoVault)?
            .clients()
    }
}

async fn read_signing_key(
    clients: &Clients,
    settings: &AssertionSettings,
) -> Result<SigningKey, CredentialError> {
    match &settings.key {
        AssertionKey::KeyVaultKey(name) => assertion::read_key(clients, name).await,
        AssertionKey::KeyVaultCertificate(name) => assertion::read_certificate(clients, name).await,
    }
}
