//! The audit trail: one record per token handed out, whatever `RUST_LOG` says, on stdout within
//! a second, never holding up a request, and every record that could not be written counted.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::helpers::{Setup, spawn_app, spawn_app_with};

/// Token records ("token handed out") and the records lost, as reported by the broker.
fn written_and_lost(records: &[Value]) -> (u64, u64) {
    let written = records
        .iter()
        .filter(|record| record["message"] == "token handed out")
        .count() as u64;
    let lost = records
        .iter()
        .filter(|record| record["message"] == "audit records lost")
        .map(|record| {
            record["dropped"]
                .as_u64()
                .expect("a count of dropped records")
        })
        .sum();
    (written, lost)
}

#[tokio::test]
async fn audit_records_are_written_when_rust_log_asks_for_warnings_only() {
    let app = spawn_app_with(Setup {
        rust_log: "warn",
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.token("demo").await.status(), 200);
    let records = app.audit_records_when(2).await;
    let caches: Vec<&str> = records
        .iter()
        .map(|record| record["cache"].as_str().unwrap())
        .collect();
    assert_eq!(caches, ["miss", "hit"]);
    for record in &records {
        assert_eq!(record["connection"], "demo");
        assert_eq!(record["scopes"], "read");
        assert_eq!(record["message"], "token handed out");
        assert!(
            record["fingerprint"].as_str().unwrap().len() == 12,
            "{record}"
        );
        assert_eq!(
            record["span"]["invocation_id"],
            "3f2b8c1e-0000-4000-8000-000000000001"
        );
    }
    // RUST_LOG still governs everything else: the token request's INFO line is not written.
    let logs = app.logs().join("\n");
    assert!(!logs.contains("token endpoint issued a token"), "{logs}");
}

#[tokio::test]
async fn a_record_reaches_stdout_within_a_second_without_further_traffic() {
    let app = spawn_app().await;
    // A miss first, so that the record timed below is the cheap path's (a hit).
    assert_eq!(app.token("demo").await.status(), 200);
    app.audit_records_when(1).await;
    assert_eq!(app.token("demo").await.status(), 200);
    let answered = Instant::now();
    let arrived = loop {
        if app.audit_records().len() >= 2 {
            break answered.elapsed();
        }
        assert!(
            answered.elapsed() < Duration::from_secs(5),
            "the record never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        arrived < Duration::from_secs(1),
        "the record took {arrived:?} to reach stdout"
    );
}

#[tokio::test]
async fn records_queued_at_shutdown_are_written_before_the_process_exits() {
    let mut app = spawn_app().await;
    let requests = (0..20).map(|_| app.token("demo"));
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
    }
    let status = app.terminate();
    assert!(status.success(), "{status:?}");
    let (written, lost) = written_and_lost(&app.log_records());
    assert_eq!((written, lost), (20, 0));
}

#[tokio::test]
async fn a_full_stdout_pipe_holds_up_no_request_and_every_lost_record_is_counted() {
    // A small queue, so that a few thousand requests overflow it once the pipe is full.
    let app = spawn_app_with(Setup {
        rust_log: "info",
        extra_env: vec![("TOKEN_BROKER_LOG_QUEUE_LINES".into(), "64".into())],
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("demo").await.status(), 200);
    app.audit_records_when(1).await;

    // The collector stalls: the pipe (64 KiB) and the writer's batch fill, then the queue.
    app.pause_stdout();
    const REQUESTS: usize = 3000;
    let started = Instant::now();
    let slowest = futures_util::stream::iter(0..REQUESTS)
        .map(|_| async {
            let sent = Instant::now();
            let response = tokio::time::timeout(Duration::from_secs(10), app.token("demo"))
                .await
                .expect("a request waited 10 s: stdout blocks request workers");
            assert_eq!(response.status(), 200);
            sent.elapsed()
        })
        .buffer_unordered(16)
        .fold(
            Duration::ZERO,
            |slowest, took| async move { slowest.max(took) },
        )
        .await;
    println!(
        "{REQUESTS} requests with stdout blocked in {:?}, slowest {slowest:?}",
        started.elapsed()
    );
    let seen_while_paused = app.logs().len();

    // Once the collector reads again, written + lost accounts for every token handed out.
    app.resume_stdout();
    let handed_out = REQUESTS as u64 + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (written, lost) = loop {
        let (written, lost) = written_and_lost(&app.log_records());
        if written + lost >= handed_out || Instant::now() > deadline {
            break (written, lost);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("written {written}, lost {lost}, lines read while paused {seen_while_paused}");
    assert!(
        lost > 0,
        "the queue never overflowed: the test proves nothing"
    );
    assert_eq!(written + lost, handed_out, "every token is accounted for");
}
