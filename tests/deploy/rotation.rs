//! Key Vault's events reach `function-rotation` (new versions only; the reminders go to Azure
//! Monitor), Event Grid retries a failed delivery for a day and says when it gave up, and the
//! README states what that does and does not do on Flex Consumption.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::bicep;
use crate::read;

/// What `function-rotation` receives, and nothing else: a rotation is a new version of a
/// secret, key or certificate (issue 17, finding 5).
const NEW_VERSION_EVENT_TYPES: &[&str] = &[
    "Microsoft.KeyVault.SecretNewVersionCreated",
    "Microsoft.KeyVault.KeyNewVersionCreated",
    "Microsoft.KeyVault.CertificateNewVersionCreated",
];

/// Reminders that announce nothing new: they go to Azure Monitor as alerts.
const REMINDER_EVENT_TYPES: &[&str] = &[
    "Microsoft.KeyVault.SecretNearExpiry",
    "Microsoft.KeyVault.KeyNearExpiry",
    "Microsoft.KeyVault.CertificateNearExpiry",
    "Microsoft.KeyVault.SecretExpired",
    "Microsoft.KeyVault.KeyExpired",
    "Microsoft.KeyVault.CertificateExpired",
];

/// The event types a subscription's filter lists.
fn event_types(subscription: &bicep::Declaration) -> BTreeSet<String> {
    subscription
        .body
        .split("includedEventTypes:")
        .nth(1)
        .map(bicep::string_array)
        .expect("includedEventTypes")
        .into_iter()
        .collect()
}

fn subscriptions_to(endpoint_type: &str) -> Vec<bicep::Declaration> {
    bicep::resources_of("Microsoft.EventGrid/systemTopics/eventSubscriptions")
        .into_iter()
        .filter(|s| s.property("endpointType").as_deref() == Some(&*format!("'{endpoint_type}'")))
        .collect()
}

#[test]
fn the_vault_system_topic_subscription_delivers_the_rotation_events_to_function_rotation() {
    let topics = bicep::resources_of("Microsoft.EventGrid/systemTopics");
    assert_eq!(topics.len(), 1, "{topics:?}");
    let topic = &topics[0];
    assert_eq!(
        topic.property("topicType").as_deref(),
        Some("'Microsoft.KeyVault.vaults'")
    );
    let vault = bicep::declarations_in(&topic.file, "resource")
        .into_iter()
        .find(|r| r.target == "Microsoft.KeyVault/vaults")
        .expect("the vault the topic listens to");
    assert_eq!(
        topic.property("source"),
        Some(format!("{}.id", vault.symbol))
    );

    // One subscription delivers to the function; the other is the near-expiry alert (checked
    // with the operations module).
    let subscriptions: Vec<_> =
        bicep::resources_of("Microsoft.EventGrid/systemTopics/eventSubscriptions")
            .into_iter()
            .filter(|s| s.property("endpointType").as_deref() == Some("'AzureFunction'"))
            .collect();
    assert_eq!(subscriptions.len(), 1, "{subscriptions:?}");
    let subscription = &subscriptions[0];
    assert_eq!(subscription.property("parent"), Some(topic.symbol.clone()));
    assert_eq!(
        subscription.property("endpointType").as_deref(),
        Some("'AzureFunction'")
    );
    // The destination is the function `function-rotation` of the broker's site.
    let destination = subscription.property("resourceId").expect("a destination");
    let site = bicep::declarations_in(&subscription.file, "resource")
        .into_iter()
        .find(|r| r.target == "Microsoft.Web/sites")
        .expect("the broker's site");
    assert_eq!(
        destination,
        format!("'${{{}.id}}/functions/function-rotation'", site.symbol)
    );
    // ...which is the folder of the eventGridTrigger function in the package.
    let function: Value = serde_json::from_str(&read("function-rotation/function.json")).unwrap();
    assert_eq!(function["bindings"][0]["type"], "eventGridTrigger");
    assert!(read("scripts/package_zip.py").contains("\"function-rotation/function.json\""));

    // Exactly the new versions: a near-expiry or expiry reminder is no rotation.
    let expected: BTreeSet<String> = NEW_VERSION_EVENT_TYPES
        .iter()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(event_types(subscription), expected);
    assert_eq!(
        subscription.property("eventDeliverySchema").as_deref(),
        Some("'EventGridSchema'")
    );
}

#[test]
fn reminders_go_to_alerts_and_a_failed_rotation_is_retried_for_a_day_then_reported() {
    // Near expiry and expiry reach Azure Monitor, each type once, and never the function.
    let alerts = subscriptions_to("MonitorAlert");
    let mut alerted = Vec::new();
    for alert in &alerts {
        assert_eq!(
            alert.property("actionGroups").as_deref(),
            Some("alertActionGroups"),
            "{}",
            alert.describe()
        );
        alerted.extend(event_types(alert));
    }
    alerted.sort();
    let mut reminders: Vec<String> = REMINDER_EVENT_TYPES.iter().map(|t| t.to_string()).collect();
    reminders.sort();
    assert_eq!(alerted, reminders);
    let expired = alerts
        .iter()
        .find(|a| event_types(a).iter().any(|t| t.ends_with("Expired")))
        .expect("an expiry alert");
    assert_eq!(expired.property("severity").as_deref(), Some("'Sev1'"));

    // Event Grid retries a delivery the function failed (5xx, or no answer in 30 s); the
    // subscription says for how long instead of leaving it to defaults.
    let function = &subscriptions_to("AzureFunction")[0];
    assert_eq!(
        function.property("maxDeliveryAttempts").as_deref(),
        Some("30")
    );
    assert_eq!(
        function.property("eventTimeToLiveInMinutes").as_deref(),
        Some("1440")
    );
    // No dead-letter destination; a dropped event raises an alert instead.
    assert!(!function.body.contains("deadLetterDestination"));
    let dropped: Vec<_> = bicep::resources_of("Microsoft.Insights/metricAlerts")
        .into_iter()
        .filter(|a| a.property("metricName").as_deref() == Some("'DroppedEventCount'"))
        .collect();
    assert_eq!(dropped.len(), 1, "an alert on DroppedEventCount");
    let dropped = &dropped[0];
    let topic = bicep::declarations_in(&dropped.file, "resource")
        .into_iter()
        .find(|r| r.target == "Microsoft.EventGrid/systemTopics")
        .expect("the alert sits beside the system topic");
    assert_eq!(
        dropped.property("scopes"),
        Some(format!("[{}.id]", topic.symbol))
    );
    assert_eq!(
        dropped.property("metricNamespace").as_deref(),
        Some("'Microsoft.EventGrid/systemTopics'")
    );
    assert!(
        dropped
            .body
            .contains("actions: [for group in alertActionGroups: { actionGroupId: group }]"),
        "{}",
        dropped.body
    );

    // infra/README.md states the schedule, the bounds and the decisions.
    let section =
        crate::markdown_section("infra/README.md", "## Rotation events").replace('\n', " ");
    for needle in [
        "`SecretNewVersionCreated`",
        "30 s",
        "10 s",
        "every 12 h",
        "30 attempts and 1,440 minutes",
        "No dead-letter destination",
        "`DroppedEventCount`",
        "`rotationAlwaysReady`",
    ] {
        assert!(
            section.contains(needle),
            "infra/README.md \"Rotation events\": {needle}"
        );
    }
}

#[test]
fn the_subscription_is_a_step_after_the_package_is_deployed() {
    let main = bicep::root_file("infra/main.bicep");
    let modules = bicep::declarations_in(&main, "module");
    let rotation = modules
        .iter()
        .find(|m| m.target == "modules/rotation-events.bicep")
        .expect("main.bicep uses the rotation events module");
    assert!(
        rotation.header.contains("if (subscribeRotationEvents)"),
        "{}",
        rotation.header
    );
    let param = bicep::param("infra/main.bicep", "subscribeRotationEvents");
    assert!(
        param.contains("param subscribeRotationEvents bool = false"),
        "{param}"
    );
    // The README's steps deploy the package, then turn the subscription on.
    let steps = crate::markdown_section("docs/deployment.md", "### Step by step");
    let package = steps
        .find("config-zip")
        .expect("a step deploys the package");
    let subscribe = steps
        .find("subscribeRotationEvents=true")
        .expect("a step turns the subscription on");
    assert!(
        package < subscribe,
        "the subscription comes after the package"
    );
}

#[test]
fn the_deployment_doc_states_the_rotation_bound_of_the_shipped_configuration() {
    let shipped: toml::Value = toml::from_str(&read("infra/broker.toml")).unwrap();
    let ttl = shipped["cache"]["secret_ttl_seconds"]
        .as_integer()
        .expect("infra/broker.toml states secret_ttl_seconds, the pickup bound");
    let rolling = crate::markdown_section("docs/deployment.md", "### Rolling a secret");
    let bound = format!("`secret_ttl_seconds` ({ttl} s in `infra/broker.toml`)");
    assert!(rolling.contains(&bound), "Rolling a secret states {bound}");
    assert!(rolling.contains("Flex Consumption"));
    // No sentence in the README or the documentation promises a rotation in seconds.
    let mut documents = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(crate::root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            documents.push(format!("docs/{name}"));
        }
    }
    assert!(
        documents.len() > 5,
        "the docs/ folder is read: {documents:?}"
    );
    let readme = documents
        .iter()
        .map(|document| read(document))
        .collect::<Vec<_>>()
        .join(" ")
        .replace('\n', " ");
    for claim in [
        "takes effect in seconds",
        "within seconds",
        "picks the new version up within seconds",
    ] {
        assert!(
            !readme.contains(claim),
            "the documentation still says {claim:?}"
        );
    }
}
