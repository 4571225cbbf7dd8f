//! Provider holds the fleet shares: what one instance learns about a connection's provider (its
//! `Retry-After`, a circuit opened by repeated failures, a refused client) holds every instance
//! off it, so that 200 instances ask a throttled provider as often as one does.
//!
//! Each kind of hold is a sealed record of its own per connection
//! (`<prefix>:h:<connection hash>:<kind>`), expiring with the hold, so that a short hold of one
//! kind never replaces a longer one of another. An instance reads them (one `MGET`) before it
//! takes the fleet lock and again before it fetches; while one holds, the caller gets the
//! answer the instance that met the refusal gave (a refused client's 502 first, then a 503
//! with `Retry-After`, as one instance's guard answers), and the provider is not asked.
//!
//! A circuit's record outlives its open period by one more. After the period, the first
//! instance to claim the trial (`SET NX` on `<...>:circuit_open:trial`, for one open period)
//! makes the fleet's one trial call; the others are answered as during the open period. A
//! failed trial opens the circuit again for every instance; an answer from the provider (a
//! token or a refusal) closes it. A refused client's record is listed with the connection's
//! entries, so that a rotation of its secret deletes it too.

use super::*;
use crate::token::Hold;

/// The kinds of hold, in the order one instance's guard checks them.
const KINDS: [&str; 3] = ["rejected", "retry_after", "circuit_open"];

/// A hold as Redis keeps it, inside the seal; `until_ms` in unix milliseconds.
#[derive(Serialize, Deserialize)]
struct StoredHold {
    hold: Hold,
    until_ms: u64,
}

impl SharedTier {
    fn hold_name(&self, connection: &ConnectionSettings, kind: &str) -> String {
        format!("{}:h:{}:{kind}", self.prefix, connection_hash(connection))
    }

    fn trial_name(&self, connection: &ConnectionSettings) -> String {
        format!("{}:trial", self.hold_name(connection, "circuit_open"))
    }

    /// The connection's fleet hold, read from Redis; `Clear` when there is none or Redis
    /// cannot tell (a hold can only ever save a request, never cost one). With `claim`, the
    /// caller is about to fetch: after a circuit's open period it claims the fleet's trial, or
    /// is held while another instance makes it; without, an ended open period is `Clear`.
    pub(super) async fn read_hold(
        &self,
        ready: &Ready,
        connection: &ConnectionSettings,
        claim: bool,
    ) -> FleetHold {
        let names = KINDS.map(|kind| self.hold_name(connection, kind));
        let Some(values) = ready.link.get_many(&names).await else {
            return FleetHold::Clear;
        };
        let now = unix_millis();
        let mut circuit_ended = false;
        for (name, sealed) in names.iter().zip(values) {
            let Some(sealed) = sealed else { continue };
            let stored = ready
                .ring()
                .open(name, &sealed)
                .ok()
                .and_then(|plain| serde_json::from_slice::<StoredHold>(&plain).ok());
            let Some(stored) = stored else {
                SharedCacheCounters::add(&self.counters.unreadable_entries);
                continue;
            };
            if now < stored.until_ms {
                let left = Duration::from_millis(stored.until_ms - now);
                return self.held(connection, &stored.hold, left);
            }
            circuit_ended |= stored.hold == Hold::CircuitOpen;
        }
        if !circuit_ended || !claim {
            return FleetHold::Clear;
        }
        match ready
            .link
            .set_new(&self.trial_name(connection), b"1", connection.breaker_open)
            .await
        {
            Some(true) => FleetHold::Trial,
            // Another instance is making the trial: as one guard's half-open circuit answers.
            Some(false) => self.held(connection, &Hold::CircuitOpen, Duration::from_secs(1)),
            None => FleetHold::Clear,
        }
    }

    /// A request held off the provider by the fleet: counted, and its answer.
    fn held(&self, connection: &ConnectionSettings, hold: &Hold, left: Duration) -> FleetHold {
        SharedCacheCounters::add(&self.counters.holds_honoured);
        if let Some(otel) = &self.otel {
            otel.hold(&connection.name, hold.kind(), "fleet");
        }
        FleetHold::Held(hold.error(&connection.name, left))
    }

    /// After a fetch this instance made: a hold its token client now applies is told to the
    /// fleet; a trial that met no answer opens the fleet's circuit again, one the provider
    /// answered (a token or a refusal) closes it.
    pub(super) async fn after_fetch(
        &self,
        ready: &Ready,
        connection: &ConnectionSettings,
        key: &CacheKey,
        trial: bool,
        result: &Result<FreshToken, TokenError>,
    ) {
        let unavailable = matches!(result, Err(TokenError::Unavailable { .. }));
        if trial && !unavailable {
            let names = [
                self.hold_name(connection, "circuit_open"),
                self.trial_name(connection),
            ];
            ready.link.delete_all(&names).await;
        }
        if result.is_ok() {
            return;
        }
        let hold = self.source.hold(key.connection()).or_else(|| {
            (trial && unavailable).then_some((Hold::CircuitOpen, connection.breaker_open))
        });
        if let Some((hold, wait)) = hold {
            self.share_hold(ready, connection, hold, wait).await;
        }
    }

    /// Writes `hold` for `wait` (at most the guard's own bounds, which made it).
    async fn share_hold(
        &self,
        ready: &Ready,
        connection: &ConnectionSettings,
        hold: Hold,
        wait: Duration,
    ) {
        let name = self.hold_name(connection, hold.kind());
        let stored = StoredHold {
            until_ms: unix_millis().saturating_add(millis(wait)),
            hold,
        };
        let Some(sealed) = serde_json::to_vec(&stored)
            .ok()
            .and_then(|plain| ready.ring().seal(&name, &plain))
        else {
            return;
        };
        let written = match &stored.hold {
            // One more open period: the fetch after this one is known as the trial, whose
            // claim is made anew.
            Hold::CircuitOpen => {
                ready.link.delete(&self.trial_name(connection)).await;
                ready
                    .link
                    .set(&name, &sealed, wait + connection.breaker_open)
                    .await
            }
            Hold::AskedToWait => ready.link.set(&name, &sealed, wait).await,
            // Listed with the connection's entries: a rotation deletes it with them.
            Hold::Rejected { .. } => {
                let index = self.index_name(connection);
                ready
                    .link
                    .put(&name, &sealed, wait, &index, MAX_LIFETIME)
                    .await
            }
        };
        if written.is_some() {
            SharedCacheCounters::add(&self.counters.holds_shared);
            tracing::info!(
                target: "shared_cache",
                connection = %connection.name,
                hold = stored.hold.kind(),
                seconds = wait.as_secs(),
                "provider hold told to every instance: none asks it before then"
            );
        }
    }
}
