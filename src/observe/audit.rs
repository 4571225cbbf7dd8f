//! The audit trail: who got which token, how often.
//!
//! It is written whatever `RUST_LOG` says: an audit trail that a log level can switch off is
//! not one. Every record carries `count`, the number of tokens it stands for, so that the sum
//! of `count` over a run equals the tokens handed out (plus the `dropped` of any "audit records
//! lost" line, which also counts tokens):
//!
//! - a token that needed a fetch (`miss`) or was served past its normal window (`stale`) gets a
//!   record of its own at once (`count` 1), with the request's `span`;
//! - cache hits are aggregated: one record per (caller, connection, scopes, token fingerprint)
//!   per [`HIT_INTERVAL`], with `count` and `since` (when its period began), written by the log
//!   writer at the end of the period and at shutdown. A line per hit was the largest cost of a
//!   cache hit after the network itself; a count per interval keeps the trail complete.
//!
//! Records have their own path to the log output: serialized straight into one line (same
//! stream, same JSON shape as the other lines) instead of going through the generic `tracing`
//! formatter. Nothing here blocks a request: a miss's record is queued without waiting (see
//! `telemetry`), and a hit adds to a counter in the calling thread's own shard of the
//! aggregator, under a lock that only that thread and, once per period, the writer take.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hashbrown::{Equivalent, HashMap};
use parking_lot::Mutex;
use serde::Serialize;

use super::telemetry::rfc3339_micros;

/// How long cache hits are counted before their records are written: within the bound
/// of 10 s, short enough that an operator sees a caller's activity in the same minute.
pub const HIT_INTERVAL: Duration = Duration::from_secs(5);
/// Aggregator shards: threads are spread over them, so a hit contends with no other worker.
const HIT_SHARDS: usize = 16;
/// Distinct keys one shard counts per period; past it, a hit gets a record of its own rather
/// than letting memory grow without bound (many callers x many tokens).
const MAX_KEYS_PER_SHARD: usize = 16_384;

/// What one audit line says. Never the token: its fingerprint only.
#[derive(Serialize)]
pub struct AuditRecord<'a> {
    pub connection: &'a str,
    pub caller: &'a str,
    pub scopes: &'a str,
    /// The audience and resource sent to the provider (the request's choice, else the
    /// connection's), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<&'a str>,
    pub cache: &'a str,
    pub expires_on: u64,
    pub fingerprint: &'a str,
    /// Tokens this record stands for.
    pub count: u64,
    #[serde(skip)]
    pub invocation_id: &'a str,
    #[serde(skip)]
    pub method: &'a str,
    #[serde(skip)]
    pub path: &'a str,
}

/// Writes a record of one answer now (queued; see `telemetry`).
pub fn record(record: &AuditRecord<'_>) {
    if !super::telemetry::installed() {
        // No log output installed (library use): fall back to an ordinary event.
        tracing::info!(
            target: "audit",
            connection = record.connection,
            caller = record.caller,
            scopes = record.scopes,
            audience = record.audience,
            resource = record.resource,
            cache = record.cache,
            expires_on = record.expires_on,
            fingerprint = record.fingerprint,
            count = record.count,
            "token handed out"
        );
        return;
    }
    super::telemetry::write_audit(format_line(record, None, SystemTime::now()), record.count);
}

/// The hits counted in the current period, by thread shard: one per process, made by `main`
/// (or a test), counted into by the token route and drained by the log writer.
pub struct HitAggregator {
    shards: [HitShard; HIT_SHARDS],
    period_start: Mutex<SystemTime>,
}

/// One shard, aligned so that two shards' locks never share a cache line.
#[repr(align(128))]
#[derive(Default)]
struct HitShard {
    // A parking_lot mutex: it cannot poison, and every critical section is a look-up and an
    // add (a swap for the writer), never an await or I/O.
    tallies: Mutex<HashMap<HitKey, Tally>>,
}

impl Default for HitAggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl HitAggregator {
    /// Counts a cache hit of `token` (the cached token itself: its address, kept alive while it is
    /// counted, tells tokens apart without hashing the token) for `record.caller`. Its record is
    /// written at the end of the period, by [`drain_hits`].
    pub fn record_hit<T: Send + Sync + 'static>(&self, token: &Arc<T>, record: &AuditRecord<'_>) {
        if !super::telemetry::installed() {
            self::record(record);
            return;
        }
        if !self.add(token, record) {
            self::record(record);
        }
    }

    /// Takes every hit counted so far and hands each key's record to `write` with its count: one
    /// line per (caller, token) however many threads counted it. Called by the log writer every
    /// [`HIT_INTERVAL`] and when the log is flushed (shutdown), as `main` tells it to.
    pub fn drain_hits(&self, now: SystemTime, write: &mut super::telemetry::RecordSink<'_>) {
        self.drain(now, write);
    }

    pub fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| HitShard::default()),
            period_start: Mutex::new(SystemTime::now()),
        }
    }

    /// Counts one hit in the calling thread's shard; `false` when the shard is full.
    fn add<T: Send + Sync + 'static>(&self, token: &Arc<T>, record: &AuditRecord<'_>) -> bool {
        let key = HitKeyRef {
            token: Arc::as_ptr(token) as *const () as usize,
            caller: record.caller,
        };
        let shard = &self.shards[super::shard::thread_shard(HIT_SHARDS)];
        let mut tallies = shard.tallies.lock();
        if let Some(tally) = tallies.get_mut(&key) {
            tally.count += 1;
            return true;
        }
        if tallies.len() >= MAX_KEYS_PER_SHARD {
            return false;
        }
        tallies.insert(
            HitKey {
                token: key.token,
                caller: record.caller.into(),
            },
            Tally {
                _token: token.clone(),
                connection: record.connection.into(),
                scopes: record.scopes.into(),
                audience: record.audience.map(Into::into),
                resource: record.resource.map(Into::into),
                fingerprint: record.fingerprint.into(),
                expires_on: record.expires_on,
                count: 1,
            },
        );
        true
    }

    /// Takes every shard's tallies, merges them by key, and writes one record per key.
    fn drain(&self, now: SystemTime, mut write: impl FnMut(Vec<u8>, u64)) {
        let since = std::mem::replace(&mut *self.period_start.lock(), now);
        let mut merged: HashMap<HitKey, Tally> = HashMap::new();
        for shard in &self.shards {
            let taken = std::mem::take(&mut *shard.tallies.lock());
            if merged.is_empty() {
                merged = taken;
                continue;
            }
            for (key, tally) in taken {
                merged
                    .entry(key)
                    .and_modify(|held| held.count += tally.count)
                    .or_insert(tally);
            }
        }
        let since = rfc3339_micros(since);
        for (key, tally) in &merged {
            let record = AuditRecord {
                connection: &tally.connection,
                caller: &key.caller,
                scopes: &tally.scopes,
                audience: tally.audience.as_deref(),
                resource: tally.resource.as_deref(),
                cache: "hit",
                expires_on: tally.expires_on,
                fingerprint: &tally.fingerprint,
                count: tally.count,
                invocation_id: "",
                method: "",
                path: "",
            };
            write(format_line(&record, Some(&since), now), tally.count);
        }
    }
}

/// A token (by address) and a caller.
#[derive(Hash, PartialEq, Eq)]
struct HitKey {
    token: usize,
    caller: Box<str>,
}

/// The same key, borrowed: a hit on a key already counted allocates nothing. Hashes as
/// `HitKey` does (same fields, same order; `Box<str>` and `&str` hash as `str`).
#[derive(Hash)]
struct HitKeyRef<'a> {
    token: usize,
    caller: &'a str,
}

impl Equivalent<HitKey> for HitKeyRef<'_> {
    fn equivalent(&self, key: &HitKey) -> bool {
        self.token == key.token && self.caller == &*key.caller
    }
}

struct Tally {
    /// Keeps the token's address from being reused by another token while it is a key.
    _token: Arc<dyn Any + Send + Sync>,
    connection: Box<str>,
    scopes: Box<str>,
    audience: Option<Box<str>>,
    resource: Option<Box<str>>,
    fingerprint: Box<str>,
    expires_on: u64,
    count: u64,
}

/// The line as written: the other log lines' shape (flattened fields, `target`, and for a
/// single answer the request's `span`; for aggregated hits `since`, when their period began).
#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    message: &'static str,
    #[serde(flatten)]
    record: &'a AuditRecord<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<&'a str>,
    target: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    span: Option<Span<'a>>,
}

#[derive(Serialize)]
struct Span<'a> {
    invocation_id: &'a str,
    method: &'a str,
    path: &'a str,
    name: &'static str,
}

/// The record as one JSON line, newline included; `since` marks an aggregated record. Public
/// for the deployment checks, which hold the workbook's queries to the fields written here.
pub fn format_line(record: &AuditRecord<'_>, since: Option<&str>, now: SystemTime) -> Vec<u8> {
    let line = Line {
        timestamp: rfc3339_micros(now),
        level: "INFO",
        message: "token handed out",
        record,
        since,
        target: "audit",
        span: since.is_none().then_some(Span {
            invocation_id: record.invocation_id,
            method: record.method,
            path: record.path,
            name: "request",
        }),
    };
    super::telemetry::json_line(&line, 384)
}

/// What an invalidation's audit line says: who asked to drop which key's token, whether it
/// was dropped, and the presented token's fingerprint (never the token). Its `count` is 0: it
/// hands out no token, so the sum of `count` over the trail stays the tokens handed out.
#[derive(Serialize)]
pub struct InvalidationRecord<'a> {
    pub connection: &'a str,
    pub caller: &'a str,
    pub scopes: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<&'a str>,
    pub fingerprint: &'a str,
    pub invalidated: bool,
    /// Why nothing was dropped (`not_current`, `too_soon`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip)]
    pub invocation_id: &'a str,
    #[serde(skip)]
    pub path: &'a str,
}

/// Writes an invalidation's record now (queued, like a miss's).
pub fn invalidation(record: &InvalidationRecord<'_>) {
    if !super::telemetry::installed() {
        tracing::info!(
            target: "audit",
            connection = record.connection,
            caller = record.caller,
            fingerprint = record.fingerprint,
            invalidated = record.invalidated,
            reason = record.reason,
            "token invalidation"
        );
        return;
    }
    #[derive(Serialize)]
    struct InvalidationLine<'a> {
        timestamp: String,
        level: &'static str,
        message: &'static str,
        #[serde(flatten)]
        record: &'a InvalidationRecord<'a>,
        count: u64,
        target: &'static str,
        span: Span<'a>,
    }
    let line = InvalidationLine {
        timestamp: rfc3339_micros(SystemTime::now()),
        level: "INFO",
        message: if record.invalidated {
            "token invalidated"
        } else {
            "token invalidation refused"
        },
        record,
        count: 0,
        target: "audit",
        span: Span {
            invocation_id: record.invocation_id,
            method: "POST",
            path: record.path,
            name: "request",
        },
    };
    super::telemetry::write_audit(super::telemetry::json_line(&line, 384), 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_line_is_json_with_the_documented_fields() {
        let record = AuditRecord {
            connection: "demo",
            caller: "weird \"caller\"\n\u{1}",
            scopes: "read write",
            audience: Some("https://api.example/orders"),
            resource: None,
            cache: "hit",
            expires_on: 1_795_846_471,
            fingerprint: "08430b6a962f",
            count: 1,
            invocation_id: "inv-1",
            method: "GET",
            path: "/api/token/demo",
        };
        let now = UNIX_EPOCH + Duration::from_micros(1_795_842_871_123_456);
        let line = format_line(&record, None, now);
        assert!(line.ends_with(b"\n"));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["timestamp"], "2026-11-28T05:14:31.123456Z");
        assert_eq!(value["target"], "audit");
        assert_eq!(value["caller"], "weird \"caller\"\n\u{1}");
        assert_eq!(value["expires_on"], 1_795_846_471u64);
        assert_eq!(value["span"]["invocation_id"], "inv-1");
        assert_eq!(value["span"]["name"], "request");
        // The other log lines' order, as written (a parsed `Value` would sort the keys).
        let text = String::from_utf8(line).unwrap();
        let positions: Vec<usize> = [
            "timestamp",
            "level",
            "message",
            "connection",
            "caller",
            "scopes",
            "audience",
            "cache",
            "expires_on",
            "fingerprint",
            "count",
            "target",
            "span",
        ]
        .iter()
        .map(|key| text.find(&format!("\"{key}\":")).unwrap())
        .collect();
        assert!(positions.is_sorted(), "{text}");
    }

    fn hit(caller: &str) -> AuditRecord<'_> {
        AuditRecord {
            connection: "demo",
            caller,
            scopes: "read",
            audience: None,
            resource: None,
            cache: "hit",
            expires_on: 1_795_846_471,
            fingerprint: "08430b6a962f",
            count: 1,
            invocation_id: "inv",
            method: "GET",
            path: "/api/token/demo",
        }
    }

    #[test]
    fn hits_from_many_threads_become_one_record_per_caller_and_token_with_their_count() {
        let aggregator = HitAggregator::new();
        let first = Arc::new("token one");
        let second = Arc::new("token two");
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (aggregator, first, second) = (&aggregator, &first, &second);
                scope.spawn(move || {
                    for round in 0..1000 {
                        let token = if round % 4 == 0 { second } else { first };
                        let caller = if thread % 2 == 0 { "app-a" } else { "app-b" };
                        assert!(aggregator.add(token, &hit(caller)));
                    }
                });
            }
        });
        let mut records = Vec::new();
        aggregator.drain(SystemTime::now(), |line, count| {
            let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(value["count"], count);
            records.push(value);
        });
        assert_eq!(records.len(), 4, "two callers x two tokens");
        let total: u64 = records.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        assert_eq!(total, 8000);
        // Four threads per caller; a quarter of each thread's hits are the second token's.
        let mut counts: Vec<(String, u64)> = records
            .iter()
            .map(|r| {
                (
                    r["caller"].as_str().unwrap().to_string(),
                    r["count"].as_u64().unwrap(),
                )
            })
            .collect();
        counts.sort();
        let expected = [
            ("app-a", 1000),
            ("app-a", 3000),
            ("app-b", 1000),
            ("app-b", 3000),
        ];
        assert_eq!(
            counts,
            expected.map(|(caller, count)| (caller.to_string(), count))
        );
        for record in &records {
            assert_eq!(record["cache"], "hit");
            assert_eq!(record["target"], "audit");
            assert!(record["since"].is_string(), "{record}");
            assert!(record.get("span").is_none(), "no single request: {record}");
        }
        let mut after = 0;
        aggregator.drain(SystemTime::now(), |_, _| after += 1);
        assert_eq!(after, 0, "a drained period starts from nothing");
    }

    #[test]
    fn a_full_shard_refuses_new_keys_but_keeps_counting_known_ones() {
        let aggregator = HitAggregator::new();
        let tokens: Vec<Arc<u32>> = (0..MAX_KEYS_PER_SHARD as u32).map(Arc::new).collect();
        for token in &tokens {
            assert!(aggregator.add(token, &hit("app")));
        }
        assert!(!aggregator.add(&Arc::new(0u32), &hit("app")), "a new key");
        assert!(aggregator.add(&tokens[0], &hit("app")), "a known key");
    }

    #[test]
    fn timestamps_have_microseconds_and_a_z() {
        let leap_day = UNIX_EPOCH + Duration::from_secs(11_016 * 86_400);
        assert_eq!(rfc3339_micros(leap_day), "2000-02-29T00:00:00.000000Z");
    }
}
