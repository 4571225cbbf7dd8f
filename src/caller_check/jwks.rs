//! The issuer's signing keys (JWKS), downloaded once and shared, so that no burst of callers,
//! whether cold or presenting made-up key ids, turns into a burst of downloads or a queue.
//!
//! - Cold (no keys yet): callers must wait for keys, so they wait for *one* download. The
//!   first takes the download lock; the others wait for it and then re-check under the lock,
//!   using that download's result instead of starting their own.
//! - An unknown `kid` (how key rotation shows) reloads at most once per
//!   [`UNKNOWN_KID_RELOAD_INTERVAL`], and only by the caller that finds no reload running:
//!   everyone else is answered at once (401) rather than queued behind it.
//! - Keys older than [`MAX_AGE`] are refreshed in the background while callers keep using them.
//! - A failed download backs off (doubling up to [`MAX_BACKOFF`]) and keeps the keys held;
//!   with no keys at all callers get [`KeyError::Unavailable`] at once during the backoff.
//! - Bodies are bounded ([`MAX_BODY_BYTES`]) and key URLs must be https (http on loopback only).

use crate::observe::stats::Registry;
use crate::single_flight::{Backoff, Leading, Seen, SingleFlight};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::EndpointUrl;
use crate::http_client::LazyClient;

/// Keys are re-read at least this often even when every `kid` is known.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(3600);
/// Shortest time between two reloads caused by unknown key ids: bounds what made-up `kid`s
/// can make the broker do, while a real rotation is noticed within seconds.
pub(crate) const UNKNOWN_KID_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// Backoff after the first failed download; doubles with each further failure.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff between failed downloads.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Largest discovery document or key set read. Entra's key set is a few KiB.
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;
/// Bound on one download (discovery and key set together), so cold callers wait that long at
/// most.
pub(crate) const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(5);

/// Why no key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// The keys held do not include this `kid`, and no reload is due.
    UnknownKid,
    /// No keys are held and none can be downloaded now.
    Unavailable { retry_after: Duration },
}

/// Where keys come from: the issuer over HTTP, or a fake in unit tests.
pub(crate) trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> impl Future<Output = Result<JwkSet, String>> + Send;
}

/// The key set and the bookkeeping that decides when to download it again.
pub(crate) struct KeyStore<S> {
    source: S,
    /// Where downloads are counted (`jwks_reloads`, `jwks_failures`).
    stats: Arc<Registry>,
    state: Mutex<State>,
    /// The right to download: one at a time, and a holder is a download in flight. Its count
    /// of settled downloads is read under `state`'s lock.
    download: SingleFlight,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<JwkSet>>,
    fetched_at: Option<Instant>,
    consecutive_failures: u32,
    retry_not_before: Option<Instant>,
    last_unknown_kid_reload: Option<Instant>,
}

impl State {
    fn backoff_left(&self, now: Instant) -> Option<Duration> {
        self.retry_not_before
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    fn find(&self, kid: &str) -> Option<Jwk> {
        self.keys.as_ref()?.find(kid).cloned()
    }
}

impl<S: KeySource> KeyStore<S> {
    pub(crate) fn new(source: S, stats: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            source,
            stats,
            state: Mutex::new(State::default()),
            download: SingleFlight::new(),
        })
    }

    /// The state; nothing that can panic runs under this lock, but a poisoned one is still
    /// sound to use, and a caller check must never take the service down.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key `kid` names.
    pub(crate) async fn key(self: &Arc<Self>, kid: &str) -> Result<Jwk, KeyError> {
        let now = Instant::now();
        let (seen, has_keys) = {
            let state = self.state();
            if let Some(jwk) = state.find(kid) {
                let stale = state.fetched_at.is_none_or(|at| now - at >= MAX_AGE);
                if stale && state.backoff_left(now).is_none() {
                    self.refresh_in_background();
                }
                return Ok(jwk);
            }
            if state.keys.is_some() {
                let recent = state
                    .last_unknown_kid_reload
                    .is_some_and(|at| now - at < UNKNOWN_KID_RELOAD_INTERVAL);
                if recent || state.backoff_left(now).is_some() {
                    return Err(KeyError::UnknownKid);
                }
            } else if let Some(retry_after) = state.backoff_left(now) {
                return Err(KeyError::Unavailable { retry_after });
            }
            (self.download.seen(), state.keys.is_some())
        };
        if has_keys {
            self.reload_for_unknown_kid(kid, seen).await
        } else {
            self.first_keys(kid, seen).await
        }
    }

    /// Keys held, `kid` not among them: reload unless a reload is running or was just made.
    async fn reload_for_unknown_kid(&self, kid: &str, seen: Seen) -> Result<Jwk, KeyError> {
        let Some(download) = self.download.try_lead() else {
            return Err(KeyError::UnknownKid);
        };
        {
            let mut state = self.state();
            if download.settled_since(seen) {
                // A download finished since we looked: its keys are as fresh as ours would be.
                return state.find(kid).ok_or(KeyError::UnknownKid);
            }
            let now = Instant::now();
            if state
                .last_unknown_kid_reload
                .is_some_and(|at| now - at < UNKNOWN_KID_RELOAD_INTERVAL)
            {
                return Err(KeyError::UnknownKid);
            }
            state.last_unknown_kid_reload = Some(now);
        }
        tracing::info!("a caller token names an unknown signing key; reloading the key set");
        self.download_now(&download).await;
        self.state().find(kid).ok_or(KeyError::UnknownKid)
    }

    /// No keys yet: wait for the one download in flight, or make it.
    async fn first_keys(&self, kid: &str, seen: Seen) -> Result<Jwk, KeyError> {
        let download = self.download.lead().await;
        if !download.settled_since(seen) {
            self.download_now(&download).await;
        }
        let state = self.state();
        match &state.keys {
            Some(_) => state.find(kid).ok_or(KeyError::UnknownKid),
            None => Err(KeyError::Unavailable {
                retry_after: state.backoff_left(Instant::now()).unwrap_or(FIRST_BACKOFF),
            }),
        }
    }

    /// Refreshes aged keys on a task of its own, so that no caller waits for it.
    fn refresh_in_background(self: &Arc<Self>) {
        let store = self.clone();
        tokio::spawn(async move {
            let Some(download) = store.download.try_lead() else {
                return;
            };
            let due = {
                let state = store.state();
                let now = Instant::now();
                state.fetched_at.is_none_or(|at| now - at >= MAX_AGE)
                    && state.backoff_left(now).is_none()
            };
            if due {
                store.download_now(&download).await;
            }
        });
    }

    /// Downloads once and records the outcome, with the right to download in hand.
    async fn download_now(&self, download: &Leading<'_>) {
        let result = match self.source.fetch().await {
            Ok(set) if set.keys.is_empty() => Err("the key set holds no keys".to_string()),
            other => other,
        };
        self.stats.record_jwks_reload(result.is_ok());
        let mut state = self.state();
        let now = Instant::now();
        download.settled();
        match result {
            Ok(set) => {
                tracing::info!(
                    keys = set.keys.len(),
                    "downloaded caller token signing keys"
                );
                state.keys = Some(Arc::new(set));
                state.fetched_at = Some(now);
                state.consecutive_failures = 0;
                state.retry_not_before = None;
            }
            Err(reason) => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                let backoff = Backoff {
                    first: FIRST_BACKOFF,
                    max: MAX_BACKOFF,
                }
                .after(state.consecutive_failures);
                state.retry_not_before = Some(now + backoff);
                tracing::warn!(
                    %reason,
                    backoff_seconds = backoff.as_secs(),
                    keeping_held_keys = state.keys.is_some(),
                    "cannot download caller token signing keys"
                );
            }
        }
    }
}

/// The issuer's keys over HTTP: from the configured `jwks_uri`, else from the URL the first
/// issuer's OpenID discovery document names.
pub(crate) struct HttpKeySource {
    http: Arc<LazyClient>,
    discovery_url: String,
    configured_jwks_uri: Option<EndpointUrl>,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

impl HttpKeySource {
    pub(crate) fn new(
        http: Arc<LazyClient>,
        issuer: &str,
        configured_jwks_uri: Option<EndpointUrl>,
    ) -> Self {
        Self {
            http,
            discovery_url: format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            ),
            configured_jwks_uri,
        }
    }

    async fn download(&self) -> Result<JwkSet, String> {
        let jwks_uri = match &self.configured_jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let discovery: Discovery = self.get_json(&self.discovery_url).await?;
                // Keys read over plain http could be anyone's: the discovered URL must be an
                // endpoint the configuration would accept (https, or http on loopback).
                EndpointUrl::parse(&discovery.jwks_uri).map_err(|problem| {
                    format!(
                        "{} names a jwks_uri that is refused: it {problem}",
                        self.discovery_url
                    )
                })?
            }
        };
        self.get_json(jwks_uri.as_str()).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let http = self.http.get().map_err(str::to_string)?;
        let mut response = http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|_| format!("{url} unreachable"))?;
        if !response.status().is_success() {
            return Err(format!(
                "{url} answered HTTP {}",
                response.status().as_u16()
            ));
        }
        let too_large = || format!("{url} answered more than {MAX_BODY_BYTES} bytes");
        if response
            .content_length()
            .is_some_and(|length| length > MAX_BODY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|_| format!("{url} answer incomplete"))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|_| format!("{url} answer is not the expected JSON"))
    }
}

impl KeySource for HttpKeySource {
    async fn fetch(&self) -> Result<JwkSet, String> {
        tokio::time::timeout(DOWNLOAD_DEADLINE, self.download())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no key set within {} s",
                    DOWNLOAD_DEADLINE.as_secs()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures_util::future::join_all;

    use super::*;

    /// A key source that takes 100 ms per download, counts them, and fails when told to.
    #[derive(Default)]
    struct FakeSource {
        downloads: AtomicUsize,
        failing: AtomicBool,
        kids: Mutex<Vec<String>>,
    }

    const LATENCY: Duration = Duration::from_millis(100);

    impl KeySource for Arc<FakeSource> {
        async fn fetch(&self) -> Result<JwkSet, String> {
            self.downloads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(LATENCY).await;
            if self.failing.load(Ordering::SeqCst) {
                return Err("down".to_string());
            }
            let keys: Vec<serde_json::Value> = self
                .kids
                .lock()
                .unwrap()
                .iter()
                .map(|kid| {
                    serde_json::json!({"kty": "oct", "kid": kid, "k": "c2VjcmV0", "alg": "HS256"})
                })
                .collect();
            Ok(serde_json::from_value(serde_json::json!({ "keys": keys })).unwrap())
        }
    }

    fn store(kids: &[&str]) -> (Arc<FakeSource>, Arc<KeyStore<Arc<FakeSource>>>) {
        let source = Arc::new(FakeSource::default());
        *source.kids.lock().unwrap() = kids.iter().map(|k| k.to_string()).collect();
        (source.clone(), KeyStore::new(source, Default::default()))
    }

    fn downloads(source: &FakeSource) -> usize {
        source.downloads.load(Ordering::SeqCst)
    }

    /// Looks `kid` up, returning the result and how long the lookup took.
    async fn timed(
        store: &Arc<KeyStore<Arc<FakeSource>>>,
        kid: &str,
    ) -> (Result<Jwk, KeyError>, Duration) {
        let start = Instant::now();
        let result = store.key(kid).await;
        (result, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn forty_cold_lookups_share_one_download() {
        let (source, store) = store(&["k1"]);
        let results = join_all((0..40).map(|_| timed(&store, "k1"))).await;
        assert_eq!(downloads(&source), 1);
        for (result, waited) in results {
            assert!(result.is_ok());
            assert_eq!(waited, LATENCY, "each waited for the one download only");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kids_cause_one_reload_and_nobody_queues_behind_it() {
        let (source, store) = store(&["k1"]);
        store.key("k1").await.unwrap();
        let results = join_all((0..20).map(|i| {
            let store = store.clone();
            async move { timed(&store, &format!("made-up-{i}")).await }
        }))
        .await;
        assert_eq!(downloads(&source), 2, "the first load and one reload");
        let waited: Vec<Duration> = results.iter().map(|(_, waited)| *waited).collect();
        assert!(results.iter().all(|(r, _)| *r == Err(KeyError::UnknownKid)));
        assert_eq!(
            waited.iter().filter(|w| w.is_zero()).count(),
            19,
            "only the caller that reloads waits: {waited:?}"
        );
        // Within the interval, a further unknown kid is refused without a download.
        tokio::time::advance(UNKNOWN_KID_RELOAD_INTERVAL / 2).await;
        assert_eq!(timed(&store, "made-up").await.1, Duration::ZERO);
        assert_eq!(downloads(&source), 2);
        // After it, a rotated-in key is found by one reload.
        source.kids.lock().unwrap().push("k2".to_string());
        tokio::time::advance(UNKNOWN_KID_RELOAD_INTERVAL).await;
        assert!(store.key("k2").await.is_ok());
        assert_eq!(downloads(&source), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_read_again_in_the_background_every_hour_and_not_before() {
        let (source, store) = store(&["k1"]);
        store.key("k1").await.unwrap();
        for hour in 1..=2 {
            // No earlier than the keys were last read.
            let read_at = Instant::now();
            // A key rotated in at the issuer; the broker learns of it only by reading again.
            let rotated_in = format!("k{}", hour + 1);
            source.kids.lock().unwrap().push(rotated_in.clone());
            // A second short of an hour: lookups answer from the keys held and read nothing.
            tokio::time::advance(MAX_AGE - Duration::from_secs(1)).await;
            for _ in 0..10 {
                assert_eq!(timed(&store, "k1").await.1, Duration::ZERO);
            }
            tokio::time::sleep(LATENCY * 2).await;
            assert_eq!(downloads(&source), hour, "no download before the hour");
            // The hour is up: the next lookup still answers at once from the keys held, and
            // starts one download in the background, whatever the number of lookups.
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(read_at.elapsed() >= MAX_AGE);
            for _ in 0..10 {
                let (result, waited) = timed(&store, "k1").await;
                assert!(result.is_ok());
                assert_eq!(waited, Duration::ZERO, "no caller waits for the re-read");
            }
            tokio::time::sleep(LATENCY * 2).await;
            assert_eq!(downloads(&source), hour + 1, "one re-read after the hour");
            // The re-read brought the rotated-in key: found without a reload of its own.
            assert!(store.key(&rotated_in).await.is_ok());
            assert_eq!(downloads(&source), hour + 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_download_backs_off_and_keeps_the_keys_held() {
        let (source, store) = store(&["k1"]);
        store.key("k1").await.unwrap();
        source.failing.store(true, Ordering::SeqCst);
        assert_eq!(store.key("k2").await, Err(KeyError::UnknownKid));
        assert_eq!(downloads(&source), 2);
        // The held key still serves.
        assert!(store.key("k1").await.is_ok());
        // Aged keys are refreshed in the background, but not during the backoff; then once.
        tokio::time::advance(MAX_AGE).await;
        assert!(store.key("k1").await.is_ok(), "aged keys still serve");
        tokio::time::sleep(LATENCY * 2).await;
        assert_eq!(downloads(&source), 3, "one background refresh");
        assert!(store.key("k1").await.is_ok());
        tokio::time::sleep(LATENCY * 2).await;
        assert_eq!(downloads(&source), 3, "no refresh during the backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn without_keys_a_failure_is_shared_and_then_answered_at_once_until_the_backoff_ends() {
        let (source, store) = store(&["k1"]);
        source.failing.store(true, Ordering::SeqCst);
        let results = join_all((0..10).map(|_| timed(&store, "k1"))).await;
        assert_eq!(downloads(&source), 1, "waiters share the failed download");
        assert!(
            results
                .iter()
                .all(|(r, _)| matches!(r, Err(KeyError::Unavailable { .. })))
        );
        let (result, waited) = timed(&store, "k1").await;
        assert_eq!(
            result,
            Err(KeyError::Unavailable {
                retry_after: FIRST_BACKOFF
            })
        );
        assert!(waited.is_zero());
        assert_eq!(downloads(&source), 1);
        // After the backoff the next caller tries again, and the backoff doubles on failure.
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(store.key("k1").await.is_err());
        assert_eq!(downloads(&source), 2);
        assert_eq!(
            store.key("k1").await,
            Err(KeyError::Unavailable {
                retry_after: FIRST_BACKOFF * 2
            })
        );
        source.failing.store(false, Ordering::SeqCst);
        tokio::time::advance(FIRST_BACKOFF * 2).await;
        assert!(store.key("k1").await.is_ok());
        assert_eq!(downloads(&source), 3);
    }
}
