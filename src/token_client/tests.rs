//! Unit tests of `token_client`.

use std::time::Duration;

use oauth2::http::{HeaderMap, header};

use super::failure::Failure;
use super::oauth_error::{OAuthErrorBody, oauth_error_code};
use super::retry::{
    BACKOFF_BASE, BACKOFF_CAP, MAX_RETRY_WAIT, retry_wait, with_retries, within_deadline,
};
use super::transport::retry_after;
use super::*;

#[test]
fn invalid_client_and_entra_secret_codes_mean_a_bad_secret() {
    let parse = |body: &str| serde_json::from_str::<OAuthErrorBody>(body).unwrap();
    assert!(parse(r#"{"error":"invalid_client"}"#).means_bad_secret());
    assert!(parse(r#"{"error":"unauthorized_client","error_codes":[7000222]}"#).means_bad_secret());
    assert!(!parse(r#"{"error":"invalid_scope","error_codes":[70011]}"#).means_bad_secret());
}

#[test]
fn upstream_error_codes_are_passed_only_when_well_formed() {
    assert_eq!(oauth_error_code("invalid_client"), "invalid_client");
    assert_eq!(oauth_error_code("bad\"code"), "unrecognised_error");
    assert_eq!(oauth_error_code("line\nbreak"), "unrecognised_error");
    assert_eq!(oauth_error_code(&"x".repeat(65)), "unrecognised_error");
}

#[test]
fn retry_after_is_read_in_seconds_and_as_an_http_date() {
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_400); // 07:26:40 GMT
    let mut headers = HeaderMap::new();
    headers.insert(header::RETRY_AFTER, "7".parse().unwrap());
    assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
    headers.insert(
        header::RETRY_AFTER,
        "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
    );
    assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(80)));
    headers.insert(
        header::RETRY_AFTER,
        "Wed, 21 Oct 2015 07:00:00 GMT".parse().unwrap(),
    );
    assert_eq!(
        retry_after(&headers, now),
        Some(Duration::ZERO),
        "a past date means now"
    );
    headers.insert(header::RETRY_AFTER, "soon".parse().unwrap());
    assert_eq!(retry_after(&headers, now), None);
}

#[test]
fn the_retry_wait_honours_retry_after_and_stays_within_the_jitter_ceiling() {
    for attempt in 0..12 {
        let wait = retry_wait(attempt, None);
        assert!(wait < BACKOFF_CAP, "{attempt}: {wait:?}");
        assert!(
            wait < BACKOFF_BASE * 2u32.pow(attempt.min(4)),
            "{attempt}: {wait:?}"
        );
    }
    assert_eq!(
        retry_wait(0, Some(Duration::from_secs(3))),
        Duration::from_secs(3)
    );
}

#[test]
fn a_401_means_a_bad_secret_whatever_its_body_and_other_rejections_do_not() {
    let rejected = |status, body: Option<&str>| Failure::Rejected {
        status,
        body: body.map(|b| serde_json::from_str(b).unwrap()),
    };
    assert!(rejected(401, None).means_bad_secret());
    assert!(rejected(400, Some(r#"{"error":"invalid_client"}"#)).means_bad_secret());
    assert!(!rejected(400, Some(r#"{"error":"invalid_scope"}"#)).means_bad_secret());
    assert!(!rejected(403, None).means_bad_secret());
    assert!(!rejected(404, None).means_bad_secret());
}

/// The retry loop driven by a fake exchange on tokio's paused clock: what each attempt
/// answers comes from `answers` (the last one repeats), and every attempt is counted.
mod retry_loop {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::VecDeque;

    fn unavailable(retry_after: Option<u64>) -> Failure {
        Failure::Unavailable {
            detail: "it answered HTTP 503".to_string(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    /// One scripted answer of the fake exchange.
    type Answer = fn() -> Result<&'static str, Failure>;

    /// A fake exchange answering from a script; `attempts` counts its calls.
    struct Fake {
        answers: RefCell<VecDeque<Answer>>,
        attempts: Cell<u32>,
        /// How long each attempt takes before it answers.
        takes: Duration,
    }

    impl Fake {
        fn new(answers: &[Answer]) -> Self {
            Self {
                answers: RefCell::new(answers.iter().copied().collect()),
                attempts: Cell::new(0),
                takes: Duration::ZERO,
            }
        }

        fn exchange(&self) -> impl std::future::Future<Output = Result<&'static str, Failure>> {
            self.attempts.set(self.attempts.get() + 1);
            let mut answers = self.answers.borrow_mut();
            let answer = if answers.len() > 1 {
                answers.pop_front().unwrap()
            } else {
                answers[0]
            };
            let takes = self.takes;
            async move {
                tokio::time::sleep(takes).await;
                answer()
            }
        }
    }

    async fn run(fake: &Fake, max_retries: u32, budget: u32) -> Result<&'static str, Failure> {
        let budget = Cell::new(budget);
        let take_retry = || {
            let left = budget.get();
            budget.set(left.saturating_sub(1));
            left > 0
        };
        with_retries("test", max_retries, take_retry, |_| fake.exchange()).await
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_answers_are_retried_up_to_max_retries() {
        let fake = Fake::new(&[|| Err(unavailable(None))]);
        let outcome = run(&fake, 2, 100).await;
        assert!(matches!(outcome, Err(Failure::Unavailable { .. })));
        assert_eq!(fake.attempts.get(), 3, "the first try and two retries");

        let fake = Fake::new(&[
            || Err(unavailable(None)),
            || Err(unavailable(None)),
            || Ok("token"),
        ]);
        assert_eq!(run(&fake, 2, 100).await.unwrap(), "token");
        assert_eq!(fake.attempts.get(), 3, "the third attempt succeeded");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_whose_assertion_cannot_be_signed_ends_with_the_providers_own_answer() {
        // Attempt 1: the provider is unavailable and asks for a second; the retry's new
        // assertion cannot be signed. The outcome is the provider's answer, its hint kept,
        // not a failure charged to the provider, and nothing more is tried.
        let fake = Fake::new(&[
            || Err(unavailable(Some(1))),
            || Err(Failure::NoRetryCredential),
        ]);
        let outcome = run(&fake, 2, 100).await;
        assert!(
            matches!(
                outcome,
                Err(Failure::Unavailable { retry_after: Some(wait), .. }) if wait == Duration::from_secs(1)
            ),
            "{outcome:?}"
        );
        assert_eq!(fake.attempts.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_and_unusable_answers_are_not_retried() {
        let rejected: Answer = || {
            Err(Failure::Rejected {
                status: 400,
                body: None,
            })
        };
        let invalid: Answer = || {
            Err(Failure::Invalid {
                detail: "not a token".to_string(),
            })
        };
        for answer in [rejected, invalid] {
            let fake = Fake::new(&[answer]);
            let started = Instant::now();
            let outcome = run(&fake, 5, 100).await;
            assert!(outcome.is_err());
            assert!(!matches!(outcome, Err(Failure::Unavailable { .. })));
            assert_eq!(fake.attempts.get(), 1, "asked once");
            assert_eq!(started.elapsed(), Duration::ZERO, "no wait");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_within_the_limit_is_waited_out_exactly() {
        let fake = Fake::new(&[|| Err(unavailable(Some(3))), || Ok("token")]);
        let started = Instant::now();
        assert_eq!(run(&fake, 2, 100).await.unwrap(), "token");
        // The jitter of a first retry is below 200 ms, so the server's 3 s decides.
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(fake.attempts.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_above_the_limit_goes_back_to_the_caller_at_once() {
        let above = MAX_RETRY_WAIT.as_secs() + 1;
        assert_eq!(above, 6);
        let fake = Fake::new(&[|| Err(unavailable(Some(6))), || Ok("token")]);
        let started = Instant::now();
        match run(&fake, 2, 100).await {
            Err(Failure::Unavailable { retry_after, .. }) => {
                assert_eq!(
                    retry_after,
                    Some(Duration::from_secs(above)),
                    "the hint is kept for the caller"
                );
            }
            other => panic!("expected the 503 with its hint, got {other:?}"),
        }
        assert_eq!(fake.attempts.get(), 1, "not retried");
        assert_eq!(started.elapsed(), Duration::ZERO, "not waited out");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_retry_budget_stops_retries_before_max_retries() {
        let fake = Fake::new(&[|| Err(unavailable(None))]);
        assert!(run(&fake, 5, 1).await.is_err());
        assert_eq!(fake.attempts.get(), 2, "one retry from a budget of one");
        let fake = Fake::new(&[|| Err(unavailable(None))]);
        assert!(run(&fake, 5, 0).await.is_err());
        assert_eq!(fake.attempts.get(), 1, "no budget, no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_without_a_hint_stays_under_the_doubling_jitter_ceilings() {
        for _ in 0..20 {
            let fake = Fake::new(&[|| Err(unavailable(None))]);
            let started = Instant::now();
            assert!(run(&fake, 3, 100).await.is_err());
            assert_eq!(fake.attempts.get(), 4);
            // Ceilings 200, 400 and 800 ms for the three waits.
            assert!(
                started.elapsed() < Duration::from_millis(1400),
                "{:?}",
                started.elapsed()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_retries_and_their_waits_together() {
        // Each attempt takes 1 s and asks for 1 s more: without the deadline, 100 retries
        // would take over three minutes.
        let mut fake = Fake::new(&[|| Err(unavailable(Some(1)))]);
        fake.takes = Duration::from_secs(1);
        let started = Instant::now();
        let outcome =
            within_deadline(started + Duration::from_secs(3), 3, run(&fake, 100, 100)).await;
        match outcome {
            Err(Failure::OutOfTime { detail }) => {
                assert_eq!(detail, "no token within the 3s deadline");
            }
            other => panic!("expected the deadline's 503, got {other:?}"),
        }
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3),
            "the deadline, not later"
        );
        // Attempt 1 at 0 s, its wait to 2 s, attempt 2 cut off at 3 s.
        assert_eq!(fake.attempts.get(), 2);
    }
}
