//! Key Vault's events reach `function-rotation`, and the README states what that does and does
//! not do on Flex Consumption.

use serde_json::Value;

use crate::bicep;
use crate::read;

/// What `function-rotation` must receive: new versions and near expiry of secrets, keys and
/// certificates (issue 13), and a secret's expiry, which the broker acts on too.
const REQUIRED_EVENT_TYPES: &[&str] = &[
    "Microsoft.KeyVault.SecretNewVersionCreated",
    "Microsoft.KeyVault.SecretNearExpiry",
    "Microsoft.KeyVault.SecretExpired",
    "Microsoft.KeyVault.KeyNewVersionCreated",
    "Microsoft.KeyVault.KeyNearExpiry",
    "Microsoft.KeyVault.CertificateNewVersionCreated",
    "Microsoft.KeyVault.CertificateNearExpiry",
];

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

    let listed = subscription
        .body
        .split("includedEventTypes:")
        .nth(1)
        .map(bicep::string_array)
        .expect("includedEventTypes");
    for required in REQUIRED_EVENT_TYPES {
        assert!(
            listed.iter().any(|t| t == required),
            "{required} is not subscribed: {listed:?}"
        );
    }
    for event_type in &listed {
        assert!(
            event_type.starts_with("Microsoft.KeyVault."),
            "{event_type}"
        );
    }
    assert_eq!(
        subscription.property("eventDeliverySchema").as_deref(),
        Some("'EventGridSchema'")
    );
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
    let steps = crate::readme_section("### Step by step");
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
fn the_readme_states_the_rotation_bound_of_the_shipped_configuration() {
    let shipped: toml::Value = toml::from_str(&read("infra/broker.toml")).unwrap();
    let ttl = shipped["cache"]["secret_ttl_seconds"]
        .as_integer()
        .expect("infra/broker.toml states secret_ttl_seconds, the pickup bound");
    let rolling = crate::readme_section("### Rolling a secret");
    let bound = format!("`secret_ttl_seconds` ({ttl} s in `infra/broker.toml`)");
    assert!(rolling.contains(&bound), "Rolling a secret states {bound}");
    assert!(rolling.contains("Flex Consumption"));
    // No sentence in the README promises a rotation in seconds.
    let readme = read("README.md").replace('\n', " ");
    for claim in [
        "takes effect in seconds",
        "within seconds",
        "picks the new version up within seconds",
    ] {
        assert!(!readme.contains(claim), "the README still says {claim:?}");
    }
}
