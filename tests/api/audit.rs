//! The audit trail accounts for every token handed out, whatever `RUST_LOG` says: a fetch or a
//! stale answer gets a record at once, cache hits one record per caller and token per interval
//! with their `count`, on stdout without holding up a request, written at shutdown, and every
//! record that could not be written counted, by the tokens it stood for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::support::{Setup, TestApp, jwt_callers, spawn_app, spawn_app_with};

/// The broker's interval for aggregated cache-hit records (`audit::HIT_INTERVAL`).
const HIT_INTERVAL: Duration = Duration::from_secs(5);

/// The slowest a cache hit may be with stdout blocked: a hit's own work is a millisecond or so,
/// the rest is slack for a loaded machine. Log output must not be what a request waits for.
const SLOWEST_HIT: Duration = Duration::from_secs(1);

/// Tokens the written records stand for (the sum of `count`), and the tokens reported lost.
fn written_and_lost(records: &[Value]) -> (u64, u64) {
    let written = records
        .iter()
        .filter(|record| record["message"] == "token handed out")
        .map(|record| record["count"].as_u64().expect("every record has a count"))
        .sum();
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

/// Aggregated cache-hit records: they carry `since`, when their period began.
fn hit_records(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|record| record["message"] == "token handed out" && record["cache"] == "hit")
        .collect()
}

#[tokio::test]
async fn audit_records_are_written_when_rust_log_asks_for_warnings_only() {
    let mut app = spawn_app_with(Setup {
        rust_log: "warn",
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.token("demo").await.status(), 200);
    assert!(app.terminate().await.success());
    let records = app.audit_records();
    let caches: Vec<(&str, u64)> = records
        .iter()
        .map(|record| {
            (
                record["cache"].as_str().unwrap(),
                record["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(caches, [("miss", 1), ("hit", 1)]);
    for record in &records {
        assert_eq!(record["connection"], "demo");
        assert_eq!(record["caller"], "function-key");
        assert_eq!(record["scopes"], "read");
        assert_eq!(record["message"], "token handed out");
        assert!(
            record["fingerprint"].as_str().unwrap().len() == 12,
            "{record}"
        );
    }
    assert_eq!(records[0]["fingerprint"], records[1]["fingerprint"]);
    // The fetch's record is the request's own; the hits' record covers a period.
    assert_eq!(
        records[0]["span"]["invocation_id"],
        "3f2b8c1e-0000-4000-8000-000000000001"
    );
    assert!(records[1]["since"].is_string(), "{}", records[1]);
    // RUST_LOG still governs everything else: the token request's INFO line is not written.
    let logs = app.logs().join("\n");
    assert!(!logs.contains("token endpoint issued a token"), "{logs}");
}

#[tokio::test]
async fn a_fetch_is_recorded_within_a_second_and_hits_within_their_interval() {
    let app = spawn_app().await;
    let answered = Instant::now();
    assert_eq!(app.token("demo").await.status(), 200);
    let arrived = wait_for(&app, answered, |records| !records.is_empty()).await;
    assert!(
        arrived < Duration::from_secs(1),
        "the fetch's record took {arrived:?} to reach stdout"
    );
    for _ in 0..3 {
        assert_eq!(app.token("demo").await.status(), 200);
    }
    let answered = Instant::now();
    // No further traffic: the interval's end alone writes the hits' one record.
    let arrived = wait_for(&app, answered, |records| !hit_records(records).is_empty()).await;
    assert!(
        arrived < HIT_INTERVAL + Duration::from_secs(1),
        "the hits' record took {arrived:?} to reach stdout"
    );
    let records = app.audit_records();
    let hits = hit_records(&records);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["count"], 3);
}

/// How long after `since` the audit records first satisfied `done` (at most 10 s).
async fn wait_for(app: &TestApp, since: Instant, done: impl Fn(&[Value]) -> bool) -> Duration {
    loop {
        if done(&app.audit_records()) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no such record after 10 s:\n{}",
            app.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn records_counted_at_shutdown_are_written_before_the_process_exits() {
    let mut app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    assert_eq!(app.token("demo").await.status(), 200);
    // That hit's record comes at the end of the log writer's period: the next period ends
    // 5 s later, time enough for the hits below to stay counted, not written, until SIGTERM.
    let started = Instant::now();
    wait_for(&app, started, |records| !hit_records(records).is_empty()).await;
    let period_ended = Instant::now();
    let requests = (0..20).map(|_| app.token("demo"));
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
    }
    // A fetch after them: its record is written at once, after anything queued before it, so
    // once it is out, a record written per hit would be out too.
    assert_eq!(app.get("/api/token/demo?scope=write").await.status(), 200);
    wait_for(&app, period_ended, |records| {
        records.iter().any(|r| r["scopes"] == "write")
    })
    .await;
    let (before, _) = written_and_lost(&app.log_records());
    let waited = period_ended.elapsed();
    assert!(
        waited < HIT_INTERVAL - Duration::from_secs(1),
        "the requests took {waited:?}: their period may have ended, the test proves nothing"
    );
    let status = app.terminate().await;
    assert!(status.success(), "{status:?}");
    let (written, lost) = written_and_lost(&app.log_records());
    println!("tokens written before SIGTERM {before}, after {written}");
    assert_eq!(
        before, 3,
        "before SIGTERM: the two fetches' records and the first hit's; the 20 hits only counted"
    );
    assert_eq!(
        (written, lost),
        (23, 0),
        "SIGTERM wrote the 20 hits' record"
    );
    let hits: Vec<u64> = hit_records(&app.log_records())
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .collect();
    assert_eq!(
        hits,
        [1, 20],
        "one record for the 20 hits, written at shutdown"
    );
}

/// The broker's cap on its last log flush when stdout is blocked (`observe::telemetry::SHUTDOWN_FLUSH`).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

#[tokio::test]
async fn sigterm_with_stdout_blocked_exits_within_the_five_second_flush_cap() {
    // At debug every request writes a line: unread, they fill the pipe and block the writer.
    let mut app = spawn_app_with(Setup {
        rust_log: "debug",
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("demo").await.status(), 200);
    app.pause_stdout();
    let served = futures_util::stream::iter(0..2000)
        .map(|_| async { app.token("demo").await.status() })
        .buffer_unordered(16)
        .filter(|status| std::future::ready(*status == 200))
        .count()
        .await;
    assert_eq!(served, 2000);
    let signalled = Instant::now();
    app.send_sigterm().await;
    let margin = Duration::from_secs(3);
    let status = app.wait_for_exit(SHUTDOWN_FLUSH + margin).await;
    let took = signalled.elapsed();
    println!("with stdout blocked the broker exited {took:?} after SIGTERM: {status:?}");
    let status = status.expect("the broker did not exit within the flush cap and a margin");
    assert!(status.success(), "{status}");
    assert!(
        took >= SHUTDOWN_FLUSH,
        "exited after {took:?}: stdout was not blocked, the test proves nothing"
    );
    app.resume_stdout();
}

/// Requests `paths` (each as one of `bearers`, when any) from `clients` concurrent clients;
/// returns the 200 answers per caller.
async fn load(
    app: &TestApp,
    requests: usize,
    clients: usize,
    paths: &[&str],
    bearers: &[(&str, String)],
) -> BTreeMap<String, u64> {
    futures_util::stream::iter(0..requests)
        .map(|n| async move {
            let path = paths[n % paths.len()];
            let (caller, response) = match bearers.get(n % bearers.len().max(1)) {
                Some((caller, bearer)) => (caller.to_string(), app.get_as(path, bearer).await),
                None => ("function-key".to_string(), app.get(path).await),
            };
            (caller, response.status())
        })
        .buffer_unordered(clients)
        .fold(BTreeMap::new(), |mut served, (caller, status)| async move {
            assert_eq!(status, 200);
            *served.entry(caller).or_insert(0) += 1;
            served
        })
        .await
}

#[tokio::test]
async fn under_load_the_counts_of_the_audit_records_add_up_to_every_token_served() {
    // Two callers, several connections and scope sets: many (caller, token) keys at once.
    let mut app = spawn_app_with(Setup {
        rust_log: "info",
        extra_config: jwt_callers("{issuer}", None, 0),
        ..Setup::default()
    })
    .await;
    let bearers = [
        ("caller-app", app.idp.caller_token("caller-app").await),
        ("caller-admin", app.idp.caller_token("caller-admin").await),
    ];
    let paths = [
        "/api/token/demo",
        "/api/token/demo?scope=write",
        "/api/token/demo?scope=read%20write",
        "/api/token/posty",
        "/api/token/setting",
    ];
    const REQUESTS: usize = 3000;
    let started = Instant::now();
    let first = load(&app, REQUESTS, 64, &paths, &bearers).await;
    let took = started.elapsed();
    // The interval's end writes the first burst's hits while the broker keeps running.
    let waited = wait_for(&app, Instant::now(), |records| {
        hit_records(records)
            .iter()
            .any(|record| record["count"].as_u64() > Some(1))
    })
    .await;
    let interval_hits = hit_records(&app.audit_records()).len();
    println!("the interval's hit records came {waited:?} after the first burst");
    assert!(
        waited < HIT_INTERVAL + Duration::from_secs(1),
        "hit records are written every {HIT_INTERVAL:?}; these took {waited:?}"
    );
    let second = load(&app, REQUESTS, 64, &paths, &bearers).await;
    // The second burst's hits are in memory until SIGTERM makes the broker write them.
    assert!(app.terminate().await.success());

    let records = app.log_records();
    let (written, lost) = written_and_lost(&records);
    let served: u64 = first.values().chain(second.values()).sum();
    println!(
        "{} requests from 64 clients in {took:?} per burst; {served} tokens served, \
         {written} in {} audit records ({interval_hits} hit records at the interval), {lost} lost",
        2 * REQUESTS,
        records
            .iter()
            .filter(|r| r["message"] == "token handed out")
            .count()
    );
    assert_eq!(served, 2 * REQUESTS as u64);
    assert_eq!(written + lost, served, "every token is accounted for");
    // Per caller too: the audit trail says who got how many.
    for (caller, _) in &bearers {
        let audited: u64 = records
            .iter()
            .filter(|r| r["message"] == "token handed out" && r["caller"] == *caller)
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        assert_eq!(audited, first[*caller] + second[*caller], "{caller}");
    }
    // Hits were aggregated: far fewer records than tokens.
    assert!(
        hit_records(&records).len() < 100,
        "{}",
        hit_records(&records).len()
    );
}

#[tokio::test]
async fn a_full_stdout_pipe_holds_up_no_request_and_every_lost_record_is_counted() {
    // A small queue and a line per request (debug), so that once the pipe is full the queue
    // overflows; then fetches whose records find no room.
    let app = spawn_app_with(Setup {
        rust_log: "debug",
        extra_env: vec![("TOKEN_BROKER_LOG_QUEUE_LINES".into(), "16".into())],
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("demo").await.status(), 200);
    app.audit_records_when(1).await;

    // The collector stalls: the pipe (64 KiB) and the writer's batch fill, then the queue.
    app.pause_stdout();
    const HITS: usize = 3000;
    let started = Instant::now();
    let slowest = futures_util::stream::iter(0..HITS)
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
    // Fetches (one record each) while the queue is full: most of their records are lost.
    let fetches = [
        "/api/token/demo?scope=write",
        "/api/token/demo?scope=read%20write",
        "/api/token/posty",
        "/api/token/posty?scope=read",
        "/api/token/posty?scope=write",
        "/api/token/short",
        "/api/token/setting",
        "/api/token/rotating",
    ];
    for path in fetches {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
    println!(
        "{HITS} requests with stdout blocked in {:?}, slowest {slowest:?}",
        started.elapsed()
    );
    // A cache hit takes a millisecond or so; one that waited on the blocked stdout (or on a
    // full queue) would take until the collector reads again.
    assert!(
        slowest < SLOWEST_HIT,
        "a request took {slowest:?} with stdout blocked: log output held it up"
    );
    let seen_while_paused = app.logs().len();

    // Once the collector reads again, written + lost accounts for every token handed out.
    app.resume_stdout();
    let handed_out = (1 + HITS + fetches.len()) as u64;
    let deadline = Instant::now() + HIT_INTERVAL + Duration::from_secs(15);
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
