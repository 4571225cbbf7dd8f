//! The last step of the data path: where a connection's client secret comes from.
//!
//! Key Vault secrets are read through the official Azure SDK with the Function App's managed
//! identity (or a developer's Azure CLI login on a laptop) and kept in memory for a TTL, as
//! Microsoft's guidance asks: Key Vault allows a few thousand transactions per 10 s per vault,
//! and a broker that read per request would throttle itself.
//!
//! When a re-read fails, the copy in memory keeps serving: a vault hiccup must not become an
//! outage. Re-reads with a copy in hand are bounded (`REREAD_WAIT`), made by one caller at a
//! time while the others use the copy, and after a failure backed off, so that a dead vault
//! never holds a token fetch up. A definitive refusal (secret disabled or deleted, access
//! revoked) is different: the copy is used for `secret_refusal_grace` after the first one, and
//! then no more.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_core::time::Duration as SdkDuration;
use azure_identity::{
    AzureCliCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
};
use azure_security_keyvault_secrets::{
    SecretClient, SecretClientOptions, models::SecretClientGetSecretOptions,
};
use parking_lot::Mutex;
use secrecy::SecretString;
use tokio::time::Instant;

use crate::config::{IdentitySettings, KeyVaultSettings, SecretSource};
use crate::http_client::LazyClient;

/// A client secret and the Key Vault version it came from.
pub struct ClientSecret {
    pub value: SecretString,
    /// The Key Vault version, `None` for app settings. Used to tell whether a re-read found
    /// a rotated secret.
    pub version: Option<String>,
}

/// Longest a re-read may take while a copy is in memory; past it the copy is used.
const REREAD_WAIT: Duration = Duration::from_secs(2);
/// Backoff between failed re-reads: doubling from the first, at most the last.
const REREAD_BACKOFF_FIRST: Duration = Duration::from_secs(5);
const REREAD_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Why a secret could not be had. Messages are for operators (they go to the log, not to
/// callers) and never hold a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Key Vault secret '{name}' was not found")]
    NotFound { name: String },
    #[error(
        "Key Vault refused to read secret '{name}' ({code}); check the identity's 'Key Vault Secrets User' role and that the secret is enabled"
    )]
    Forbidden { name: String, code: String },
    #[error("Key Vault secret '{name}' has no value")]
    Empty { name: String },
    #[error("the managed identity could not obtain a token for Key Vault")]
    Identity,
    #[error("Key Vault did not answer reading secret '{name}' ({detail})")]
    Unavailable { name: String, detail: String },
    #[error("no Key Vault is configured")]
    NoVault,
    #[error("the Key Vault client could not be built (the log says why)")]
    Client,
}

impl SecretError {
    /// Whether Key Vault said no for good (deleted, disabled, access revoked), as opposed to
    /// not answering: only then does a copy in memory stop being used.
    pub fn is_definitive(&self) -> bool {
        matches!(
            self,
            SecretError::NotFound { .. }
                | SecretError::Forbidden { .. }
                | SecretError::Empty { .. }
        )
    }

    /// The step that failed, as a caller may be told it.
    pub fn step(&self) -> &'static str {
        match self {
            SecretError::Identity => "getting a managed identity token for Key Vault",
            _ => "reading it from Key Vault",
        }
    }
}

/// Reads client secrets and keeps them in memory for a TTL.
pub struct SecretStore {
    vault: Option<LazyVault>,
    ttl: Duration,
    refusal_grace: Duration,
    /// One slot per Key Vault secret name.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One secret: what is known of it, and the right to read it from Key Vault.
#[derive(Default)]
struct Slot {
    /// A blocking mutex: held for field updates only, never across an await.
    state: Mutex<SlotState>,
    /// Held for a Key Vault read, so that concurrent readers of a secret make one read; with
    /// a copy in memory, a caller that finds it taken uses the copy instead of waiting.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    cached: Option<CachedSecret>,
    /// Consecutive failed re-reads, and when the next may be made.
    failures: u32,
    retry_at: Option<Instant>,
    /// When Key Vault first refused the secret definitively since the last good read.
    refused_since: Option<Instant>,
}

impl SlotState {
    /// The copy, when it is fresh (read within the TTL and not marked by a rotation event).
    fn fresh(&self, ttl: Duration) -> Option<Arc<ClientSecret>> {
        self.cached
            .as_ref()
            .filter(|entry| !entry.stale && entry.read_at.elapsed() < ttl)
            .map(|entry| entry.latest.clone())
    }

    /// Whether a re-read is backing off after a failure.
    fn backing_off(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }
}

struct CachedSecret {
    /// The version Key Vault returned last.
    latest: Arc<ClientSecret>,
    /// The version before it, kept through a rotation as a fallback.
    previous: Option<Arc<ClientSecret>>,
    read_at: Instant,
    /// Set by a rotation event: read again before the next use.
    stale: bool,
}

/// Records a fresh read, keeping the version it replaces as `previous`.
fn remember(cached: &mut Option<CachedSecret>, secret: ClientSecret) -> Arc<ClientSecret> {
    let secret = Arc::new(secret);
    let previous = match cached.take() {
        Some(old) if old.latest.version != secret.version => {
            tracing::info!(
                from = old.latest.version.as_deref().unwrap_or("unknown"),
                to = secret.version.as_deref().unwrap_or("unknown"),
                "client secret has a new version"
            );
            Some(old.latest)
        }
        Some(old) => old.previous,
        None => None,
    };
    *cached = Some(CachedSecret {
        latest: secret.clone(),
        previous,
        read_at: Instant::now(),
        stale: false,
    });
    secret
}

impl SecretStore {
    /// Builds the Key Vault client when one is configured. No network call happens here:
    /// startup must stay fast for the host's readiness probe.
    pub fn new(
        key_vault: Option<&KeyVaultSettings>,
        identity: &IdentitySettings,
        http: Arc<LazyClient>,
        ttl: Duration,
        refusal_grace: Duration,
    ) -> Self {
        Self {
            vault: key_vault.map(|settings| LazyVault {
                settings: settings.clone(),
                identity: identity.clone(),
                http,
                client: OnceLock::new(),
            }),
            ttl,
            refusal_grace,
            slots: Mutex::default(),
        }
    }

    /// The secret for `source`, from memory when fresh enough.
    pub async fn client_secret(
        &self,
        source: &SecretSource,
    ) -> Result<Arc<ClientSecret>, SecretError> {
        match source {
            SecretSource::AppSetting { value, .. } => Ok(Arc::new(ClientSecret {
                value: value.clone(),
                version: None,
            })),
            SecretSource::KeyVault { secret_name } => self.key_vault_secret(secret_name).await,
        }
    }

    async fn key_vault_secret(&self, name: &str) -> Result<Arc<ClientSecret>, SecretError> {
        let slot = self.slot(name);
        let has_copy = {
            let state = slot.state.lock();
            if let Some(fresh) = state.fresh(self.ttl) {
                return Ok(fresh);
            }
            if state.cached.is_some() && state.backing_off() {
                return self.copy(name, &state, None);
            }
            state.cached.is_some()
        };
        if !has_copy {
            // Nothing to serve meanwhile: wait for the one read, then look again.
            let _reading = slot.reading.lock().await;
            if let Some(fresh) = slot.state.lock().fresh(self.ttl) {
                return Ok(fresh);
            }
            let result = self.read(name).await;
            return self.settle(name, &slot, result);
        }
        let Ok(_reading) = slot.reading.try_lock() else {
            // Another caller is re-reading; the copy serves until it is done.
            return self.copy(name, &slot.state.lock(), None);
        };
        if let Some(fresh) = slot.state.lock().fresh(self.ttl) {
            return Ok(fresh);
        }
        let result = match tokio::time::timeout(REREAD_WAIT, self.read(name)).await {
            Ok(result) => result,
            Err(_) => Err(SecretError::Unavailable {
                name: name.to_string(),
                detail: format!("no answer within {}s", REREAD_WAIT.as_secs()),
            }),
        };
        self.settle(name, &slot, result)
    }

    /// Records the outcome of a read: a new copy, or a failure that backs re-reads off and,
    /// when there is a copy, is answered from it as long as `copy` allows.
    fn settle(
        &self,
        name: &str,
        slot: &Slot,
        result: Result<ClientSecret, SecretError>,
    ) -> Result<Arc<ClientSecret>, SecretError> {
        let mut state = slot.state.lock();
        match result {
            Ok(secret) => {
                state.failures = 0;
                state.retry_at = None;
                state.refused_since = None;
                Ok(remember(&mut state.cached, secret))
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let backoff = REREAD_BACKOFF_FIRST
                    .saturating_mul(1 << (state.failures - 1).min(8))
                    .min(REREAD_BACKOFF_MAX);
                state.retry_at = Some(Instant::now() + backoff);
                if error.is_definitive() && state.refused_since.is_none() {
                    state.refused_since = Some(Instant::now());
                }
                if state.cached.is_none() {
                    return Err(error);
                }
                self.copy(name, &state, Some(error))
            }
        }
    }

    /// The copy in memory, unless Key Vault refused the secret definitively longer ago than the
    /// grace period: a disabled, deleted or revoked secret stops being used.
    fn copy(
        &self,
        name: &str,
        state: &SlotState,
        error: Option<SecretError>,
    ) -> Result<Arc<ClientSecret>, SecretError> {
        let Some(entry) = state.cached.as_ref() else {
            return Err(error.unwrap_or(SecretError::Unavailable {
                name: name.to_string(),
                detail: "no copy in memory".to_string(),
            }));
        };
        if let Some(since) = state.refused_since
            && since.elapsed() >= self.refusal_grace
        {
            tracing::warn!(
                secret = name,
                grace_seconds = self.refusal_grace.as_secs(),
                "key vault refuses this secret for longer than the grace period; no longer using the copy in memory"
            );
            return Err(error.unwrap_or(SecretError::Forbidden {
                name: name.to_string(),
                code: "refused".to_string(),
            }));
        }
        if let Some(error) = error {
            tracing::warn!(
                secret = name,
                reason = %error,
                retry_in_ms = state.retry_at.map_or(0, |at| at.saturating_duration_since(Instant::now()).as_millis() as u64),
                "key vault re-read failed; using the copy in memory"
            );
        }
        Ok(entry.latest.clone())
    }

    /// Called when the token endpoint refused `rejected` as a client secret: re-reads Key
    /// Vault at once and offers another version to try, the new one when the secret was
    /// rotated, else the previous one (the identity provider may not accept the new one yet).
    /// `None` when there is nothing else to try.
    pub async fn after_rejection(
        &self,
        source: &SecretSource,
        rejected: &ClientSecret,
    ) -> Option<Arc<ClientSecret>> {
        let SecretSource::KeyVault { secret_name } = source else {
            return None;
        };
        let slot = self.slot(secret_name);
        let _reading = slot.reading.lock().await;
        let rejected_version = rejected.version.as_deref();
        let result = self.read(secret_name).await;
        let mut state = slot.state.lock();
        match result {
            Ok(secret) => {
                state.failures = 0;
                state.retry_at = None;
                state.refused_since = None;
                remember(&mut state.cached, secret);
            }
            Err(error) => {
                tracing::warn!(secret = %secret_name, reason = %error, "key vault re-read after a rejected secret failed");
            }
        }
        let entry = state.cached.as_ref()?;
        if entry.latest.version.as_deref() != rejected_version {
            return Some(entry.latest.clone());
        }
        entry
            .previous
            .as_ref()
            .filter(|previous| previous.version.as_deref() != rejected_version)
            .cloned()
    }

    /// Makes the next read of `secret_name` go to Key Vault (a rotation event arrived); the
    /// versions already known stay available as fallbacks. Returns whether it was cached.
    pub async fn invalidate(&self, secret_name: &str) -> bool {
        let Some(slot) = self.slots.lock().get(secret_name).cloned() else {
            return false;
        };
        let mut state = slot.state.lock();
        // A rotation event is a reason to ask at once, whatever the backoff said.
        state.retry_at = None;
        match state.cached.as_mut() {
            Some(entry) => {
                entry.stale = true;
                true
            }
            None => false,
        }
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        // Held only to look up or insert the slot, never across an await.
        self.slots
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    async fn read(&self, name: &str) -> Result<ClientSecret, SecretError> {
        let vault = self.vault.as_ref().ok_or(SecretError::NoVault)?.client()?;
        let started = Instant::now();
        let response = vault
            .get_secret(name, None::<SecretClientGetSecretOptions<'_>>)
            .await
            .map_or_else(crate::stats::key_vault_failed, crate::stats::key_vault_read)
            .map_err(|error| classify(name, &error))?;
        let secret = response
            .into_model()
            .map_err(|error| classify(name, &error))?;
        let version = secret
            .id
            .as_deref()
            .and_then(|id| id.trim_end_matches('/').rsplit('/').next())
            .map(str::to_string);
        let value = secret
            .value
            .filter(|value| !value.is_empty())
            .ok_or_else(|| SecretError::Empty {
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
}

/// The Key Vault client, built on first use so that startup does no TLS or credential work.
struct LazyVault {
    settings: KeyVaultSettings,
    identity: IdentitySettings,
    http: Arc<LazyClient>,
    client: OnceLock<Result<SecretClient, String>>,
}

impl LazyVault {
    fn client(&self) -> Result<&SecretClient, SecretError> {
        self.client
            .get_or_init(|| {
                let http = self.http.get().map_err(str::to_string)?;
                let credential = credential(&self.settings, &self.identity, http)
                    .map_err(|error| format!("cannot build the credential: {error}"))?;
                let options = SecretClientOptions {
                    client_options: sdk_client_options(http),
                    verify_challenge_resource: Some(self.settings.verify_challenge_resource),
                    ..Default::default()
                };
                SecretClient::new(self.settings.uri.as_str(), credential, Some(options))
                    .map_err(|error| format!("cannot build the Key Vault client: {error}"))
            })
            .as_ref()
            .map_err(|detail| {
                tracing::error!(%detail, "key vault client unavailable");
                SecretError::Client
            })
    }
}

/// Maps an SDK error to what an operator needs to know, without the raw response body.
fn classify(name: &str, error: &azure_core::Error) -> SecretError {
    use azure_core::error::ErrorKind;
    match error.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            // Key Vault's inner code tells a disabled secret from a missing role
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
                404 => SecretError::NotFound {
                    name: name.to_string(),
                },
                401 | 403 => SecretError::Forbidden {
                    name: name.to_string(),
                    code,
                },
                _ => SecretError::Unavailable {
                    name: name.to_string(),
                    detail: format!("HTTP {}", u16::from(*status)),
                },
            }
        }
        ErrorKind::Credential => SecretError::Identity,
        ErrorKind::Connection | ErrorKind::Io => SecretError::Unavailable {
            name: name.to_string(),
            detail: "connection failed".to_string(),
        },
        _ => SecretError::Unavailable {
            name: name.to_string(),
            detail: "unexpected response".to_string(),
        },
    }
}

/// The SDK options every Azure client shares: the broker's one HTTP client, and retries
/// bounded so that a caller never waits for minutes on a sick vault.
fn sdk_client_options(http: &reqwest::Client) -> ClientOptions {
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

/// The credential the Key Vault client authenticates with.
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
