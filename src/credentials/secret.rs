//! Client secrets: from an app setting, or from Key Vault through the shared cache.

use std::sync::Arc;

use azure_security_keyvault_secrets::models::SecretClientGetSecretOptions;
use secrecy::SecretString;
use tokio::time::Instant;

use super::cache::Versioned;
use super::error::{CredentialError, ObjectKind};
use super::vault::{Vault, classify};

/// A client secret and the Key Vault version it came from.
pub(crate) struct ClientSecret {
    pub value: SecretString,
    /// The Key Vault version, `None` for app settings. Used to tell whether a re-read found
    /// a rotated secret.
    pub version: Option<String>,
}

impl Versioned for ClientSecret {
    fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }
}

/// Reads the latest version of secret `name`.
pub(super) async fn read(
    vault: Option<&Vault>,
    name: &str,
) -> Result<ClientSecret, CredentialError> {
    let vault = vault.ok_or(CredentialError::NoVault)?;
    let clients = vault.clients()?;
    let started = Instant::now();
    let failed = |error: azure_core::Error| classify(ObjectKind::Secret, name, &error);
    let secret = clients
        .secrets
        .get_secret(name, None::<SecretClientGetSecretOptions<'_>>)
        .await
        .map_or_else(
            |error| vault.stats.key_vault_failed(error),
            |answer| vault.stats.key_vault_read(answer),
        )
        .map_err(failed)?
        .into_model()
        .map_err(failed)?;
    let version = secret
        .id
        .as_deref()
        .and_then(|id| id.trim_end_matches('/').rsplit('/').next())
        .map(str::to_string);
    let value = secret
        .value
        .filter(|value| !value.is_empty())
        .ok_or_else(|| CredentialError::Empty {
            name: name.to_string(),
        })?;
    tracing::info!(
        secret = name,
        version = version.as_deref().unwrap_or("unknown"),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read client secret from key vault"
    );
    Ok(ClientSecret {
        value: SecretString::from(value),
        version,
    })
}

/// A secret held in an app setting: never re-read, no version.
pub(super) fn from_app_setting(value: &SecretString) -> Arc<ClientSecret> {
    Arc::new(ClientSecret {
        value: value.clone(),
        version: None,
    })
}
