//! A fleet of brokers behind one identity provider, sharing one `redis-server`: one token
//! request per key per lifetime, sealed entries, Redis trouble that no caller notices, and
//! rotations that reach every instance.

use std::time::{Duration, Instant};

use crate::fleet_helpers::{
    Broker, CACHE_KEY, FLEET_SECRET, FLEET_SECRET_V2, Fleet, OTHER_CACHE_KEY, REDIS_PASSWORD,
    RedisOptions, RedisServer, tls_dir,
};

/// Every broker asks for `path` at once; all must succeed.
async fn burst(brokers: &[Broker], path: &str, per_broker: usize) -> Vec<String> {
    let requests = brokers
        .iter()
        .flat_map(|broker| (0..per_broker).map(move |_| broker.access_token(path)));
    futures_util::future::join_all(requests).await
}

#[tokio::test]
async fn a_cold_burst_over_three_instances_makes_one_token_request() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let brokers = fleet.shared_brokers(&redis, 3).await;
    let tokens = burst(&brokers, "demo", 10).await;
    assert_eq!(fleet.token_requests().await, 1);
    assert!(
        tokens.iter().all(|token| token == &tokens[0]),
        "one token for the fleet"
    );
}

#[tokio::test]
async fn without_the_shared_tier_each_instance_fetches_its_own_token() {
    // The baseline the shared tier is measured against (and proof the test above can fail).
    let fleet = Fleet::start(3600).await;
    let config = fleet.config("fleet-a", None);
    let mut brokers = Vec::new();
    for _ in 0..3 {
        brokers.push(fleet.broker(&config, &[]).await);
    }
    burst(&brokers, "demo", 5).await;
    assert_eq!(fleet.token_requests().await, 3);
}

#[tokio::test]
async fn steady_traffic_over_three_instances_refreshes_once_per_lifetime() {
    // The numbers, in real time: 10 s tokens, 24 s of traffic, three instances.
    // Each lifetime (refreshed between half and three quarters of it) costs one request for
    // the whole fleet, so at most 5 in 24 s; three independent instances make about 12.
    let fleet = Fleet::start(10).await;
    let redis = RedisServer::start(RedisOptions::default());
    let brokers = fleet.shared_brokers(&redis, 3).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(24) {
        burst(&brokers, "demo", 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests = fleet.token_requests().await;
    assert!(
        (3..=5).contains(&requests),
        "{requests} token requests in 24 s"
    );
}

#[tokio::test]
async fn redis_holds_no_token_secret_key_or_name_in_clear_and_every_key_expires() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let brokers = fleet.shared_brokers(&redis, 2).await;
    let token = brokers[0].access_token("demo").await;
    brokers[0].access_token("demo?scope=write").await;
    brokers[1].access_token("other").await;
    let mut inspect = redis.inspect();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut inspect).unwrap();
    assert!(keys.len() >= 3, "{keys:?}");
    let forbidden = [
        token.as_str(),
        FLEET_SECRET,
        CACHE_KEY,
        "demo",
        "other",
        "read",
        "write",
        "fleet-a",
        fleet.idp.token_endpoint.as_str(),
    ];
    for key in &keys {
        for needle in &forbidden[1..] {
            assert!(!key.contains(needle), "key {key} shows {needle}");
        }
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut inspect).unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
        let kind: String = redis::cmd("TYPE").arg(key).query(&mut inspect).unwrap();
        if kind == "string" {
            let value: Vec<u8> = redis::cmd("GET").arg(key).query(&mut inspect).unwrap();
            let text = String::from_utf8_lossy(&value);
            for needle in forbidden {
                assert!(!text.contains(needle), "value of {key} shows {needle}");
            }
            // No part of the token's text either: the JWT's header is always there.
            assert!(!text.contains("eyJ"), "value of {key} holds a JWT");
        }
    }
}

#[tokio::test]
async fn a_tampered_or_foreign_entry_is_refetched_never_served() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let brokers = fleet.shared_brokers(&redis, 2).await;
    let first = brokers[0].access_token("demo").await;
    let mut inspect = redis.inspect();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:t:*")
        .query(&mut inspect)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let mut value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut inspect).unwrap();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg(value)
        .arg("EX")
        .arg(600)
        .query(&mut inspect)
        .unwrap();
    let second = brokers[1].access_token("demo").await;
    assert_ne!(first, second, "the tampered entry was not served");
    assert_eq!(fleet.token_requests().await, 2);
    assert!(second.starts_with("eyJ"), "a token from the provider");
}

#[tokio::test]
async fn two_deployments_with_the_same_connection_name_never_get_each_others_token() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let block = Fleet::shared_block(&redis);
    // Same Redis, same key, same prefix, same connection name: only the client differs.
    let a = fleet
        .broker(&fleet.config("fleet-a", Some(&block)), &[])
        .await;
    let b = fleet
        .broker(&fleet.config("fleet-b", Some(&block)), &[])
        .await;
    // A third deployment with the same client but another encryption key.
    let c = fleet
        .broker(
            &fleet.config("fleet-a", Some(&block)),
            &[("CACHE_KEY", OTHER_CACHE_KEY)],
        )
        .await;
    for broker in [&a, &b, &c] {
        broker.wait_for_log("shared cache connected", 1).await;
    }
    let from_a = a.access_token("demo").await;
    let from_b = b.access_token("demo").await;
    let from_c = c.access_token("demo").await;
    assert_ne!(from_a, from_b);
    assert_ne!(from_a, from_c);
    assert_eq!(fleet.token_requests().await, 3);
    let claims = |token: &str| -> serde_json::Value {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims(&from_a)["client_id"], "fleet-a");
    assert_eq!(claims(&from_b)["client_id"], "fleet-b");
}

#[tokio::test]
async fn a_dead_redis_costs_callers_nothing_and_sharing_resumes_when_it_is_back() {
    let fleet = Fleet::start(3600).await;
    let mut redis = RedisServer::start(RedisOptions::default());
    let mut brokers = fleet.shared_brokers(&redis, 3).await;
    burst(&brokers, "demo", 3).await;
    assert_eq!(fleet.token_requests().await, 1);

    redis.kill();
    // New keys for every instance: each fetches on its own, none waits on Redis.
    for path in ["demo?scope=write", "other", "demo"] {
        for broker in &brokers {
            let started = Instant::now();
            let response = broker.token(path).await;
            assert_eq!(response.status(), 200);
            let elapsed = started.elapsed();
            assert!(elapsed < Duration::from_millis(1500), "{path}: {elapsed:?}");
        }
    }
    for broker in &brokers {
        assert_eq!(
            broker.log_count("shared cache unavailable"),
            1,
            "warned once"
        );
    }
    // A new instance starts and serves while Redis is down.
    let config = fleet.config("fleet-a", Some(&Fleet::shared_block(&redis)));
    let late = fleet.broker(&config, &[]).await;
    let started = Instant::now();
    late.access_token("demo").await;
    assert!(started.elapsed() < Duration::from_millis(1500));
    brokers.push(late);

    redis.restart();
    for broker in &brokers[..3] {
        broker.wait_for_log("shared cache connected", 2).await;
    }
    brokers[3].wait_for_log("shared cache connected", 1).await;
    let before = fleet.token_requests().await;
    burst(&brokers, "demo?scope=read%20write", 5).await;
    assert_eq!(fleet.token_requests().await - before, 1, "sharing resumed");
}

#[tokio::test]
async fn a_rotation_delivered_to_one_instance_reaches_every_instance() {
    let mut fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let brokers = fleet.shared_brokers(&redis, 3).await;
    let before = brokers[0].access_token("demo").await;
    burst(&brokers, "demo", 2).await;
    // The secret changes in Key Vault and at the provider, which now refuses the old one.
    let version = fleet
        .azure
        .vault
        .set_secret("fleet-secret", FLEET_SECRET_V2);
    fleet.idp.restart(|clients| {
        for client in clients.iter_mut() {
            client.client_secret = FLEET_SECRET_V2.to_string();
        }
    });
    let body = brokers[0].deliver_rotation("fleet-secret", &version).await;
    let log = body["Logs"][0].as_str().unwrap();
    assert!(log.contains("told every instance"), "{log}");
    for broker in &brokers[1..] {
        broker
            .wait_for_log("rotation announced by another instance", 1)
            .await;
    }
    // The others fetch a new scope set (their old secret would be refused) and the shared
    // token minted with the old secret is gone.
    for broker in &brokers[1..] {
        broker.access_token("demo?scope=write").await;
    }
    let after = brokers[2].access_token("demo").await;
    assert_ne!(before, after);
    let stats = fleet.idp.stats().await;
    assert_eq!(stats.token_errors, 0, "no request with the old secret");
    assert_eq!(stats.token_issued, 2, "one per key for the fleet");
}

#[tokio::test]
async fn redis_over_tls_with_the_test_ca_and_password_auth() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions {
        password: true,
        tls_dir: Some(tls_dir(&fleet)),
    });
    let block = format!(
        "{}auth = \"password\"\npassword = {{ key_vault_secret = \"redis-password\" }}\n",
        Fleet::shared_block(&redis)
    );
    let config = fleet.config("fleet-a", Some(&block));
    let mut brokers = Vec::new();
    for _ in 0..2 {
        let broker = fleet.broker(&config, &[]).await;
        broker.wait_for_log("shared cache connected", 1).await;
        brokers.push(broker);
    }
    burst(&brokers, "demo", 5).await;
    assert_eq!(fleet.token_requests().await, 1);
}

#[tokio::test]
async fn a_wrong_redis_password_leaves_each_instance_working_alone() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions {
        password: true,
        tls_dir: None,
    });
    fleet
        .azure
        .vault
        .set_secret("redis-password", "not the password");
    let block = format!(
        "{}auth = \"password\"\npassword = {{ key_vault_secret = \"redis-password\" }}\n",
        Fleet::shared_block(&redis)
    );
    let broker = fleet
        .broker(&fleet.config("fleet-a", Some(&block)), &[])
        .await;
    broker.wait_for_log("shared cache unavailable", 1).await;
    broker.access_token("demo").await;
    assert_eq!(broker.log_count("shared cache connected"), 0);
    assert!(
        !broker
            .logs()
            .iter()
            .any(|line| line.contains(REDIS_PASSWORD))
    );
}

/// How long one `200` answer takes, seen by the caller.
async fn timed(broker: &Broker, path: &str) -> Duration {
    let started = Instant::now();
    assert_eq!(broker.token(path).await.status(), 200);
    started.elapsed()
}

/// The numbers in BENCHMARKS.md's "Fleet" section, printed (`--no-capture`) and checked: token
/// requests per key per lifetime for 1, 3 and 6 instances with and without the shared tier
/// (4 s tokens, 8 s of traffic: two lifetimes, scaled down from the 10 s / 24 s so
/// that six runs take under a minute), and the latency, seen by a caller, of a memory hit, a
/// shared-tier hit and a fetch from the identity provider.
#[tokio::test]
async fn fleet_measurements() {
    let fleet = Fleet::start(4).await;
    let mut table = Vec::new();
    for instances in [1, 3, 6] {
        for shared in [false, true] {
            let redis = RedisServer::start(RedisOptions::default());
            let brokers = if shared {
                fleet.shared_brokers(&redis, instances).await
            } else {
                let config = fleet.config("fleet-a", None);
                let mut brokers = Vec::new();
                for _ in 0..instances {
                    brokers.push(fleet.broker(&config, &[]).await);
                }
                brokers
            };
            let before = fleet.token_requests().await;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(8) {
                burst(&brokers, "demo", 1).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let requests = fleet.token_requests().await - before;
            // Refresh-ahead renews a token at half to three quarters of its life, so one
            // broker makes 3 or 4 requests in two lifetimes; a fleet with the shared tier
            // makes as many as one broker, and without it each instance makes its own.
            if shared {
                assert!(requests <= 4, "{instances} shared: {requests}");
            } else {
                assert!(requests >= 3 * instances as u64, "{instances}: {requests}");
            }
            table.push(format!(
                "| {instances} | {} | {requests} | {:.1} |",
                if shared {
                    "memory + shared"
                } else {
                    "memory only"
                },
                requests as f64 / 2.0
            ));
        }
    }
    println!(
        "| instances | tiers | token requests in 8 s | per key per lifetime |\n|---:|---|---:|---:|"
    );
    println!("{}", table.join("\n"));

    // Latency: a long-lived token so that nothing refreshes while measuring.
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let mut idp = Vec::new();
    let mut shared_hits = Vec::new();
    let mut memory_hits = Vec::new();
    for path in [
        "demo",
        "demo?scope=write",
        "demo?scope=read%20write",
        "other",
    ] {
        let brokers = fleet.shared_brokers(&redis, 2).await;
        // Warm each broker's connections with the health endpoint, then time.
        for broker in &brokers {
            broker.http.get(&broker.address).send().await.unwrap();
        }
        idp.push(timed(&brokers[0], path).await);
        shared_hits.push(timed(&brokers[1], path).await);
        for _ in 0..25 {
            memory_hits.push(timed(&brokers[1], path).await);
        }
        let _: () = redis::cmd("FLUSHALL").query(&mut redis.inspect()).unwrap();
    }
    let median = |mut samples: Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2].as_secs_f64() * 1000.0
    };
    let (memory, shared, fetched) = (median(memory_hits), median(shared_hits), median(idp));
    println!(
        "| memory hit | {memory:.2} ms |\n| shared-tier hit | {shared:.2} ms |\n| identity provider fetch | {fetched:.2} ms |"
    );
    assert!(
        memory < shared && shared < fetched,
        "{memory} {shared} {fetched}"
    );
}

/// The sum of `field` over the `stats` lines `broker` has written so far; `None` when a
/// `stats` line lacks it.
fn stats_sum(broker: &Broker, field: &str) -> Option<u64> {
    broker
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "stats")
        .map(|line| line.get(field).and_then(serde_json::Value::as_u64))
        .sum()
}

#[tokio::test]
async fn the_stats_line_counts_the_shared_tier_per_instance() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default());
    let config = fleet.config("fleet-a", Some(&Fleet::shared_block(&redis)))
        + "\n[telemetry]\nstats_interval_seconds = 1\n";
    let mut brokers = Vec::new();
    for _ in 0..2 {
        let broker = fleet.broker(&config, &[]).await;
        broker.wait_for_log("shared cache connected", 1).await;
        brokers.push(broker);
    }
    // The first instance fetches (a shared miss), the second finds the token in Redis.
    brokers[0].access_token("demo").await;
    brokers[1].access_token("demo").await;
    assert_eq!(fleet.token_requests().await, 1);

    let deadline = Instant::now() + Duration::from_secs(10);
    // The shared tier counts a fetch before the answer's memory miss is counted, so a line may
    // fall between the two: wait for both.
    while stats_sum(&brokers[0], "shared_misses") != Some(1)
        || stats_sum(&brokers[1], "shared_hits") != Some(1)
        || brokers
            .iter()
            .any(|broker| stats_sum(broker, "cache_misses") != Some(1))
    {
        assert!(
            Instant::now() < deadline,
            "stats lines never counted the shared tier:\n{}",
            brokers[1].logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats_sum(&brokers[0], "shared_hits"), Some(0));
    assert_eq!(stats_sum(&brokers[1], "shared_misses"), Some(0));
    for broker in &brokers {
        for field in [
            "shared_waits",
            "shared_errors",
            "shared_unreadable",
            "shared_outages",
        ] {
            assert_eq!(stats_sum(broker, field), Some(0), "{field}");
        }
        // Beside the memory tier's own counts: the second instance's answer was a memory miss.
        assert_eq!(stats_sum(broker, "cache_misses"), Some(1));
    }
}
