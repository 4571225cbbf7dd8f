//! How a fetch is retried and bounded: backoff, `Retry-After`, and the whole fetch's deadline.

use super::failure::Failure;
use std::time::Duration;

use tokio::time::Instant;

/// Longest `Retry-After` the broker waits out itself before retrying; beyond it the caller
/// gets the 503 with the hint instead of a long wait.
pub(super) const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// Full-jitter backoff: a random wait up to `BACKOFF_BASE * 2^attempt`, at most `BACKOFF_CAP`.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(200);

pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// The retry loop of `exchange_with_retries`, apart from the exchange it drives so that its
/// policy (what is retried, how long it waits, when it stops) can be tested with a fake
/// exchange and tokio's paused clock. `take_retry` spends one unit of the retry budget.
pub(super) async fn with_retries<T, Attempt>(
    connection: &str,
    max_retries: u32,
    mut take_retry: impl FnMut() -> bool,
    mut exchange: impl FnMut(u32) -> Attempt,
) -> Result<T, Failure>
where
    Attempt: std::future::Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0;
    let mut previous = None;
    loop {
        let failure = match exchange(attempt).await {
            Err(failure @ Failure::Unavailable { .. }) => failure,
            // The retry could not be made: the answer is the last attempt's.
            Err(Failure::NoRetryCredential) if previous.is_some() => {
                return Err(previous.expect("checked"));
            }
            other => return other,
        };
        let Failure::Unavailable { retry_after, .. } = &failure else {
            return Err(failure);
        };
        let wait = retry_wait(attempt, *retry_after);
        if attempt >= max_retries || wait > MAX_RETRY_WAIT || !take_retry() {
            return Err(failure);
        }
        attempt += 1;
        previous = Some(failure);
        tracing::info!(
            connection = %connection,
            attempt,
            wait_ms = wait.as_millis() as u64,
            "retrying the token request"
        );
        tokio::time::sleep(wait).await;
    }
}

/// `outcome`, unless `deadline` passes first: then the deadline's `Unavailable`.
pub(super) async fn within_deadline<T>(
    deadline: Instant,
    deadline_seconds: u64,
    outcome: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, outcome)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::OutOfTime {
                detail: format!("no token within the {deadline_seconds}s deadline"),
            })
        })
}

/// How long to wait before retry `attempt + 1`: the server's `Retry-After` when it gave one
/// and it is longer, else a random wait in `[0, min(cap, base * 2^attempt))` ("full jitter",
/// so that callers that failed together do not retry together).
pub(super) fn retry_wait(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(10))
        .min(BACKOFF_CAP);
    let backoff = ceiling.mul_f64(rand::random_range(0.0..1.0));
    retry_after.map_or(backoff, |hint| hint.max(backoff))
}
