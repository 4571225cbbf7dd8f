//! The operator's workbook and alert rules (`infra/modules/operations.bicep`) read fields the
//! broker really writes: every `line.<field>` a query names is in the broker's own `audit` or
//! `stats` line, every error code and fetch result it names is one the broker counts, and the
//! panels and rules the issue asks for are there. Those lines reach Application Insights
//! whole: `host.json` keeps traces out of sampling, every query reads the host's category for
//! the handler's stdout, and no query counts rows in a way sampling would shrink.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use token_broker::observe::audit::{AuditRecord, format_line as audit_line};
use token_broker::observe::stats::{
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
        audience: Some("https://api.example"),
        resource: Some("https://api.example/orders"),
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
    assert!(read("src/observe/telemetry.rs").contains("\"audit records lost\""));
    // Tokens are counted by `count`, not by lines: a line stands for many cache hits (and a
    // row for `itemCount` lines).
    assert!(text.contains("sum(tolong(line[\"count\"]) * itemCount)"));
}

/// The category the Functions host logs a custom handler's stdout under
/// (`WorkerConstants.FunctionConsoleLogCategoryName`); Application Insights has it as
/// `customDimensions.Category`.
const CONSOLE_CATEGORY: &str = "Host.Function.Console";

/// Every query of the module (workbook panels, then alert rules), named, with the module's
/// string variables (`${lines}`, `${statsLines}`, ...) expanded.
fn expanded_queries(text: &str) -> Vec<(String, String)> {
    let literal = |value: &str| -> String {
        value
            .trim()
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or_else(|| panic!("a one-line string literal: {value}"))
            .to_string()
    };
    let vars: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("var "))
        .filter_map(|rest| rest.split_once(" = '"))
        .map(|(name, value)| (name.trim().to_string(), literal(&format!("'{value}"))))
        .collect();
    let mut queries = Vec::new();
    let block = text.split("var queries = {").nth(1).expect("var queries");
    for line in block[..block.find("\n}").unwrap()].lines() {
        if let Some((name, value)) = line.trim().split_once(": ") {
            queries.push((name.to_string(), literal(value)));
        }
    }
    for line in text.lines() {
        if let Some(value) = line.trim().strip_prefix("query: '") {
            queries.push(("alert rule".to_string(), literal(&format!("'{value}"))));
        }
    }
    for (name, query) in &mut queries {
        while let Some(start) = query.find("${") {
            let end = start + query[start..].find('}').unwrap();
            let var = &query[start + 2..end];
            let value = vars
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no var {var}"))
                .clone();
            query.replace_range(start..=end, &value);
        }
    }
    queries
}

/// The arguments of every call of `function(` in a query, parentheses balanced.
fn calls<'a>(query: &'a str, function: &str) -> Vec<&'a str> {
    let needle = format!("{function}(");
    query
        .match_indices(&needle)
        .filter(|(at, _)| {
            !query[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            let open = at + needle.len();
            let mut depth = 1;
            let close = query[open..]
                .char_indices()
                .find_map(|(i, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    (depth == 0).then_some(open + i)
                })
                .unwrap_or_else(|| panic!("unbalanced: {query}"));
            &query[open..close]
        })
        .collect()
}

#[test]
fn every_query_reads_the_broker_s_console_lines_and_weighs_rows_by_item_count() {
    let queries = expanded_queries(&read(MODULE));
    // Ten panels and three alert rules.
    assert_eq!(queries.len(), 13, "{queries:#?}");
    let from =
        format!("traces | where tostring(customDimensions.Category) == \"{CONSOLE_CATEGORY}\" | ");
    let mut counted_rows = 0;
    for (name, query) in &queries {
        // The host's own traces (its warnings, other categories) are not the broker's lines.
        assert!(
            query.starts_with(&from),
            "{name} does not keep {CONSOLE_CATEGORY}: {query}"
        );
        assert_eq!(query.matches("traces").count(), 1, "{name}: {query}");
        // A sampled row stands for `itemCount` rows: no count of rows, no plain sum, no mean.
        for unweighted in ["count(", "countif(", "dcount(", "avg(", "percentile("] {
            assert!(
                calls(query, unweighted.trim_end_matches('(')).is_empty(),
                "{name} uses {unweighted}): {query}"
            );
        }
        for argument in calls(query, "sum") {
            assert!(
                argument == "itemCount" || argument.ends_with(" * itemCount"),
                "{name}: sum({argument}) is not weighed by itemCount"
            );
            counted_rows += usize::from(argument == "itemCount");
        }
    }
    assert!(counted_rows >= 1, "rows are counted as sum(itemCount)");
    // The checks are not blind: they see a bare count and an unweighted sum.
    assert_eq!(calls("x | summarize n = count()", "count"), [""]);
    assert_eq!(
        calls("x | summarize sum(tolong(a.b))", "sum"),
        ["tolong(a.b)"]
    );
    assert!(calls("x | summarize sum(itemCount)", "count").is_empty());
}

/// Log levels that let a category's `Information` lines through, and those that do not.
const VERBOSE: &[&str] = &["Trace", "Debug", "Information"];
const QUIET: &[&str] = &["Warning", "Error", "Critical", "None"];

#[test]
fn host_json_keeps_traces_out_of_sampling_and_the_host_s_own_logs_down() {
    let host: Value = serde_json::from_str(&read("host.json")).unwrap();
    let logging = &host["logging"];
    // Application Insights samples every type by default (20 items a second per instance):
    // the broker's audit and stats lines must not be.
    let sampling = &logging["applicationInsights"]["samplingSettings"];
    let excluded: Vec<&str> = sampling["excludedTypes"]
        .as_str()
        .unwrap_or("")
        .split(';')
        .map(str::trim)
        .collect();
    assert!(
        sampling["isEnabled"] == false || excluded.contains(&"Trace"),
        "host.json samples traces: {sampling}"
    );
    let levels = logging["logLevel"].as_object().expect("logging.logLevel");
    let level = |category: &str| levels.get(category).and_then(Value::as_str);
    // The broker's stdout lines are Information; requests and the aggregated counts too.
    assert!(
        VERBOSE.contains(&level(CONSOLE_CATEGORY).unwrap_or("")),
        "{levels:?}"
    );
    assert_eq!(level("Host.Results"), Some("Information"), "requests");
    assert_eq!(
        level("Host.Aggregator"),
        Some("Information"),
        "customMetrics"
    );
    // Everything else of the host's stays at Warning or above: no Executing/Executed pair per
    // invocation (`Function`), no startup chatter (`default`).
    assert!(
        QUIET.contains(&level("default").unwrap_or("")),
        "{levels:?}"
    );
    assert!(
        QUIET.contains(&level("Function").unwrap_or("")),
        "{levels:?}"
    );
    for (category, value) in levels {
        if ![CONSOLE_CATEGORY, "Host.Results", "Host.Aggregator"].contains(&category.as_str()) {
            assert!(
                QUIET.contains(&value.as_str().unwrap()),
                "{category}: {value} lets the host's chatter through"
            );
        }
    }
    // No ingestion sampling on the Application Insights resource either.
    let components: Vec<_> = bicep::resources_of("Microsoft.Insights/components")
        .into_iter()
        .filter(|c| !c.is_existing())
        .collect();
    assert_eq!(components.len(), 1, "{components:?}");
    if let Some(percentage) = components[0].property("SamplingPercentage") {
        assert_eq!(percentage, "100", "ingestion sampling drops traces");
    }
}

#[test]
fn the_operations_doc_says_what_reaches_application_insights_and_what_it_costs() {
    let section =
        crate::markdown_section("docs/operations.md", "## Operating it").replace('\n', " ");
    let host: Value = serde_json::from_str(&read("host.json")).unwrap();
    let sampling = &host["logging"]["applicationInsights"]["samplingSettings"];
    let excluded = sampling["excludedTypes"].as_str().expect("excludedTypes");
    for needle in [
        CONSOLE_CATEGORY.to_string(),
        "customDimensions.Category".to_string(),
        format!("\"excludedTypes\": \"{excluded}\""),
        format!(
            "`maxTelemetryItemsPerSecond` {}",
            sampling["maxTelemetryItemsPerSecond"]
        ),
        "Host.Results".to_string(),
        "Host.Aggregator".to_string(),
        "itemCount".to_string(),
        "sum(itemCount)".to_string(),
        "What that costs, in rows".to_string(),
    ] {
        assert!(
            section.contains(&needle),
            "docs/operations.md \"Operating it\" does not say {needle}"
        );
    }
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
fn the_operations_doc_explains_every_field_of_the_stats_line() {
    let section = crate::markdown_section("docs/operations.md", "## Operating it");
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
            "docs/operations.md \"Operating it\" does not explain `{field}`"
        );
    }
    for needle in ["GET /api/health", "stats_interval_seconds", "MonitorAlert"] {
        assert!(section.contains(needle), "{needle}");
    }
}
