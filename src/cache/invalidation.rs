//! Verified invalidation: a caller whose backend refused a token asks for that token to be
//! dropped. Only the token cached for the key can be dropped (compared in constant time), so
//! a caller holding an older token cannot force a refresh; at most one invalidation per key
//! per `min_invalidation_interval_seconds` (fleet-wide with the shared tier), so a backend that
//! refuses every token cannot make the broker hammer its provider. The next request fetches a
//! new token through the cache's single flight, once for the fleet.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::memory::{CacheKey, TokenCache, fingerprint};
use super::shared::SharedTier;

/// The longest interval a connection may set: what the rate limit's memory is pruned by.
const LONGEST_INTERVAL: Duration = Duration::from_secs(3600);

/// What an invalidation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalidation {
    /// The token was the cached one and is dropped; `fleet` when every instance and the shared
    /// tier were told (false without a shared tier, or when Redis was unavailable).
    Dropped { fleet: bool },
    /// The token is not the one cached for the key: nothing is dropped.
    NotCurrent,
    /// The key was invalidated within its interval: nothing is dropped before `retry_after`.
    TooSoon { retry_after: Duration },
}

impl Invalidation {
    /// The `reason` an answer that dropped nothing gives.
    pub(crate) fn reason(&self) -> Option<&'static str> {
        match self {
            Invalidation::Dropped { .. } => None,
            Invalidation::NotCurrent => Some("not_current"),
            Invalidation::TooSoon { .. } => Some("too_soon"),
        }
    }
}

/// Invalidates cached tokens; see the module documentation.
pub(crate) struct Invalidator {
    cache: Arc<TokenCache>,
    shared: Option<Arc<SharedTier>>,
    /// When each key was last invalidated by this instance.
    recent: Mutex<HashMap<CacheKey, Instant>>,
}

impl Invalidator {
    pub(crate) fn new(cache: Arc<TokenCache>, shared: Option<Arc<SharedTier>>) -> Self {
        Self {
            cache,
            shared,
            recent: Mutex::default(),
        }
    }

    /// Drops `presented` if it is the token cached for `key`, at most once per `interval`.
    pub(crate) async fn invalidate(
        &self,
        key: &CacheKey,
        presented: &SecretString,
        interval: Duration,
    ) -> Invalidation {
        let digest: [u8; 32] = Sha256::digest(presented.expose_secret().as_bytes()).into();
        let in_memory = self.cache.current(key).is_some_and(|token| {
            let held: [u8; 32] =
                Sha256::digest(token.access_token.expose_secret().as_bytes()).into();
            bool::from(held.ct_eq(&digest))
        });
        let current = in_memory
            || match &self.shared {
                Some(shared) => shared.holds_token(key, &digest).await == Some(true),
                None => false,
            };
        if !current {
            return Invalidation::NotCurrent;
        }
        // The key's slot is taken under the lock, so that two concurrent invalidations of one
        // key cannot both drop; it is given back when the fleet refuses it.
        let now = Instant::now();
        {
            let mut recent = self.recent.lock();
            recent.retain(|_, at| now.duration_since(*at) < LONGEST_INTERVAL);
            if let Some(at) = recent.get(key)
                && now.duration_since(*at) < interval
            {
                return Invalidation::TooSoon {
                    retry_after: interval - now.duration_since(*at),
                };
            }
            recent.insert(key.clone(), now);
        }
        if let Some(shared) = &self.shared
            && let Some(Err(left)) = shared.claim_invalidation(key, interval).await
        {
            let mut recent = self.recent.lock();
            if recent.get(key) == Some(&now) {
                recent.remove(key);
            }
            return Invalidation::TooSoon { retry_after: left };
        }
        let fingerprint = fingerprint(presented.expose_secret());
        // Redis first: an instance that misses in memory after hearing of this must not find
        // the old token there.
        let fleet = match &self.shared {
            Some(shared) => shared.invalidate(key, &digest, &fingerprint).await,
            None => false,
        };
        self.cache.drop_token(Some(key), &fingerprint);
        Invalidation::Dropped { fleet }
    }

    /// Another instance invalidated the token with `fingerprint`: drop it from memory.
    pub(crate) fn announced(&self, fingerprint: &str) -> usize {
        self.cache.drop_token(None, fingerprint)
    }
}
