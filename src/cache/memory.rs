//! The memory tier: the reason the broker is as fast as a static response.
//!
//! Entries are keyed by connection and the sorted scope set. Each entry is refreshed in the
//! background once it is between half and three quarters through its life (jittered so that
//! many keys do not refresh together), while callers keep getting the cached token. A cold or
//! expired key is fetched exactly once however many callers ask at the same time: the fetch
//! is a spawned task whose result every waiter shares, so a caller that disconnects does not
//! cancel the fetch the others are waiting for.
//!
//! Nothing here can take the service down: lifetimes are clamped before any time arithmetic
//! (`token::clamp_lifetime`), the locks are `parking_lot` mutexes that do not poison, and a
//! panic inside a fetch becomes an `Internal` error for that fetch's waiters while the entry
//! stays usable for the next one.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use hashbrown::HashMap;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::hot::{self, Generation, LastUsed};
use crate::single_flight::Backoff;
use crate::token::{FreshToken, Hold, TokenError, clamp_lifetime};
pub(crate) use key::{CacheKey, Target};

mod key;

/// Delays between failed refreshes while the token in hand still serves (each also at most half
/// of what is left of it): 2 s, doubling, at most 64 s.
const REFRESH_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(2),
    max: Duration::from_secs(64),
};
/// Produces tokens for cache keys; the token client in production, a counting fake in tests.
pub(crate) trait TokenSource: Send + Sync + 'static {
    fn fetch(self: Arc<Self>, key: CacheKey) -> BoxFuture<'static, Result<FreshToken, TokenError>>;

    /// What holds this source off `connection`'s provider now, and for how much longer
    /// (see [`Hold`]): what the shared tier tells the other instances after a failed fetch.
    fn hold(&self, connection: &str) -> Option<(Hold, Duration)> {
        let _ = connection;
        None
    }

    /// `fetch`, ending by `finish_by` at the latest when given (a caller that already waited
    /// for another instance has less than a whole deadline left). A source that keeps its own
    /// deadline may ignore it.
    fn fetch_by(
        self: Arc<Self>,
        key: CacheKey,
        finish_by: Option<Instant>,
    ) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        let _ = finish_by;
        self.fetch(key)
    }
}

/// A token as the cache holds and hands it out.
pub struct CachedToken {
    /// Unique among the tokens this process has held: what a per-thread copy of this token's
    /// answer is keyed by (an address could be reused by a later token).
    pub id: u64,
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: Option<String>,
    /// When the token stops being valid (monotonic clock).
    pub expires_at: Instant,
    /// The same instant as unix seconds, for callers.
    pub expires_on: u64,
    /// First hex digits of SHA-256 of the token: lets an operator match audit lines to a
    /// token without the token ever being logged.
    pub fingerprint: String,
    /// After this the token is no longer handed out: a caller must have time to use it.
    usable_until: Instant,
    /// The answer's JSON up to `"expires_in":`, built once per token instead of once per
    /// request: escaping a kilobyte of token on every cache hit was the largest cost of the
    /// answer. It holds the token, so it is a secret like the token itself.
    answer_prefix: SecretSlice<u8>,
    /// The rest of the answer after the `expires_in` value (the scope, and the closing brace).
    answer_suffix: Box<[u8]>,
}

impl CachedToken {
    /// The cache's view of a fresh token issued at `now`, its lifetime clamped to the
    /// documented range first so that no instant below can overflow. Public for the fuzz
    /// target, which drives hostile token responses through it.
    pub fn new(fresh: FreshToken, now: Instant) -> Self {
        let lifetime = clamp_lifetime(fresh.lifetime);
        let margin = hand_out_margin(lifetime);
        let expires_on = SystemTime::now()
            .checked_add(lifetime)
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_secs());
        let (answer_prefix, answer_suffix) = answer_parts(
            &fresh.access_token,
            &fresh.token_type,
            expires_on,
            fresh.scope.as_deref(),
        );
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            fingerprint: fingerprint(fresh.access_token.expose_secret()),
            answer_prefix,
            answer_suffix,
            access_token: fresh.access_token,
            token_type: fresh.token_type,
            scope: fresh.scope,
            expires_at: later(now, lifetime),
            expires_on,
            usable_until: later(now, lifetime.saturating_sub(margin)),
        }
    }

    /// Whole seconds of life left at `now`, at least 1: a token is only handed out while it
    /// has more than `STALE_FLOOR` to live, but a caller that waited for a slow fetch may read
    /// it a moment later, and `0` would tell it the token is already dead.
    pub fn expires_in(&self, now: Instant) -> u64 {
        self.expires_at
            .saturating_duration_since(now)
            .as_secs()
            .max(1)
    }

    /// The answer's JSON around its one changing value, `expires_in`: prefix, then the
    /// number, then the suffix (`{"access_token":…,"token_type":…,"expires_on":…,
    /// "expires_in":N,"scope":…}`).
    pub fn answer_parts(&self) -> (&SecretSlice<u8>, &[u8]) {
        (&self.answer_prefix, &self.answer_suffix)
    }
}

/// Builds the fixed parts of a token's answer (see `CachedToken::answer_parts`). The one
/// place besides the fingerprint where the cache reads the token: to write the answer body.
fn answer_parts(
    token: &SecretString,
    token_type: &str,
    expires_on: u64,
    scope: Option<&str>,
) -> (SecretSlice<u8>, Box<[u8]>) {
    let json = |text: &str| serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string());
    let mut prefix = Vec::with_capacity(token.expose_secret().len() + 96);
    prefix.extend_from_slice(b"{\"access_token\":");
    prefix.extend_from_slice(json(token.expose_secret()).as_bytes());
    prefix.extend_from_slice(b",\"token_type\":");
    prefix.extend_from_slice(json(token_type).as_bytes());
    prefix.extend_from_slice(format!(",\"expires_on\":{expires_on},\"expires_in\":").as_bytes());
    let suffix = match scope {
        Some(scope) => format!(",\"scope\":{}}}", json(scope)),
        None => "}".to_string(),
    };
    (
        SecretSlice::from(prefix),
        suffix.into_bytes().into_boxed_slice(),
    )
}

/// How long before expiry a token of (clamped) `lifetime` stops being handed out, so it is
/// still valid when the caller presents it: a tenth of its life, at least 1 s and at most 30 s
/// (and never more than half of a very short life). The shared tier keeps an entry in Redis
/// exactly as long as that.
pub(crate) fn hand_out_margin(lifetime: Duration) -> Duration {
    (lifetime / 10)
        .clamp(Duration::from_secs(1), Duration::from_secs(30))
        .min(lifetime / 2)
}

/// `now + after`, or `now` far enough ahead when that would overflow the clock (it cannot with
/// clamped lifetimes; this keeps it so if a caller forgets).
fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(crate::token::MAX_LIFETIME))
        .unwrap_or(now)
}

/// SHA-256 of the token, first 12 hex digits.
pub(crate) fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(&digest[..6])
}

/// Whether a caller was served from memory or waited for the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheOutcome {
    Hit,
    /// Served from memory past its normal hand-out window (its last tenth of life, at most
    /// 30 s), because a refresh is failing or still in flight: still valid for at least 1 s.
    Stale,
    /// This caller's request started the fetch the answer came from.
    Miss,
    /// The answer came from a fetch another caller (or a background refresh) had started:
    /// with single flight, a cold burst is one `miss` and any number of `joined`.
    Joined,
}

impl CacheOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Joined => "joined",
        }
    }
}

type SharedFetch = Shared<BoxFuture<'static, Result<Arc<CachedToken>, Arc<TokenError>>>>;

/// The cache. Cheap to share: every method takes `&self`.
pub(crate) struct TokenCache {
    source: Arc<dyn TokenSource>,
    max_entries: usize,
    // A blocking mutex: held only for map look-ups and inserts, never across an await.
    // hashbrown's default hasher (foldhash), not SipHash: keys are configured names and
    // scopes, not attacker input (a caller can only name scopes from its connection's allowed
    // list), and a cache hit hashes one on every request.
    entries: Mutex<HashMap<CacheKey, Arc<Entry>>>,
    /// Advanced on every change to an entry: what the worker threads' lock-free copies of
    /// recent hits ([`hot`]) are checked against.
    generation: Arc<Generation>,
    /// Where `LastUsed` counts from.
    epoch: Instant,
    /// Whether a fetch's task runs in the span of the request that started it, so that its
    /// Key Vault and provider spans are that request's children (exported traces only).
    traced_fetches: bool,
}

struct Entry {
    // A blocking mutex for the same reason: every critical section is a few field updates.
    state: Mutex<EntryState>,
    /// Outside the lock: the lock-free hit path ([`hot`]) refreshes it too.
    last_used: Arc<LastUsed>,
}

struct EntryState {
    token: Option<Arc<CachedToken>>,
    refresh_at: Option<Instant>,
    fetch: Option<SharedFetch>,
    failed_refreshes: u32,
}

impl Entry {
    /// Made at `now`, so a new entry is never the "least recently used" one.
    fn new(epoch: Instant, now: Instant) -> Self {
        Self {
            state: Mutex::new(EntryState {
                token: None,
                refresh_at: None,
                fetch: None,
                failed_refreshes: 0,
            }),
            last_used: Arc::new(LastUsed::new(epoch, now)),
        }
    }
}

thread_local! {
    /// This worker thread's copy of the hits it handed out lately (see [`hot`]).
    static HOT_COPY: std::cell::RefCell<hot::Copy<CacheKey, CachedToken>> =
        std::cell::RefCell::default();
}

/// Past its normal window (refresh failing or in flight), a token is handed out only while it
/// has at least this long to live.
const STALE_FLOOR: Duration = Duration::from_secs(1);

impl TokenCache {
    pub(crate) fn new(source: Arc<dyn TokenSource>, max_entries: usize) -> Self {
        Self {
            source,
            max_entries: max_entries.max(1),
            entries: Mutex::default(),
            generation: Arc::new(Generation::new()),
            epoch: Instant::now(),
            traced_fetches: false,
        }
    }

    /// The same cache, its fetches in the span of the request that started them.
    pub(crate) fn with_traced_fetches(mut self, traced: bool) -> Self {
        self.traced_fetches = traced;
        self
    }

    /// `serve` applied to a token for `key` without taking a lock, when this worker thread
    /// handed one out lately and nothing changed since (see [`hot`]): always a `hit`.
    /// `None` when the caller must take the slow path, [`TokenCache::get`].
    pub(crate) fn serve_hit<R>(
        &self,
        key: &CacheKey,
        now: Instant,
        serve: impl FnOnce(&Arc<CachedToken>) -> R,
    ) -> Option<R> {
        hot::serve(&HOT_COPY, &self.generation, key, now, serve)
    }

    /// A token for `key`: from memory when one is usable, else from the shared fetch.
    pub(crate) async fn get(
        &self,
        key: &CacheKey,
    ) -> Result<(Arc<CachedToken>, CacheOutcome), Arc<TokenError>> {
        // Read before the entry: a change made after it empties what is remembered below.
        let seen = self.generation.now();
        let fetch = {
            // Looked up and read under the map's lock, without taking a reference of its own.
            let mut entries = self.entries.lock();
            let entry = self.entry(&mut entries, key);
            let mut state = entry.state.lock();
            let now = Instant::now();
            entry.last_used.touch(now);
            if let Some(token) = state.token.clone() {
                // Past its normal window, a token still valid is worth more than an error while
                // refreshing fails, and no caller waits while a refresh is in flight: both are
                // served, labelled `stale`, until the token has less than `STALE_FLOOR` left.
                let still_valid = token.expires_at.saturating_duration_since(now) > STALE_FLOOR;
                let outcome = if now < token.usable_until {
                    Some(CacheOutcome::Hit)
                } else if still_valid && (state.failed_refreshes > 0 || state.fetch.is_some()) {
                    Some(CacheOutcome::Stale)
                } else {
                    None
                };
                if let Some(outcome) = outcome {
                    let refresh_due = state.refresh_at.is_some_and(|at| now >= at);
                    if refresh_due && state.fetch.is_none() {
                        state.fetch = Some(self.spawn_fetch(entry, key));
                    }
                    if outcome == CacheOutcome::Hit && state.fetch.is_none() {
                        let fresh_until = state
                            .refresh_at
                            .map_or(token.usable_until, |at| at.min(token.usable_until));
                        let last_used = entry.last_used.clone();
                        drop(state);
                        drop(entries);
                        hot::remember(&HOT_COPY, seen, key, &token, fresh_until, &last_used, now);
                    }
                    return Ok((token, outcome));
                }
            }
            match &state.fetch {
                Some(fetch) => (fetch.clone(), CacheOutcome::Joined),
                None => {
                    let fetch = self.spawn_fetch(entry, key);
                    state.fetch = Some(fetch.clone());
                    (fetch, CacheOutcome::Miss)
                }
            }
        };
        let (fetch, outcome) = fetch;
        if outcome == CacheOutcome::Joined {
            // At DEBUG only (a cold burst writes one per caller): single flight made visible
            // while the fetch is still in flight, not only in the audit record afterwards.
            tracing::debug!(
                connection = key.connection(),
                "waiting for the token fetch in flight"
            );
        }
        fetch.await.map(|token| (token, outcome))
    }

    /// Drops every key of the given (lower-cased) connections; returns how many. A fetch in
    /// flight still completes for its waiters, but its result is not kept.
    pub(crate) fn evict_connections(&self, connections: &[&str]) -> usize {
        let mut entries = self.entries.lock();
        let before = entries.len();
        entries.retain(|key, _| !connections.contains(&key.connection()));
        self.generation.advance();
        before - entries.len()
    }

    /// The token held for `key`, whatever its window: what an invalidation compares with.
    pub(crate) fn current(&self, key: &CacheKey) -> Option<Arc<CachedToken>> {
        let entries = self.entries.lock();
        let entry = entries.get(key)?;
        entry.state.lock().token.clone()
    }

    /// Forgets the tokens whose fingerprint is `fingerprint` (of `key` only, when given), so
    /// that the next request fetches (a fetch in flight is kept: callers join it); returns
    /// how many were dropped.
    pub(crate) fn drop_token(&self, key: Option<&CacheKey>, fingerprint: &str) -> usize {
        let entries = self.entries.lock();
        let mut dropped = 0;
        let mut drop = |entry: &Entry| {
            let mut state = entry.state.lock();
            if state
                .token
                .as_ref()
                .is_some_and(|token| token.fingerprint == fingerprint)
            {
                state.token = None;
                state.refresh_at = None;
                state.failed_refreshes = 0;
                dropped += 1;
            }
        };
        match key {
            Some(key) => entries.get(key).into_iter().for_each(|entry| drop(entry)),
            None => entries.values().for_each(|entry| drop(entry)),
        }
        // The threads' copies of recent hits must look again.
        self.generation.advance();
        dropped
    }

    /// Number of keys held, for the tests of its bounds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// The entry for `key` in `entries` (the map, locked by the caller), made when absent.
    fn entry<'a>(
        &self,
        entries: &'a mut HashMap<CacheKey, Arc<Entry>>,
        key: &CacheKey,
    ) -> &'a Arc<Entry> {
        if entries.len() >= self.max_entries && !entries.contains_key(key) {
            evict(entries, self.max_entries - 1, Instant::now());
            self.generation.advance();
        }
        // One hash look-up on a hit; the key is cloned only when it is new.
        let epoch = self.epoch;
        entries
            .entry_ref(key)
            .or_insert_with(|| Arc::new(Entry::new(epoch, Instant::now())))
    }

    /// Starts the one fetch for `key` on its own task. Called with the entry's lock held, so
    /// the task cannot publish its result before the caller has stored the shared handle.
    fn spawn_fetch(&self, entry: &Arc<Entry>, key: &CacheKey) -> SharedFetch {
        let source = self.source.clone();
        let entry = entry.clone();
        let generation = self.generation.clone();
        let connection = key.connection().to_string();
        let key = key.clone();
        let span = if self.traced_fetches {
            tracing::Span::current()
        } else {
            tracing::Span::none()
        };
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let connection = key.connection().to_string();
                // A panic in the source must not leave `fetch` set (every later caller would get
                // the same failed result forever): it becomes an error like any other.
                let result = AssertUnwindSafe(source.fetch(key))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        tracing::error!(
                            connection = %connection,
                            panic = panic_message(panic.as_ref()),
                            "token fetch panicked"
                        );
                        Err(TokenError::Internal { connection })
                    });
                let now = Instant::now();
                let mut state = entry.state.lock();
                state.fetch = None;
                // Whatever follows changes the entry: the threads' copies must look again.
                generation.advance();
                match result {
                    Ok(fresh) => {
                        let refresh_in =
                            refresh_delay(clamp_lifetime(fresh.lifetime), fresh.refresh_in);
                        let token = Arc::new(CachedToken::new(fresh, now));
                        state.refresh_at = Some(later(now, refresh_in));
                        state.token = Some(token.clone());
                        state.failed_refreshes = 0;
                        Ok(token)
                    }
                    Err(error) => {
                        // Keep any token still usable; try the refresh again after a backoff
                        // that never reaches past the token's usable life.
                        state.failed_refreshes = state.failed_refreshes.saturating_add(1);
                        if let Some(token) = &state.token {
                            let remaining = token.expires_at.saturating_duration_since(now);
                            let backoff = REFRESH_BACKOFF.after(state.failed_refreshes);
                            let wait = backoff.min(remaining / 2).max(Duration::from_millis(500));
                            state.refresh_at = Some(later(now, wait));
                        }
                        Err(Arc::new(error))
                    }
                }
            },
            span,
        ));
        task.map(move |joined| {
            // The task catches panics itself; a join error means the runtime is shutting down.
            joined.unwrap_or_else(|_| Err(Arc::new(TokenError::Internal { connection })))
        })
        .boxed()
        .shared()
    }
}

/// The text of a panic payload, for the log.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// When to refresh a token of `lifetime`: Entra's `refresh_in` when it gave one, else at a
/// random point between half and three quarters of the lifetime.
/// A `refresh_in` below a tenth of the lifetime is raised to it, so that a provider's
/// `refresh_in: 1` cannot make the broker refresh every second.
pub(crate) fn refresh_delay(lifetime: Duration, refresh_in: Option<Duration>) -> Duration {
    if let Some(refresh_in) = refresh_in.filter(|r| !r.is_zero() && *r < lifetime) {
        return refresh_in.max(lifetime / 10);
    }
    lifetime.mul_f64(rand::random_range(0.5..0.75))
}

/// Shrinks the map to `target` keys: first keys with nothing usable and no fetch running, then
/// the least recently used of those with no fetch running. A key whose fetch is in flight is
/// never dropped: its waiters and the callers still to come must share that one fetch (single
/// flight). So the map may exceed its bound by the number of fetches in flight, which the
/// connections' deadlines keep short-lived.
fn evict(entries: &mut HashMap<CacheKey, Arc<Entry>>, target: usize, now: Instant) {
    entries.retain(|_, entry| {
        let state = entry.state.lock();
        state.fetch.is_some() || state.token.as_ref().is_some_and(|t| now < t.usable_until)
    });
    while entries.len() > target {
        let oldest = entries
            .iter()
            .filter_map(|(key, entry)| {
                let state = entry.state.lock();
                state
                    .fetch
                    .is_none()
                    .then_some((entry.last_used.get(), key))
            })
            .min_by_key(|(last_used, _)| *last_used)
            .map(|(_, key)| key.clone());
        match oldest {
            Some(key) => entries.remove(&key),
            None => break,
        };
    }
}

#[cfg(test)]
mod tests;
