//! Verified invalidation across the fleet: whether the token a backend refused is the one
//! Redis holds for its key, one invalidation per key per interval for the whole fleet, and
//! the entry deleted (only if it is still that token) and every instance told (by the token's
//! fingerprint, in a signed announcement) to drop its copy from memory.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::*;

impl SharedTier {
    /// Whether the entry Redis holds for `key` is the token whose SHA-256 is `digest`
    /// (compared in constant time); `None` when Redis cannot tell.
    pub(crate) async fn holds_token(&self, key: &CacheKey, digest: &[u8; 32]) -> Option<bool> {
        let (ready, names) = self.ready_names(key)?;
        let matching = self.matching_entry(ready, &names, digest).await?;
        Some(matching.is_some())
    }

    /// Claims `key`'s one invalidation for `interval`, fleet-wide: `Some(Err(left))` when
    /// another instance (or this one) claimed it and the claim lasts `left` more, `None` when
    /// Redis cannot tell.
    pub(crate) async fn claim_invalidation(
        &self,
        key: &CacheKey,
        interval: Duration,
    ) -> Option<Result<(), Duration>> {
        let (ready, names) = self.ready_names(key)?;
        let claim = format!("{}:i:{}", self.prefix, names.id);
        if ready.link.set_new(&claim, b"1", interval).await? {
            return Some(Ok(()));
        }
        let left = ready.link.ttl(&claim).await.unwrap_or(interval);
        Some(Err(left.max(Duration::from_secs(1))))
    }

    /// Deletes `key`'s entry if it is still the token whose SHA-256 is `digest` (a
    /// compare-and-delete of the very bytes read, so that a token another instance stored
    /// meanwhile stays), and tells every instance to drop the token with `fingerprint` from
    /// memory. `false` when Redis could not be read or told: the entry may still hold the
    /// token (this instance's own memory is dropped by the caller either way).
    pub(crate) async fn invalidate(
        &self,
        key: &CacheKey,
        digest: &[u8; 32],
        fingerprint: &str,
    ) -> bool {
        let Some((ready, names)) = self.ready_names(key) else {
            return false;
        };
        match self.matching_entry(ready, &names, digest).await {
            None => return false,
            Some(Some(sealed)) => {
                if ready.link.delete_if(&names.entry, &sealed).await.is_none() {
                    return false;
                }
            }
            Some(None) => {}
        }
        let message = ready.ring().sign(&format!(
            "v:{fingerprint}:{}:{}",
            self.instance,
            Self::stamp()
        ));
        ready.link.publish(&message).await.is_some()
    }

    /// The sealed entry at `names` when it is the token whose SHA-256 is `digest`;
    /// `Some(None)` when it is another token or none, `None` when Redis cannot tell.
    async fn matching_entry(
        &self,
        ready: &Ready,
        names: &Names,
        digest: &[u8; 32],
    ) -> Option<Option<Vec<u8>>> {
        let Some(sealed) = ready.link.get(&names.entry).await? else {
            return Some(None);
        };
        let stored = ready
            .ring()
            .open(&names.entry, &sealed)
            .ok()
            .and_then(|plain| serde_json::from_slice::<StoredToken>(&plain).ok());
        let matches = stored.is_some_and(|stored| {
            let held: [u8; 32] = Sha256::digest(stored.access_token.as_bytes()).into();
            bool::from(held.ct_eq(digest))
        });
        Some(matches.then_some(sealed))
    }

    /// The tier when connected, and the Redis names of `key`.
    fn ready_names(&self, key: &CacheKey) -> Option<(&Ready, Names)> {
        let ready = self.ready.get().filter(|ready| ready.link.is_up())?;
        let connection = self.connections.get(key.connection())?;
        Some((ready, self.names(connection, key)))
    }
}
