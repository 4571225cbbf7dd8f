//! The `stats` line: every `stats_interval_seconds`, the counts of what happened since the
//! previous line, written whatever `RUST_LOG` says, and once more at shutdown.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Setup, refusing_port, spawn_app_with};

/// The sum of `path` over `lines`: a field every line must carry (`["requests"]`), or a count
/// in one of its objects of counts (`["requests_by_status", "200"]`), which leaves a name out
/// when its count is zero. A missing field or object fails the test; it is never read as 0.
fn sum(lines: &[Value], path: &[&str]) -> u64 {
    lines
        .iter()
        .map(|line| {
            let (name, objects) = path.split_last().expect("a field name");
            let holder = objects.iter().fold(line, |value, key| {
                value
                    .get(*key)
                    .unwrap_or_else(|| panic!("a stats line without {key}: {line}"))
            });
            match holder.get(*name) {
                Some(count) => count
                    .as_u64()
                    .unwrap_or_else(|| panic!("{path:?} is not a count: {line}")),
                None if !objects.is_empty() && holder.is_object() => 0,
                None => panic!("a stats line without {path:?}: {line}"),
            }
        })
        .sum()
}

#[tokio::test]
async fn stats_lines_count_requests_cache_outcomes_fetches_and_key_vault_reads() {
    let mut app = spawn_app_with(Setup {
        rust_log: "warn",
        extra_config: "\n[telemetry]\nstats_interval_seconds = 1\n".to_string(),
        ..Setup::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.token("demo").await.status(), 200);
    }
    assert_eq!(app.token("nonesuch").await.status(), 404);
    assert_eq!(app.get("/api/token/demo?scope=admin").await.status(), 400);
    assert_eq!(app.token("nosecret").await.status(), 503);
    assert_eq!(app.token("down").await.status(), 503);

    // A line comes every second without any traffic to prompt it.
    let started = Instant::now();
    let records = loop {
        let records = app.log_records();
        let lines: Vec<Value> = records
            .into_iter()
            .filter(|record| record["target"] == "stats")
            .collect();
        if sum(&lines, &["requests"]) >= 7 {
            break lines;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no stats line counting the requests after 5 s:\n{}",
            app.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let line = &records[0];
    assert_eq!(line["message"], "stats");
    assert_eq!(line["level"], "INFO");
    assert!(line["period_seconds"].as_f64().unwrap() > 0.5, "{line}");
    // No shared tier configured: no `shared_*` fields (zeros would claim a tier that is not there).
    assert!(line.get("shared_hits").is_none(), "{line}");

    // SIGTERM writes the last partial period: summed, the lines hold every count.
    assert!(app.terminate().await.success());
    let lines: Vec<Value> = app
        .log_records()
        .into_iter()
        .filter(|record| record["target"] == "stats")
        .collect();
    println!("{} stats lines; the first: {}", lines.len(), lines[0]);
    let count = |path: &[&str]| sum(&lines, path);
    // The readiness probes of `/` are not requests.
    assert_eq!(count(&["requests"]), 7);
    assert_eq!(count(&["requests_by_status", "200"]), 3);
    assert_eq!(count(&["requests_by_status", "404"]), 1);
    assert_eq!(count(&["requests_by_status", "400"]), 1);
    assert_eq!(count(&["requests_by_status", "503"]), 2);
    assert_eq!(count(&["errors_by_code", "unknown_connection"]), 1);
    assert_eq!(count(&["errors_by_code", "invalid_scope"]), 1);
    assert_eq!(count(&["errors_by_code", "secret_unavailable"]), 1);
    assert_eq!(count(&["errors_by_code", "upstream_unavailable"]), 1);
    assert_eq!(count(&["cache_hits"]), 2);
    assert_eq!(count(&["cache_misses"]), 1);
    assert_eq!(count(&["cache_stale"]), 0);
    assert_eq!(count(&["token_fetches"]), 3);
    assert_eq!(count(&["token_fetches_by_result", "ok"]), 1);
    assert_eq!(count(&["token_fetches_by_result", "secret_unavailable"]), 1);
    assert_eq!(count(&["token_fetches_by_result", "unavailable"]), 1);
    assert_eq!(count(&["token_fetch_failures"]), 2);
    // demo's secret, and nosecret's, which Key Vault does not have.
    assert_eq!(count(&["key_vault_reads"]), 2);
    assert_eq!(count(&["key_vault_failures"]), 1);
    assert_eq!(count(&["jwks_reloads"]), 0);
    assert_eq!(count(&["audit_dropped"]), 0);
    let with_fetches: Vec<&Value> = lines
        .iter()
        .filter(|line| line["token_fetches"].as_u64() > Some(0))
        .collect();
    for line in with_fetches {
        let (p50, p99, max) = (
            line["token_fetch_p50_ms"].as_u64().unwrap(),
            line["token_fetch_p99_ms"].as_u64().unwrap(),
            line["token_fetch_max_ms"].as_u64().unwrap(),
        );
        assert!(p50 <= p99 && p99 <= max, "{line}");
    }
    // The RUST_LOG=warn run wrote no INFO line but these.
    assert!(
        app.log_records()
            .iter()
            .filter(|record| record["level"] == "INFO")
            // The "listening" line is kept at any level: it is how the port is reported.
            .filter(|record| record["target"] != "token_broker::startup")
            .all(|record| record["target"] == "stats" || record["target"] == "audit")
    );
}

#[tokio::test]
async fn the_stats_line_names_the_open_circuit_breakers() {
    // A port held for the test's lifetime and refusing: nothing else can answer on it.
    let (_refusing, port) = refusing_port();
    let mut app = spawn_app_with(Setup {
        rust_log: "warn",
        extra_config: format!(
            r#"
[connections.fragile]
token_url = "http://127.0.0.1:{port}/token"
client_id = "broker-basic"
client_secret = {{ app_setting = "SETTING_SECRET" }}
max_retries = 0
breaker_failures = 1
breaker_open_seconds = 600

[telemetry]
stats_interval_seconds = 1
"#
        ),
        ..Setup::default()
    })
    .await;
    assert_eq!(app.token("fragile").await.status(), 503);
    assert!(app.terminate().await.success());
    let last = app
        .log_records()
        .into_iter()
        .rfind(|record| record["target"] == "stats")
        .expect("a stats line at shutdown");
    assert_eq!(last["breakers_open"], 1, "{last}");
    assert_eq!(last["breakers_open_connections"][0], "fragile");
}
