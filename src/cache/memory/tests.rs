//! Unit tests of `memory`.

use super::*;
use crate::config::{ConnectionName, ScopeToken};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Semaphore;

/// A key of connection `c` with `scopes`.
fn key_of<'a>(scopes: impl IntoIterator<Item = &'a str>) -> CacheKey {
    let connection = ConnectionName::parse("c").unwrap();
    CacheKey::new(
        &connection,
        scopes.into_iter().map(|s| ScopeToken::parse(s).unwrap()),
    )
}

/// Counts fetches and hands out numbered tokens; `gate` lets a test hold a fetch open.
struct CountingSource {
    fetches: AtomicUsize,
    lifetime: Duration,
    gate: Arc<Semaphore>,
    fail: std::sync::atomic::AtomicBool,
    panic: std::sync::atomic::AtomicBool,
}

impl CountingSource {
    fn new(lifetime: Duration, open: bool) -> Arc<Self> {
        Arc::new(Self {
            fetches: AtomicUsize::new(0),
            lifetime,
            gate: Arc::new(Semaphore::new(if open {
                Semaphore::MAX_PERMITS
            } else {
                0
            })),
            fail: Default::default(),
            panic: Default::default(),
        })
    }
    fn count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl TokenSource for CountingSource {
    fn fetch(
        self: Arc<Self>,
        _key: CacheKey,
    ) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        Box::pin(async move {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            let _permit = self.gate.acquire().await.expect("gate closed");
            if self.panic.load(Ordering::SeqCst) {
                panic!("a bug in the token source");
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(TokenError::Unavailable {
                    connection: "c".into(),
                    detail: "down".into(),
                    retry_after: None,
                });
            }
            Ok(FreshToken {
                access_token: SecretString::from(format!("token-{n}")),
                token_type: "bearer".into(),
                lifetime: self.lifetime,
                refresh_in: None,
                scope: None,
            })
        })
    }
}

fn token_text(token: &CachedToken) -> &str {
    token.access_token.expose_secret()
}

#[tokio::test(start_paused = true)]
async fn many_concurrent_callers_for_a_cold_key_cause_one_fetch() {
    let source = CountingSource::new(Duration::from_secs(3600), false);
    let cache = Arc::new(TokenCache::new(source.clone(), 16));
    let key = key_of(["b", "a"]);
    let callers: Vec<_> = (0..500)
        .map(|_| {
            let cache = cache.clone();
            let key = key.clone();
            tokio::spawn(async move { cache.get(&key).await })
        })
        .collect();
    wait_until_idle().await;
    assert_eq!(source.count(), 1, "every caller is waiting on one fetch");
    source.gate.add_permits(1);
    let (mut misses, mut joined) = (0, 0);
    for caller in callers {
        let (token, outcome) = caller.await.unwrap().unwrap();
        assert_eq!(token_text(&token), "token-1");
        match outcome {
            CacheOutcome::Miss => misses += 1,
            CacheOutcome::Joined => joined += 1,
            other => panic!("{other:?}: every caller came while the fetch was held"),
        }
    }
    assert_eq!(
        (misses, joined),
        (1, 499),
        "one caller started the fetch; 499 joined it"
    );
    assert_eq!(source.count(), 1);
    let (_, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(source.count(), 1);
}

/// Returns once every task has run until it waits: on the paused clock a timer fires only
/// when the runtime has nothing else to do, so this is a fact of the run, not a guess.
async fn wait_until_idle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn scope_order_and_duplicates_do_not_make_a_new_key() {
    let a = key_of(["x", "y"]);
    let b = key_of(["y", "x", "x"]);
    assert_eq!(a, b);
}

#[tokio::test(start_paused = true)]
async fn a_token_is_refreshed_in_the_background_while_callers_get_the_cached_one() {
    let source = CountingSource::new(Duration::from_secs(100), true);
    let cache = TokenCache::new(source.clone(), 16);
    let key = key_of([]);
    let (first, _) = cache.get(&key).await.unwrap();
    assert_eq!(token_text(&first), "token-1");

    // Close the gate so the refresh, once started, cannot finish.
    source.gate.forget_permits(Semaphore::MAX_PERMITS);
    // Past three quarters of the life, a refresh is due whatever the jitter chose.
    tokio::time::advance(Duration::from_secs(76)).await;
    for _ in 0..100 {
        let (token, outcome) = cache.get(&key).await.unwrap();
        assert_eq!(
            outcome,
            CacheOutcome::Hit,
            "no caller waits for the refresh"
        );
        assert_eq!(token_text(&token), "token-1");
    }
    wait_until_idle().await;
    assert_eq!(
        source.count(),
        2,
        "exactly one refresh started for 100 callers"
    );

    source.gate.add_permits(1);
    wait_until_idle().await;
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(
        (token_text(&token), outcome),
        ("token-2", CacheOutcome::Hit)
    );
    assert_eq!(source.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_serving_the_cached_token_until_it_expires() {
    let source = CountingSource::new(Duration::from_secs(100), true);
    let cache = TokenCache::new(source.clone(), 16);
    let key = key_of([]);
    cache.get(&key).await.unwrap();
    source.fail.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(80)).await;
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(
        (token_text(&token), outcome),
        ("token-1", CacheOutcome::Hit)
    );
    settle(&source, 2).await;
    // Many callers within the backoff (2 s after the first failure) start no refresh.
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..50 {
        cache.get(&key).await.unwrap();
    }
    wait_until_idle().await;
    assert_eq!(source.count(), 2, "refreshes are spaced by backoff");
    // Past the normal hand-out window (100 s less a 10 s margin) but before expiry, the
    // failing refresh means the token is served stale rather than replaced by an error.
    tokio::time::advance(Duration::from_secs(14)).await;
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(
        (token_text(&token), outcome),
        ("token-1", CacheOutcome::Stale)
    );
    assert!(token.expires_in(Instant::now()) >= 1);
    settle(&source, 3).await;
    // At expiry the caller waits for a fetch, which fails.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(cache.get(&key).await.is_err());
    assert_eq!(
        source.count(),
        4,
        "one first fetch, two spaced refreshes, one at expiry"
    );
}

/// Waits until every task is idle (fetches finished or held at the gate), then checks
/// that the source has seen `count` fetches.
async fn settle(source: &CountingSource, count: usize) {
    wait_until_idle().await;
    assert_eq!(source.count(), count);
}

#[tokio::test(start_paused = true)]
async fn a_never_expiring_token_is_clamped_and_does_not_panic() {
    for lifetime in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::from_secs(i64::MAX as u64),
    ] {
        let source = CountingSource::new(lifetime, true);
        let cache = TokenCache::new(source.clone(), 16);
        let key = key_of([]);
        let (token, outcome) = cache.get(&key).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        let left = token.expires_in(Instant::now());
        assert!(
            left > 0 && left <= crate::token::MAX_LIFETIME.as_secs(),
            "{left}"
        );
        let (_, outcome) = cache.get(&key).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Hit);
        // A day later the clamped token has expired and is fetched again.
        tokio::time::advance(crate::token::MAX_LIFETIME).await;
        let (_, outcome) = cache.get(&key).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_fetch_is_an_internal_error_and_the_key_recovers() {
    let source = CountingSource::new(Duration::from_secs(3600), true);
    let cache = TokenCache::new(source.clone(), 16);
    let key = key_of([]);
    source.panic.store(true, Ordering::SeqCst);
    let error = cache.get(&key).await.err().expect("a panic is an error");
    assert!(
        matches!(error.as_ref(), TokenError::Internal { .. }),
        "{error:?}"
    );
    source.panic.store(false, Ordering::SeqCst);
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(
        (token_text(&token), outcome),
        ("token-2", CacheOutcome::Miss)
    );
}

#[tokio::test(start_paused = true)]
async fn a_refresh_in_flight_serves_the_last_tenth_of_life_as_stale() {
    let source = CountingSource::new(Duration::from_secs(100), true);
    let cache = TokenCache::new(source.clone(), 16);
    let key = key_of([]);
    cache.get(&key).await.unwrap();
    source.gate.forget_permits(Semaphore::MAX_PERMITS);
    tokio::time::advance(Duration::from_secs(80)).await;
    let (_, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    // The refresh is held open; past the hand-out window (90 s) callers still do not wait.
    tokio::time::advance(Duration::from_secs(12)).await;
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(
        (token_text(&token), outcome),
        ("token-1", CacheOutcome::Stale)
    );
    assert_eq!(source.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn churn_at_the_bound_never_evicts_a_key_whose_fetch_is_in_flight() {
    let source = CountingSource::new(Duration::from_secs(3600), false);
    let cache = Arc::new(TokenCache::new(source.clone(), 2));
    let get = |key: CacheKey| {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get(&key)
                .await
                .map(|(t, outcome)| (token_text(&t).to_string(), outcome))
        })
    };
    let first = get(key_of(["a"]));
    settle(&source, 1).await;
    let others: Vec<_> = (0..5)
        .map(|n| get(key_of([format!("other-{n}").as_str()])))
        .collect();
    settle(&source, 6).await;
    // The key's entry survived five inserts past the bound: this caller joins its fetch.
    let second = get(key_of(["a"]));
    wait_until_idle().await;
    assert_eq!(source.count(), 6, "no second fetch for a key in flight");
    source.gate.add_permits(Semaphore::MAX_PERMITS);
    let (first, second) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert_eq!(first.0, second.0);
    assert_eq!(
        (first.1, second.1),
        (CacheOutcome::Miss, CacheOutcome::Joined)
    );
    for other in others {
        other.await.unwrap().unwrap();
    }
    // Once nothing is in flight, the bound holds again at the next insert.
    cache.get(&key_of(["late"])).await.unwrap();
    assert_eq!(cache.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_is_never_handed_out() {
    let source = CountingSource::new(Duration::from_secs(10), true);
    let cache = TokenCache::new(source.clone(), 16);
    let key = key_of([]);
    cache.get(&key).await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Miss);
    assert!(token.expires_in(Instant::now()) > 0);
}

#[tokio::test(start_paused = true)]
async fn the_cache_holds_at_most_its_bound() {
    let source = CountingSource::new(Duration::from_secs(3600), true);
    let cache = TokenCache::new(source.clone(), 8);
    for n in 0..50 {
        cache
            .get(&key_of([format!("scope-{n}").as_str()]))
            .await
            .unwrap();
    }
    assert_eq!(cache.len(), 8);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_does_not_cancel_the_shared_fetch() {
    let source = CountingSource::new(Duration::from_secs(3600), false);
    let cache = Arc::new(TokenCache::new(source.clone(), 16));
    let key = key_of([]);
    let impatient = {
        let (cache, key) = (cache.clone(), key.clone());
        tokio::spawn(async move { cache.get(&key).await.map(|_| ()) })
    };
    wait_until_idle().await;
    assert_eq!(source.count(), 1, "the impatient caller's fetch is held");
    impatient.abort();
    assert!(
        impatient.await.unwrap_err().is_cancelled(),
        "the caller went away while the fetch was held"
    );
    // Nobody waits for the fetch any more; it still runs to its end and fills the entry.
    source.gate.add_permits(1);
    wait_until_idle().await;
    let (token, outcome) = cache.get(&key).await.unwrap();
    assert_eq!(
        (token_text(&token), outcome),
        ("token-1", CacheOutcome::Hit),
        "the fetch finished with no caller left waiting for it"
    );
    assert_eq!(source.count(), 1);
}

#[test]
fn refresh_in_is_honoured_and_jitter_stays_in_range() {
    let hour = Duration::from_secs(3600);
    assert_eq!(
        refresh_delay(hour, Some(Duration::from_secs(600))),
        Duration::from_secs(600)
    );
    assert_eq!(
        refresh_delay(hour, Some(Duration::from_secs(1))),
        Duration::from_secs(360),
        "a tenth of the life at least"
    );
    for _ in 0..1000 {
        let delay = refresh_delay(hour, None);
        assert!(delay >= hour / 2 && delay <= hour * 3 / 4, "{delay:?}");
    }
}

#[test]
fn the_answer_is_json_with_the_token_escaped_and_expires_in_in_its_place() {
    let fresh = FreshToken {
        access_token: SecretString::from("tok\"en\\"),
        token_type: "Bearer".into(),
        lifetime: Duration::from_secs(3600),
        refresh_in: None,
        scope: Some("read \"write\"".into()),
    };
    let token = CachedToken::new(fresh, Instant::now());
    let (prefix, suffix) = token.answer_parts();
    let body = [prefix.expose_secret(), b"3599", suffix].concat();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["access_token"], "tok\"en\\");
    assert_eq!(value["token_type"], "Bearer");
    assert_eq!(value["expires_in"], 3599);
    assert_eq!(value["expires_on"], token.expires_on);
    assert_eq!(value["scope"], "read \"write\"");
    let fresh = FreshToken {
        access_token: SecretString::from("t"),
        token_type: "Bearer".into(),
        lifetime: Duration::from_secs(60),
        refresh_in: None,
        scope: None,
    };
    let token = CachedToken::new(fresh, Instant::now());
    let (prefix, suffix) = token.answer_parts();
    let value: serde_json::Value =
        serde_json::from_slice(&[prefix.expose_secret(), b"59", suffix].concat()).unwrap();
    assert!(value.get("scope").is_none(), "{value}");
}

#[test]
fn fingerprints_are_short_stable_hex() {
    assert_eq!(fingerprint("abc"), "ba7816bf8f01");
}
