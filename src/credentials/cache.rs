//! Key Vault objects kept in memory: client secrets, and the public metadata of signing keys
//! and certificates. One machinery for all three, so that they share the behaviour an
//! operator has learnt for secrets.
//!
//! Objects are read through the official Azure SDK with the Function App's managed identity
//! (or a developer's Azure CLI login on a laptop) and kept in memory for a TTL, as Microsoft's
//! guidance asks: Key Vault allows a few thousand transactions per 10 s per vault, and a broker
//! that read per request would throttle itself.
//!
//! When a re-read fails, the copy in memory keeps serving: a vault hiccup must not become an
//! outage. Re-reads with a copy in hand are bounded (`REREAD_WAIT`), made by one caller at a
//! time while the others use the copy, and after a failure backed off, so that a dead vault
//! never holds a token fetch up. A definitive refusal (object disabled or deleted, access
//! revoked) is different: the copy is used for `refusal_grace` after the first one, and
//! then no more.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::error::{CredentialError, ObjectKind};
use crate::single_flight::{Backoff, Leading, SingleFlight};

/// Longest a re-read may take while a copy is in memory; past it the copy is used.
const REREAD_WAIT: Duration = Duration::from_secs(2);
/// Backoff between failed re-reads while a copy serves. The vault's limit is shared by every
/// caller of the vault, so a sick vault is asked rarely.
const REREAD_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(5),
    max: Duration::from_secs(60),
};
/// Backoff between failed first reads (no copy: callers see the error meanwhile), shorter so
/// that a repaired vault or identity is noticed soon.
const COLD_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(30),
};

/// What the cache needs to know of an object: which Key Vault version it is, to tell whether a
/// re-read found a rotated one.
pub(crate) trait Versioned {
    fn version(&self) -> Option<&str>;
}

/// Objects of one kind, by Key Vault name, each read at most once per TTL.
pub(crate) struct VaultCache<T> {
    kind: ObjectKind,
    ttl: Duration,
    refusal_grace: Duration,
    /// One slot per Key Vault object name.
    slots: Mutex<HashMap<String, Arc<Slot<T>>>>,
}

/// One object: what is known of it, and the right to read it from Key Vault.
struct Slot<T> {
    /// A blocking mutex: held for field updates only, never across an await.
    state: Mutex<SlotState<T>>,
    /// The right to read it from Key Vault, so that concurrent readers of an object make one
    /// read; with a copy in memory, a caller that finds it taken uses the copy instead of
    /// waiting. Its count of settled reads is read under `state`'s lock.
    reading: SingleFlight,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(SlotState {
                cached: None,
                failures: 0,
                retry_at: None,
                refused_since: None,
                last_error: None,
            }),
            reading: SingleFlight::new(),
        }
    }
}

struct SlotState<T> {
    cached: Option<CachedObject<T>>,
    /// Consecutive failed re-reads, and when the next may be made.
    failures: u32,
    retry_at: Option<Instant>,
    /// When Key Vault first refused the object definitively since the last good read.
    refused_since: Option<Instant>,
    /// The last read's error, answered without a new read while backing off (no copy).
    last_error: Option<CredentialError>,
}

impl<T> SlotState<T> {
    /// The copy, when it is fresh: read within the TTL, not marked by a rotation event, and
    /// not refused by Key Vault since (a refusal seen by the rotation path must not be ignored
    /// until the TTL runs out).
    fn fresh(&self, ttl: Duration) -> Option<Arc<T>> {
        if self.refused_since.is_some() {
            return None;
        }
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

struct CachedObject<T> {
    /// The version Key Vault returned last.
    latest: Arc<T>,
    /// The version before it, kept through a rotation as a fallback.
    previous: Option<Arc<T>>,
    read_at: Instant,
    /// Set by a rotation event: read again before the next use.
    stale: bool,
}

impl<T: Versioned> VaultCache<T> {
    pub(crate) fn new(kind: ObjectKind, ttl: Duration, refusal_grace: Duration) -> Self {
        Self {
            kind,
            ttl,
            refusal_grace,
            slots: Mutex::default(),
        }
    }

    /// The object called `name`, from memory when fresh enough, else from `read`.
    pub(crate) async fn get<F, Fut>(&self, name: &str, read: F) -> Result<Arc<T>, CredentialError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, CredentialError>>,
    {
        let slot = self.slot(name);
        let (has_copy, seen) = {
            let state = slot.state.lock();
            if let Some(fresh) = state.fresh(self.ttl) {
                return Ok(fresh);
            }
            if state.backing_off() {
                if state.cached.is_some() {
                    return self.copy(name, &state, None);
                }
                if let Some(error) = &state.last_error {
                    return Err(error.clone());
                }
            }
            (state.cached.is_some(), slot.reading.seen())
        };
        if !has_copy {
            // Nothing to serve meanwhile: wait for the one read. A read that settled while
            // this caller waited is its answer too: callers never queue up reads one after
            // another, each burning its own deadline.
            let reading = slot.reading.lead().await;
            {
                let state = slot.state.lock();
                if let Some(fresh) = state.fresh(self.ttl) {
                    return Ok(fresh);
                }
                if reading.settled_since(seen)
                    && let Some(error) = &state.last_error
                {
                    return Err(error.clone());
                }
            }
            let result = read().await;
            return self.settle(name, &slot, &reading, result);
        }
        let Some(reading) = slot.reading.try_lead() else {
            // Another caller is re-reading; the copy serves until it is done.
            return self.copy(name, &slot.state.lock(), None);
        };
        if let Some(fresh) = slot.state.lock().fresh(self.ttl) {
            return Ok(fresh);
        }
        let result = match tokio::time::timeout(REREAD_WAIT, read()).await {
            Ok(result) => result,
            Err(_) => Err(CredentialError::Unavailable {
                kind: self.kind,
                name: name.to_string(),
                detail: format!("no answer within {}s", REREAD_WAIT.as_secs()),
            }),
        };
        self.settle(name, &slot, &reading, result)
    }

    /// Records the outcome of a read: a new copy, or a failure that backs re-reads off and,
    /// when there is a copy, is answered from it as long as `copy` allows.
    fn settle(
        &self,
        name: &str,
        slot: &Slot<T>,
        reading: &Leading<'_>,
        result: Result<T, CredentialError>,
    ) -> Result<Arc<T>, CredentialError> {
        let mut state = slot.state.lock();
        reading.settled();
        match result {
            Ok(object) => {
                state.failures = 0;
                state.retry_at = None;
                state.refused_since = None;
                state.last_error = None;
                Ok(self.remember(&mut state.cached, object))
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let backoff = if state.cached.is_some() {
                    REREAD_BACKOFF
                } else {
                    COLD_BACKOFF
                }
                .after(state.failures);
                state.retry_at = Some(Instant::now() + backoff);
                if error.is_definitive() && state.refused_since.is_none() {
                    state.refused_since = Some(Instant::now());
                }
                state.last_error = Some(error.clone());
                if state.cached.is_none() {
                    return Err(error);
                }
                self.copy(name, &state, Some(error))
            }
        }
    }

    /// The copy in memory, unless Key Vault refused the object definitively longer ago than
    /// the grace period: a disabled, deleted or revoked object stops being used.
    fn copy(
        &self,
        name: &str,
        state: &SlotState<T>,
        error: Option<CredentialError>,
    ) -> Result<Arc<T>, CredentialError> {
        let Some(entry) = state.cached.as_ref() else {
            return Err(error.unwrap_or(CredentialError::Unavailable {
                kind: self.kind,
                name: name.to_string(),
                detail: "no copy in memory".to_string(),
            }));
        };
        if let Some(since) = state.refused_since
            && since.elapsed() >= self.refusal_grace
        {
            tracing::warn!(
                object = self.kind.as_str(),
                name,
                grace_seconds = self.refusal_grace.as_secs(),
                "key vault refuses this object for longer than the grace period; no longer using the copy in memory"
            );
            return Err(error.unwrap_or(CredentialError::Forbidden {
                kind: self.kind,
                name: name.to_string(),
                code: "refused".to_string(),
            }));
        }
        if let Some(error) = error {
            tracing::warn!(
                object = self.kind.as_str(),
                name,
                reason = %error,
                retry_in_ms = state.retry_at.map_or(0, |at| at.saturating_duration_since(Instant::now()).as_millis() as u64),
                "key vault re-read failed; using the copy in memory"
            );
        }
        Ok(entry.latest.clone())
    }

    /// Called when the token endpoint refused the credential made from `rejected_version`:
    /// re-reads Key Vault at once and offers another version to try, the new one when the
    /// object was rotated, else the previous one (the identity provider may not accept the new
    /// one yet). `None` when there is nothing else to try.
    pub(crate) async fn after_rejection<F, Fut>(
        &self,
        name: &str,
        rejected_version: Option<&str>,
        read: F,
    ) -> Option<Arc<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, CredentialError>>,
    {
        let slot = self.slot(name);
        let reading = slot.reading.lead().await;
        // Read again unless re-reads are backing off; bounded like any re-read with a copy,
        // and settled the same way (backoff, refusal grace), so this path cannot hammer a sick
        // vault or eat the token fetch's deadline.
        if !slot.state.lock().backing_off() {
            let result = match tokio::time::timeout(REREAD_WAIT, read()).await {
                Ok(result) => result,
                Err(_) => Err(CredentialError::Unavailable {
                    kind: self.kind,
                    name: name.to_string(),
                    detail: format!("no answer within {}s", REREAD_WAIT.as_secs()),
                }),
            };
            if let Err(error) = self.settle(name, &slot, &reading, result) {
                tracing::warn!(object = self.kind.as_str(), name, reason = %error, "key vault re-read after a rejected credential failed");
                return None;
            }
        }
        let state = slot.state.lock();
        let entry = state.cached.as_ref()?;
        if entry.latest.version() != rejected_version {
            return Some(entry.latest.clone());
        }
        entry
            .previous
            .as_ref()
            .filter(|previous| previous.version() != rejected_version)
            .cloned()
    }

    /// Makes the next use of `name` go to Key Vault (a rotation event arrived); the versions
    /// already known stay available as fallbacks. Returns whether it was cached.
    pub(crate) fn invalidate(&self, name: &str) -> bool {
        let Some(slot) = self.slots.lock().get(&name.to_ascii_lowercase()).cloned() else {
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

    /// Records a fresh read, keeping the version it replaces as `previous`.
    fn remember(&self, cached: &mut Option<CachedObject<T>>, object: T) -> Arc<T> {
        let object = Arc::new(object);
        let previous = match cached.take() {
            Some(old) if old.latest.version() != object.version() => {
                tracing::info!(
                    object = self.kind.as_str(),
                    from = old.latest.version().unwrap_or("unknown"),
                    to = object.version().unwrap_or("unknown"),
                    "key vault object has a new version"
                );
                Some(old.latest)
            }
            Some(old) => old.previous,
            None => None,
        };
        *cached = Some(CachedObject {
            latest: object.clone(),
            previous,
            read_at: Instant::now(),
            stale: false,
        });
        object
    }

    fn slot(&self, name: &str) -> Arc<Slot<T>> {
        // Held only to look up or insert the slot, never across an await.
        self.slots
            .lock()
            // Key Vault names are case-insensitive: one slot per object, however spelled.
            .entry(name.to_ascii_lowercase())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Object;

    impl Versioned for Object {
        fn version(&self) -> Option<&str> {
            Some("1")
        }
    }

    fn cache(grace: Duration) -> VaultCache<Object> {
        VaultCache::new(ObjectKind::Secret, Duration::from_secs(300), grace)
    }

    fn reads(cache: &VaultCache<Object>, name: &str) -> u64 {
        cache.slot(name).reading.loads()
    }

    async fn failing() -> Result<Object, CredentialError> {
        Err(CredentialError::NoVault)
    }

    #[tokio::test(start_paused = true)]
    async fn failed_first_reads_back_off_and_waiters_share_one_read() {
        let cache = Arc::new(cache(Duration::from_secs(300)));
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("s", failing).await.map(|_| ()) })
            })
            .collect();
        for caller in callers {
            assert!(matches!(
                caller.await.unwrap(),
                Err(CredentialError::NoVault)
            ));
        }
        assert_eq!(reads(&cache, "s"), 1, "twenty concurrent callers, one read");
        for _ in 0..10 {
            assert!(cache.get("S", failing).await.is_err());
        }
        assert_eq!(
            reads(&cache, "s"),
            1,
            "within the backoff, no read (any spelling)"
        );
        tokio::time::advance(COLD_BACKOFF.first).await;
        assert!(cache.get("s", failing).await.is_err());
        assert_eq!(reads(&cache, "s"), 2, "after the backoff, one more");
        tokio::time::advance(COLD_BACKOFF.first).await;
        assert!(cache.get("s", failing).await.is_err());
        assert_eq!(reads(&cache, "s"), 2, "the backoff doubles");
        tokio::time::advance(COLD_BACKOFF.first).await;
        assert!(cache.get("s", failing).await.is_err());
        assert_eq!(reads(&cache, "s"), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_definitive_refusal_serves_the_copy_only_within_the_grace_period() {
        let grace = Duration::from_secs(120);
        let cache = cache(grace);
        assert!(cache.get("s", || async { Ok(Object) }).await.is_ok());
        let slot = cache.slot("s");
        let refusal = CredentialError::Forbidden {
            kind: ObjectKind::Secret,
            name: "s".into(),
            code: "Forbidden/SecretDisabled".into(),
        };
        assert!(
            cache
                .settle("s", &slot, &slot.reading.lead().await, Err(refusal))
                .is_ok(),
            "within the grace"
        );
        tokio::time::advance(grace - Duration::from_secs(1)).await;
        assert!(
            cache.get("s", failing).await.is_ok(),
            "still within the grace"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            cache.get("s", failing).await.is_err(),
            "past the grace the copy is no longer used"
        );
        // A vault that merely does not answer never ends the copy's use.
        assert!(cache.get("t", || async { Ok(Object) }).await.is_ok());
        let slot = cache.slot("t");
        let outage = || CredentialError::Unavailable {
            kind: ObjectKind::Secret,
            name: "t".into(),
            detail: "HTTP 503".into(),
        };
        let reading = slot.reading.lead().await;
        assert!(cache.settle("t", &slot, &reading, Err(outage())).is_ok());
        tokio::time::advance(grace * 10).await;
        assert!(cache.settle("t", &slot, &reading, Err(outage())).is_ok());
    }
}
