//! A fleet of brokers behind one identity provider, sharing one `redis-server`: one token
//! request per key per lifetime, sealed entries, Redis trouble that no caller notices, and
//! rotations that reach every instance.

use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use base64::Engine as _;

use crate::support::{
    Broker, CACHE_KEY, FLEET_SECRET, FLEET_SECRET_V2, Fleet, OTHER_CACHE_KEY, REDIS_PASSWORD,
    RedisOptions, RedisProxy, RedisServer, sealed, tls_dir,
};
use crate::support::{FUNCTION_KEY, contains_jwt};

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
    let redis = RedisServer::start(RedisOptions::default()).await;
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
    let redis = RedisServer::start(RedisOptions::default()).await;
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
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 2).await;
    let channel = redis.listen("token-broker:events").await;
    // Three keys (the same client with another scope set is another token).
    let handed_out = [
        brokers[0].access_token("demo").await,
        brokers[0].access_token("demo?scope=read%20write").await,
        brokers[1].access_token("other").await,
    ];
    let mut inspect = redis.inspect();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut inspect).unwrap();
    let forbidden: Vec<&str> = [
        FLEET_SECRET,
        CACHE_KEY,
        "fleet-secret",
        "demo",
        "other",
        "read",
        "write",
        "fleet-a",
        fleet.idp.token_endpoint.as_str(),
    ]
    .into_iter()
    .chain(handed_out.iter().map(String::as_str))
    .collect::<Vec<&str>>();
    for key in &keys {
        for needle in &forbidden {
            assert!(!key.contains(needle), "key {key} shows {needle}");
        }
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut inspect).unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }

    // Each entry opens with the configured key (and the format docs/fleet.md describes) under its
    // own name, and holds what was handed out: a token, its type and times, nothing else.
    let entries: Vec<&String> = keys
        .iter()
        .filter(|key| key.starts_with("token-broker:t:"))
        .collect();
    assert_eq!(entries.len(), 3, "{keys:?}");
    let mut opened = Vec::new();
    for entry in &entries {
        let value: Vec<u8> = redis::cmd("GET").arg(*entry).query(&mut inspect).unwrap();
        let text = String::from_utf8_lossy(&value);
        for needle in &forbidden {
            assert!(!text.contains(needle), "value of {entry} shows {needle}");
        }
        assert!(!text.contains("eyJ"), "value of {entry} holds a JWT");
        let plain = sealed::open(CACHE_KEY, entry, &value)
            .unwrap_or_else(|| panic!("{entry} does not open with the configured key"));
        let stored: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        let mut fields: Vec<&str> = stored
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "access_token",
                "expires_at_ms",
                "refresh_at_ms",
                "scope",
                "token_type"
            ],
            "{stored}"
        );
        assert_eq!(stored["token_type"], "Bearer");
        let now = unix_millis();
        let refresh = stored["refresh_at_ms"].as_u64().unwrap();
        let expires = stored["expires_at_ms"].as_u64().unwrap();
        assert!(
            now < refresh && refresh < expires && expires <= now + 3_600_000,
            "{stored}"
        );
        let ttl: u64 = redis::cmd("PTTL").arg(*entry).query(&mut inspect).unwrap();
        assert!(now + ttl <= expires, "{entry} outlives its token");
        // Bound to its name and to its key: under another entry's name, or its lock's, or
        // with another key, it does not open.
        for other in entries.iter().filter(|other| other != &entry) {
            assert_eq!(sealed::open(CACHE_KEY, other, &value), None);
        }
        assert_eq!(
            sealed::open(CACHE_KEY, &entry.replace(":t:", ":l:"), &value),
            None
        );
        assert_eq!(sealed::open(OTHER_CACHE_KEY, entry, &value), None);
        opened.push(stored["access_token"].as_str().unwrap().to_string());
    }
    let mut expected = handed_out.to_vec();
    expected.sort();
    opened.sort();
    assert_eq!(opened, expected, "each entry holds one token handed out");

    // Announcements: one per fetch under the lock, naming the entry by its hash only; a
    // rotation's is signed with the fleet's key and names the secret by a hash too.
    let messages = channel.when(3, |message| message.starts_with("t:")).await;
    let announced: BTreeSet<&str> = messages
        .iter()
        .filter_map(|message| message.strip_prefix("t:"))
        .collect();
    let named: BTreeSet<&str> = entries
        .iter()
        .map(|entry| entry.trim_start_matches("token-broker:t:"))
        .collect();
    assert_eq!(announced, named);
    let version = fleet.set_secret("fleet-secret", FLEET_SECRET);
    brokers[0].deliver_rotation("fleet-secret", &version).await;
    let messages = channel.when(1, |message| message.starts_with("r:")).await;
    let signed = messages
        .iter()
        .find(|message| message.starts_with("r:"))
        .unwrap();
    let (message, tag) = signed.rsplit_once('|').unwrap();
    assert_eq!(tag, sealed::tag(CACHE_KEY, message), "{signed}");
    assert_ne!(tag, sealed::tag(OTHER_CACHE_KEY, message));
    let fields: Vec<&str> = message.split(':').collect();
    assert_eq!(fields.len(), 5, "{message}");
    assert!(fields[1].len() == 64 && fields[1].bytes().all(|b| b.is_ascii_hexdigit()));
    for message in &messages {
        assert!(!contains_jwt(message), "{message}");
        for needle in &forbidden {
            assert!(
                !message.contains(needle),
                "announcement {message} shows {needle}"
            );
        }
    }
}

fn unix_millis() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The name and sealed value of the entry that holds `token`.
fn entry_holding(redis: &RedisServer, token: &str) -> (String, Vec<u8>) {
    let mut inspect = redis.inspect();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("token-broker:t:*")
        .query(&mut inspect)
        .unwrap();
    keys.into_iter()
        .find_map(|name| {
            let value: Vec<u8> = redis::cmd("GET").arg(&name).query(&mut inspect).unwrap();
            let plain = sealed::open(CACHE_KEY, &name, &value)?;
            let stored: serde_json::Value = serde_json::from_slice(&plain).ok()?;
            (stored["access_token"] == token).then_some((name, value))
        })
        .expect("an entry holding the token")
}

#[tokio::test]
async fn a_tampered_or_foreign_entry_is_a_counted_miss_refetched_never_served() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let mut brokers = fleet.shared_brokers(&redis, 3).await;
    let demo = brokers[0].access_token("demo").await;
    let other = brokers[0].access_token("other").await;
    let (demo_entry, demo_value) = entry_holding(&redis, &demo);
    let (other_entry, _) = entry_holding(&redis, &other);
    let mut inspect = redis.inspect();

    // Tampered: one bit of demo's entry flipped.
    let mut tampered = demo_value.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let _: () = redis::cmd("SET")
        .arg(&demo_entry)
        .arg(tampered)
        .arg("EX")
        .arg(600)
        .query(&mut inspect)
        .unwrap();
    let refetched = brokers[1].access_token("demo").await;
    assert_ne!(refetched, demo, "the tampered entry was not served");
    assert_eq!(fleet.token_requests().await, 3);

    // Foreign: a well-formed entry, sealed with the fleet's key, copied under another name.
    assert!(sealed::open(CACHE_KEY, &demo_entry, &demo_value).is_some());
    assert_eq!(sealed::open(CACHE_KEY, &other_entry, &demo_value), None);
    let _: () = redis::cmd("SET")
        .arg(&other_entry)
        .arg(&demo_value)
        .arg("EX")
        .arg(600)
        .query(&mut inspect)
        .unwrap();
    let fetched = brokers[2].access_token("other").await;
    assert_ne!(fetched, demo, "the copied entry was not served");
    assert_ne!(fetched, other);
    assert!(fetched.starts_with("eyJ"), "a token from the provider");
    assert_eq!(fleet.token_requests().await, 4);

    // Each is counted where it was met (the stats line written at shutdown has the totals).
    for broker in &mut brokers {
        broker.stop().await;
    }
    assert_eq!(stats_sum(&brokers[0], "shared_unreadable"), Some(0));
    for broker in &brokers[1..] {
        assert!(
            stats_sum(broker, "shared_unreadable") >= Some(1),
            "{:?}",
            broker.logs()
        );
        assert_eq!(stats_sum(broker, "shared_hits"), Some(0));
    }
}

#[tokio::test]
async fn the_leak_scan_looks_for_every_credential_a_broker_held_and_finds_each() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions {
        password: true,
        tls_dir: None,
    })
    .await;
    // One broker with all of them: the cache key and Redis password from Key Vault.
    let block = format!(
        "{}auth = \"password\"\npassword = {{ key_vault_secret = \"redis-password\" }}\n",
        Fleet::shared_block(&redis).replace(
            "{ app_setting = \"CACHE_KEY\" }",
            "{ key_vault_secret = \"cache-key\" }"
        )
    );
    let mut full = fleet
        .broker(&fleet.config("fleet-a", Some(&block)), &[])
        .await;
    full.wait_for_log("shared cache connected", 1).await;
    full.access_token("demo").await;
    // One with no shared cache: another client, and a cache key only in its environment.
    let alone = fleet
        .broker(
            &fleet.config("fleet-b", None),
            &[("CACHE_KEY", OTHER_CACHE_KEY)],
        )
        .await;
    alone.access_token("demo").await;

    let form =
        |text: &str| -> String { url::form_urlencoded::byte_serialize(text.as_bytes()).collect() };
    let basic = |id: &str, secret: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", form(id), form(secret)))
    };
    let identity_tokens: Vec<String> = fleet
        .azure
        .identity
        .issued()
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(!identity_tokens.is_empty(), "Key Vault was read");
    let held = full.credentials();
    for needle in [
        FLEET_SECRET.to_string(),
        form(FLEET_SECRET),
        basic("fleet-a", FLEET_SECRET),
        CACHE_KEY.to_string(),
        REDIS_PASSWORD.to_string(),
        FUNCTION_KEY.to_string(),
    ]
    .into_iter()
    .chain(identity_tokens)
    {
        assert!(held.contains(&needle), "{needle} not looked for");
    }
    let alone_held = alone.credentials();
    assert!(alone_held.contains(&basic("fleet-b", FLEET_SECRET)));
    for needle in [
        REDIS_PASSWORD.to_string(),
        CACHE_KEY.to_string(),
        OTHER_CACHE_KEY.to_string(),
        basic("fleet-a", FLEET_SECRET),
    ] {
        assert!(!alone_held.contains(&needle), "{needle}: not held there");
    }

    // The scan finds each one in a line, and a JWT; then the lines are taken back.
    let mut lines: Vec<String> = held
        .iter()
        .map(|needle| format!("{{\"message\":\"careless {needle}\"}}"))
        .collect();
    lines.push(format!(
        "{{\"token\":\"{}\"}}",
        full.access_token("demo").await
    ));
    for line in &lines {
        full.pretend_logged(line);
    }
    assert_eq!(full.leaks(), lines);
    full.forget_pretended(&lines);

    // SIGTERM, so that the broker's last lines reach the pipe before the scan on drop.
    full.stop().await;
    assert_eq!(full.log_count("\"stopped\""), 1, "{:?}", full.logs());
    assert!(full.leaks().is_empty());
}

#[tokio::test]
async fn two_deployments_with_the_same_connection_name_never_get_each_others_token() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
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
    let mut redis = RedisServer::start(RedisOptions::default()).await;
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
        // Lines reach the pipe from the broker's writer thread: wait for the one expected.
        broker.wait_for_log("shared cache unavailable", 1).await;
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

    redis.restart().await;
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
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 3).await;
    let before = brokers[0].access_token("demo").await;
    burst(&brokers, "demo", 2).await;
    // The secret changes in Key Vault and at the provider, which now refuses the old one.
    let version = fleet.set_secret("fleet-secret", FLEET_SECRET_V2);
    fleet
        .idp
        .restart(|clients| {
            for client in clients.iter_mut() {
                client.client_secret = FLEET_SECRET_V2.to_string();
            }
        })
        .await;
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
    })
    .await;
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
    })
    .await;
    fleet.set_secret("redis-password", "not the password");
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

/// The tokens for Redis the managed identity endpoint has issued.
fn redis_tokens(fleet: &Fleet) -> BTreeSet<String> {
    fleet
        .azure
        .identity
        .issued()
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, issued)| issued.resource == "https://redis.azure.com")
        .map(|(token, _)| token.clone())
        .collect()
}

/// The ACL user the identity's object id names, with exactly `passwords`.
fn acl_user(admin: &mut redis::Connection, passwords: &BTreeSet<String>) {
    let mut command = redis::cmd("ACL");
    command
        .arg("SETUSER")
        .arg(OBJECT_ID)
        .arg("on")
        .arg("resetpass");
    for password in passwords {
        command.arg(format!(">{password}"));
    }
    command.arg("~*").arg("&*").arg("+@all");
    let _: () = command.query(admin).unwrap();
}

/// The fields of Redis's ACL log (refused AUTHs among them), as text.
fn acl_log(admin: &mut redis::Connection) -> Vec<String> {
    let entries: Vec<Vec<redis::Value>> = redis::cmd("ACL").arg("LOG").query(admin).unwrap();
    entries
        .into_iter()
        .flatten()
        .filter_map(|value| redis::from_redis_value::<String>(value).ok())
        .collect()
}

/// `AUTH` calls Redis has executed, and how many of them failed.
fn auth_calls(admin: &mut redis::Connection) -> (u64, u64) {
    let info: String = redis::cmd("INFO").arg("commandstats").query(admin).unwrap();
    let Some(line) = info.lines().find(|line| line.starts_with("cmdstat_auth:")) else {
        return (0, 0);
    };
    let field = |name: &str| -> u64 {
        line.split([':', ','])
            .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
            .map_or(0, |value| value.parse().unwrap())
    };
    (field("calls"), field("failed_calls"))
}

/// The broker's managed identity's object (principal) id: its Redis user name with Entra.
const OBJECT_ID: &str = "6f1c2b9e-0d4a-4e7b-8c3f-00000000e1d1";

#[tokio::test]
async fn entra_auth_sends_the_identitys_redis_token_and_re_authenticates_the_live_connection_when_it_is_renewed()
 {
    let fleet = Fleet::start(3600).await;
    // Tokens of two minutes: azure_identity asks again whenever less than five remain, and
    // the broker renews after its floor of 30 s (a real timer: this test waits for it).
    fleet
        .azure
        .identity
        .set_token_lifetime(Duration::from_secs(120));
    let redis = RedisServer::start(RedisOptions {
        password: true,
        tls_dir: None,
    })
    .await;
    // Through a proxy that can hold an AUTH on its way to Redis.
    let proxy = RedisProxy::start(&redis).await;
    let block = format!(
        "redis_url = \"{}\"\nencryption_key = {{ app_setting = \"CACHE_KEY\" }}\ntimeout_ms = 1000\nauth = \"entra\"\nusername = \"{OBJECT_ID}\"\n",
        proxy.url()
    );
    let config = fleet.config("fleet-a", Some(&block));
    let brokers = [
        fleet.broker(&config, &[]).await,
        fleet.broker(&config, &[]).await,
    ];
    // No ACL user yet: the identity's token is refused, and each instance works alone.
    for broker in &brokers {
        broker.wait_for_log("shared cache unavailable", 1).await;
    }
    // One connection of the test's own, opened now: its AUTH is not counted below.
    let mut admin = redis.inspect();
    let refused = acl_log(&mut admin);
    assert!(
        refused.iter().any(|field| field == OBJECT_ID),
        "an AUTH as the object id was refused: {refused:?}"
    );
    let first = redis_tokens(&fleet);
    assert_eq!(first.len(), 2, "one token for Redis per instance");
    // Redis learns the tokens, as Azure's would by the access policy: both instances connect.
    acl_user(&mut admin, &first);
    for broker in &brokers {
        broker.wait_for_log("shared cache connected", 1).await;
    }
    burst(&brokers, "demo", 3).await;
    assert_eq!(fleet.token_requests().await, 1, "shared with Entra auth");

    // Renewal: each instance asks for a new token and sends AUTH with it on its live
    // connection. Each AUTH is held until Redis accepts that token and no longer the first.
    let connections = proxy.connections();
    let (calls, failed) = auth_calls(&mut admin);
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut admin)
        .unwrap();
    proxy.hold_auth(true);
    let mut renewed = BTreeSet::new();
    for _ in 0..2 {
        let held = proxy.next_auth(Duration::from_secs(60)).await;
        let sent = String::from_utf8_lossy(&held.bytes).to_string();
        let token = redis_tokens(&fleet)
            .into_iter()
            .find(|token| sent.contains(token.as_str()))
            .expect("the AUTH carries a token the identity issued for Redis");
        assert!(!first.contains(&token), "a new token");
        assert!(sent.contains(OBJECT_ID));
        assert!(
            held.connection <= connections,
            "sent on a connection made before: the live one"
        );
        renewed.insert(token);
        acl_user(&mut admin, &renewed);
        held.release();
    }
    proxy.hold_auth(false);
    // Redis ran both AUTHs, and none failed: they carried the new tokens.
    for _ in 0..500 {
        if auth_calls(&mut admin).0 >= calls + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(auth_calls(&mut admin), (calls + 2, failed));
    assert_eq!(acl_log(&mut admin), Vec::<String>::new(), "no AUTH refused");
    // The first tokens no longer open Redis; the new ones do.
    let auth = |token: &String| {
        redis::cmd("AUTH")
            .arg(OBJECT_ID)
            .arg(token)
            .query::<()>(&mut redis.inspect())
    };
    assert!(first.iter().all(|token| auth(token).is_err()));
    assert!(renewed.iter().all(|token| auth(token).is_ok()));

    // Sharing goes on over the same connections, with no outage.
    let before = fleet.token_requests().await;
    burst(&brokers, "other", 3).await;
    assert_eq!(fleet.token_requests().await - before, 1);
    assert_eq!(proxy.connections(), connections, "no new connection");
    for broker in &brokers {
        assert_eq!(broker.log_count("shared cache unavailable"), 1);
        assert_eq!(broker.log_count("shared cache connected"), 1);
    }
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
            let redis = RedisServer::start(RedisOptions::default()).await;
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
    let redis = RedisServer::start(RedisOptions::default()).await;
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
    let redis = RedisServer::start(RedisOptions::default()).await;
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
