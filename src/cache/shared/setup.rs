//! Starting the shared tier: reading its encryption key (and Redis password) from Key Vault
//! and connecting, in the background, so that startup never waits for either.

use super::*;

impl SharedTier {
    /// Builds the tier and starts, in the background, reading its key (and password) and
    /// connecting: startup never waits for Key Vault or Redis, and until both are there the
    /// tier simply passes every fetch to the token client. Returns the tier and the Key Vault
    /// secret names other instances announce as rotated.
    pub(crate) fn start(
        parts: SharedTierParts<'_>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Announced>) {
        let (rotations, rotated) = mpsc::unbounded_channel();
        let secrets_by_hash = parts
            .connections
            .values()
            .flat_map(|connection| connection.vault_objects())
            .map(|object| (secret_hash(&parts.settings.key_prefix, &object), object))
            .collect();
        let tier = Arc::new(Self {
            source: parts.source,
            connections: parts.connections,
            prefix: parts.settings.key_prefix.clone(),
            ready: OnceLock::new(),
            ready_signal: watch::Sender::new(false),
            waiters: Mutex::default(),
            counters: Arc::default(),
            instance: hex::encode(rand::random::<[u8; 8]>()),
            secrets_by_hash,
            credentials: parts.credentials.clone(),
            encryption_key: parts.settings.encryption_key.clone(),
            key_checked: tokio::sync::Mutex::new(None),
            rechecking: AtomicBool::new(false),
            seen: Mutex::default(),
            lease: lock_lease(parts.settings.timeout),
            otel: parts.otel.clone(),
        });
        let settings = parts.settings.clone();
        let credentials = parts.credentials;
        let identity = parts.identity.clone();
        let client_id = parts
            .key_vault
            .and_then(|vault| vault.managed_identity_client_id.clone());
        let http = parts.http;
        let weak = Arc::downgrade(&tier);
        tokio::spawn(async move {
            let (encryption_key, password) = loop {
                match read_secrets(&settings, &credentials).await {
                    Ok(read) => break read,
                    Err(problem) => {
                        tracing::warn!(target: "shared_cache", problem, "shared cache not ready: retrying; until then this instance works alone");
                        tokio::time::sleep(SETUP_RETRY).await;
                    }
                }
            };
            let Some(tier) = weak.upgrade() else { return };
            let auth = match (&settings.auth, password) {
                (RedisAuth::Password { username, .. }, Some(password)) => LinkAuth::Password {
                    username: username.clone(),
                    password,
                },
                (RedisAuth::Entra { username }, _) => {
                    match crate::cache::entra::credential(&identity, client_id, &http) {
                        Ok(credential) => {
                            LinkAuth::Entra(EntraCredentials::start(credential, username.clone()))
                        }
                        Err(problem) => {
                            tracing::error!(target: "shared_cache", problem, "shared cache disabled: no credential for redis");
                            return;
                        }
                    }
                }
                _ => LinkAuth::None,
            };
            let (messages, mut received) = mpsc::unbounded_channel::<Message>();
            let channel = format!("{}:events", tier.prefix);
            let link =
                match RedisLink::start(&settings, auth, channel, tier.counters.clone(), messages) {
                    Ok(link) => link,
                    Err(problem) => {
                        tracing::error!(target: "shared_cache", problem, "shared cache disabled");
                        return;
                    }
                };
            let ring = KeyRing::new(Sealer::new(&encryption_key));
            let _ = tier.ready.set(Ready {
                ring: RwLock::new(Arc::new(ring)),
                link,
            });
            tier.ready_signal.send_replace(true);
            tracing::info!(target: "shared_cache", "shared cache configured; connecting in the background");
            let weak = Arc::downgrade(&tier);
            drop(tier);
            while let Some(message) = received.recv().await {
                let Some(tier) = weak.upgrade() else { return };
                tier.on_message(&message, &rotations);
            }
        });
        (tier, rotated)
    }
}

/// The encryption key, and the Redis password when there is one.
async fn read_secrets(
    settings: &SharedCacheSettings,
    credentials: &Credentials,
) -> Result<
    (
        secrecy::SecretBox<[u8; crate::config::ENCRYPTION_KEY_BYTES]>,
        Option<SecretString>,
    ),
    String,
> {
    let key = credentials
        .secret(&settings.encryption_key)
        .await
        .map_err(|error| format!("encryption key: {} failed", error.step()))?;
    let key = decode_encryption_key(&key.value)
        .ok_or_else(|| "encryption key: not base64 of 32 bytes".to_string())?;
    let password = match &settings.auth {
        RedisAuth::Password { password, .. } => Some(
            credentials
                .secret(password)
                .await
                .map_err(|error| format!("redis password: {} failed", error.step()))?
                .value
                .clone(),
        ),
        _ => None,
    };
    Ok((key, password))
}
