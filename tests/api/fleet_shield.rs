//! The fleet shields its provider: a hold one instance meets (a `Retry-After`, an open
//! circuit, a refused client) holds every instance sharing the Redis tier off the provider.

use std::time::Duration;

use token_broker_doubles::FaultProxy;
use token_broker_doubles::fault_proxy::Fault;

use crate::support::{Broker, Fleet, RedisOptions, RedisServer};

/// `count` brokers on `config`, each connected to the shared tier when it has one.
async fn brokers(fleet: &Fleet, config: &str, count: usize) -> Vec<Broker> {
    let mut brokers = Vec::new();
    for _ in 0..count {
        let broker = fleet.broker(config, &[]).await;
        if config.contains("[shared_cache]") {
            broker.wait_for_log("shared cache connected", 1).await;
        }
        brokers.push(broker);
    }
    brokers
}

/// A broker configuration whose token endpoint is reached through `proxy`, with `extra`
/// settings on connection `demo`.
fn through(fleet: &Fleet, config: &str, proxy: &FaultProxy, extra: &str) -> String {
    config
        .replace(&fleet.idp.token_endpoint, &format!("{}/token", proxy.url()))
        .replacen(
            "allowed_scopes = [\"read\", \"write\"]",
            &format!("allowed_scopes = [\"read\", \"write\"]\n{extra}"),
            1,
        )
}

/// `total` requests for `demo`, spread round-robin over `brokers` across `over`; every
/// answer's status and `Retry-After`.
async fn spread(brokers: &[Broker], total: usize, over: Duration) -> Vec<(u16, Option<u64>)> {
    let mut answers = Vec::new();
    for n in 0..total {
        let response = brokers[n % brokers.len()].token("demo").await;
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().parse::<u64>().unwrap());
        answers.push((response.status().as_u16(), retry_after));
        tokio::time::sleep(over / total as u32).await;
    }
    answers
}

/// The measure: four instances, a provider answering 429 with `Retry-After: 20`, 12
/// requests spread over the instances for 3 s.
async fn throttled(shared: bool) -> (usize, Vec<(u16, Option<u64>)>) {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let proxy = FaultProxy::start(&fleet.idp.issuer).await.unwrap();
    proxy.set_default(Fault::Status {
        status: 429,
        retry_after: Some(20),
    });
    let block = Fleet::shared_block(&redis);
    let config = through(
        &fleet,
        &fleet.config("fleet-a", shared.then_some(block.as_str())),
        &proxy,
        "",
    );
    let brokers = brokers(&fleet, &config, 4).await;
    let answers = spread(&brokers, 12, Duration::from_secs(3)).await;
    (proxy.requests(), answers)
}

#[tokio::test]
async fn a_429_met_by_one_instance_holds_all_four_off_the_provider() {
    let (asked, answers) = throttled(true).await;
    eprintln!("measured: the provider saw {asked} request(s) for 12 callers on 4 instances");
    assert!(asked <= 2, "the provider saw {asked} requests");
    for (status, retry_after) in &answers {
        assert_eq!(*status, 503, "{answers:?}");
        let retry_after = retry_after.expect("a Retry-After on every held answer");
        assert!((1..=20).contains(&retry_after), "{answers:?}");
    }
}

#[tokio::test]
async fn without_the_shared_tier_each_instance_asks_a_throttled_provider_itself() {
    // The baseline the test above is measured against, and proof that it can fail.
    let (asked, _) = throttled(false).await;
    eprintln!("measured: without the shared tier the provider saw {asked} request(s)");
    assert!(asked >= 4, "the provider saw {asked} requests");
}

#[tokio::test]
async fn an_open_circuit_holds_the_fleet_and_its_trial_after_the_open_period_is_one_request() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let proxy = FaultProxy::start(&fleet.idp.issuer).await.unwrap();
    proxy.set_default(Fault::Status {
        status: 500,
        retry_after: None,
    });
    let config = through(
        &fleet,
        &fleet.config("fleet-a", Some(&Fleet::shared_block(&redis))),
        &proxy,
        "max_retries = 0\nbreaker_failures = 1\nbreaker_open_seconds = 2",
    );
    let brokers = brokers(&fleet, &config, 4).await;
    let first = brokers[0].token("demo").await;
    assert_eq!(first.status(), 503);
    assert_eq!(proxy.requests(), 1);
    for broker in &brokers[1..] {
        let response = broker.token("demo").await;
        assert_eq!(response.status(), 503);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("circuit open"),
            "{body}"
        );
    }
    assert_eq!(proxy.requests(), 1, "the circuit held every instance off");

    // After the open period, one trial for the fleet, however many instances and keys ask at
    // once: it fails, and the circuit opens again for every instance.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let at_once = brokers
        .iter()
        .flat_map(|broker| ["demo", "demo?scope=write"].map(|path| broker.token(path)));
    for response in futures_util::future::join_all(at_once).await {
        assert_eq!(response.status(), 503);
    }
    assert_eq!(
        proxy.requests(),
        2,
        "one trial for four instances and two keys"
    );

    // The provider recovers: after the next open period one trial succeeds and every instance
    // is served again.
    proxy.set_default(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for broker in &brokers {
        broker.access_token("demo").await;
    }
    assert_eq!(
        proxy.requests(),
        3,
        "the successful trial's token serves the fleet"
    );
}

#[tokio::test]
async fn a_refused_client_is_held_fleet_wide_for_the_negative_cache_interval() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    fleet.set_secret("wrong-secret", "not the registered secret");
    let config = fleet
        .config("fleet-a", Some(&Fleet::shared_block(&redis)))
        .replacen("\"fleet-secret\"", "\"wrong-secret\"", 1);
    let brokers = brokers(&fleet, &config, 4).await;
    let first = brokers[0].token("demo").await;
    assert_eq!(first.status(), 502);
    let asked = fleet.token_requests().await;
    assert!(asked >= 1, "the first instance asked");
    for broker in &brokers[1..] {
        let response = broker.token("demo").await;
        assert_eq!(response.status(), 502);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "upstream_rejected");
        assert_eq!(body["upstream_error"], "invalid_client", "{body}");
    }
    assert_eq!(
        fleet.token_requests().await,
        asked,
        "no other instance asked the provider"
    );
}

/// `POST /api/token/demo/invalidate` on `broker` for `token`.
async fn invalidate(broker: &Broker, token: &str) -> serde_json::Value {
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("access_token", token)
        .finish();
    let response = broker
        .http
        .post(format!("{}/api/token/demo/invalidate", broker.address))
        .header("x-functions-key", crate::support::FUNCTION_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn an_invalidation_reaches_every_instance_and_the_fleet_fetches_once_after_it() {
    let fleet = Fleet::start(3600).await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let brokers = fleet.shared_brokers(&redis, 4).await;
    let mut first = Vec::new();
    for broker in &brokers {
        first.push(broker.access_token("demo").await);
    }
    assert!(first.iter().all(|token| token == &first[0]));
    assert_eq!(fleet.token_requests().await, 1);

    // A token that is not the cached one drops nothing, on any instance.
    let wrong = invalidate(&brokers[2], "eyJ.a-stale.token").await;
    assert_eq!(wrong["invalidated"], false);
    assert_eq!(wrong["reason"], "not_current");

    // The backend refused the cached token: one instance drops it for all.
    assert_eq!(
        invalidate(&brokers[1], &first[0]).await["invalidated"],
        true
    );
    for (n, broker) in brokers.iter().enumerate() {
        if n != 1 {
            broker
                .wait_for_log("token invalidated by another instance", 1)
                .await;
        }
    }
    let requests = brokers
        .iter()
        .flat_map(|broker| (0..10).map(move |_| broker.access_token("demo")));
    let after = futures_util::future::join_all(requests).await;
    assert!(
        after
            .iter()
            .all(|token| token == &after[0] && token != &first[0])
    );
    assert_eq!(
        fleet.token_requests().await,
        2,
        "one new token for forty callers on four instances"
    );

    // A repeat on another instance within the interval is too soon, fleet-wide.
    let again = invalidate(&brokers[3], &after[0]).await;
    assert_eq!(again["invalidated"], false);
    assert_eq!(again["reason"], "too_soon");
    for broker in &brokers {
        assert_eq!(broker.access_token("demo").await, after[0]);
    }
    assert_eq!(fleet.token_requests().await, 2);
}
