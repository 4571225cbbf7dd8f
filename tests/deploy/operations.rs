//! The operator's workbook and alert rules (`infra/modules/operations.bicep`) read fields the
//! broker really writes: every `line.<field>` a query names is in the broker's own `audit` or
//! `stats` line, every error code and fetch result it names is one the broker counts, and the
//! panels and rules the issue asks for are there.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use token_broker::audit::{AuditRecord, format_line as audit_line};
use token_broker::stats::{
    ERROR_CODES, FETCH_RESULTS, SharedTierCounts, Snapshot, format_line as stats_line,
};

use crate::bicep;
use crate::read;

const MODULE: &str = "infra/modules/operations.bicep";

/// Field names a query reads: `line.<name>` and `line["<name>"]`, with a nested name
/// (`line.errors_by_code.secret_unavailable`) as its path.
fn fields_read(text: &str) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for (start, _) in text.match_indices("line") {
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let mut rest = &text[start + "line".len()..];
        let mut path = Vec::new();
        loop {
            if let Some(after) = rest.strip_prefix('.') {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                rest = &after[name.len()..];
                path.push(name);
            } else if let Some(after) = rest.strip_prefix("[\"") {
                let end = after.find("\"]").unwrap();
                path.push(after[..end].to_string());
                rest = &after[end + 2..];
            } else {
                break;
            }
        }
        if !path.is_empty() {
            found.insert(path);
        }
    }
    found
}

/// Top-level keys of the broker's lines: a single-answer and an aggregated audit record, and a
/// `stats` line.
fn written_fields() -> BTreeSet<String> {
    let record = AuditRecord {
        connection: "demo",
        caller: "app",
        scopes: "read",
        cache: "hit",
        expires_on: 1,
        fingerprint: "0123456789ab",
        count: 1,
        invocation_id: "i",
        method: "GET",
        path: "/api/token/demo",
    };
    let now = SystemTime::now();
    let mut shared = Snapshot::default();
    shared.shared = Some(SharedTierCounts::default());
    let lines = [
        audit_line(&record, None, now),
        audit_line(&record, Some("2026-01-01T00:00:00.000000Z"), now),
        stats_line(&Snapshot::default(), Duration::from_secs(60), &[], now),
        // With a shared tier, the line also carries the `shared_*` counts.
        stats_line(&shared, Duration::from_secs(60), &[], now),
    ];
    let mut fields: BTreeSet<String> = lines
        .iter()
        .flat_map(|line| {
            let value: Value = serde_json::from_slice(line).unwrap();
            value
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    // The loss report (`telemetry`): `dropped` and `write_errors`, target `audit`.
    fields.extend(["dropped".to_string(), "write_errors".to_string()]);
    fields
}

#[test]
fn every_field_the_workbook_and_the_alert_rules_read_is_one_the_broker_writes() {
    let text = read(MODULE);
    let read_fields = fields_read(&text);
    let written = written_fields();
    assert!(read_fields.len() >= 15, "{read_fields:?}");
    for path in &read_fields {
        assert!(
            written.contains(&path[0]),
            "the queries read `{}`, which the broker does not write ({written:?})",
            path.join(".")
        );
        // Names inside the counted maps are codes and results the broker counts.
        match path[0].as_str() {
            "errors_by_code" if path.len() > 1 => {
                assert!(ERROR_CODES.contains(&path[1].as_str()), "{path:?}");
            }
            "token_fetches_by_result" if path.len() > 1 => {
                assert!(FETCH_RESULTS.contains(&path[1].as_str()), "{path:?}");
            }
            _ => assert_eq!(path.len(), 1, "{path:?}"),
        }
    }
    // The targets and messages the queries select on are the broker's.
    for needle in [
        "tostring(line.target) == \"audit\"",
        "tostring(line.target) == \"stats\"",
        "tostring(line.target) == \"rotation\"",
        "tostring(line.message) == \"token handed out\"",
        "tostring(line.message) == \"audit records lost\"",
    ] {
        assert!(text.contains(needle), "{needle}");
    }
    assert!(read("src/rotation.rs").contains("will be read again"));
    assert!(read("src/telemetry.rs").contains("\"audit records lost\""));
    // Tokens are counted by `count`, not by lines: a line stands for many cache hits.
    assert!(text.contains("sum(tolong(line[\"count\"]))"));
}

#[test]
fn the_workbook_shows_what_an_operator_asks_and_the_rules_cover_the_failures() {
    let text = read(MODULE);
    let workbooks = bicep::resources_of("Microsoft.Insights/workbooks");
    assert_eq!(workbooks.len(), 1);
    let workbook = &workbooks[0];
    assert_eq!(
        workbook.property("sourceId").as_deref(),
        Some("appInsightsId")
    );
    assert_eq!(
        workbook.property("serializedData").as_deref(),
        Some("string(workbookContent)")
    );
    for panel in [
        "Tokens handed out per connection",
        "Tokens per connection, caller and scopes",
        "Cache hit ratio",
        "Token endpoint latency",
        "Token endpoint fetches by result",
        "Errors by code",
        "Secret rotations",
    ] {
        assert!(text.contains(panel), "no panel {panel}");
    }
    for field in [
        "token_fetch_p50_ms",
        "token_fetch_p95_ms",
        "token_fetch_p99_ms",
        "cache_hits",
    ] {
        assert!(text.contains(&format!("line.{field}")), "{field}");
    }

    let rules = bicep::resources_of("Microsoft.Insights/scheduledQueryRules");
    assert_eq!(
        rules.len(),
        1,
        "one declaration, a rule per entry of `rules`"
    );
    assert!(rules[0].header.contains("for rule in rules"));
    assert_eq!(
        rules[0].property("scopes").as_deref(),
        Some("[appInsightsId]")
    );
    for (key, field) in [
        ("token-endpoint-failures", "line.token_fetch_failures"),
        (
            "secret-unavailable",
            "line.errors_by_code.secret_unavailable",
        ),
        ("breaker-open", "line.breakers_open"),
    ] {
        let rule = text
            .split(&format!("key: '{key}'"))
            .nth(1)
            .unwrap_or_else(|| panic!("no rule {key}"));
        let query = rule
            .lines()
            .find(|l| l.trim().starts_with("query:"))
            .unwrap();
        assert!(query.contains(field), "{key}: {query}");
    }

    // Key Vault near expiry: the vault's own events, handed to Azure Monitor as alerts.
    let alert = bicep::resources_of("Microsoft.EventGrid/systemTopics/eventSubscriptions")
        .into_iter()
        .find(|s| s.property("endpointType").as_deref() == Some("'MonitorAlert'"))
        .expect("a near-expiry alert subscription");
    for event in [
        "Microsoft.KeyVault.SecretNearExpiry",
        "Microsoft.KeyVault.KeyNearExpiry",
        "Microsoft.KeyVault.CertificateNearExpiry",
    ] {
        assert!(alert.body.contains(&format!("'{event}'")), "{event}");
    }
    assert_eq!(
        alert.property("actionGroups").as_deref(),
        Some("alertActionGroups")
    );

    // main.bicep deploys the module against the broker's Application Insights.
    let main = read("infra/main.bicep");
    let module = main
        .split("module operations 'modules/operations.bicep'")
        .nth(1)
        .expect("main.bicep deploys the operations module");
    assert!(module.contains("appInsightsId: monitoring.outputs.appInsightsId"));
    assert!(main.contains("alertActionGroups: operations.outputs.actionGroupIds"));
}

#[test]
fn the_readme_explains_every_field_of_the_stats_line() {
    let section = crate::readme_section("## Operating it");
    let line = stats_line(
        &Snapshot::default(),
        Duration::from_secs(60),
        &[],
        SystemTime::now(),
    );
    let value: Value = serde_json::from_slice(&line).unwrap();
    for field in value.as_object().unwrap().keys() {
        if ["timestamp", "level", "message", "target"].contains(&field.as_str()) {
            continue;
        }
        assert!(
            section.contains(&format!("`{field}`")),
            "README \"Operating it\" does not explain `{field}`"
        );
    }
    for needle in ["GET /api/health", "stats_interval_seconds", "MonitorAlert"] {
        assert!(section.contains(needle), "{needle}");
    }
}
