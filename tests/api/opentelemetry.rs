//! OpenTelemetry: with an OTLP endpoint set, the broker exports the documented metrics and a
//! trace per request that continues the caller's `traceparent`, through its own HTTP client,
//! honouring the standard variables; nothing secret reaches an export; unset, nothing is sent.

use std::time::Duration;

use crate::support::{
    FUNCTION_KEY, OtlpReceiver, Setup, TRICKY_SECRET, json, post_secret, setting_secret,
    spawn_app_with,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

fn exporting(receiver: &OtlpReceiver) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-otlp-key=collector%20key,x-tenant=t1",
        ),
        ("OTEL_SERVICE_NAME", "broker-under-test"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .into()
}

const DOCUMENTED: [&str; 8] = [
    "token_broker.requests",
    "token_broker.cache.lookups",
    "token_broker.token.fetches",
    "token_broker.token.fetch.duration",
    "token_broker.provider.holds",
    "token_broker.key_vault.operations",
    "token_broker.invalidations",
    "http.client.request.duration",
];

#[tokio::test]
async fn metrics_and_a_trace_continuing_the_callers_traceparent_reach_an_otlp_receiver() {
    let receiver = OtlpReceiver::start().await;
    let mut app = spawn_app_with(Setup {
        extra_env: exporting(&receiver),
        ..Setup::default()
    })
    .await;
    // A miss (Key Vault read, provider call) in the caller's trace, then a hit.
    let traced = app
        .request("/api/token/demo")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), 200);
    let token = json(traced).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let hit = app
        .http
        .get(app.url(&format!("/api/token/demo?code={FUNCTION_KEY}")))
        .send()
        .await
        .unwrap();
    assert_eq!(hit.status(), 200);
    let second = json(app.get("/api/token/posty").await).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    // A refused client, then the same refusal from the negative cache (a provider hold).
    assert_eq!(app.get("/api/token/wrong").await.status(), 502);
    assert_eq!(app.get("/api/token/wrong").await.status(), 502);
    // An invalidation that drops nothing, and an unknown connection.
    let invalidation = app
        .http
        .post(app.url("/api/token/demo/invalidate"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("access_token=not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(json(invalidation).await["invalidated"], false);
    assert_eq!(app.get("/api/token/nosuch").await.status(), 404);

    let all_named = receiver
        .wait_for(Duration::from_secs(20), |receiver| {
            let (points, _) = receiver.points();
            DOCUMENTED
                .iter()
                .all(|name| points.iter().any(|point| point.metric == *name))
        })
        .await;
    let (points, resources) = receiver.points();
    let names: std::collections::BTreeSet<&str> =
        points.iter().map(|point| point.metric.as_str()).collect();
    assert!(all_named, "documented metrics missing; received {names:?}");
    let has = |metric: &str, pairs: &[(&str, &str)]| {
        points.iter().any(|point| {
            point.metric == metric
                && pairs
                    .iter()
                    .all(|(key, value)| point.attribute(key) == Some(value))
        })
    };
    assert!(has(
        "token_broker.requests",
        &[
            ("connection", "demo"),
            ("http.response.status_code", "200"),
            ("http.route", "/api/token/{connection}")
        ]
    ));
    assert!(has(
        "token_broker.requests",
        &[("http.response.status_code", "404")]
    ));
    assert!(has(
        "token_broker.cache.lookups",
        &[("tier", "memory"), ("outcome", "hit")]
    ));
    assert!(has(
        "token_broker.cache.lookups",
        &[("tier", "memory"), ("outcome", "miss")]
    ));
    assert!(has(
        "token_broker.token.fetches",
        &[("connection", "wrong"), ("result", "rejected")]
    ));
    assert!(has(
        "token_broker.token.fetch.duration",
        &[("connection", "demo"), ("result", "ok")]
    ));
    assert!(has(
        "token_broker.provider.holds",
        &[
            ("connection", "wrong"),
            ("kind", "rejected"),
            ("scope", "instance")
        ]
    ));
    assert!(has(
        "token_broker.key_vault.operations",
        &[("operation", "get_secret"), ("result", "ok")]
    ));
    assert!(has(
        "token_broker.invalidations",
        &[("connection", "demo"), ("result", "not_current")]
    ));
    // Cumulative sums: the last export counts both answered requests for demo's token.
    let demo_ok = points
        .iter()
        .filter(|point| {
            point.metric == "token_broker.requests"
                && point.attribute("connection") == Some("demo")
                && point.attribute("http.response.status_code") == Some("200")
        })
        .map(|point| point.value)
        .fold(0.0, f64::max);
    assert_eq!(demo_ok, 2.0, "two answered requests for demo");
    assert!(has(
        "http.client.request.duration",
        &[
            ("http.request.method", "POST"),
            ("server.address", "127.0.0.1"),
            ("http.response.status_code", "200")
        ]
    ));
    // The standard variables: the service name, resource attributes and headers.
    assert!(resources.iter().all(|attributes| {
        attributes.contains(&("service.name".into(), "broker-under-test".into()))
            && attributes.contains(&("deployment.environment".into(), "test".into()))
    }));

    // The caller's trace: the request's server span is the child of its `traceparent`, and
    // the Key Vault read and the provider call are children of the request span.
    let traced = receiver
        .wait_for(Duration::from_secs(20), |receiver| {
            let spans = receiver.spans();
            ["key_vault get_secret", "POST token endpoint"]
                .iter()
                .all(|name| {
                    spans
                        .iter()
                        .any(|s| s.name == *name && s.trace_id == TRACE_ID)
                })
                && spans
                    .iter()
                    .any(|s| s.name == "POST /api/token/{connection}/invalidate")
        })
        .await;
    let spans = receiver.spans();
    assert!(traced, "{spans:#?}");
    let request = spans
        .iter()
        .find(|span| span.trace_id == TRACE_ID && span.parent_span_id == PARENT_SPAN)
        .unwrap_or_else(|| panic!("no span continues the traceparent: {spans:#?}"));
    assert_eq!(request.name, "GET /api/token/{connection}");
    assert_eq!(request.kind, 2, "a server span");
    assert_eq!(request.attribute("http.response.status_code"), Some("200"));
    assert_eq!(request.attribute("url.path"), Some("/api/token/demo"));
    for name in ["key_vault get_secret", "POST token endpoint"] {
        let child = spans
            .iter()
            .find(|span| span.name == name && span.trace_id == TRACE_ID)
            .unwrap();
        assert_eq!(child.parent_span_id, request.span_id, "{name}: {child:?}");
        assert_eq!(child.kind, 3, "{name}: a client span");
    }
    // Spans only: the log lines inside them (a provider's error text among them) stay in the
    // broker's log and are not exported as span events.
    assert!(spans.iter().all(|span| span.events == 0), "{spans:#?}");
    // Other requests have traces of their own.
    assert!(
        spans.iter().any(|span| span.trace_id != TRACE_ID
            && span.name == "POST /api/token/{connection}/invalidate")
    );

    // Sent as the variables ask, in protobuf.
    let exports = receiver.exports();
    for export in &exports {
        assert_eq!(
            export.content_type, "application/x-protobuf",
            "{}",
            export.path
        );
        assert_eq!(export.headers["x-otlp-key"], "collector key");
        assert_eq!(export.headers["x-tenant"], "t1");
    }

    // Nothing secret in any export: not a client secret, not a token handed out, not the
    // function key (sent in the query above), not a presented token.
    app.terminate().await;
    let exports = receiver.exports();
    let bytes: Vec<u8> = exports
        .iter()
        .flat_map(|export| export.body.clone())
        .collect();
    let contains = |needle: &str| {
        bytes
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    };
    for secret in [
        TRICKY_SECRET.to_string(),
        post_secret(),
        setting_secret(),
        "not-the-registered-secret".to_string(),
        token.clone(),
        second.clone(),
        FUNCTION_KEY.to_string(),
        "not-the-token".to_string(),
    ] {
        assert!(!contains(&secret), "an export carries a secret or token");
    }
    // The scan can find what it looks for: the request path is in the exports.
    assert!(contains("/api/token/demo"));
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_even_with_the_other_variables_set() {
    let receiver = OtlpReceiver::start().await;
    let mut env = exporting(&receiver);
    env.retain(|(name, _)| name != "OTEL_EXPORTER_OTLP_ENDPOINT");
    let mut app = spawn_app_with(Setup {
        extra_env: env,
        ..Setup::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.get("/api/token/demo").await.status(), 200);
    }
    // Shutdown is when an exporter would send what is left: after it, nothing may have come.
    app.terminate().await;
    assert!(receiver.exports().is_empty());
    assert!(!app.logs().iter().any(|line| line.contains("OpenTelemetry")));
}

#[tokio::test]
async fn a_traces_endpoint_alone_exports_traces_and_no_metrics() {
    let receiver = OtlpReceiver::start().await;
    let mut app = spawn_app_with(Setup {
        extra_env: vec![
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_string(),
                format!("{}/v1/traces", receiver.endpoint),
            ),
            ("OTEL_METRIC_EXPORT_INTERVAL".to_string(), "200".to_string()),
            ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
        ],
        ..Setup::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.get("/api/token/demo").await.status(), 200);
    }
    // Shutdown exports what is left: after it, every export has arrived.
    app.terminate().await;
    let paths: std::collections::BTreeSet<String> = receiver
        .exports()
        .into_iter()
        .map(|export| export.path)
        .collect();
    assert_eq!(
        paths,
        std::collections::BTreeSet::from(["/v1/traces".to_string()])
    );
}
