//! Per-connection protection of the identity provider and of the broker's callers.
//!
//! - A **circuit breaker**: after `breaker_failures` consecutive unavailable answers, calls fail
//!   fast for `breaker_open_seconds`; then one trial call is let through, and its outcome
//!   closes or re-opens the circuit. A dead IdP is not hammered and callers do not queue on it.
//! - A **retry budget**: retries draw from a bucket refilled by first attempts (one retry per
//!   five requests, ten in reserve), so retries cannot multiply the load on a struggling IdP.
//! - **Negative caching**: after a refused client secret (HTTP 401, `invalid_client`, Entra's
//!   bad-secret codes) that a secret re-read did not cure, calls fail fast with the same answer
//!   for `negative_cache_seconds`.
//!
//! One guard per connection, so one connection's outage never slows another.

use std::time::Duration;

use parking_lot::Mutex;

use tokio::time::Instant;

/// Longest `Retry-After` the guard honours across requests: a provider that asks for an hour
/// is asked again within this (and the breaker takes over if it still refuses).
const MAX_HOLD_OFF: Duration = Duration::from_secs(60);

/// Retries held in reserve, and the share of a retry each first attempt earns.
const RETRY_BUDGET_MAX: f64 = 10.0;
const RETRY_BUDGET_PER_REQUEST: f64 = 0.2;

/// Tunables, from the connection's configuration.
#[derive(Debug, Clone)]
pub(crate) struct GuardSettings {
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    pub negative_cache: Duration,
}

/// Why a call was refused without reaching the IdP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The circuit is open; try again after the duration.
    CircuitOpen { retry_after: Duration },
    /// The IdP asked the broker to wait (`Retry-After` on a 429 or 503): no call before then.
    AskedToWait { retry_after: Duration },
    /// The IdP rejected this client recently.
    RecentlyRejected {
        rejection: Rejection,
        retry_after: Duration,
    },
}

/// How the IdP refused the client: its HTTP status and OAuth error code, if it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub status: u16,
    pub code: Option<String>,
}

/// Where a connection's circuit breaker stands, for `/api/health` and the `stats` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    Closed,
    /// Calls fail fast until the open period ends.
    Open,
    /// The open period ended: the next call (or the one in flight) is the trial.
    HalfOpen,
}

impl BreakerState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The state of one connection's upstream.
pub(crate) struct UpstreamGuard {
    settings: GuardSettings,
    // A std mutex: every critical section is a few field updates, never an await.
    state: Mutex<GuardState>,
}

struct GuardState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
    rejected: Option<(Rejection, Instant)>,
    /// No call before this: the IdP's own `Retry-After`.
    not_before: Option<Instant>,
    retry_tokens: f64,
}

impl UpstreamGuard {
    pub(crate) fn new(settings: GuardSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(GuardState {
                consecutive_failures: 0,
                open_until: None,
                trial_in_flight: false,
                rejected: None,
                not_before: None,
                retry_tokens: RETRY_BUDGET_MAX,
            }),
        }
    }

    /// Whether a call would be refused now, changing nothing (no trial is taken, no budget
    /// earned). The token client asks this before it makes a credential, so that a refused
    /// client, an open circuit or a pending `Retry-After` costs no Key Vault read or sign:
    /// those count against the vault's limits, which every other secret read shares.
    pub(crate) fn check(&self) -> Result<(), Refusal> {
        let now = Instant::now();
        let state = self.state.lock();
        if let Some((rejection, until)) = &state.rejected
            && now < *until
        {
            return Err(Refusal::RecentlyRejected {
                rejection: rejection.clone(),
                retry_after: *until - now,
            });
        }
        if let Some(not_before) = state.not_before
            && now < not_before
        {
            return Err(Refusal::AskedToWait {
                retry_after: not_before - now,
            });
        }
        match state.open_until {
            Some(open_until) if now < open_until => Err(Refusal::CircuitOpen {
                retry_after: open_until - now,
            }),
            Some(_) if state.trial_in_flight => Err(Refusal::CircuitOpen {
                retry_after: Duration::from_secs(1),
            }),
            _ => Ok(()),
        }
    }

    /// Whether a call may go to the IdP now. Also earns retry budget.
    pub(crate) fn admit(&self) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut state = self.state.lock();
        if let Some((rejection, until)) = &state.rejected {
            if now < *until {
                return Err(Refusal::RecentlyRejected {
                    rejection: rejection.clone(),
                    retry_after: *until - now,
                });
            }
            state.rejected = None;
        }
        if let Some(not_before) = state.not_before {
            if now < not_before {
                return Err(Refusal::AskedToWait {
                    retry_after: not_before - now,
                });
            }
            state.not_before = None;
        }
        if let Some(open_until) = state.open_until {
            if now < open_until {
                return Err(Refusal::CircuitOpen {
                    retry_after: open_until - now,
                });
            }
            // Half open: one trial call; the others keep failing fast until it reports.
            if state.trial_in_flight {
                return Err(Refusal::CircuitOpen {
                    retry_after: Duration::from_secs(1),
                });
            }
            state.trial_in_flight = true;
        }
        state.retry_tokens = (state.retry_tokens + RETRY_BUDGET_PER_REQUEST).min(RETRY_BUDGET_MAX);
        Ok(())
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn take_retry(&self) -> bool {
        let mut state = self.state.lock();
        if state.retry_tokens >= 1.0 {
            state.retry_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The call ended without telling anything about the IdP (the caller's own time ran out,
    /// spent waiting elsewhere): a half-open trial is released for the next call, and no
    /// failure is counted.
    pub(crate) fn record_neutral(&self) {
        self.state.lock().trial_in_flight = false;
    }

    /// The IdP issued a token.
    pub(crate) fn record_success(&self) {
        let mut state = self.state.lock();
        state.consecutive_failures = 0;
        state.open_until = None;
        state.trial_in_flight = false;
    }

    /// The IdP was unreachable, slow, or answered 5xx/429. Returns when the circuit opened.
    pub(crate) fn record_unavailable(&self) -> Option<Duration> {
        let mut state = self.state.lock();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let trial_failed = state.trial_in_flight;
        state.trial_in_flight = false;
        if trial_failed || state.consecutive_failures >= self.settings.breaker_failures {
            state.open_until = Some(Instant::now() + self.settings.breaker_open);
            tracing::warn!(
                failures = state.consecutive_failures,
                open_seconds = self.settings.breaker_open.as_secs(),
                "circuit opened: calls to this token endpoint fail fast"
            );
            return Some(self.settings.breaker_open);
        }
        None
    }

    /// The IdP asked for `wait` before the next call (its `Retry-After`, at most a minute is
    /// honoured): every request for this connection is answered without asking it until then,
    /// instead of only the request that got the answer.
    pub(crate) fn asked_to_wait(&self, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_HOLD_OFF);
        let mut state = self.state.lock();
        state.not_before = Some(state.not_before.map_or(until, |at| at.max(until)));
    }

    /// The IdP answered, but refused the client: remember it for a while.
    pub(crate) fn record_rejected(&self, rejection: Rejection) {
        let mut state = self.state.lock();
        state.consecutive_failures = 0;
        state.open_until = None;
        state.trial_in_flight = false;
        if !self.settings.negative_cache.is_zero() {
            state.rejected = Some((rejection, Instant::now() + self.settings.negative_cache));
        }
    }

    /// The IdP answered with another OAuth error (nothing to remember).
    pub(crate) fn record_answered(&self) {
        self.record_success();
    }

    /// Where the circuit breaker stands now (read-only).
    pub(crate) fn breaker(&self) -> BreakerState {
        match self.state.lock().open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Forgets a remembered rejection: the secret was rotated, so the next call may succeed.
    pub(crate) fn clear_rejection(&self) {
        self.state.lock().rejected = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> UpstreamGuard {
        UpstreamGuard::new(GuardSettings {
            breaker_failures: 3,
            breaker_open: Duration::from_secs(10),
            negative_cache: Duration::from_secs(30),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_after_consecutive_failures_and_lets_one_trial_through() {
        let guard = guard();
        for _ in 0..2 {
            guard.admit().unwrap();
            assert_eq!(guard.record_unavailable(), None);
        }
        guard.admit().unwrap();
        assert_eq!(guard.record_unavailable(), Some(Duration::from_secs(10)));
        assert_eq!(guard.breaker(), BreakerState::Open);
        assert!(matches!(guard.admit(), Err(Refusal::CircuitOpen { .. })));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(guard.breaker(), BreakerState::HalfOpen);
        guard.admit().expect("the trial call");
        assert!(guard.admit().is_err(), "only one trial at a time");
        guard.record_success();
        assert_eq!(guard.breaker(), BreakerState::Closed);
        guard.admit().expect("closed again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_reopens_the_circuit() {
        let guard = guard();
        for _ in 0..3 {
            guard.admit().unwrap();
            guard.record_unavailable();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        guard.admit().unwrap();
        assert!(guard.record_unavailable().is_some());
        assert!(guard.admit().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_is_remembered_for_the_negative_cache_interval() {
        let guard = guard();
        guard.admit().unwrap();
        let rejection = Rejection {
            status: 401,
            code: Some("invalid_client".to_string()),
        };
        guard.record_rejected(rejection.clone());
        match guard.admit() {
            Err(Refusal::RecentlyRejected {
                rejection: seen, ..
            }) => assert_eq!(seen, rejection),
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        guard.admit().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_holds_every_call_off_until_it_passes_at_most_a_minute() {
        let guard = guard();
        guard.admit().unwrap();
        guard.asked_to_wait(Duration::from_secs(3));
        match guard.admit() {
            Err(Refusal::AskedToWait { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(3))
            }
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        guard.admit().expect("the wait is over");
        guard.asked_to_wait(Duration::from_secs(3600));
        tokio::time::advance(MAX_HOLD_OFF).await;
        guard
            .admit()
            .expect("an hour is honoured for a minute only");
    }

    #[test]
    fn the_retry_budget_runs_out_and_is_refilled_by_requests() {
        let guard = guard();
        let mut granted = 0;
        while guard.take_retry() {
            granted += 1;
        }
        assert_eq!(granted, 10);
        for _ in 0..5 {
            guard.admit().unwrap();
        }
        assert!(guard.take_retry(), "five requests earn one retry");
        assert!(!guard.take_retry());
    }
}
