//! The broker's one Redis connection, and the rule that Redis can never hurt a caller.
//!
//! Every operation is bounded by `timeout_ms`; an error, or no answer in time for
//! [`UNRESPONSIVE_TO_DOWN`], turn the link *down*, and while it is down no operation is even
//! attempted, so a dead or black-holed Redis costs a caller nothing. A late answer alone (a
//! loaded machine, a Redis that stalls for a moment during a cold burst) is only that
//! operation's miss: turning the whole link down for it would send every instance to the
//! identity provider at once, which is what the shared tier exists to prevent. A background task probes once a second, re-subscribes to the event channel
//! and turns the link *up* again; the redis crate's connection manager reconnects by itself
//! after an I/O error, and after any other failure to connect (a refused `AUTH`) the probe
//! starts over with a new one.
//! Each change of state is logged once (a warning going down, an info line coming back) and
//! counted, never once per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::SharedCacheSettings;

/// How often a down link is probed (and re-subscribed), and an up link pinged.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long Redis may leave every operation without an answer in time before the link turns
/// down: a black-holed Redis costs callers `timeout_ms` each for about this long (the probe's
/// own late answers count, so a silent Redis is found even without traffic).
const UNRESPONSIVE_TO_DOWN: Duration = Duration::from_secs(1);

/// Takes the fleet lock for `ARGV[1]` with a lease of `ARGV[2]` ms: free, already ours
/// (a late answer may hide that an earlier attempt took it), or held by something no broker
/// writes: a key of another type, no expiry, or a lease longer than any broker takes
/// (`ARGV[3]` ms). 1 taken, 2 taken over from such a foreign lock, 0 held by another instance.
const LOCK: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'string' and kind ~= 'none' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not held then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 or ttl > tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0";
/// Extends the lease of the lock `KEYS[1]` if `ARGV[1]` still holds it, or takes it again if
/// it lapsed and nobody took it meanwhile (a renewal answered late); 0 when another holds it.
const RENEW: &str = r"
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not held then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0";
/// Deletes the lock `KEYS[1]` only if `ARGV[1]` still holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// What the shared tier did and what went wrong, since the start: for tests, and as totals
/// from which the `stats` line takes each period's counts.
#[derive(Default, Debug)]
pub(crate) struct SharedCacheCounters {
    /// Tokens taken from Redis instead of the identity provider.
    pub hits: AtomicU64,
    /// Fetches from the identity provider made under the fleet-wide lock.
    pub locked_fetches: AtomicU64,
    /// Times an instance waited for another one's fetch.
    pub waits: AtomicU64,
    /// Waits that ran out of patience and fetched themselves.
    pub impatient_fetches: AtomicU64,
    /// Entries that did not open (tampered, another key, another format) and were ignored.
    pub unreadable_entries: AtomicU64,
    /// Redis operations that failed or timed out.
    pub redis_errors: AtomicU64,
    /// Times the link went down.
    pub outages: AtomicU64,
    /// Locks taken over because no broker could have written them (no expiry, or a lease
    /// longer than any broker takes).
    pub foreign_locks: AtomicU64,
    /// Signed announcements no key held here could verify (forged, or signed with a newer
    /// key this instance then read).
    pub unverified_announcements: AtomicU64,
    /// Requests answered from a provider hold another instance (or this one) told the fleet.
    pub holds_honoured: AtomicU64,
    /// Provider holds this instance told the fleet.
    pub holds_shared: AtomicU64,
}

impl SharedCacheCounters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals so far, as the `stats` line names them.
    pub(crate) fn totals(&self) -> crate::observe::stats::SharedTierCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        crate::observe::stats::SharedTierCounts {
            shared_hits: read(&self.hits),
            shared_misses: read(&self.locked_fetches) + read(&self.impatient_fetches),
            shared_waits: read(&self.waits),
            shared_errors: read(&self.redis_errors),
            shared_unreadable: read(&self.unreadable_entries),
            shared_outages: read(&self.outages),
            shared_holds: read(&self.holds_honoured),
        }
    }
}

const STARTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// A pub/sub message on the broker's channel.
pub(crate) type Message = String;

/// The connection, its health and its subscription.
pub(crate) struct RedisLink {
    /// Replaced by the probe when a connection attempt failed in a way the manager never
    /// retries by itself (see [`RedisLink::probe`]).
    manager: parking_lot::RwLock<ConnectionManager>,
    /// What a replacement manager is built from.
    client: redis::Client,
    config: ConnectionManagerConfig,
    timeout: Duration,
    state: AtomicU8,
    /// When the first late answer since the last answer in time came.
    late_since: parking_lot::Mutex<Option<Instant>>,
    up: watch::Sender<bool>,
    channel: String,
    counters: Arc<SharedCacheCounters>,
}

/// How the link authenticates, resolved from the settings (secrets already read).
pub(crate) enum LinkAuth {
    None,
    Password {
        username: Option<String>,
        password: SecretString,
    },
    Entra(super::entra::EntraCredentials),
}

impl RedisLink {
    /// Builds the link without connecting (the first connection is made by the probe task,
    /// so startup never waits for Redis), and starts the probe and message tasks. Messages
    /// published on `channel` are handed to `messages`.
    pub(crate) fn start(
        settings: &SharedCacheSettings,
        auth: LinkAuth,
        channel: String,
        counters: Arc<SharedCacheCounters>,
        messages: mpsc::UnboundedSender<Message>,
    ) -> Result<Arc<Self>, String> {
        let info = settings
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|error| format!("redis_url not usable ({:?})", error.kind()))?;
        let mut redis = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let mut config = ConnectionManagerConfig::new()
            // A connection attempt (TLS included) may take longer than one command; the
            // callers never wait for it, only the probe task does.
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_secs(2))))
            // Later than `bounded`'s own bound, which decides what a late answer means.
            .set_response_timeout(Some(settings.timeout * 2))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        match auth {
            LinkAuth::None => {}
            LinkAuth::Password { username, password } => {
                redis = redis.set_password(password.expose_secret());
                if let Some(username) = username {
                    redis = redis.set_username(username);
                }
            }
            LinkAuth::Entra(credentials) => {
                config = config.set_credentials_provider(credentials);
            }
        }
        let client = redis::Client::open(info.set_redis_settings(redis))
            .map_err(|error| format!("redis client not usable ({:?})", error.kind()))?;
        let (pushes, mut pushed) = mpsc::unbounded_channel::<PushInfo>();
        let config = config
            .set_push_sender(pushes)
            .set_automatic_resubscription();
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|error| format!("redis connection not usable ({:?})", error.kind()))?;
        let link = Arc::new(Self {
            manager: parking_lot::RwLock::new(manager),
            client,
            config,
            timeout: settings.timeout,
            state: AtomicU8::new(STARTING),
            late_since: parking_lot::Mutex::new(None),
            up: watch::Sender::new(false),
            channel,
            counters,
        });

        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            while let Some(push) = pushed.recv().await {
                let Some(link) = weak.upgrade() else { return };
                match push.kind {
                    PushKind::Message => {
                        if let Some(text) = message_text(&push.data) {
                            let _ = messages.send(text);
                        }
                    }
                    PushKind::Disconnection => link.failed("the connection closed"),
                    _ => {}
                }
            }
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            loop {
                let Some(link) = weak.upgrade() else { return };
                link.probe().await;
                drop(link);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
        Ok(link)
    }

    /// Whether operations are attempted now.
    pub(crate) fn is_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == UP
    }

    /// Waits at most `bound` for the link to be up.
    pub(crate) async fn wait_until_up(&self, bound: Duration) -> bool {
        let mut up = self.up.subscribe();
        tokio::time::timeout(bound, up.wait_for(|up| *up))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// A handle on the current connection.
    fn connection(&self) -> ConnectionManager {
        self.manager.read().clone()
    }

    /// One probe: a PING, and on the way up the subscription, before operations resume.
    /// While the link is up, a late PING counts like any late answer.
    async fn probe(&self) {
        let mut connection = self.connection();
        let command = redis::cmd("PING");
        let ping = command.query_async::<Value>(&mut connection);
        if self.is_up() {
            self.bounded(ping).await;
            return;
        }
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                // The connection manager connects again by itself only after an I/O error.
                // Any other failure to connect (an AUTH refused because an Entra access
                // policy has not propagated yet, a server still loading its data) it keeps
                // answering for ever: the next probe starts with a new manager instead.
                if !error.is_io_error() {
                    self.replace_manager();
                }
                return self.failed(&format!("{:?}", error.kind()));
            }
            Err(_) => return self.failed("no answer within timeout_ms"),
        }
        let subscribe = connection.subscribe(&self.channel);
        match tokio::time::timeout(self.timeout, subscribe).await {
            Ok(Ok(())) => {
                let was = self.state.swap(UP, Ordering::AcqRel);
                if was != UP {
                    tracing::info!(
                        target: "shared_cache",
                        "shared cache connected: tokens are shared with the other instances"
                    );
                    self.up.send_replace(true);
                }
            }
            Ok(Err(error)) => self.failed(&format!("subscribe: {:?}", error.kind())),
            Err(_) => self.failed("subscribe: no answer within timeout_ms"),
        }
    }

    /// A new connection manager in place of the current one; it connects on first use.
    fn replace_manager(&self) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => *self.manager.write() = manager,
            Err(error) => {
                tracing::debug!(target: "shared_cache", kind = ?error.kind(), "redis connection not rebuilt");
            }
        }
    }

    /// Marks the link down, logging and counting only a change of state.
    fn failed(&self, reason: &str) {
        *self.late_since.lock() = None;
        let was = self.state.swap(DOWN, Ordering::AcqRel);
        self.up.send_replace(false);
        if was != DOWN {
            SharedCacheCounters::add(&self.counters.outages);
            tracing::warn!(
                target: "shared_cache",
                reason,
                "shared cache unavailable: this instance works alone (its memory and the identity provider) until it is back"
            );
        }
    }

    /// Runs `command` when the link is up, within the timeout; `None` when it is down, fails
    /// or is late, which callers treat exactly like an absent entry.
    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Option<T> {
        if !self.is_up() {
            return None;
        }
        let mut connection = self.connection();
        self.bounded(command.query_async::<T>(&mut connection))
            .await
    }

    /// One Redis operation within `timeout_ms`: a failure counts as an error and turns the
    /// link down (see `failed`), as do late answers only, for `UNRESPONSIVE_TO_DOWN`; the
    /// caller sees `None`, like an absent entry.
    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => {
                *self.late_since.lock() = None;
                Some(value)
            }
            // A server's error reply (a key of another type, a script error) is that
            // operation's miss: the link is fine, and one odd key must not take the shared
            // tier away from every key.
            Ok(Err(error)) if !error.is_timeout() && !means_link_trouble(&error) => {
                SharedCacheCounters::add(&self.counters.redis_errors);
                *self.late_since.lock() = None;
                None
            }
            Ok(Err(error)) if !error.is_timeout() => {
                SharedCacheCounters::add(&self.counters.redis_errors);
                self.failed(&format!("{:?}", error.kind()));
                None
            }
            Ok(Err(_)) | Err(_) => {
                SharedCacheCounters::add(&self.counters.redis_errors);
                let now = Instant::now();
                let since = *self.late_since.lock().get_or_insert(now);
                if now.duration_since(since) >= UNRESPONSIVE_TO_DOWN {
                    self.failed("no answer within timeout_ms for a second");
                }
                None
            }
        }
    }

    /// The value at `key`: `Some(None)` when there is none, `None` when Redis is unavailable.
    pub(crate) async fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.run(redis::cmd("GET").arg(key)).await
    }

    /// Takes the lock at `key` for `lease` unless another instance holds it (see [`LOCK`]);
    /// `None` when unavailable. `longest_lease` is the longest any broker takes.
    pub(crate) async fn lock(
        &self,
        key: &str,
        holder: &str,
        lease: Duration,
        longest_lease: Duration,
    ) -> Option<bool> {
        let answer: i64 = self
            .run(
                redis::cmd("EVAL")
                    .arg(LOCK)
                    .arg(1)
                    .arg(key)
                    .arg(holder)
                    .arg(millis(lease))
                    .arg(millis(longest_lease)),
            )
            .await?;
        if answer == 2 {
            SharedCacheCounters::add(&self.counters.foreign_locks);
            tracing::warn!(
                target: "shared_cache",
                "a fleet lock with no expiry or an overlong lease was taken over (not written by a broker)"
            );
        }
        Some(answer != 0)
    }

    /// Extends the lock at `key` by `lease` if `holder` still holds it (or takes it again if it
    /// lapsed unclaimed); `Some(false)` when another instance holds it now.
    pub(crate) async fn renew(&self, key: &str, holder: &str, lease: Duration) -> Option<bool> {
        let answer: i64 = self
            .run(
                redis::cmd("EVAL")
                    .arg(RENEW)
                    .arg(1)
                    .arg(key)
                    .arg(holder)
                    .arg(millis(lease)),
            )
            .await?;
        Some(answer == 1)
    }

    /// Releases the lock at `key` if `holder` still holds it (its lease may have lapsed and
    /// another instance taken it): a compare-and-delete, never a plain `DEL`.
    pub(crate) async fn unlock(&self, key: &str, holder: &str) {
        let _: Option<Value> = self
            .run(redis::cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(holder))
            .await;
    }

    /// Stores `value` at `key` for `ttl` and records the key in the set `index` (which expires
    /// after `index_ttl`), so that a rotation can find every entry of a connection.
    pub(crate) async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        index: &str,
        index_ttl: Duration,
    ) -> Option<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(millis(ttl))
            .ignore()
            .cmd("SADD")
            .arg(index)
            .arg(key)
            .ignore()
            .cmd("PEXPIRE")
            .arg(index)
            .arg(millis(index_ttl))
            .ignore();
        if !self.is_up() {
            return None;
        }
        let mut connection = self.connection();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    /// Stores `value` at `key` for `ttl`.
    pub(crate) async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Option<()> {
        self.run(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis(ttl)),
        )
        .await
    }

    /// Stores `value` at `key` for `ttl` unless `key` exists: `Some(true)` when stored.
    pub(crate) async fn set_new(&self, key: &str, value: &[u8], ttl: Duration) -> Option<bool> {
        let answer: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl)),
            )
            .await?;
        Some(answer.is_some())
    }

    /// Deletes `key`.
    pub(crate) async fn delete(&self, key: &str) -> Option<()> {
        self.delete_all(&[key]).await
    }

    /// Deletes `keys`.
    pub(crate) async fn delete_all(&self, keys: &[impl AsRef<str>]) -> Option<()> {
        let mut command = redis::cmd("DEL");
        for key in keys {
            command.arg(key.as_ref());
        }
        let _: i64 = self.run(&command).await?;
        Some(())
    }

    /// Deletes `key` only if it still holds `value` (a compare-and-delete): `Some(true)` when
    /// deleted.
    pub(crate) async fn delete_if(&self, key: &str, value: &[u8]) -> Option<bool> {
        let answer: i64 = self
            .run(redis::cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(value))
            .await?;
        Some(answer == 1)
    }

    /// The values at `keys` (one `MGET`), each `None` when absent; `None` when unavailable.
    pub(crate) async fn get_many(&self, keys: &[String]) -> Option<Vec<Option<Vec<u8>>>> {
        let mut command = redis::cmd("MGET");
        for key in keys {
            command.arg(key);
        }
        self.run(&command).await
    }

    /// Milliseconds `key` lives on; `None` when unavailable, absent or without expiry.
    pub(crate) async fn ttl(&self, key: &str) -> Option<Duration> {
        let millis: i64 = self.run(redis::cmd("PTTL").arg(key)).await?;
        u64::try_from(millis).ok().map(Duration::from_millis)
    }

    /// Deletes every entry listed in the set `index`, and the set; returns how many.
    pub(crate) async fn delete_indexed(&self, index: &str) -> Option<usize> {
        let members: Vec<String> = self.run(redis::cmd("SMEMBERS").arg(index)).await?;
        let mut command = redis::cmd("DEL");
        command.arg(index);
        for member in &members {
            command.arg(member);
        }
        let _: i64 = self.run(&command).await?;
        Some(members.len())
    }

    /// Publishes `message` on the broker's channel.
    pub(crate) async fn publish(&self, message: &str) -> Option<()> {
        let _: i64 = self
            .run(redis::cmd("PUBLISH").arg(&self.channel).arg(message))
            .await?;
        Some(())
    }
}

/// Whether an error says the connection itself is in trouble (it failed, dropped, was
/// refused, must be replaced, or no longer authenticates), not just that one command failed.
fn means_link_trouble(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::Parse
        )
}

/// The payload of a `message` push: `[channel, payload]`.
fn message_text(data: &[Value]) -> Option<String> {
    match data.get(1)? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
