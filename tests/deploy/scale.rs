//! Flex Consumption's scale settings of the broker's Function App: the HTTP concurrency per
//! instance is set, from a parameter whose default the infra README reasons for, instead of
//! Flex's default by instance size (4 at 512 MB); `function-rotation` gets an always-ready
//! instance only when asked.

use crate::{bicep, read};

const MODULE: &str = "infra/modules/functionapp.bicep";

/// Flex's HTTP concurrency per instance when none is set, at 512 MB (Microsoft Learn,
/// "Concurrency in Azure Functions": 4 at 512 MB, 16 at 2,048 MB, 32 at 4,096 MB).
const FLEX_DEFAULT_AT_512_MB: i64 = 4;

/// The broker's site (not an `existing` reference to it).
fn site() -> bicep::Declaration {
    let sites: Vec<_> = bicep::declarations_in(&bicep::root_file(MODULE), "resource")
        .into_iter()
        .filter(|r| r.target == "Microsoft.Web/sites" && !r.is_existing())
        .collect();
    assert_eq!(sites.len(), 1, "{sites:?}");
    sites.into_iter().next().unwrap()
}

/// The body of the object literal `key: { ... }` in `text`, braces balanced.
fn object(text: &str, key: &str) -> String {
    let start = text
        .find(&format!("{key}: {{"))
        .unwrap_or_else(|| panic!("no {key}: {{ in {text}"));
    let open = start + text[start..].find('{').unwrap();
    let mut depth = 0usize;
    for (index, character) in text[open..].char_indices() {
        match character {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return text[open + 1..open + index].to_string();
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after {key}")
}

/// The default of `param <name> int = <value>` in main.bicep.
fn main_default(name: &str) -> String {
    let param = bicep::param("infra/main.bicep", name);
    param
        .lines()
        .last()
        .unwrap()
        .split_once(" = ")
        .unwrap_or_else(|| panic!("{name} has a default: {param}"))
        .1
        .trim()
        .to_string()
}

#[test]
fn http_concurrency_per_instance_is_set_from_a_parameter_above_flex_s_default() {
    let scale = object(
        &object(&site().body, "functionAppConfig"),
        "scaleAndConcurrency",
    );
    let http = object(&object(&scale, "triggers"), "http");
    assert_eq!(
        http.trim(),
        "perInstanceConcurrency: httpPerInstanceConcurrency"
    );
    // The reasoning in infra/README.md is for 512 MB instances (a quarter of a core).
    assert!(scale.contains("instanceMemoryMB: 512"), "{scale}");
    let module_param = bicep::param(MODULE, "httpPerInstanceConcurrency");
    for line in [
        "@minValue(1)",
        "@maxValue(1000)",
        "param httpPerInstanceConcurrency int",
    ] {
        assert!(module_param.contains(line), "{module_param}");
    }

    // main.bicep takes it as a parameter with a reasoned default and passes it on.
    let main_param = bicep::param("infra/main.bicep", "httpPerInstanceConcurrency");
    assert!(main_param.contains("@minValue(1)") && main_param.contains("@maxValue(1000)"));
    let default: i64 = main_default("httpPerInstanceConcurrency").parse().unwrap();
    assert!(
        default > FLEX_DEFAULT_AT_512_MB && default <= 1000,
        "{default}"
    );
    let function_app = bicep::declarations_in(&bicep::root_file("infra/main.bicep"), "module")
        .into_iter()
        .find(|m| m.target == "modules/functionapp.bicep")
        .unwrap();
    assert_eq!(
        function_app
            .property("httpPerInstanceConcurrency")
            .as_deref(),
        Some("httpPerInstanceConcurrency")
    );

    // infra/README.md gives the default and the bounds it was weighed against.
    let section =
        crate::markdown_section("infra/README.md", "## HTTP concurrency").replace('\n', " ");
    for needle in [
        format!("(default **{default}**"),
        format!("{FLEX_DEFAULT_AT_512_MB} at 512 MB"),
        "BENCHMARKS.md".to_string(),
        "single flight".to_string(),
        "230 s".to_string(),
        "`deadline_seconds`".to_string(),
        "`maximumInstanceCount`".to_string(),
    ] {
        assert!(
            section.contains(&needle),
            "infra/README.md \"HTTP concurrency\": {needle}"
        );
    }
    // The README's table and Flex section state the value deployed.
    let deploying =
        crate::markdown_section("docs/deployment.md", "## Deploying").replace('\n', " ");
    assert!(
        deploying.contains(&format!("{default} requests in flight per instance")),
        "README \"Deploying\" states {default} requests in flight per instance"
    );
}

#[test]
fn function_rotation_gets_an_always_ready_instance_only_when_asked() {
    let text = read(MODULE);
    let scale = object(
        &object(&site().body, "functionAppConfig"),
        "scaleAndConcurrency",
    );
    assert!(
        scale.contains("alwaysReady: concat(httpAlwaysReady, rotationAlwaysReadyInstances)"),
        "{scale}"
    );
    // The HTTP group always keeps one instance ready; `function-rotation`, scaled on
    // instances of its own, is named `function:<name>`, and only when the parameter says so.
    assert!(text.contains("var httpAlwaysReady = [{ name: 'http', instanceCount: 1 }]"));
    let rotation = text
        .lines()
        .find(|line| line.starts_with("var rotationAlwaysReadyInstances = "))
        .expect("var rotationAlwaysReadyInstances");
    assert_eq!(
        rotation,
        "var rotationAlwaysReadyInstances = rotationAlwaysReady ? [{ name: 'function:function-rotation', instanceCount: 1 }] : []"
    );
    assert_eq!(
        text.matches("'function:").count(),
        1,
        "one always-ready function"
    );
    // ...the folder of the Event Grid function in the package.
    assert!(
        crate::root()
            .join("function-rotation/function.json")
            .exists()
    );
    assert!(bicep::param(MODULE, "rotationAlwaysReady").contains("param rotationAlwaysReady bool"));

    // Off by default (an instance billed around the clock for a few events a year), passed
    // through from main.bicep, and the decision is written down.
    assert_eq!(main_default("rotationAlwaysReady"), "false");
    let function_app = bicep::declarations_in(&bicep::root_file("infra/main.bicep"), "module")
        .into_iter()
        .find(|m| m.target == "modules/functionapp.bicep")
        .unwrap();
    assert_eq!(
        function_app.property("rotationAlwaysReady").as_deref(),
        Some("rotationAlwaysReady")
    );
    let section =
        crate::markdown_section("infra/README.md", "## Rotation events").replace('\n', " ");
    for needle in [
        "(`rotationAlwaysReady`, default **false**)",
        "`function:function-rotation`",
        "billed around the clock",
    ] {
        assert!(
            section.contains(needle),
            "infra/README.md \"Rotation events\": {needle}"
        );
    }
}
