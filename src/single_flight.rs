//! One load at a time, and a doubling backoff after failed loads: the shape the Key Vault
//! object cache (`credentials::cache`) and the caller check's key set (`caller_check::jwks`)
//! share.
//!
//! A value loaded from a slow dependency is loaded by one caller at a time. A caller that
//! waited while another loaded takes that load's outcome instead of making its own, so that
//! callers never queue loads one after another, each burning its own deadline; a caller that
//! has a copy to use can decline to wait at all ([`SingleFlight::try_lead`]). The token cache's
//! memory tier has another shape (its fetch is a task of its own, started ahead of expiry, that
//! callers join), so it keeps its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The right to load one value, and a count of the loads settled so far.
pub(crate) struct SingleFlight {
    /// Held for the whole of a load: one at a time, and a holder is a load in flight.
    lock: tokio::sync::Mutex<()>,
    settled: AtomicU64,
}

/// What a caller saw before it asked to load: how many loads had settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen(u64);

/// The right to load, held until dropped; [`Leading::settled`] records the load's outcome
/// while it is still held, so that a waiter let in next sees it.
pub(crate) struct Leading<'a> {
    flight: &'a SingleFlight,
    _lock: tokio::sync::MutexGuard<'a, ()>,
}

impl SingleFlight {
    pub(crate) fn new() -> Self {
        Self {
            lock: tokio::sync::Mutex::new(()),
            settled: AtomicU64::new(0),
        }
    }

    /// The loads settled so far. Read it together with the value it guards (under the same
    /// lock as the value), then ask to lead: [`Leading::settled_since`] then tells whether a
    /// load settled in between.
    pub(crate) fn seen(&self) -> Seen {
        Seen(self.settled.load(Ordering::Acquire))
    }

    /// Waits for the load in flight, if any, and takes the right to load.
    pub(crate) async fn lead(&self) -> Leading<'_> {
        Leading {
            flight: self,
            _lock: self.lock.lock().await,
        }
    }

    /// The right to load, unless a load is in flight: for a caller with a copy to use meanwhile.
    pub(crate) fn try_lead(&self) -> Option<Leading<'_>> {
        let lock = self.lock.try_lock().ok()?;
        Some(Leading {
            flight: self,
            _lock: lock,
        })
    }

    /// Loads settled so far, as a number.
    #[cfg(test)]
    pub(crate) fn loads(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }
}

impl Default for SingleFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl Leading<'_> {
    /// Whether a load settled after `seen` was read: its outcome is this caller's answer too.
    pub(crate) fn settled_since(&self, seen: Seen) -> bool {
        self.flight.seen() != seen
    }

    /// This load's outcome is recorded: the next caller let in takes it rather than loading.
    pub(crate) fn settled(&self) {
        self.flight.settled.fetch_add(1, Ordering::Release);
    }
}

/// Delays between failed loads: `first` after the first failure, doubling, at most `max`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    pub(crate) first: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (at least one).
    pub(crate) fn after(self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_learns_that_a_load_settled_while_it_waited() {
        let flight = SingleFlight::new();
        let seen = flight.seen();
        let leading = flight.lead().await;
        assert!(!leading.settled_since(seen), "nothing settled yet");
        assert!(flight.try_lead().is_none(), "one load at a time");
        leading.settled();
        drop(leading);
        let next = flight.lead().await;
        assert!(
            next.settled_since(seen),
            "the first load's outcome is the waiter's answer"
        );
        assert!(!next.settled_since(flight.seen()));
        assert_eq!(flight.loads(), 1);
    }

    #[test]
    fn the_backoff_doubles_from_its_first_delay_up_to_its_cap() {
        let backoff = Backoff {
            first: Duration::from_secs(5),
            max: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..=6).map(|n| backoff.after(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff.after(u32::MAX), Duration::from_secs(60));
    }
}
