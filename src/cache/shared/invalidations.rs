//! Verified invalidation across the fleet: whether the token a backend refused is the one
//! Redis holds for its key, one invalidation per key per interval for the whole fleet, and
//! the entry deleted and every instance told (by the token's fingerprint, in a signed
//! announcement) to drop its copy from memory.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::*;

impl SharedTier {
    /// Whether the entry Redis holds for `key` is the token whose SHA-256 is `digest`
    /// (compared in constant time); `None` when Redis cannot tell.
    pub(crate) async fn holds_token(&self, key: &CacheKey, digest: &[u8; 32]) -> Option<bool> {
        let (ready, names) = self.ready_names(key)?;
        let sealed = ready.link.get(&names.entry).await?;
        let Some(sealed) = sealed else {
            return Some(false);
        };
        let stored = ready
            .ring()
            .open(&names.entry, &sealed)
            .ok()
            .and_then(|plain| serde_json::from_slice::<StoredToken>(&plain).ok());
        Some(stored.is_some_and(|stored| {
            let held: [u8; 32] = Sha256::digest(stored.access_token.as_bytes()).into();
            bool::from(held.ct_eq(digest))
        }))
    }

    /// Claims `key`'s one invalidation for `interval`, fleet-wide: `Some(false)` when another
    /// instance (or this one) claimed it within the interval, `None` when Redis cannot tell.
    pub(crate) async fn claim_invalidation(
        &self,
        key: &CacheKey,
        interval: Duration,
    ) -> Option<bool> {
        let (ready, names) = self.ready_names(key)?;
        let claim = format!("{}:i:{}", self.prefix, names.id);
        ready.link.set_new(&claim, b"1", interval).await
    }

    /// Deletes `key`'s entry if it is still the token whose SHA-256 is `digest`, and tells
    /// every instance to drop the token with `fingerprint` from memory. `false` when Redis
    /// could not be told (this instance's own memory is dropped by the caller either way).
    pub(crate) async fn invalidate(
        &self,
        key: &CacheKey,
        digest: &[u8; 32],
        fingerprint: &str,
    ) -> bool {
        let Some((ready, names)) = self.ready_names(key) else {
            return false;
        };
        if self.holds_token(key, digest).await == Some(true)
            && ready.link.delete(&names.entry).await.is_none()
        {
            return false;
        }
        let message = ready.ring().sign(&format!(
            "v:{fingerprint}:{}:{}",
            self.instance,
            Self::stamp()
        ));
        ready.link.publish(&message).await.is_some()
    }

    /// The tier when connected, and the Redis names of `key`.
    fn ready_names(&self, key: &CacheKey) -> Option<(&Ready, Names)> {
        let ready = self.ready.get().filter(|ready| ready.link.is_up())?;
        let connection = self.connections.get(key.connection())?;
        Some((ready, self.names(connection, key)))
    }
}
