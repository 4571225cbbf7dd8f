//! Unit tests of `stats`.

use super::*;

#[test]
fn a_period_s_counts_are_summed_over_shards_and_start_over() {
    let registry = Registry::new();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..1000 {
                    registry.response(200, None);
                    registry.cache_outcome(CacheLookup::Hit);
                }
                registry.response(503, Some(ErrorCode::UpstreamUnavailable));
                registry.response(418, Some(ErrorCode::InvalidRequest));
            });
        }
    });
    let snapshot = registry.take();
    let line = format_line(
        &snapshot,
        Duration::from_secs(60),
        &["flaky"],
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(value["target"], "stats");
    assert_eq!(value["message"], "stats");
    assert_eq!(value["requests"], 4 * 1002);
    assert_eq!(value["requests_by_status"]["200"], 4000);
    assert_eq!(value["requests_by_status"]["503"], 4);
    assert_eq!(value["requests_by_status"]["other"], 4);
    assert_eq!(value["errors_by_code"]["upstream_unavailable"], 4);
    assert_eq!(value["errors_by_code"]["invalid_request"], 4);
    assert!(value["errors_by_code"].get("other").is_none());
    assert!(value["errors_by_code"].get("invalid_scope").is_none());
    assert_eq!(value["cache_hits"], 4000);
    assert_eq!(value["breakers_open"], 1);
    assert_eq!(value["breakers_open_connections"][0], "flaky");
    assert_eq!(value["token_fetch_p50_ms"], serde_json::Value::Null);
    let again = registry.take();
    assert_eq!(again.statuses.iter().sum::<u64>(), 0, "counts are deltas");
}

#[test]
fn latency_percentiles_come_from_the_buckets_capped_at_the_largest_seen() {
    let registry = Registry::new();
    for _ in 0..90 {
        registry.fetch("ok", Duration::from_millis(7));
    }
    for _ in 0..9 {
        registry.fetch("unavailable", Duration::from_millis(300));
    }
    registry.fetch("unavailable", Duration::from_millis(1_234));
    let snapshot = registry.take();
    assert_eq!(snapshot.latency_percentile(50), Some(10));
    assert_eq!(snapshot.latency_percentile(95), Some(500));
    assert_eq!(snapshot.latency_percentile(99), Some(500));
    assert_eq!(snapshot.latency_percentile(100), Some(1_234));
    let line = format_line(&snapshot, Duration::from_secs(1), &[], SystemTime::now());
    let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(value["token_fetches"], 100);
    assert_eq!(value["token_fetch_failures"], 10);
    assert_eq!(value["token_fetches_by_result"]["ok"], 90);
    assert_eq!(value["token_fetch_max_ms"], 1_234);
}

#[test]
fn a_connection_s_token_is_none_once_expired_and_stale_when_handed_out_stale() {
    let stats = ConnectionStats::default();
    let at = |seconds| UNIX_EPOCH + Duration::from_secs(seconds);
    assert_eq!(
        (stats.token(at(100)), stats.last_fetch()),
        ("none", "never")
    );
    stats.fetched(true);
    stats.handed_out(200, false);
    assert_eq!((stats.token(at(100)), stats.last_fetch()), ("fresh", "ok"));
    stats.handed_out(200, true);
    assert_eq!(stats.token(at(100)), "stale");
    assert_eq!(stats.token(at(200)), "none");
    stats.fetched(false);
    assert_eq!(stats.last_fetch(), "failed");
}

#[test]
fn every_counted_status_has_the_slot_of_its_text_and_any_other_the_other_slot() {
    for (slot, text) in STATUSES.iter().enumerate() {
        assert_eq!(status_index(text.parse().unwrap()), slot, "status {text}");
    }
    for other in [100, 201, 204, 302, 429, 501, 504, 999] {
        assert_eq!(status_index(other), STATUSES.len(), "status {other}");
    }
}

#[test]
fn every_error_code_is_named_by_its_own_variant() {
    assert_eq!(ErrorCode::UnknownConnection.as_str(), "unknown_connection");
    assert_eq!(ErrorCode::InternalError.as_str(), "internal_error");
    assert_eq!(ERROR_CODES.len(), ErrorCode::InternalError as usize + 1);
}
