//! Provider holds the fleet shares: what one instance learns about a connection's provider (its
//! `Retry-After`, a circuit opened by repeated failures, a refused client) holds every instance
//! off it, so that 200 instances ask a throttled provider as often as one does.
//!
//! A hold is a sealed record per connection (`<prefix>:h:<connection hash>`) that expires with
//! the hold. An instance reads it before it takes the fleet lock and again before it fetches;
//! while it holds, the caller gets the answer the instance that met the refusal gave (a 503
//! with `Retry-After`, or the provider's rejection as a 502), and the provider is not asked.
//! A circuit's record outlives its open period by one more: the fetch made after the period is
//! the fleet's trial, and when it fails the circuit opens again for the whole fleet (one trial,
//! not one per instance); when it succeeds the record is deleted. A refused client's record is
//! listed with the connection's entries, so that a rotation of its secret deletes it too.

use super::*;
use crate::token::Hold;

/// A hold as Redis keeps it, inside the seal; `until_ms` in unix milliseconds.
#[derive(Serialize, Deserialize)]
struct StoredHold {
    hold: Hold,
    until_ms: u64,
}

impl SharedTier {
    fn hold_name(&self, connection: &ConnectionSettings) -> String {
        format!("{}:h:{}", self.prefix, connection_hash(connection))
    }

    /// The connection's fleet hold, read from Redis; `Clear` when there is none or Redis
    /// cannot tell (a hold can only ever save a request, never cost one).
    pub(super) async fn read_hold(
        &self,
        ready: &Ready,
        connection: &ConnectionSettings,
    ) -> FleetHold {
        let name = self.hold_name(connection);
        let Some(Some(sealed)) = ready.link.get(&name).await else {
            return FleetHold::Clear;
        };
        let stored = ready
            .ring()
            .open(&name, &sealed)
            .ok()
            .and_then(|plain| serde_json::from_slice::<StoredHold>(&plain).ok());
        let Some(stored) = stored else {
            SharedCacheCounters::add(&self.counters.unreadable_entries);
            return FleetHold::Clear;
        };
        let now = unix_millis();
        if now < stored.until_ms {
            SharedCacheCounters::add(&self.counters.holds_honoured);
            if let Some(otel) = &self.otel {
                let kind = stored.hold.kind();
                otel.hold(&connection.name, kind, "fleet");
            }
            let left = Duration::from_millis(stored.until_ms - now);
            return FleetHold::Held(stored.hold.error(&connection.name, left));
        }
        match stored.hold {
            Hold::CircuitOpen => FleetHold::Trial,
            _ => FleetHold::Clear,
        }
    }

    /// After a fetch this instance made: a hold its token client now applies is told to the
    /// fleet; a failed trial opens the fleet's circuit again, a successful one closes it.
    pub(super) async fn after_fetch(
        &self,
        ready: &Ready,
        connection: &ConnectionSettings,
        key: &CacheKey,
        trial: bool,
        result: &Result<FreshToken, TokenError>,
    ) {
        match result {
            Ok(_) if trial => {
                ready.link.delete(&self.hold_name(connection)).await;
            }
            Ok(_) => {}
            Err(error) => {
                let hold = self.source.hold(key.connection()).or_else(|| {
                    (trial && matches!(error, TokenError::Unavailable { .. }))
                        .then_some((Hold::CircuitOpen, connection.breaker_open))
                });
                if let Some((hold, wait)) = hold {
                    self.share_hold(ready, connection, hold, wait).await;
                }
            }
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
        let name = self.hold_name(connection);
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
            // One more open period: the fetch after this one is known as the trial.
            Hold::CircuitOpen => {
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
                hold = ?stored.hold,
                seconds = wait.as_secs(),
                "provider hold told to every instance: none asks it before then"
            );
        }
    }
}
