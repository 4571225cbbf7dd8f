//! What a fleet does to the shared tier at its edges: cold bursts over several instances, a
//! lock holder killed mid-fetch, a lock key no broker wrote, a rotation that cannot reach the
//! fleet, and a rotated encryption key.

use std::time::{Duration, Instant};

use token_broker_doubles::FaultProxy;
use token_broker_doubles::fault_proxy::Fault;

use crate::support::{
    Broker, CACHE_KEY, FLEET_SECRET, Fleet, OTHER_CACHE_KEY, RedisOptions, RedisProxy, RedisServer,
};

/// Every broker asks for `path` `per_broker` times at once; all must succeed.
async fn burst(brokers: &[Broker], path: &str, per_broker: usize) -> Vec<String> {
    let requests = brokers
        .iter()
        .flat_map(|broker| (0..per_broker).map(move |_| broker.access_token(path)));
    futures_util::future::join_all(requests).await
}

/// The Redis keys matching `pattern`.
fn keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query(&mut redis.inspect())
        .unwrap()
}

#[tokio::test]
async fn six_cold_bursts_of_120_over_three_instances_make_one_token_request_each_even_when_redis_stalls()
 {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 3).await;
    for round in 1..=6 {
        let before = fleet.token_requests().await;
        // Redis stalls for 300 ms as the burst begins (a busy server, a failover, a slow
        // disk): its first answers come later than the brokers' 100 ms timeout. A late
        // answer is a miss for that operation, not a reason to leave the fleet.
        if round % 2 == 0 {
            let _: () = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(300)
                .arg("ALL")
                .query(&mut redis.inspect())
                .unwrap();
        }
        let tokens = burst(&brokers, "demo", 40).await;
        assert_eq!(
            fleet.token_requests().await - before,
            1,
            "round {round}: one token request for 120 callers on 3 instances"
        );
        assert!(
            tokens.iter().all(|token| token == &tokens[0]),
            "round {round}: one token for the fleet"
        );
        make_cold(&fleet, &brokers, round).await;
    }
}

/// Cold again everywhere: a rotation delivered to the first broker drops every instance's
/// token and the shared entry; returns once every other broker has heard of a rotation
/// `nth` times.
async fn make_cold(fleet: &Fleet, brokers: &[Broker], nth: usize) {
    let version = fleet.set_secret("fleet-secret", FLEET_SECRET);
    brokers[0].deliver_rotation("fleet-secret", &version).await;
    for broker in &brokers[1..] {
        broker
            .wait_for_log("rotation announced by another instance", nth)
            .await;
    }
}

/// A broker configuration whose token endpoint is reached through `proxy`.
fn through(fleet: &Fleet, config: &str, proxy: &FaultProxy) -> String {
    config.replace(&fleet.idp.token_endpoint, &format!("{}/token", proxy.url()))
}

#[tokio::test]
async fn a_lock_holder_killed_mid_fetch_holds_the_others_off_for_one_short_lease_only() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let proxy = FaultProxy::start(&fleet.idp.issuer).await.unwrap();
    let config = through(
        &fleet,
        &fleet.config("fleet-a", Some(&Fleet::shared_block(&redis))),
        &proxy,
    );
    let mut holder = fleet.broker(&config, &[]).await;
    let other = fleet.broker(&config, &[]).await;
    for broker in [&holder, &other] {
        broker.wait_for_log("shared cache connected", 1).await;
    }
    // The holder takes the fleet lock and hangs at the provider; then it is killed.
    proxy.push(Fault::Hold, 1);
    let stuck = tokio::spawn({
        let http = holder.http.clone();
        let url = format!("{}/api/token/demo", holder.address);
        async move { http.get(url).send().await }
    });
    assert!(proxy.wait_for_requests(1, Duration::from_secs(10)).await);
    assert_eq!(
        keys(&redis, "token-broker:l:*").len(),
        1,
        "the lock is held"
    );
    holder.kill();
    let _ = stuck.await;

    // The lease is short and no longer renewed: the other instance waits at most that long
    // (3 s), not the connection's whole 20 s deadline.
    let started = Instant::now();
    let token = other.access_token("demo").await;
    let waited = started.elapsed();
    eprintln!("measured: waited {waited:?} for a killed holder's lock");
    assert!(token.starts_with("eyJ"));
    assert!(
        waited < Duration::from_secs(8),
        "waited {waited:?} for a dead holder's lock"
    );
    assert_eq!(
        fleet.token_requests().await,
        1,
        "the held request never arrived"
    );
}

#[tokio::test]
async fn a_lock_key_without_expiry_does_not_stall_cold_fetches() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 2).await;
    brokers[0].access_token("demo").await;
    let entry = keys(&redis, "token-broker:t:*")
        .pop()
        .expect("a shared entry");
    let lock = entry.replace(":t:", ":l:");
    // Cold again, and someone with write access leaves a lock that never expires.
    make_cold(&fleet, &brokers, 1).await;
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("not-a-broker")
        .query(&mut redis.inspect())
        .unwrap();
    let started = Instant::now();
    burst(&brokers, "demo", 5).await;
    let waited = started.elapsed();
    eprintln!("measured: a cold burst behind a lock no broker wrote took {waited:?}");
    assert!(
        waited < Duration::from_secs(5),
        "a lock no broker wrote held a cold fetch {waited:?}"
    );
    assert_eq!(fleet.token_requests().await, 2, "one per cold key");
    // Log lines reach the pipe from the broker's writer thread: wait for the one expected.
    let taken_over = || -> usize {
        brokers
            .iter()
            .map(|broker| broker.log_count("was taken over"))
            .sum()
    };
    for _ in 0..500 {
        if taken_over() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(taken_over(), 1, "the instance that took it over says so");
    let left: Option<String> = redis::cmd("GET")
        .arg(&lock)
        .query(&mut redis.inspect())
        .unwrap();
    assert_eq!(left, None, "released by its new holder");
}

#[tokio::test]
async fn a_rotation_that_cannot_reach_the_fleet_is_a_503_so_event_grid_delivers_it_again() {
    let fleet = Fleet::start(3600).await;
    let mut redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 2).await;
    let version = fleet.set_secret("fleet-secret", FLEET_SECRET);
    redis.kill();
    let response = brokers[0].invoke_rotation("fleet-secret", &version).await;
    assert_eq!(
        response.status(),
        503,
        "a non-2xx answer fails the invocation"
    );
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "shared_cache_unavailable", "{body}");
    // Event Grid delivers it again once Redis is back, and then it reaches every instance.
    redis.restart().await;
    for broker in &brokers {
        broker.wait_for_log("shared cache connected", 2).await;
    }
    let body = brokers[0].deliver_rotation("fleet-secret", &version).await;
    assert!(
        body["Logs"][0]
            .as_str()
            .unwrap()
            .contains("told every instance")
    );
    brokers[1]
        .wait_for_log("rotation announced by another instance", 1)
        .await;
}

/// The usual shared block, with the encryption key read from Key Vault's `cache-key`.
fn vault_key_block(redis: &RedisServer) -> String {
    Fleet::shared_block(redis).replace(
        "{ app_setting = \"CACHE_KEY\" }",
        "{ key_vault_secret = \"cache-key\" }",
    )
}

#[tokio::test]
async fn a_new_cache_key_version_reaches_every_instance_and_instances_started_later_share_with_them()
 {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let config = fleet.config("fleet-a", Some(&vault_key_block(&redis)));
    let mut brokers = Vec::new();
    for _ in 0..2 {
        let broker = fleet.broker(&config, &[]).await;
        broker.wait_for_log("shared cache connected", 1).await;
        brokers.push(broker);
    }
    brokers[0].access_token("demo?scope=write").await;
    assert_eq!(fleet.token_requests().await, 1);

    // A new version of the cache key; Event Grid tells one instance.
    let version = fleet.set_secret("cache-key", OTHER_CACHE_KEY);
    let body = brokers[0].deliver_rotation("cache-key", &version).await;
    let log = body["Logs"][0].as_str().unwrap();
    assert!(
        log.contains("rotated") && log.contains("told every instance"),
        "{log}"
    );
    brokers[1]
        .wait_for_log("shared cache encryption key rotated", 1)
        .await;
    // An entry sealed before the rotation still opens (the previous key's window).
    brokers[1].access_token("demo?scope=write").await;
    assert_eq!(
        fleet.token_requests().await,
        1,
        "read from Redis, not fetched"
    );

    // An instance started now reads the new key; the three share a new key's token.
    let late = fleet.broker(&config, &[]).await;
    late.wait_for_log("shared cache connected", 1).await;
    brokers.push(late);
    let tokens = burst(&brokers, "demo?scope=read%20write", 10).await;
    assert_eq!(
        fleet.token_requests().await,
        2,
        "one request for the new key"
    );
    assert!(tokens.iter().all(|token| token == &tokens[0]));
    for secret in [CACHE_KEY, OTHER_CACHE_KEY] {
        for broker in &brokers {
            assert!(!broker.logs().iter().any(|line| line.contains(secret)));
        }
    }
}

#[tokio::test]
async fn an_entry_under_a_key_this_instance_does_not_hold_makes_it_read_the_key_again() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let config = fleet.config("fleet-a", Some(&vault_key_block(&redis)));
    let old = fleet.broker(&config, &[]).await;
    old.wait_for_log("shared cache connected", 1).await;
    // The key is rotated in Key Vault, but no event reaches `old`; a new instance reads it.
    fleet.set_secret("cache-key", OTHER_CACHE_KEY);
    let new = fleet.broker(&config, &[]).await;
    new.wait_for_log("shared cache connected", 1).await;
    let token = new.access_token("demo").await;
    // `old` finds an entry it cannot open with its key, reads the key again, and opens it.
    assert_eq!(old.access_token("demo").await, token);
    assert_eq!(fleet.token_requests().await, 1);
    old.wait_for_log("shared cache encryption key rotated", 1)
        .await;
}

#[tokio::test]
async fn a_rotation_instance_that_started_on_the_new_key_still_reaches_instances_on_the_old_one() {
    // On Flex the rotation function runs on an instance of its own, started by the event: it
    // reads the new key at start and holds no other, so its announcement is signed with the
    // new key only. Instances on the old key still act on it.
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let config = fleet.config("fleet-a", Some(&vault_key_block(&redis)));
    let mut serving = Vec::new();
    for _ in 0..2 {
        let broker = fleet.broker(&config, &[]).await;
        broker.wait_for_log("shared cache connected", 1).await;
        serving.push(broker);
    }
    let version = fleet.set_secret("cache-key", OTHER_CACHE_KEY);
    let rotation = fleet.broker(&config, &[]).await;
    rotation.wait_for_log("shared cache connected", 1).await;
    let body = rotation.deliver_rotation("cache-key", &version).await;
    assert!(
        body["Logs"][0]
            .as_str()
            .unwrap()
            .contains("told every instance"),
        "{body}"
    );
    for broker in &serving {
        broker
            .wait_for_log("shared cache encryption key rotated", 1)
            .await;
    }
    // All three now share: one token request for a cold key.
    serving.push(rotation);
    let tokens = burst(&serving, "demo", 5).await;
    assert_eq!(fleet.token_requests().await, 1);
    assert!(tokens.iter().all(|token| token == &tokens[0]));
}

#[tokio::test]
async fn a_replayed_announcement_is_acted_on_once() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 2).await;
    brokers[1].access_token("demo").await;
    // Someone who can read and write Redis captures a rotation announcement...
    let channel = redis.listen("token-broker:events").await;
    let version = fleet.set_secret("fleet-secret", FLEET_SECRET);
    brokers[0].deliver_rotation("fleet-secret", &version).await;
    let captured = channel
        .when(1, |message| message.starts_with("r:"))
        .await
        .into_iter()
        .find(|message| message.starts_with("r:"))
        .unwrap();
    brokers[1]
        .wait_for_log("rotation announced by another instance", 1)
        .await;
    // ...and publishes it again and again: nothing more happens.
    let mut publisher = redis.inspect();
    for _ in 0..50 {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("token-broker:events")
            .arg(&captured)
            .query(&mut publisher)
            .unwrap();
    }
    // A second, real rotation after the replays: the channel keeps order, so once its
    // announcement is acted on, every replay before it was seen too.
    let version = fleet.set_secret("fleet-secret", FLEET_SECRET);
    brokers[0].deliver_rotation("fleet-secret", &version).await;
    brokers[1]
        .wait_for_log("rotation announced by another instance", 2)
        .await;
    assert_eq!(
        brokers[1].log_count("rotation announced by another instance"),
        2,
        "50 replays were not acted on"
    );
}

#[tokio::test]
async fn a_lock_key_of_another_type_costs_that_key_nothing_and_the_tier_stays_up() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 2).await;
    brokers[0].access_token("demo").await;
    let entry = keys(&redis, "token-broker:t:*")
        .pop()
        .expect("a shared entry");
    // Another key: its entry and lock are made unusable by someone with write access.
    make_cold(&fleet, &brokers, 1).await;
    let mut inspect = redis.inspect();
    for name in [entry.clone(), entry.replace(":t:", ":l:")] {
        let _: () = redis::cmd("HSET")
            .arg(&name)
            .arg("field")
            .arg("value")
            .query(&mut inspect)
            .unwrap();
    }
    let tokens = burst(&brokers, "demo", 5).await;
    assert!(tokens.iter().all(|token| token == &tokens[0]));
    assert_eq!(
        fleet.token_requests().await,
        2,
        "one per cold key, still shared"
    );
    for broker in &brokers {
        assert_eq!(
            broker.log_count("shared cache unavailable"),
            0,
            "an odd key is not an outage"
        );
    }
}

/// When `broker` logged `text` for the `nth` time (from 1), by its log line's timestamp.
fn logged_at(broker: &Broker, text: &str, nth: usize) -> std::time::SystemTime {
    let line = broker
        .logs()
        .into_iter()
        .filter(|line| line.contains(text))
        .nth(nth - 1)
        .unwrap_or_else(|| panic!("'{text}' not logged {nth} time(s)"));
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    let stamp = chrono::DateTime::parse_from_rfc3339(record["timestamp"].as_str().unwrap())
        .unwrap_or_else(|error| panic!("{line}: {error}"));
    std::time::UNIX_EPOCH + Duration::from_micros(u64::try_from(stamp.timestamp_micros()).unwrap())
}

#[tokio::test]
async fn a_slow_redis_costs_callers_a_bounded_wait_and_is_no_outage() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 3).await;
    // Every answer comes up to 300 ms late, three times timeout_ms but under the second of
    // late answers that turns the link down.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(300)
        .arg("ALL")
        .query(&mut redis.inspect())
        .unwrap();
    let calls = brokers.iter().flat_map(|broker| {
        (0..5).map(move |_| async move {
            let started = Instant::now();
            let token = broker.access_token("demo").await;
            (token, started.elapsed())
        })
    });
    let answers = futures_util::future::join_all(calls).await;
    // The pause, a few late operations of timeout_ms, and one fetch from the provider.
    for (_, waited) in &answers {
        assert!(*waited < Duration::from_secs(2), "waited {waited:?}");
    }
    assert!(answers.iter().all(|(token, _)| token == &answers[0].0));
    assert_eq!(
        fleet.token_requests().await,
        1,
        "still one fetch for the fleet"
    );
    for broker in &brokers {
        assert_eq!(broker.log_count("shared cache unavailable"), 0);
    }
}

#[tokio::test]
async fn a_black_holed_redis_turns_the_link_down_after_a_second_and_sharing_resumes_after() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let proxy = RedisProxy::start(&redis).await;
    let config = fleet.config("fleet-a", Some(&Fleet::shared_block_at(&proxy.url())));
    let mut brokers = Vec::new();
    for _ in 0..2 {
        let broker = fleet.broker(&config, &[]).await;
        broker.wait_for_log("shared cache connected", 1).await;
        brokers.push(broker);
    }
    burst(&brokers, "demo", 3).await;
    assert_eq!(fleet.token_requests().await, 1);

    // Nothing is answered any more; connections stay open. (Outages before it, on a loaded
    // machine, are not this test's business: it counts from here.)
    let outages: Vec<usize> = brokers
        .iter()
        .map(|broker| broker.log_count("shared cache unavailable"))
        .collect();
    let connected: Vec<usize> = brokers
        .iter()
        .map(|broker| broker.log_count("shared cache connected"))
        .collect();
    proxy.black_hole(true);
    let holed = std::time::SystemTime::now();
    let calls = brokers.iter().map(|broker| async move {
        let started = Instant::now();
        let status = broker.token("other").await.status();
        (status, started.elapsed())
    });
    for (status, waited) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
        // A second of late answers before the link turns down, a few timeout_ms, one fetch.
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    }
    for (broker, before) in brokers.iter().zip(&outages) {
        broker
            .wait_for_log("shared cache unavailable", before + 1)
            .await;
        // About a second of late answers (a late answer alone is no outage: see the slow
        // Redis test), the probe's beat, and a margin for a loaded machine.
        let down_after = logged_at(broker, "shared cache unavailable", before + 1)
            .duration_since(holed)
            .unwrap_or_default();
        assert!(
            down_after < Duration::from_secs(4),
            "down after {down_after:?}"
        );
        // Down: memory answers at once, a new key costs only its fetch.
        let started = Instant::now();
        broker.access_token("demo").await;
        broker.access_token("demo?scope=write").await;
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(1500), "waited {waited:?}");
    }

    proxy.black_hole(false);
    for ((broker, outages), connected) in brokers.iter().zip(&outages).zip(&connected) {
        broker
            .wait_for_log("shared cache connected", connected + 1)
            .await;
        assert_eq!(
            broker.log_count("shared cache unavailable"),
            outages + 1,
            "warned once"
        );
    }
    let before = fleet.token_requests().await;
    let tokens = burst(&brokers, "demo?scope=read%20write", 5).await;
    assert!(tokens.iter().all(|token| token == &tokens[0]));
    assert_eq!(fleet.token_requests().await - before, 1, "sharing resumed");
}
