//! The broker's metrics: counters kept in memory and written every `stats_interval_seconds` as
//! one JSON line with target `stats`. A custom handler has no metrics channel of its own: its
//! stdout lines become Application Insights `traces`, so these lines *are* the metrics, and the
//! workbook and alert rules in `infra/` read them.
//!
//! Every count in a line is what happened since the previous line (a delta), so that summing
//! over lines and instances gives totals however many instances ran and restarted; the token
//! endpoint's latency percentiles are over the same period. Gauges (open circuit breakers) are
//! read when the line is written.
//!
//! Counters are lock-free atomics, and each thread adds to its own cache-line-aligned shard of
//! them: a request adds to two or three counters, and a shared counter hammered by every worker
//! would bounce its cache line between cores on every hit. The writer sums the shards.
//!
//! Per-connection observations (the last token handed out, the last fetch's outcome) are kept
//! for `/api/health` in [`ConnectionStats`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use serde::Serialize;
use serde::ser::SerializeMap;

use super::shard::thread_shard;

/// Statuses the broker answers with; anything else is counted as `other`.
const STATUSES: [&str; 12] = [
    "200", "400", "401", "403", "404", "405", "413", "414", "431", "500", "502", "503",
];
/// The documented error codes (docs/behaviour.md's error table), each once: the variants the
/// edge counts a refused request by, and their names as an answer's `error` and the stats
/// line's `errors_by_code` write them.
macro_rules! error_codes {
    ($($variant:ident => $name:literal,)*) => {
        /// A documented error code: what the edge tells the counters of a refused request.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ErrorCode {
            $($variant,)*
        }

        /// The codes' names, in the order of [`ErrorCode`].
        pub const ERROR_CODES: [&str; [$($name,)*].len()] = [$($name,)*];
    };
}

error_codes! {
    UnknownConnection => "unknown_connection",
    NotFound => "not_found",
    InvalidRequest => "invalid_request",
    InvalidScope => "invalid_scope",
    InvalidTarget => "invalid_target",
    InvalidToken => "invalid_token",
    AccessDenied => "access_denied",
    UpstreamRejected => "upstream_rejected",
    UpstreamInvalidResponse => "upstream_invalid_response",
    UpstreamUnavailable => "upstream_unavailable",
    SecretUnavailable => "secret_unavailable",
    CallerKeysUnavailable => "caller_keys_unavailable",
    SharedCacheUnavailable => "shared_cache_unavailable",
    InternalError => "internal_error",
}

impl ErrorCode {
    /// The code as the API writes it.
    pub fn as_str(self) -> &'static str {
        ERROR_CODES[self as usize]
    }
}

const CACHE_OUTCOMES: [&str; 3] = ["hit", "miss", "stale"];
/// How a token fetch ended, by the error the caller would see.
pub const FETCH_RESULTS: [&str; 6] = [
    "ok",
    "rejected",
    "unavailable",
    "invalid_response",
    "secret_unavailable",
    "internal",
];
/// Upper bounds (milliseconds) of the fetch latency buckets: 1-2-5 steps from 1 ms to a minute
/// (a fetch's deadline is at most that), plus one bucket above. Percentiles are reported as
/// the bound of the bucket they fall in, capped at the largest latency seen: a fixed histogram
/// is all a p99 of token fetches needs, and it costs one atomic add per fetch.
const LATENCY_BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000,
];
/// Counter shards; threads are spread over them round-robin.
const SHARDS: usize = 16;

/// One shard of every counter. Aligned so that two shards never share a cache line.
#[repr(align(128))]
struct Counters {
    statuses: [AtomicU64; STATUSES.len() + 1],
    errors: [AtomicU64; ERROR_CODES.len()],
    cache: [AtomicU64; CACHE_OUTCOMES.len()],
    fetches: [AtomicU64; FETCH_RESULTS.len()],
    latency: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    latency_max_ms: AtomicU64,
    key_vault_reads: AtomicU64,
    key_vault_failures: AtomicU64,
    jwks_reloads: AtomicU64,
    jwks_failures: AtomicU64,
    audit_dropped: AtomicU64,
    invalidations: AtomicU64,
    invalidations_refused: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Self {
            statuses: [const { AtomicU64::new(0) }; STATUSES.len() + 1],
            errors: [const { AtomicU64::new(0) }; ERROR_CODES.len()],
            cache: [const { AtomicU64::new(0) }; CACHE_OUTCOMES.len()],
            fetches: [const { AtomicU64::new(0) }; FETCH_RESULTS.len()],
            latency: [const { AtomicU64::new(0) }; LATENCY_BOUNDS_MS.len() + 1],
            latency_max_ms: AtomicU64::new(0),
            key_vault_reads: AtomicU64::new(0),
            key_vault_failures: AtomicU64::new(0),
            jwks_reloads: AtomicU64::new(0),
            jwks_failures: AtomicU64::new(0),
            audit_dropped: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            invalidations_refused: AtomicU64::new(0),
        }
    }
}

/// Every counter, sharded by thread, and each connection's observations for `/api/health`:
/// one per process, made by `main` (or a test) and handed to whatever reports to it.
pub struct Registry {
    shards: [Counters; SHARDS],
    connections: RwLock<HashMap<String, Arc<ConnectionStats>>>,
}

fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}

impl Registry {
    pub fn new() -> Self {
        Self {
            shards: [const { Counters::new() }; SHARDS],
            connections: RwLock::default(),
        }
    }

    fn local(&self) -> &Counters {
        &self.shards[thread_shard(SHARDS)]
    }

    fn response(&self, status: u16, code: Option<ErrorCode>) {
        let counters = self.local();
        add(&counters.statuses[status_index(status)], 1);
        if let Some(code) = code {
            add(&counters.errors[code as usize], 1);
        }
    }

    fn cache_outcome(&self, outcome: CacheLookup) {
        add(&self.local().cache[outcome as usize], 1);
    }

    fn fetch(&self, result: &str, elapsed: Duration) {
        let counters = self.local();
        if let Some(index) = FETCH_RESULTS.iter().position(|known| *known == result) {
            add(&counters.fetches[index], 1);
        }
        let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| millis <= *bound)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        add(&counters.latency[bucket], 1);
        counters.latency_max_ms.fetch_max(millis, Ordering::Relaxed);
    }

    /// Everything counted since the last call, and the counters back at zero.
    pub fn take(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let take = |counter: &AtomicU64| counter.swap(0, Ordering::Relaxed);
        let sum = |into: &mut [u64], from: &[AtomicU64]| {
            for (total, counter) in into.iter_mut().zip(from) {
                *total += take(counter);
            }
        };
        for shard in &self.shards {
            sum(&mut snapshot.statuses, &shard.statuses);
            sum(&mut snapshot.errors, &shard.errors);
            sum(&mut snapshot.cache, &shard.cache);
            sum(&mut snapshot.fetches, &shard.fetches);
            sum(&mut snapshot.latency, &shard.latency);
            snapshot.latency_max_ms = snapshot.latency_max_ms.max(take(&shard.latency_max_ms));
            snapshot.key_vault_reads += take(&shard.key_vault_reads);
            snapshot.key_vault_failures += take(&shard.key_vault_failures);
            snapshot.jwks_reloads += take(&shard.jwks_reloads);
            snapshot.jwks_failures += take(&shard.jwks_failures);
            snapshot.audit_dropped += take(&shard.audit_dropped);
            snapshot.invalidations += take(&shard.invalidations);
            snapshot.invalidations_refused += take(&shard.invalidations_refused);
        }
        snapshot
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// `status` as three ASCII digits (every HTTP status has three).
/// The slot of `status` among [`STATUSES`], or the `other` slot after them: a match on the
/// number, not a search of their texts, since every response is counted.
fn status_index(status: u16) -> usize {
    match status {
        200 => 0,
        400 => 1,
        401 => 2,
        403 => 3,
        404 => 4,
        405 => 5,
        413 => 6,
        414 => 7,
        431 => 8,
        500 => 9,
        502 => 10,
        503 => 11,
        _ => STATUSES.len(),
    }
}

/// How a token answer was found, as the stats line counts it (`cache`): the order of
/// [`CACHE_OUTCOMES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLookup {
    /// From memory, within the token's normal window.
    Hit = 0,
    /// After a fetch, whether this caller started it or waited for it.
    Miss = 1,
    /// From memory past its normal window, while a refresh failed or was in flight.
    Stale = 2,
}

/// How a token fetch ended, as the stats line counts it (`fetches`). The token client says
/// which of these a fetch's error is; nothing here knows the error types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchResult {
    Ok,
    Rejected,
    Unavailable,
    InvalidResponse,
    SecretUnavailable,
    Internal,
}

impl FetchResult {
    /// The name in the stats line, one of [`FETCH_RESULTS`].
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Unavailable => "unavailable",
            Self::InvalidResponse => "invalid_response",
            Self::SecretUnavailable => "secret_unavailable",
            Self::Internal => "internal",
        }
    }
}

/// What the counters held over one period.
#[derive(Default, Debug)]
pub struct Snapshot {
    statuses: [u64; STATUSES.len() + 1],
    errors: [u64; ERROR_CODES.len()],
    cache: [u64; CACHE_OUTCOMES.len()],
    fetches: [u64; FETCH_RESULTS.len()],
    latency: [u64; LATENCY_BOUNDS_MS.len() + 1],
    latency_max_ms: u64,
    key_vault_reads: u64,
    key_vault_failures: u64,
    jwks_reloads: u64,
    jwks_failures: u64,
    audit_dropped: u64,
    invalidations: u64,
    invalidations_refused: u64,
    /// The shared (Redis) tier's counts over the period; `None` without a shared tier, and
    /// then the line has no `shared_*` fields.
    pub shared: Option<SharedTierCounts>,
}

/// What the shared tier did over one period (or since the start, as totals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SharedTierCounts {
    /// Tokens taken from Redis instead of the identity provider.
    pub shared_hits: u64,
    /// Fetches made through the fleet-wide lock, or after waiting too long for another
    /// instance's, because Redis had no token. Fetches made while Redis is unreachable bypass
    /// the tier and are not counted here (`shared_errors` and `shared_outages` show those).
    pub shared_misses: u64,
    /// Times this instance waited for another instance's fetch.
    pub shared_waits: u64,
    /// Redis operations that failed or timed out.
    pub shared_errors: u64,
    /// Entries that did not open (tampered, another key, another format) and were ignored.
    pub shared_unreadable: u64,
    /// Times the link to Redis went down.
    pub shared_outages: u64,
    /// Requests answered from a provider hold the fleet shares, without asking the provider.
    pub shared_holds: u64,
}

impl SharedTierCounts {
    /// `self - earlier`, field by field: the counts of one period from two totals.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            shared_hits: self.shared_hits.saturating_sub(earlier.shared_hits),
            shared_misses: self.shared_misses.saturating_sub(earlier.shared_misses),
            shared_waits: self.shared_waits.saturating_sub(earlier.shared_waits),
            shared_errors: self.shared_errors.saturating_sub(earlier.shared_errors),
            shared_unreadable: self
                .shared_unreadable
                .saturating_sub(earlier.shared_unreadable),
            shared_outages: self.shared_outages.saturating_sub(earlier.shared_outages),
            shared_holds: self.shared_holds.saturating_sub(earlier.shared_holds),
        }
    }
}

impl Snapshot {
    /// The latency below which `percent` of the period's fetches finished (bucket bound,
    /// capped at the largest seen); `None` without fetches.
    fn latency_percentile(&self, percent: u64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (total * percent).div_ceil(100).max(1);
        let mut seen = 0;
        for (bucket, count) in self.latency.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let bound = LATENCY_BOUNDS_MS
                    .get(bucket)
                    .copied()
                    .unwrap_or(self.latency_max_ms);
                return Some(bound.min(self.latency_max_ms));
            }
        }
        Some(self.latency_max_ms)
    }
}

/// Non-zero counts of `names` (and `other`) as a JSON object.
struct Counts<'a> {
    names: &'a [&'a str],
    counts: &'a [u64],
}

impl Serialize for Counts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (index, count) in self.counts.iter().enumerate() {
            if *count > 0 {
                map.serialize_entry(self.names.get(index).copied().unwrap_or("other"), count)?;
            }
        }
        map.end()
    }
}

#[derive(Serialize)]
struct StatsLine<'a> {
    timestamp: String,
    level: &'static str,
    message: &'static str,
    /// Seconds this line's counts cover (the configured interval; shorter for the last line).
    period_seconds: f64,
    requests: u64,
    requests_by_status: Counts<'a>,
    errors_by_code: Counts<'a>,
    cache_hits: u64,
    cache_misses: u64,
    cache_stale: u64,
    token_fetches: u64,
    token_fetches_by_result: Counts<'a>,
    token_fetch_failures: u64,
    token_fetch_p50_ms: Option<u64>,
    token_fetch_p95_ms: Option<u64>,
    token_fetch_p99_ms: Option<u64>,
    token_fetch_max_ms: Option<u64>,
    key_vault_reads: u64,
    key_vault_failures: u64,
    jwks_reloads: u64,
    jwks_failures: u64,
    breakers_open: usize,
    breakers_open_connections: &'a [&'a str],
    audit_dropped: u64,
    /// Invalidations that dropped the token a backend refused.
    invalidations: u64,
    /// Invalidations that dropped nothing: not the cached token, or too soon after the last.
    invalidations_refused: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    shared: Option<SharedTierCounts>,
    target: &'static str,
}

/// The `stats` line for `snapshot`: one JSON line, newline included, shaped like the other
/// log lines (`timestamp`, `level`, `message`, flat fields, `target`).
pub fn format_line(
    snapshot: &Snapshot,
    period: Duration,
    open_breakers: &[&str],
    now: SystemTime,
) -> Vec<u8> {
    let fetches: u64 = snapshot.fetches.iter().sum();
    let line = StatsLine {
        timestamp: super::telemetry::rfc3339_micros(now),
        level: "INFO",
        message: "stats",
        period_seconds: (period.as_millis() as f64 / 1000.0),
        requests: snapshot.statuses.iter().sum(),
        requests_by_status: Counts {
            names: &STATUSES,
            counts: &snapshot.statuses,
        },
        errors_by_code: Counts {
            names: &ERROR_CODES,
            counts: &snapshot.errors,
        },
        cache_hits: snapshot.cache[0],
        cache_misses: snapshot.cache[1],
        cache_stale: snapshot.cache[2],
        token_fetches: fetches,
        token_fetches_by_result: Counts {
            names: &FETCH_RESULTS,
            counts: &snapshot.fetches,
        },
        token_fetch_failures: fetches - snapshot.fetches[0],
        token_fetch_p50_ms: snapshot.latency_percentile(50),
        token_fetch_p95_ms: snapshot.latency_percentile(95),
        token_fetch_p99_ms: snapshot.latency_percentile(99),
        token_fetch_max_ms: (fetches > 0).then_some(snapshot.latency_max_ms),
        key_vault_reads: snapshot.key_vault_reads,
        key_vault_failures: snapshot.key_vault_failures,
        jwks_reloads: snapshot.jwks_reloads,
        jwks_failures: snapshot.jwks_failures,
        breakers_open: open_breakers.len(),
        breakers_open_connections: open_breakers,
        audit_dropped: snapshot.audit_dropped,
        invalidations: snapshot.invalidations,
        invalidations_refused: snapshot.invalidations_refused,
        shared: snapshot.shared,
        target: "stats",
    };
    super::telemetry::json_line(&line, 1024)
}

/// What the rest of the broker reports, and the `stats` line written from it.
impl Registry {
    /// A response was sent: its status and, for an error, its documented code.
    pub fn record_response(&self, status: u16, code: Option<ErrorCode>) {
        self.response(status, code);
    }

    /// An invalidation was asked for: `dropped` when it dropped the cached token.
    pub fn record_invalidation(&self, dropped: bool) {
        let counters = self.local();
        add(
            if dropped {
                &counters.invalidations
            } else {
                &counters.invalidations_refused
            },
            1,
        );
    }

    /// A token was handed out from memory (`hit`, `stale`) or after a fetch (`miss`).
    pub fn record_cache_outcome(&self, outcome: CacheLookup) {
        self.cache_outcome(outcome);
    }

    /// The result of one token fetch (what the cache asked the token client for), and how long the
    /// cache's waiters waited for it.
    pub fn record_fetch(&self, connection: &str, result: FetchResult, elapsed: Duration) {
        self.fetch(result.as_str(), elapsed);
        self.connection_stats(connection)
            .fetched(result == FetchResult::Ok);
    }

    /// A Key Vault read answered; passes the answer on (`Result::map_or_else`, so that the read's
    /// call site counts both outcomes in one line).
    pub fn key_vault_read<T, E>(&self, answer: T) -> Result<T, E> {
        add(&self.local().key_vault_reads, 1);
        Ok(answer)
    }

    /// A Key Vault read failed; passes the error on.
    pub fn key_vault_failed<T, E>(&self, error: E) -> Result<T, E> {
        let counters = self.local();
        add(&counters.key_vault_reads, 1);
        add(&counters.key_vault_failures, 1);
        Err(error)
    }

    /// The caller-token signing keys were downloaded (`ok`) or a download failed.
    pub fn record_jwks_reload(&self, ok: bool) {
        let counters = self.local();
        add(&counters.jwks_reloads, 1);
        if !ok {
            add(&counters.jwks_failures, 1);
        }
    }

    /// Audit records (tokens, counting an aggregated record's `count`) that never reached stdout.
    pub fn record_audit_dropped(&self, tokens: u64) {
        add(&self.local().audit_dropped, tokens);
    }
    /// Takes the counters and writes the `stats` line (through the log queue, whatever
    /// `RUST_LOG` says: metrics a log level can switch off are not metrics).
    pub fn report(
        &self,
        period: Duration,
        open_breakers: &[&str],
        shared: Option<SharedTierCounts>,
    ) {
        let mut snapshot = self.take();
        snapshot.shared = shared;
        let line = format_line(&snapshot, period, open_breakers, SystemTime::now());
        super::telemetry::write_stats(line);
    }

    /// The observations of `connection` (its lower-cased name), made on first use.
    pub fn connection_stats(&self, connection: &str) -> Arc<ConnectionStats> {
        if let Some(stats) = self.connections.read().get(connection) {
            return stats.clone();
        }
        self.connections
            .write()
            .entry(connection.to_string())
            .or_default()
            .clone()
    }
}

/// What `/api/health` reports of one connection, as the broker observed it.
#[derive(Default)]
pub struct ConnectionStats {
    /// 0: no fetch yet; 1: the last fetch gave a token; 2: it failed.
    last_fetch: AtomicU8,
    /// When the last token handed out for the connection expires (unix seconds; 0: none yet).
    expires_on: AtomicU64,
    /// Whether that token was handed out `stale` (past its normal window, refresh failing).
    stale: AtomicBool,
}

impl ConnectionStats {
    /// A token that expires at `expires_on` was handed out. Called per request: it writes only
    /// when something changed, so that workers do not all write the same cache line.
    pub fn handed_out(&self, expires_on: u64, stale: bool) {
        if self.expires_on.load(Ordering::Relaxed) != expires_on {
            self.expires_on.store(expires_on, Ordering::Relaxed);
        }
        if self.stale.load(Ordering::Relaxed) != stale {
            self.stale.store(stale, Ordering::Relaxed);
        }
    }

    fn fetched(&self, ok: bool) {
        self.last_fetch
            .store(if ok { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// `fresh`, `stale` or `none`: whether the last token handed out is still valid, and
    /// whether it was handed out past its normal window.
    pub fn token(&self, now: SystemTime) -> &'static str {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let expires_on = self.expires_on.load(Ordering::Relaxed);
        if expires_on <= now {
            "none"
        } else if self.stale.load(Ordering::Relaxed) {
            "stale"
        } else {
            "fresh"
        }
    }

    /// `ok`, `failed` or `never`.
    pub fn last_fetch(&self) -> &'static str {
        match self.last_fetch.load(Ordering::Relaxed) {
            0 => "never",
            1 => "ok",
            _ => "failed",
        }
    }
}

#[cfg(test)]
mod tests;
