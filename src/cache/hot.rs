//! The cache-hit path without a lock: each worker thread keeps its own copy of the tokens it
//! handed out lately, valid while the cache's *generation* has not moved.
//!
//! A hit on the shared map costs two mutexes and reference counts that every worker thread
//! writes, so the cache lines bounce between cores on every request. Here a hit reads one
//! atomic that only changes when an entry does (a token stored, a refresh rescheduled, a key
//! evicted: [`Generation::advance`]) and a map no other thread touches. Whatever the slow path
//! handed out as a `hit` is remembered here until the token's refresh time or its usable
//! end, whichever comes first; any change to any entry empties every thread's copy at its
//! next request, so the copy can be stale by no more than that.

use std::cell::RefCell;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;
use std::time::Duration;

use hashbrown::HashMap;
use tokio::time::Instant;

// Generic over the key and the token, so that this module needs nothing from the memory
// tier (which declares the thread-local copy for its own types).

/// Counts every change to a cache's entries; a thread's copy is good for one value.
#[derive(Default)]
pub(crate) struct Generation {
    /// Which cache this is (a process may hold several, in tests), and its count of changes.
    cache: u64,
    changes: AtomicU64,
}

impl Generation {
    pub(crate) fn new() -> Self {
        static NEXT_CACHE: AtomicU64 = AtomicU64::new(1);
        Self {
            cache: NEXT_CACHE.fetch_add(1, Ordering::Relaxed),
            changes: AtomicU64::new(0),
        }
    }

    /// An entry changed: every thread's copy is dropped at its next look.
    pub(crate) fn advance(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// The current count, read before the slow path looks at an entry: what it found is
    /// remembered under this count, so a change made meanwhile empties it again.
    pub(crate) fn now(&self) -> (u64, u64) {
        (self.cache, self.changes.load(Ordering::Acquire))
    }
}

/// One remembered hit.
struct Hot<T> {
    token: Arc<T>,
    /// Served from here until then: the earlier of the token's refresh time and its end.
    fresh_until: Instant,
    /// Told when the key was last used (for the map's eviction), at most once a second.
    touched: Instant,
    last_used: Arc<LastUsed>,
}

/// A thread's remembered hits, for one cache and one generation: the memory tier keeps one
/// in a `thread_local!`.
pub(crate) struct Copy<K, T> {
    generation: (u64, u64),
    hits: HashMap<K, Hot<T>>,
}

impl<K, T> Default for Copy<K, T> {
    fn default() -> Self {
        Self {
            generation: (0, 0),
            hits: HashMap::default(),
        }
    }
}

/// Where a thread keeps its copy.
pub(crate) type ThreadCopy<K, T> = LocalKey<RefCell<Copy<K, T>>>;

/// When an entry was last used, as nanoseconds since the cache's epoch: an atomic, so that
/// the lock-free path can refresh it (rarely) for the eviction order.
pub(crate) struct LastUsed {
    epoch: Instant,
    nanos: AtomicU64,
}

impl LastUsed {
    pub(crate) fn new(epoch: Instant, now: Instant) -> Self {
        let this = Self {
            epoch,
            nanos: AtomicU64::new(0),
        };
        this.touch(now);
        this
    }

    pub(crate) fn touch(&self, now: Instant) {
        let nanos =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(nanos, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.nanos.load(Ordering::Relaxed)
    }
}

/// How often the lock-free path tells an entry it is still in use.
const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// `serve` applied to the token this thread remembers for `key`, when it is still fresh at
/// `now` and nothing changed since (`generation`); `None` sends the caller to the slow path.
pub(crate) fn serve<K: Hash + Eq, T, R>(
    copy: &'static ThreadCopy<K, T>,
    generation: &Generation,
    key: &K,
    now: Instant,
    serve: impl FnOnce(&Arc<T>) -> R,
) -> Option<R> {
    let current = generation.now();
    copy.with(|copy| {
        let mut copy = copy.try_borrow_mut().ok()?;
        if copy.generation != current {
            copy.hits.clear();
            copy.generation = current;
            return None;
        }
        let hot = copy.hits.get_mut(key)?;
        if now >= hot.fresh_until {
            return None;
        }
        if now.saturating_duration_since(hot.touched) >= TOUCH_EVERY {
            hot.touched = now;
            hot.last_used.touch(now);
        }
        Some(serve(&hot.token))
    })
}

/// Remembers a hit the slow path handed out, found when the cache's count was `seen`.
pub(crate) fn remember<K: Hash + Eq + Clone, T>(
    copy: &'static ThreadCopy<K, T>,
    seen: (u64, u64),
    key: &K,
    token: &Arc<T>,
    fresh_until: Instant,
    last_used: &Arc<LastUsed>,
    now: Instant,
) {
    if now >= fresh_until {
        return;
    }
    copy.with(|copy| {
        let Ok(mut copy) = copy.try_borrow_mut() else {
            return;
        };
        if copy.generation != seen {
            copy.hits.clear();
            copy.generation = seen;
        }
        copy.hits.insert(
            key.clone(),
            Hot {
                token: token.clone(),
                fresh_until,
                touched: now,
                last_used: last_used.clone(),
            },
        );
    });
}
