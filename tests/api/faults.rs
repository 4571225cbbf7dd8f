//! Keep serving through identity provider and Key Vault faults. A fault-injecting proxy sits
//! in front of the real oidc-provider; each test reports what callers saw, how many upstream
//! calls were made, and the slowest answer, and checks that no request outlived its bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use token_broker_doubles::Fault as VaultFault;
use token_broker_doubles::fault_proxy::Fault;

use crate::support::{Setup, TestApp, json as body_json, spawn_app_with};

/// A connection behind the proxy with tight bounds: 1 s per attempt, 3 s per fetch.
const FLAKY: &str = r#"
[connections.flaky]
token_url = "{proxy_url}/token"
client_id = "broker-short"
client_secret = { key_vault_secret = "short-secret" }
connect_timeout_seconds = 1
timeout_seconds = 1
deadline_seconds = 3
max_retries = 2
breaker_failures = 3
breaker_open_seconds = 2
negative_cache_seconds = 5
allowed_scopes = ["read", "s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]

[connections.stable]
token_url = "{proxy_url}/token"
client_id = "broker-basic"
client_secret = { key_vault_secret = "basic-secret" }
negative_cache_seconds = 5
"#;

/// The bound on any caller's wait for `flaky`: its deadline plus slack for the machine.
const BOUND: Duration = Duration::from_millis(3000 + 1500);

async fn faulty_app() -> TestApp {
    spawn_app_with(Setup {
        proxy: true,
        extra_config: FLAKY.to_string(),
        ..Setup::default()
    })
    .await
}

/// Status counts and the slowest answer of a series of calls.
#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, usize>,
    slowest: Duration,
}

impl Tally {
    async fn call(&mut self, app: &TestApp, path: &str) -> reqwest::Response {
        let started = Instant::now();
        let response = app.get(path).await;
        self.slowest = self.slowest.max(started.elapsed());
        *self.statuses.entry(response.status().as_u16()).or_default() += 1;
        response
    }

    fn report(&self, scenario: &str, upstream_calls: usize) {
        println!(
            "fault report | {scenario} | callers saw {:?} | upstream calls {upstream_calls} | slowest {} ms",
            self.statuses,
            self.slowest.as_millis()
        );
        assert!(
            self.slowest < BOUND,
            "{scenario}: a request took {:?}",
            self.slowest
        );
    }
}

#[tokio::test]
async fn an_idp_down_during_refresh_is_hidden_until_the_token_expires() {
    let app = faulty_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    let mut tally = Tally::default();
    let first = body_json(tally.call(&app, "/api/token/flaky").await).await;
    let expires_on = first["expires_on"].as_u64().unwrap();
    proxy.set_default(Fault::Status {
        status: 503,
        retry_after: None,
    });
    let mut after_expiry = Vec::new();
    let calls_before = proxy.requests();
    let mut served_after_a_failed_refresh = 0;
    // Call every 100 ms for 7.5 s: the 6 s token needs refreshing after 3 to 4.5 s.
    for _ in 0..75 {
        let response = tally.call(&app, "/api/token/flaky").await;
        let now = unix_now();
        let status = response.status().as_u16();
        if status == 200 {
            let body = body_json(response).await;
            assert_eq!(
                body["expires_on"].as_u64().unwrap(),
                expires_on,
                "the cached token"
            );
            assert!(body["expires_in"].as_u64().unwrap() >= 1);
            if proxy.requests() > calls_before {
                served_after_a_failed_refresh += 1;
            }
        } else {
            assert!(now + 1 >= expires_on, "an error before the token expired");
            assert_eq!(status, 503);
            assert!(response.headers().contains_key("retry-after"));
            after_expiry.push(body_json(response).await["error"].clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !after_expiry.is_empty(),
        "the token did expire during the run"
    );
    assert!(after_expiry.iter().all(|e| e == "upstream_unavailable"));
    tally.report("IdP down (503) during refresh", proxy.requests());
    assert!(
        served_after_a_failed_refresh > 0,
        "callers kept getting the cached token after the refresh failed"
    );
    assert!(
        proxy.requests() < 25,
        "a dead IdP was not hammered: {}",
        proxy.requests()
    );
}

#[tokio::test]
async fn a_slow_idp_costs_callers_at_most_the_deadline() {
    let app = faulty_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.set_default(Fault::Delay(Duration::from_secs(5)));
    let mut tally = Tally::default();
    for _ in 0..3 {
        let response = tally.call(&app, "/api/token/flaky").await;
        assert_eq!(response.status(), 503);
        assert_eq!(body_json(response).await["error"], "upstream_unavailable");
    }
    tally.report("IdP slower than the timeout", proxy.requests());
    assert!(
        proxy.requests() <= 3 * 3,
        "at most three attempts per fetch"
    );
}

#[tokio::test]
async fn throttling_with_a_short_retry_after_is_retried_and_a_long_one_is_passed_on() {
    let app = faulty_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.push(
        Fault::Status {
            status: 429,
            retry_after: Some(1),
        },
        1,
    );
    let mut tally = Tally::default();
    let started = Instant::now();
    assert_eq!(tally.call(&app, "/api/token/flaky").await.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    assert_eq!((proxy.requests(), proxy.forwarded()), (2, 1));
    // A Retry-After beyond what the broker waits out itself goes back to the caller.
    proxy.push(
        Fault::Status {
            status: 429,
            retry_after: Some(30),
        },
        1,
    );
    let response = tally.call(&app, "/api/token/flaky?scope=read").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "30");
    tally.report("429 with Retry-After 1 s, then 30 s", proxy.requests());
}

#[tokio::test]
async fn a_burst_of_server_errors_is_retried_and_a_long_one_opens_the_circuit() {
    let app = faulty_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.push(
        Fault::Status {
            status: 500,
            retry_after: None,
        },
        2,
    );
    let mut tally = Tally::default();
    assert_eq!(
        tally.call(&app, "/api/token/flaky").await.status(),
        200,
        "two 500s, then success"
    );
    assert_eq!(proxy.requests(), 3);
    proxy.set_default(Fault::Status {
        status: 500,
        retry_after: None,
    });
    for n in 0..10 {
        let response = tally
            .call(&app, &format!("/api/token/flaky?scope=s{n}"))
            .await;
        assert_eq!(response.status(), 503);
    }
    let calls = proxy.requests() - 3;
    tally.report("500 burst of 2, then 500s for good", proxy.requests());
    // Three fetches fail (three attempts at most each), then the circuit is open: the other
    // seven fail fast without a call.
    assert!(calls <= 9, "{calls} upstream calls for 10 requests");
}

#[tokio::test]
async fn connection_resets_are_retried() {
    let app = faulty_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.push(Fault::Reset, 2);
    let mut tally = Tally::default();
    assert_eq!(tally.call(&app, "/api/token/flaky").await.status(), 200);
    tally.report("two connection resets", proxy.requests());
    assert_eq!((proxy.requests(), proxy.forwarded()), (3, 1));
}

#[tokio::test]
async fn a_rejected_client_is_remembered_instead_of_asked_again() {
    let app = spawn_app_with(Setup::default()).await;
    let mut tally = Tally::default();
    for _ in 0..6 {
        let response = tally.call(&app, "/api/token/wrong").await;
        assert_eq!(response.status(), 502);
        assert_eq!(
            body_json(response).await["upstream_error"],
            "invalid_client"
        );
    }
    let calls = app.idp.stats().await.token_requests as usize;
    tally.report("invalid_client, 6 calls", calls);
    assert_eq!(
        calls, 1,
        "the first answer is remembered for the negative-cache interval"
    );
}

#[tokio::test]
async fn key_vault_throttling_and_outages_are_absorbed_by_the_secret_cache() {
    let app = faulty_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    let mut tally = Tally::default();
    assert_eq!(tally.call(&app, "/api/token/stable").await.status(), 200);
    assert_eq!(app.azure.vault.reads(), 1);
    for (round, fault) in [VaultFault::Throttled, VaultFault::Unavailable]
        .into_iter()
        .enumerate()
    {
        app.azure.vault.set_fault(Some(fault));
        // A rotation event forces the next use to re-read the secret, which now fails.
        let event = json!({"Data": {"event": {"eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
            "data": {"ObjectName": "basic-secret", "VaultName": "kv"}}}});
        let delivered = app
            .http
            .post(app.url("/function-rotation"))
            .json(&event)
            .send()
            .await
            .unwrap();
        assert_eq!(delivered.status(), 200);
        let logs = body_json(delivered).await["Logs"].to_string();
        assert!(
            logs.contains("dropped 1 cached token(s)") && logs.contains("stable"),
            "{fault:?}: the event was acted on: {logs}"
        );
        let (vault_before, idp_before) = (app.azure.vault.requests(), proxy.requests());
        let response = tally.call(&app, "/api/token/stable").await;
        assert_eq!(
            response.status(),
            200,
            "{fault:?}: the cached secret kept working"
        );
        assert!(
            app.azure.vault.requests() > vault_before,
            "{fault:?}: Key Vault was asked again after the event"
        );
        assert_eq!(
            app.azure.vault.reads(),
            1,
            "{fault:?}: and it answered no secret"
        );
        assert_eq!(
            proxy.requests() - idp_before,
            1,
            "{fault:?}: a new token was fetched with the copy in memory"
        );
        let audit = app.audit_records_when(round + 2).await;
        assert_eq!(
            audit[round + 1]["cache"],
            "miss",
            "{fault:?}: the dropped token was not served from memory"
        );
    }
    tally.report(
        "Key Vault 429 then 503 on re-read",
        app.azure.vault.requests(),
    );
    let audit = app.audit_records_when(3).await;
    let caches: Vec<&str> = audit.iter().map(|r| r["cache"].as_str().unwrap()).collect();
    assert_eq!(caches, ["miss", "miss", "miss"]);
}

#[tokio::test]
async fn an_identity_endpoint_outage_on_a_cold_start_is_a_clean_bounded_503() {
    let app = faulty_app().await;
    app.azure.identity.set_failure(Some(502));
    let mut tally = Tally::default();
    let response = tally.call(&app, "/api/token/stable").await;
    assert_eq!(response.status(), 503);
    assert_eq!(body_json(response).await["error"], "secret_unavailable");
    tally.report("identity endpoint 502, cold", app.azure.identity.requests());
    // Once it is back, callers succeed again within the cold backoff (1 s after one failure),
    // and meanwhile the failed read is not repeated per request.
    app.azure.identity.set_failure(None);
    let requests_before = app.azure.identity.requests();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let status = app.token("stable").await.status();
        if status == 200 {
            break;
        }
        assert_eq!(
            status, 503,
            "only the remembered failure until the backoff passes"
        );
        assert!(attempts < 100, "no recovery after 100 attempts 50 ms apart");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        app.azure.identity.requests() - requests_before <= 2,
        "the identity endpoint was asked once (or twice) by {attempts} attempts"
    );
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_cancel_the_fetch_others_wait_for() {
    let app = hanging_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    proxy.set_default(Fault::Hold);
    // The first caller's request starts the fetch, which is held at the proxy; then the
    // caller gives up: its connection is dropped while the fetch is in flight.
    let impatient = tokio::spawn(app.request("/api/token/hanging").send());
    assert!(
        proxy.wait_for_requests(1, Duration::from_secs(30)).await,
        "the first caller's fetch never reached the provider"
    );
    impatient.abort();
    assert!(
        impatient.await.unwrap_err().is_cancelled(),
        "the first caller gave up before its answer"
    );
    // A second caller joins the fetch still held, which then goes on.
    let patient = tokio::spawn(app.request("/api/token/hanging").send());
    app.log_count_when(
        |r| r["message"] == "waiting for the token fetch in flight" && r["connection"] == "hanging",
        1,
    )
    .await;
    proxy.release_held();
    let response = patient.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        (proxy.requests(), proxy.forwarded()),
        (1, 1),
        "the one fetch the first caller started served the second"
    );
    let joined = app
        .audit_count_when(
            |r| r["connection"] == "hanging" && r["cache"] == "joined",
            1,
        )
        .await;
    assert_eq!(joined, 1, "the second caller joined the first one's fetch");
}

/// The hanging connection's fetch is held at the proxy until the test lets it go, so "while
/// it hangs" is a fact of the run, not a guess about timings.
const HANGING: &str = r#"
[connections.hanging]
token_url = "{proxy_url}/token"
client_id = "broker-short"
client_secret = { key_vault_secret = "short-secret" }
timeout_seconds = 60
deadline_seconds = 60
"#;

async fn hanging_app() -> TestApp {
    spawn_app_with(Setup {
        proxy: true,
        extra_config: HANGING.to_string(),
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn one_connections_outage_never_delays_another_connections_cache_hits() {
    let app = hanging_app().await;
    let proxy = app.proxy.as_ref().unwrap();
    assert_eq!(app.token("demo").await.status(), 200);
    proxy.set_default(Fault::Hold);
    let hung = tokio::spawn({
        let url = app.url("/api/token/hanging");
        async move { reqwest::get(url).await.map(|r| r.status().as_u16()) }
    });
    // Wait until the hanging fetch has really reached the proxy (bounded, woken by it).
    assert!(
        proxy.wait_for_requests(1, Duration::from_secs(30)).await,
        "the hanging connection's fetch never reached the proxy"
    );
    let mut tally = Tally::default();
    for _ in 0..50 {
        assert_eq!(tally.call(&app, "/api/token/demo").await.status(), 200);
    }
    assert!(
        !hung.is_finished(),
        "all 50 hits were answered while the other fetch was held"
    );
    assert_eq!(
        (proxy.requests(), proxy.forwarded()),
        (1, 0),
        "the held fetch was the only one and it was still held"
    );
    tally.report(
        "50 cache hits on demo while another connection hangs",
        proxy.requests(),
    );
    let demo_hits = app
        .audit_count_when(|r| r["connection"] == "demo" && r["cache"] == "hit", 50)
        .await;
    assert_eq!(demo_hits, 50, "every one of them a cache hit");
    proxy.release_held();
    assert_eq!(
        hung.await.unwrap().unwrap(),
        200,
        "the held fetch completes once released"
    );
    assert_eq!(proxy.forwarded(), 1);
}

/// A connection with 20 s tokens behind the proxy: handed out until 18 s, then (a refresh
/// failing) served `stale` until 19 s. Failures are quick: one attempt of at most 1 s.
const TWENTY: &str = r#"
[connections.twenty]
token_url = "{proxy_url}/token"
client_id = "broker-twenty"
client_secret = { key_vault_secret = "twenty-secret" }
timeout_seconds = 1
deadline_seconds = 2
max_retries = 0
"#;

/// The `twenty` connection's entry in `/api/health`.
async fn twenty_health(app: &TestApp) -> Value {
    let response = app.get("/api/health").await;
    assert_eq!(response.status(), 200);
    let body = body_json(response).await;
    let mut connection = body["connections"]["twenty"].clone();
    connection["status"] = body["status"].clone();
    connection
}

#[tokio::test]
async fn a_provider_down_past_the_refresh_time_means_stale_answers_and_health_says_stale() {
    let app = spawn_app_with(Setup {
        proxy: true,
        extra_config: TWENTY.to_string(),
        ..Setup::default()
    })
    .await;
    let proxy = app.proxy.as_ref().unwrap();
    let sent = Instant::now();
    let first = body_json(app.token("twenty").await).await;
    let expires_on = first["expires_on"].as_u64().unwrap();
    assert_eq!(twenty_health(&app).await["token"], "fresh");
    // The provider goes down before the refresh is due (10 to 15 s into the token's life).
    proxy.set_default(Fault::Status {
        status: 503,
        retry_after: None,
    });
    // Call every 50 ms until the broker refuses: the cached token throughout, then a 503 only
    // once it has at most a second to live. Health is read after every answer.
    let mut seen = Vec::new();
    let refusal = loop {
        assert!(
            sent.elapsed() < Duration::from_secs(30),
            "no refusal within 30 s of a 20 s token"
        );
        let response = app.token("twenty").await;
        if response.status() != 200 {
            break response;
        }
        let body = body_json(response).await;
        assert_eq!(
            body["access_token"], first["access_token"],
            "the cached token"
        );
        assert!(body["expires_in"].as_u64().unwrap() >= 1, "{body}");
        let health = twenty_health(&app).await;
        seen.push((
            sent.elapsed(),
            health["token"].as_str().unwrap().to_string(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        unix_now() + 1 >= expires_on,
        "refused with more than a second of the token's life left"
    );
    assert_eq!(refusal.status(), 503);
    assert!(refusal.headers().contains_key("retry-after"));
    assert_eq!(body_json(refusal).await["error"], "upstream_unavailable");
    // Health said `fresh`, then `stale` once answers were stale: never before the last tenth of
    // the token's life (18 s after its fetch, which came after `sent`).
    let first_stale = seen
        .iter()
        .position(|(_, token)| token == "stale")
        .expect("health never said stale while the stale token was served");
    println!(
        "stale report | first stale answer {:?} after the fetch | {} answers, {} stale by health | upstream calls {}",
        seen[first_stale].0,
        seen.len(),
        seen.len() - first_stale,
        proxy.requests()
    );
    assert!(
        seen[first_stale].0 >= Duration::from_secs(18),
        "stale before the last tenth of the token's life: {:?}",
        seen[first_stale].0
    );
    assert!(
        seen[..first_stale]
            .iter()
            .all(|(_, token)| token == "fresh")
    );
    assert!(
        seen[first_stale..]
            .iter()
            .all(|(_, token)| token == "stale")
    );
    let health = twenty_health(&app).await;
    assert_eq!(
        (health["last_fetch"].as_str(), health["status"].as_str()),
        (Some("failed"), Some("degraded")),
        "{health}"
    );
    assert!(proxy.requests() > 1, "refreshes were tried and failed");
    // The audit says the same: the first answer a miss, the last ones `stale`, one token.
    let stale_answers = (seen.len() - first_stale) as u64;
    let stale = app
        .audit_count_when(
            |r| r["connection"] == "twenty" && r["cache"] == "stale",
            stale_answers,
        )
        .await;
    let audit: Vec<Value> = app
        .audit_records()
        .into_iter()
        .filter(|r| r["connection"] == "twenty")
        .collect();
    assert_eq!(audit[0]["cache"], "miss");
    assert!(
        audit
            .iter()
            .all(|r| r["fingerprint"] == audit[0]["fingerprint"] && r["expires_on"] == expires_on),
        "one token throughout"
    );
    assert_eq!(
        stale, stale_answers,
        "a stale record for every answer health called stale"
    );
    // Once the token has expired, health no longer reports one.
    while unix_now() <= expires_on {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(twenty_health(&app).await["token"], "none");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
