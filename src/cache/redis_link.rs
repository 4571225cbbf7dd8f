//! The broker's one Redis connection, and the rule that Redis can never hurt a caller.
//!
//! Every operation is bounded by `timeout_ms`; a failure or a timeout turns the link *down*,
//! and while it is down no operation is even attempted, so a dead or black-holed Redis costs a
//! caller nothing. A background task probes once a second, re-subscribes to the event channel
//! and turns the link *up* again; the redis crate's connection manager reconnects by itself.
//! Each change of state is logged once (a warning going down, an info line coming back) and
//! counted, never once per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};

use crate::config::SharedCacheSettings;

/// How often a down link is probed, and an up link checked for its subscription.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What the shared tier did and what went wrong, since the start: for tests, and as totals
/// from which the `stats` line takes each period's counts.
#[derive(Default, Debug)]
pub struct SharedCacheCounters {
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
}

impl SharedCacheCounters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals so far, as the `stats` line names them.
    pub fn totals(&self) -> crate::stats::SharedTierCounts {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        crate::stats::SharedTierCounts {
            shared_hits: read(&self.hits),
            shared_misses: read(&self.locked_fetches) + read(&self.impatient_fetches),
            shared_waits: read(&self.waits),
            shared_errors: read(&self.redis_errors),
            shared_unreadable: read(&self.unreadable_entries),
            shared_outages: read(&self.outages),
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
    manager: ConnectionManager,
    timeout: Duration,
    state: AtomicU8,
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
            .set_response_timeout(Some(settings.timeout))
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
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|error| format!("redis connection not usable ({:?})", error.kind()))?;
        let link = Arc::new(Self {
            manager,
            timeout: settings.timeout,
            state: AtomicU8::new(STARTING),
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

    /// One probe: a PING, and on the way up the subscription, before operations resume.
    async fn probe(&self) {
        let mut connection = self.manager.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<Value>(&mut connection);
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return self.failed(&format!("{:?}", error.kind())),
            Err(_) => return self.failed("no answer within timeout_ms"),
        }
        if self.is_up() {
            return;
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

    /// Marks the link down, logging and counting only a change of state.
    fn failed(&self, reason: &str) {
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
        let mut connection = self.manager.clone();
        self.bounded(command.query_async::<T>(&mut connection))
            .await
    }

    /// One Redis operation within `timeout_ms`: a failure or a late answer counts as an error
    /// and turns the link down (see `failed`), and the caller sees `None`, like an absent entry.
    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                SharedCacheCounters::add(&self.counters.redis_errors);
                self.failed(&format!("{:?}", error.kind()));
                None
            }
            Err(_) => {
                SharedCacheCounters::add(&self.counters.redis_errors);
                self.failed("no answer within timeout_ms");
                None
            }
        }
    }

    /// The value at `key`: `Some(None)` when there is none, `None` when Redis is unavailable.
    pub(crate) async fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.run(redis::cmd("GET").arg(key)).await
    }

    /// Takes the lock at `key` for `lease` unless someone holds it; `None` when unavailable.
    pub(crate) async fn lock(&self, key: &str, holder: &str, lease: Duration) -> Option<bool> {
        let answer: Option<Value> = self
            .run(
                redis::cmd("SET")
                    .arg(key)
                    .arg(holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(lease)),
            )
            .await;
        answer.map(|value| !matches!(value, Value::Nil))
    }

    /// Releases the lock at `key` if `holder` still holds it (its lease may have lapsed and
    /// another instance taken it).
    pub(crate) async fn unlock(&self, key: &str, holder: &str) {
        const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
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
        let mut connection = self.manager.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
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
