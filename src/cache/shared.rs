//! The shared tier: Redis under every instance's memory tier, so that a fleet of instances
//! makes one token request per key per token lifetime, as one broker would.
//!
//! It is the memory tier's token source. On a memory miss (or a due refresh) it reads Redis; a
//! fresh entry is used. Otherwise it takes a fleet-wide lock for the key (a short lease,
//! renewed while the holder works, released by compare-and-delete; see [`RedisLink::lock`]),
//! reads once more (another instance may have just written it), fetches from the identity
//! provider, writes the sealed entry with an expiry equal to the token's usable life, and
//! announces it on the broker's channel. Instances that lose the lock wait for that
//! announcement (or a short poll) for at most half the connection's deadline, then fetch
//! themselves rather than fail; whoever fetches after waiting must finish within the
//! deadline counted from the caller's first look, so one bound covers a caller's whole wait.
//! A holder that dies stops renewing its lease, and the lock lapses within [`LOCK_LEASE`].
//! Every entry carries the fleet's refresh time, which the memory tiers adopt, so the
//! refresh-ahead happens once, under the same lock.
//!
//! The encryption key rotates (see [`KeyRing`]): a `SecretNewVersionCreated` for it, delivered
//! to any one instance, makes that instance read it again and tell the others (an
//! announcement they can check with either key), which read it too; an instance that meets an
//! entry sealed under a key it does not hold reads the key again as well (at most once per
//! [`KEY_RECHECK`]).
//!
//! Redis can only ever make things faster: when it is absent, slow or failing (see
//! [`RedisLink`]), every path here falls through to the token client at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::entra::EntraCredentials;
use super::memory::{CacheKey, TokenSource, hand_out_margin, refresh_delay};
use super::redis_link::{LinkAuth, Message, RedisLink, SharedCacheCounters};
use super::seal::{self, KeyRing, Sealer, Unopened};
use crate::config::decode_encryption_key;
use crate::config::{
    ConnectionName, ConnectionSettings, IdentitySettings, KeyVaultSettings, RedisAuth,
    SecretSource, SharedCacheSettings,
};
use crate::credentials::Credentials;
use crate::http_client::LazyClient;
use crate::observe::otel::Otel;
use crate::token::{FreshToken, MAX_LIFETIME, TokenError, clamp_lifetime};

mod announcements;
mod holds;
mod invalidations;
mod setup;

/// How often a waiting instance looks at Redis even without an announcement (one may be
/// lost while a connection is re-established).
const WAIT_POLL: Duration = Duration::from_millis(100);
/// Longest a rotation waits for the shared tier to be configured and connected: the
/// rotation function's instance may have just started.
const ROTATION_WAIT: Duration = Duration::from_secs(10);
/// Wait between attempts to read the encryption key or the password at startup.
const SETUP_RETRY: Duration = Duration::from_secs(5);
/// The fleet lock's shortest lease: short, so that a holder killed mid-fetch holds the others
/// off for at most this long; the holder renews it every [`LOCK_RENEW_EVERY`] while it works.
/// A slow Redis lengthens it (see [`lock_lease`]), so that a renewal always lands in time.
pub(crate) const LOCK_LEASE: Duration = Duration::from_secs(3);
const LOCK_RENEW_EVERY: Duration = Duration::from_secs(1);
/// How old a signed announcement may be and still be acted on: a captured one cannot be
/// replayed later, and one seen already is not acted on twice.
const ANNOUNCEMENT_FRESHNESS: Duration = Duration::from_secs(60);
/// Shortest time between two re-reads of the encryption key prompted by entries sealed under
/// a key this instance does not hold: whoever can write to Redis cannot make the fleet hammer
/// Key Vault.
pub(crate) const KEY_RECHECK: Duration = Duration::from_secs(30);

/// A token as Redis holds it, inside the seal. Times are unix milliseconds, so that every
/// instance reads them alike.
#[derive(Serialize, Deserialize)]
struct StoredToken {
    access_token: String,
    token_type: String,
    scope: Option<String>,
    expires_at_ms: u64,
    refresh_at_ms: u64,
}

/// What the fleet knows of a connection's provider.
enum FleetHold {
    /// Nothing: it may be asked.
    Clear,
    /// Held: the answer to give instead, without asking.
    Held(TokenError),
    /// A circuit the fleet opened has ended its open period: this fetch is its one trial.
    Trial,
}

/// What another instance announced that this instance's handlers must apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Announced {
    /// A Key Vault object (as `ObjectKind::object_id` names it) was rotated.
    Rotated(String),
    /// The token with this fingerprint was invalidated: drop it from memory.
    Invalidated(String),
}

/// The Redis names of one cache key.
struct Names {
    /// The hash that stands for the key in announcements.
    id: String,
    entry: String,
    lock: String,
    /// The set of a connection's entries, for rotations.
    index: String,
}

/// What the tier has once its key is read and its link built.
struct Ready {
    /// The encryption keys; replaced whole when the key rotates.
    ring: RwLock<Arc<KeyRing>>,
    link: Arc<RedisLink>,
}

impl Ready {
    fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().clone()
    }
}

/// Everything the shared tier needs from startup.
pub(crate) struct SharedTierParts<'a> {
    pub settings: &'a SharedCacheSettings,
    pub source: Arc<dyn TokenSource>,
    pub connections: Arc<BTreeMap<ConnectionName, ConnectionSettings>>,
    pub credentials: Arc<Credentials>,
    pub identity: &'a IdentitySettings,
    pub key_vault: Option<&'a KeyVaultSettings>,
    pub http: Arc<LazyClient>,
    pub otel: Option<Arc<Otel>>,
}

/// The shared tier; see the module documentation.
pub(crate) struct SharedTier {
    source: Arc<dyn TokenSource>,
    connections: Arc<BTreeMap<ConnectionName, ConnectionSettings>>,
    prefix: String,
    ready: OnceLock<Ready>,
    ready_signal: watch::Sender<bool>,
    /// One `Notify` per key some caller of this instance is waiting for.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    counters: Arc<SharedCacheCounters>,
    /// Tells this instance's own rotation announcements from the others'.
    instance: String,
    /// Key Vault objects the connections use, by their hash (rotation messages).
    secrets_by_hash: HashMap<String, String>,
    credentials: Arc<Credentials>,
    encryption_key: SecretSource,
    /// When the encryption key was last read again; one re-read at a time.
    key_checked: tokio::sync::Mutex<Option<Instant>>,
    /// Set while an announcement has a key re-read under way: a flood of them costs one.
    rechecking: AtomicBool,
    /// Signed announcements already acted on, with when they were seen.
    seen: Mutex<HashMap<String, Instant>>,
    /// The fleet lock's lease for this tier's `timeout_ms`.
    lease: Duration,
    /// Shared hits and misses, and fleet holds, for OpenTelemetry when it is on.
    otel: Option<Arc<Otel>>,
}

/// The fleet lock's lease: [`LOCK_LEASE`], or longer when a Redis answer may take so long
/// that a renewal every [`LOCK_RENEW_EVERY`] could land after the lease ran out.
fn lock_lease(timeout: Duration) -> Duration {
    LOCK_LEASE.max(LOCK_RENEW_EVERY + timeout * 2)
}

impl SharedTier {
    /// What the tier has done so far.
    pub(crate) fn counters(&self) -> &SharedCacheCounters {
        &self.counters
    }

    /// The tier once configured and connected, waiting a bounded time: the rotation
    /// function's instance may have just started.
    async fn wait_until_ready(&self) -> Result<&Ready, &'static str> {
        let mut ready_signal = self.ready_signal.subscribe();
        if tokio::time::timeout(ROTATION_WAIT, ready_signal.wait_for(|ready| *ready))
            .await
            .is_err()
        {
            return Err("the shared cache is not configured yet");
        }
        let ready = self
            .ready
            .get()
            .ok_or("the shared cache is not configured")?;
        if !ready.link.wait_until_up(ROTATION_WAIT).await {
            return Err("the shared cache is unavailable");
        }
        Ok(ready)
    }

    async fn fetch_shared(
        self: Arc<Self>,
        key: CacheKey,
        finish_by: Option<Instant>,
    ) -> Result<FreshToken, TokenError> {
        let direct = |key| self.source.clone().fetch_by(key, finish_by);
        let ready = match self.ready.get() {
            Some(ready) if ready.link.is_up() => ready,
            _ => return direct(key).await,
        };
        let Some(connection) = self.connections.get(key.connection()) else {
            return direct(key).await;
        };
        // One bound on the caller's whole wait: the deadline, counted from the first look.
        // Waiting ends at half of it, so that a fetch begun after waiting still has the other
        // half; only the bounded Redis writes after a fetch (each within `timeout_ms`) come on
        // top.
        let finish_by = finish_by.unwrap_or_else(|| Instant::now() + connection.deadline);
        let stop_waiting = finish_by
            .checked_sub(connection.deadline / 2)
            .unwrap_or(finish_by);
        let names = self.names(connection, &key);
        if let Some(fresh) = self.read_fresh(ready, &names).await {
            return Ok(fresh);
        }
        // Another instance met a refusal the whole fleet must respect: no lock, no fetch.
        if let FleetHold::Held(error) = self.read_hold(ready, connection, false).await {
            return Err(error);
        }
        let holder = hex::encode(rand::random::<[u8; 16]>());
        let notify = self.waiter(&names.id);
        let mut waited = false;
        let result = loop {
            match ready
                .link
                .lock(&names.lock, &holder, self.lease, self.lease)
                .await
            {
                Some(true) => {
                    break self
                        .fetch_locked(ready, &names, &holder, key, finish_by)
                        .await;
                }
                None if !ready.link.is_up() => {
                    break self.source.clone().fetch_by(key, Some(finish_by)).await;
                }
                // Held by another instance, or one late answer: look again below.
                Some(false) | None => {}
            }
            if !waited {
                SharedCacheCounters::add(&self.counters.waits);
                waited = true;
            }
            // Armed before the read, so an announcement between the two is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(fresh) = self.read_fresh(ready, &names).await {
                break Ok(fresh);
            }
            if !ready.link.is_up() {
                break self.source.clone().fetch_by(key, Some(finish_by)).await;
            }
            if Instant::now() >= stop_waiting {
                SharedCacheCounters::add(&self.counters.impatient_fetches);
                self.observe_lookup("miss");
                break self.fetch_and_store(ready, &names, key, finish_by).await;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(WAIT_POLL) => {}
                () = tokio::time::sleep_until(stop_waiting) => {}
            }
        };
        drop(notify);
        self.forget_waiter(&names.id);
        result
    }

    /// Holding the lock: reads once more, else fetches and stores (renewing the lease while
    /// it works), then releases and announces.
    async fn fetch_locked(
        &self,
        ready: &Ready,
        names: &Names,
        holder: &str,
        key: CacheKey,
        finish_by: Instant,
    ) -> Result<FreshToken, TokenError> {
        let work = async {
            match self.read_fresh(ready, names).await {
                Some(fresh) => Ok(fresh),
                None => {
                    SharedCacheCounters::add(&self.counters.locked_fetches);
                    self.observe_lookup("miss");
                    self.fetch_and_store(ready, names, key, finish_by).await
                }
            }
        };
        tokio::pin!(work);
        let renewing = async {
            // On a fixed beat, not after each answer: a slow answer does not push the next
            // renewal past the lease.
            let mut beat =
                tokio::time::interval_at(Instant::now() + LOCK_RENEW_EVERY, LOCK_RENEW_EVERY);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                if ready.link.renew(&names.lock, holder, self.lease).await == Some(false) {
                    tracing::warn!(target: "shared_cache", "the fleet lock lapsed while its holder was fetching; another instance may fetch too");
                    return;
                }
            }
        };
        let result = tokio::select! {
            result = &mut work => result,
            () = renewing => work.await,
        };
        ready.link.unlock(&names.lock, holder).await;
        // Announced on failure too: the waiters then take the lock at once instead of polling.
        ready.link.publish(&format!("t:{}", names.id)).await;
        result
    }

    /// Fetches from the token client and stores a success in Redis, unless the fleet holds
    /// the provider off; tells the fleet of a hold the fetch met (see [`holds`]).
    async fn fetch_and_store(
        &self,
        ready: &Ready,
        names: &Names,
        key: CacheKey,
        finish_by: Instant,
    ) -> Result<FreshToken, TokenError> {
        let connection = self.connections.get(key.connection());
        let trial = match connection {
            Some(connection) => match self.read_hold(ready, connection, true).await {
                FleetHold::Held(error) => return Err(error),
                FleetHold::Trial => true,
                FleetHold::Clear => false,
            },
            None => false,
        };
        let fetched = self
            .source
            .clone()
            .fetch_by(key.clone(), Some(finish_by))
            .await;
        if let Some(connection) = connection {
            self.after_fetch(ready, connection, &key, trial, &fetched)
                .await;
        }
        let fresh = fetched?;
        let lifetime = clamp_lifetime(fresh.lifetime);
        let refresh_in = refresh_delay(lifetime, fresh.refresh_in);
        let now = unix_millis();
        let stored = StoredToken {
            access_token: fresh.access_token.expose_secret().to_string(),
            token_type: fresh.token_type.clone(),
            scope: fresh.scope.clone(),
            expires_at_ms: now.saturating_add(millis(lifetime)),
            refresh_at_ms: now.saturating_add(millis(refresh_in)),
        };
        let sealed = serde_json::to_vec(&stored)
            .ok()
            .and_then(|plain| ready.ring().seal(&names.entry, &plain));
        if let Some(sealed) = sealed {
            let usable = lifetime.saturating_sub(hand_out_margin(lifetime));
            // A second try after one late answer: the waiters read this entry, and without
            // it each would fetch a token of its own.
            for _ in 0..2 {
                let stored = ready
                    .link
                    .put(&names.entry, &sealed, usable, &names.index, MAX_LIFETIME)
                    .await;
                if stored.is_some() || !ready.link.is_up() {
                    break;
                }
            }
        }
        Ok(FreshToken {
            lifetime,
            refresh_in: Some(refresh_in),
            ..fresh
        })
    }

    /// The entry at `names`, when it opens and is before the fleet's refresh time. An entry
    /// sealed under a key this instance does not hold makes it read the key again (the fleet
    /// may have rotated it) and try once more.
    async fn read_fresh(&self, ready: &Ready, names: &Names) -> Option<FreshToken> {
        let sealed = ready.link.get(&names.entry).await??;
        let ring = ready.ring();
        let mut opened = ring.open(&names.entry, &sealed);
        if opened == Err(Unopened::ForeignKey) {
            // Read again here, or by another caller meanwhile; never waited for.
            let _ = self.reread_key(false, false).await;
            let now = ready.ring();
            if !Arc::ptr_eq(&ring, &now) {
                opened = now.open(&names.entry, &sealed);
            }
        }
        let stored = opened
            .ok()
            .and_then(|plain| serde_json::from_slice::<StoredToken>(&plain).ok());
        let Some(stored) = stored else {
            SharedCacheCounters::add(&self.counters.unreadable_entries);
            return None;
        };
        let now = unix_millis();
        // A second of life at least, like the memory tier's floor.
        if now >= stored.refresh_at_ms || stored.expires_at_ms <= now.saturating_add(1000) {
            return None;
        }
        SharedCacheCounters::add(&self.counters.hits);
        self.observe_lookup("hit");
        Some(FreshToken {
            access_token: SecretString::from(stored.access_token),
            token_type: stored.token_type,
            scope: stored.scope,
            lifetime: Duration::from_millis(stored.expires_at_ms - now),
            refresh_in: Some(Duration::from_millis(stored.refresh_at_ms - now)),
        })
    }

    /// Names bound to everything that makes a token differ (hashed, not keyed: see
    /// [`seal::name`]): never the connection's name, which two deployments may use for
    /// different clients.
    fn names(&self, connection: &ConnectionSettings, key: &CacheKey) -> Names {
        let connection_id = connection_hash(connection);
        let mut parts: Vec<&[u8]> = vec![b"token", connection_id.as_bytes()];
        parts.extend(key.scopes().iter().map(|scope| scope.as_str().as_bytes()));
        // A chosen audience or resource makes a different token. After an empty part (no
        // scope is empty, and parts are length-prefixed), tagged: neither can pass for a scope
        // or for the other.
        let audience = key.audience().map(|value| format!("audience={value}"));
        let resource = key.resource().map(|value| format!("resource={value}"));
        if audience.is_some() || resource.is_some() {
            parts.push(b"");
            parts.extend(audience.iter().chain(&resource).map(String::as_bytes));
        }
        let id = seal::name(&parts);
        Names {
            entry: format!("{}:t:{id}", self.prefix),
            lock: format!("{}:l:{id}", self.prefix),
            index: format!("{}:c:{connection_id}", self.prefix),
            id,
        }
    }

    /// A look-up in this tier, for OpenTelemetry when it is on.
    fn observe_lookup(&self, outcome: &'static str) {
        if let Some(otel) = &self.otel {
            otel.cache_lookup("shared", outcome);
        }
    }

    fn index_name(&self, connection: &ConnectionSettings) -> String {
        format!("{}:c:{}", self.prefix, connection_hash(connection))
    }

    fn waiter(&self, id: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Drops the key's `Notify` once no caller holds it any more.
    fn forget_waiter(&self, id: &str) {
        let mut waiters = self.waiters.lock();
        if waiters
            .get(id)
            .is_some_and(|notify| Arc::strong_count(notify) == 1)
        {
            waiters.remove(id);
        }
    }
}

impl TokenSource for SharedTier {
    fn fetch(self: Arc<Self>, key: CacheKey) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        Box::pin(self.fetch_shared(key, None))
    }

    fn fetch_by(
        self: Arc<Self>,
        key: CacheKey,
        finish_by: Option<Instant>,
    ) -> BoxFuture<'static, Result<FreshToken, TokenError>> {
        Box::pin(self.fetch_shared(key, finish_by))
    }
}

/// The hash of a connection's identity at its token endpoint.
fn connection_hash(connection: &ConnectionSettings) -> String {
    let auth = connection.auth_method.as_str().as_bytes();
    let optional = |value: &Option<String>| match value {
        None => Vec::new(),
        Some(value) => [b"=".as_slice(), value.as_bytes()].concat(),
    };
    let audience = optional(&connection.audience);
    let resource = optional(&connection.resource);
    let mut parts: Vec<&[u8]> = vec![
        b"connection",
        connection.token_url.as_str().as_bytes(),
        connection.client_id.as_bytes(),
        auth,
        &audience,
        &resource,
    ];
    for (name, value) in &connection.extra_params {
        parts.push(name.as_bytes());
        parts.push(value.as_bytes());
    }
    seal::name(&parts)
}

/// How a rotated Key Vault object is named in announcements (which are signed).
fn secret_hash(prefix: &str, secret_name: &str) -> String {
    seal::name(&[
        b"secret",
        prefix.as_bytes(),
        secret_name.to_ascii_lowercase().as_bytes(),
    ])
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
