//! What instances tell each other through Redis pub/sub: a rotated secret, key or certificate, and a new encryption key; each announcement signed, fresh within a minute and acted on once.

use super::*;

impl SharedTier {
    pub(super) fn on_message(
        self: Arc<Self>,
        message: &str,
        rotations: &mpsc::UnboundedSender<Announced>,
    ) {
        if let Some(id) = message.strip_prefix("t:") {
            // Unsigned: a forged one only makes the waiters look at Redis once more.
            if let Some(notify) = self.waiters.lock().get(id) {
                notify.notify_waiters();
            }
            return;
        }
        let Some(ready) = self.ready.get() else {
            return;
        };
        match ready.ring().verify(message) {
            Some(body) => self.on_signed(body, rotations),
            None => {
                // Signed with a key this instance does not hold (a rotation function that
                // started on the new key), or forged: read the key again, at most once per
                // KEY_RECHECK whatever arrives, and look at the message once more.
                SharedCacheCounters::add(&self.counters.unverified_announcements);
                if self.rechecking.swap(true, Ordering::AcqRel) {
                    return;
                }
                let tier = self.clone();
                let message = message.to_string();
                let rotations = rotations.clone();
                tokio::spawn(async move {
                    let changed = tier.reread_key(false, true).await == Ok(true);
                    tier.rechecking.store(false, Ordering::Release);
                    let verified = tier
                        .ready
                        .get()
                        .and_then(|ready| ready.ring().verify(&message).map(str::to_string));
                    match verified {
                        Some(body) if changed => tier.on_signed(&body, &rotations),
                        _ => {
                            tracing::debug!(target: "shared_cache", "an announcement no key held here signed was ignored")
                        }
                    }
                });
            }
        }
    }

    /// A verified announcement: `r:<hash>:<instance>:<ms>:<nonce>` (an object rotated),
    /// `v:<fingerprint>:<instance>:<ms>:<nonce>` (a token invalidated) or
    /// `k:<instance>:<ms>:<nonce>:<key id>` (the encryption key rotated). Acted on once, and
    /// only while fresh.
    pub(super) fn on_signed(
        self: Arc<Self>,
        body: &str,
        rotations: &mpsc::UnboundedSender<Announced>,
    ) {
        let fields: Vec<&str> = body.split(':').collect();
        let (instance, sent_ms) = match fields.as_slice() {
            ["r" | "v", _, instance, ms, _] | ["k", instance, ms, _, _] => (*instance, *ms),
            _ => return,
        };
        if instance == self.instance || !self.fresh_and_new(body, sent_ms) {
            return;
        }
        match fields.as_slice() {
            ["r", hash, ..] => {
                if let Some(name) = self.secrets_by_hash.get(*hash) {
                    let _ = rotations.send(Announced::Rotated(name.clone()));
                }
            }
            ["v", fingerprint, ..] => {
                let _ = rotations.send(Announced::Invalidated(fingerprint.to_string()));
            }
            ["k", _, _, _, key_id] => {
                let held = self
                    .ready
                    .get()
                    .is_some_and(|ready| ready.ring().current_id() == *key_id);
                // Only a holder of a key can sign one, and each is acted on once (above).
                if held {
                    return;
                }
                let tier = self.clone();
                tokio::spawn(async move {
                    match tier.reread_key(true, true).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(target: "shared_cache", "encryption key rotation announced; this instance holds that key already")
                        }
                        Err(problem) => {
                            tracing::warn!(target: "shared_cache", problem, "encryption key rotation announced, but the key could not be read again")
                        }
                    }
                });
            }
            _ => {}
        }
    }

    /// Whether an announcement sent at `sent_ms` (unix milliseconds) is recent and not seen
    /// before; records it as seen.
    pub(super) fn fresh_and_new(&self, body: &str, sent_ms: &str) -> bool {
        let Ok(sent_ms) = sent_ms.parse::<u64>() else {
            return false;
        };
        let freshness = millis(ANNOUNCEMENT_FRESHNESS);
        if unix_millis().abs_diff(sent_ms) > freshness {
            return false;
        }
        let now = Instant::now();
        let mut seen = self.seen.lock();
        seen.retain(|_, at| now.duration_since(*at) < ANNOUNCEMENT_FRESHNESS * 2);
        seen.insert(body.to_string(), now).is_none()
    }

    /// A fresh announcement body's suffix: when it is sent and a nonce.
    pub(super) fn stamp() -> String {
        format!(
            "{}:{}",
            unix_millis(),
            hex::encode(rand::random::<[u8; 8]>())
        )
    }

    /// Whether `secret_name` is the Key Vault secret that holds this tier's encryption key.
    pub(crate) fn uses_encryption_key(&self, secret_name: &str) -> bool {
        matches!(&self.encryption_key, SecretSource::KeyVault { secret_name: ours } if ours.eq_ignore_ascii_case(secret_name))
    }

    /// The encryption key has a new version: read it, seal with it from now on (the previous
    /// key still opens for its window), and tell every instance to do the same. An error
    /// when the fleet could not be told, so that the event is delivered again.
    pub(crate) async fn rotate_encryption_key(self: &Arc<Self>) -> Result<String, &'static str> {
        let ready = self.wait_until_ready().await?;
        let rotated = self.reread_key(true, true).await?;
        let ring = ready.ring();
        let message = ring.sign(&format!(
            "k:{}:{}:{}",
            self.instance,
            Self::stamp(),
            ring.current_id()
        ));
        ready
            .link
            .publish(&message)
            .await
            .ok_or("the shared cache is unavailable")?;
        Ok(if rotated {
            "the shared cache's encryption key was read again and rotated; told every instance"
                .to_string()
        } else {
            "the shared cache's encryption key is unchanged here; told every instance to read it again"
                .to_string()
        })
    }

    /// Reads the encryption key again, from Key Vault and never a copy (unless `force` is
    /// false and it was read within [`KEY_RECHECK`]); `Ok(true)` when it changed and this
    /// instance now seals with it, `Ok(false)` when it is the key held already or was not
    /// read. With `wait` false, returns at once when another re-read is under way.
    pub(super) async fn reread_key(&self, force: bool, wait: bool) -> Result<bool, &'static str> {
        let mut checked = if wait {
            self.key_checked.lock().await
        } else {
            match self.key_checked.try_lock() {
                Ok(checked) => checked,
                Err(_) => return Ok(false),
            }
        };
        if !force && checked.is_some_and(|at| at.elapsed() < KEY_RECHECK) {
            return Ok(false);
        }
        *checked = Some(Instant::now());
        let ready = self
            .ready
            .get()
            .ok_or("the shared cache is not configured")?;
        let secret = self
            .credentials
            .secret_now(&self.encryption_key)
            .await
            .map_err(|_| "the encryption key could not be read from Key Vault")?;
        let key = decode_encryption_key(&secret.value)
            .ok_or("the encryption key is not base64 of 32 bytes")?;
        let mut ring = ready.ring.write();
        let Some(rotated) = ring.rotated(Sealer::new(&key)) else {
            return Ok(false);
        };
        *ring = Arc::new(rotated);
        drop(ring);
        tracing::info!(
            target: "shared_cache",
            "shared cache encryption key rotated: new entries are sealed with the new key; the previous one still opens for a day"
        );
        Ok(true)
    }

    /// Tells every instance that `secret_name` (a Key Vault object, as
    /// `ObjectKind::object_id` names it) was rotated, after deleting the shared entries
    /// of `connections` (tokens minted with the old secret). Waits a bounded time for the
    /// tier to be ready, since the rotation function's instance may have just started.
    pub(crate) async fn announce_rotation(
        &self,
        secret_name: &str,
        connections: &[&str],
    ) -> Result<usize, &'static str> {
        let ready = self.wait_until_ready().await?;
        let mut deleted = 0;
        for name in connections {
            if let Some(connection) = self.connections.get(*name) {
                let index = self.index_name(connection);
                deleted += ready
                    .link
                    .delete_indexed(&index)
                    .await
                    .ok_or("the shared cache is unavailable")?;
            }
        }
        let message = ready.ring().sign(&format!(
            "r:{}:{}:{}",
            secret_hash(&self.prefix, secret_name),
            self.instance,
            Self::stamp()
        ));
        ready
            .link
            .publish(&message)
            .await
            .ok_or("the shared cache is unavailable")?;
        Ok(deleted)
    }
}
