//! The broker as the Functions host sees it: the files the host reads, readiness on `/`,
//! forwarded paths and headers, and shutdown.

use std::path::Path;

use serde_json::Value;

use crate::support::{json, spawn_app};

fn read_json(path: &str) -> Value {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap()
}

/// SchemaStore's schemas, vendored in `tests/schemas` (source and licence noted there).
fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/schemas")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn host_json_and_local_settings_validate_against_schemastore() {
    for (file, schema_name) in [
        ("host.json", "host.json"),
        ("local.settings.json.example", "local.settings.json"),
    ] {
        let validator = schema(schema_name);
        let document = read_json(file);
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
    // The validator is not a rubber stamp: an unknown key is refused.
    let mut broken = read_json("host.json");
    broken["customHandler"]["enableForwarding"] = true.into();
    assert!(!schema("host.json").is_valid(&broken));
}

#[test]
fn host_json_starts_the_broker_binary_and_forwards_http() {
    let host = read_json("host.json");
    assert_eq!(host["version"], "2.0");
    let handler = &host["customHandler"];
    assert_eq!(
        handler["description"]["defaultExecutablePath"],
        "token-broker"
    );
    assert_eq!(handler["enableForwardingHttpRequest"], true);
    // The broker expects the default route prefix.
    let prefix = &host["extensions"]["http"]["routePrefix"];
    assert!(prefix.is_null() || prefix == "api", "{prefix}");
    // The file host.json names, looked up where the package puts it (beside the built binary,
    // as at the zip root), is the broker, and it serves with no arguments.
    let arguments = handler["description"]["arguments"].as_array().unwrap();
    assert!(
        arguments.is_empty() || arguments == &["serve"],
        "the broker serves only without arguments or with 'serve': {arguments:?}"
    );
    let named = handler["description"]["defaultExecutablePath"]
        .as_str()
        .unwrap();
    let built = Path::new(env!("CARGO_BIN_EXE_token-broker"));
    let output = std::process::Command::new(built.with_file_name(named))
        .arg("--version")
        .output()
        .unwrap_or_else(|error| panic!("host.json names '{named}', which is not built: {error}"));
    let version = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        version.trim(),
        format!("token-broker {}", env!("CARGO_PKG_VERSION")),
        "the binary the host starts"
    );
}

#[test]
fn the_token_function_is_one_http_trigger_and_one_http_output() {
    let function = read_json("function-token/function.json");
    let bindings = function["bindings"].as_array().unwrap();
    assert_eq!(
        bindings.len(),
        2,
        "forwarding needs exactly one trigger and one output"
    );
    let trigger = &bindings[0];
    assert_eq!(trigger["type"], "httpTrigger");
    assert_eq!(trigger["direction"], "in");
    assert_eq!(trigger["authLevel"], "function");
    assert_eq!(trigger["route"], "token/{connection}");
    let methods: Vec<&str> = trigger["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(methods, ["get", "post"]);
    assert_eq!(bindings[1]["type"], "http");
    assert_eq!(bindings[1]["direction"], "out");
}

#[test]
fn the_invalidate_function_is_a_post_only_http_trigger_with_a_function_key() {
    let function = read_json("function-invalidate/function.json");
    let bindings = function["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 2);
    let trigger = &bindings[0];
    assert_eq!(trigger["type"], "httpTrigger");
    assert_eq!(trigger["authLevel"], "function");
    assert_eq!(trigger["route"], "token/{connection}/invalidate");
    assert_eq!(trigger["methods"], serde_json::json!(["post"]));
    assert_eq!(bindings[1]["type"], "http");
}

/// Whether an ASP.NET route template (the host's) matches `path`: literal segments compare
/// case-insensitively, a `{parameter}` takes exactly one non-empty segment.
fn route_matches(template: &str, path: &str) -> bool {
    let template: Vec<&str> = template.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    template.len() == path.len()
        && template.iter().zip(&path).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t.eq_ignore_ascii_case(p)
            }
        })
}

#[test]
fn every_http_path_the_broker_serves_reaches_it_through_exactly_one_function() {
    let mut routes = Vec::new();
    for entry in std::fs::read_dir(env!("CARGO_MANIFEST_DIR")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("function-") {
            continue;
        }
        let function = read_json(&format!("{name}/function.json"));
        for binding in function["bindings"].as_array().unwrap() {
            if binding["type"] == "httpTrigger" {
                let route = binding["route"].as_str().unwrap_or(&name[9..]).to_string();
                routes.push((name.clone(), route));
            }
        }
    }
    for (path, expected) in [
        ("token/demo", "function-token"),
        ("Token/Demo", "function-token"),
        ("token/demo/invalidate", "function-invalidate"),
        ("token/demo/INVALIDATE", "function-invalidate"),
        ("health", "function-health"),
    ] {
        let matched: Vec<&str> = routes
            .iter()
            .filter(|(_, route)| route_matches(route, path))
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(matched, [expected], "/api/{path}: {routes:?}");
    }
}

#[test]
fn the_rotation_function_is_an_event_grid_trigger_with_the_bundle_it_needs() {
    let function = read_json("function-rotation/function.json");
    let bindings = function["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0]["type"], "eventGridTrigger");
    assert_eq!(bindings[0]["direction"], "in");
    let host = read_json("host.json");
    assert_eq!(
        host["extensionBundle"]["id"],
        "Microsoft.Azure.Functions.ExtensionBundle"
    );
    assert_eq!(host["extensionBundle"]["version"], "[4.*, 5.0.0)");
}

#[test]
fn local_settings_example_names_the_custom_runtime() {
    let settings = read_json("local.settings.json.example");
    assert_eq!(settings["IsEncrypted"], false);
    assert_eq!(settings["Values"]["FUNCTIONS_WORKER_RUNTIME"], "custom");
    for value in settings["Values"].as_object().unwrap().values() {
        assert!(value.is_string(), "app settings are strings");
    }
}

#[tokio::test]
async fn readiness_is_answered_and_forwarded_requests_are_served() {
    let app = spawn_app().await;
    let ready = app.get("/").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(json(ready).await["status"], "ready");
    // The host forwards the client's casing, the function key and its own headers.
    let response = app
        .http
        .post(app.url("/API/Token/Demo?code=somekey"))
        .header("x-functions-key", "somekey")
        .header(
            "X-Azure-Functions-InvocationId",
            "11111111-2222-3333-4444-555555555555",
        )
        .header("X-Azure-Functions-HostVersion", "4.1037.0")
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The token's audit record carries the host's invocation id, the method and the path as
    // the client typed it, and nothing of the query string (it holds the function key).
    let audit: Vec<Value> = app
        .log_records_when(|record| record["target"] == "audit")
        .await
        .into_iter()
        .filter(|record| record["target"] == "audit")
        .collect();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let span = &audit[0]["span"];
    assert_eq!(
        span["invocation_id"],
        "11111111-2222-3333-4444-555555555555"
    );
    assert_eq!(span["method"], "POST");
    assert_eq!(span["path"], "/API/Token/Demo");
    assert_eq!(audit[0]["connection"], "demo");
    let logs = app.logs().join("\n");
    assert!(
        !logs.contains("somekey") && !logs.contains("code="),
        "{logs}"
    );
}

#[tokio::test]
async fn sigterm_stops_the_broker_cleanly() {
    let mut app = spawn_app().await;
    assert_eq!(app.token("demo").await.status(), 200);
    let status = app.terminate().await;
    assert!(status.success(), "{status:?}");
    let logs = app.logs().join("\n");
    assert!(logs.contains("shutdown signal received"), "{logs}");
}

#[test]
fn check_validates_the_configuration_and_names_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "[connections.x]\ntoken_url = \"https://idp.example.com/token\"\nclient_id = \"${X_ID}\"\nclient_secret = { app_setting = \"X_SECRET\" }\n",
    )
    .unwrap();
    let run = |with_env: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"));
        command
            .arg("check")
            .env_clear()
            .env("TOKEN_BROKER_CONFIG", &config);
        if with_env {
            command.env("X_ID", "id").env("X_SECRET", "do-not-print-me");
        }
        command.output().unwrap()
    };
    let good = run(true);
    assert!(good.status.success());
    assert!(String::from_utf8_lossy(&good.stdout).contains("valid (1 connection)"));
    // A problem reported while the secret is set must not echo it.
    std::fs::write(
        &config,
        "[connections.x]\ntoken_url = \"http://idp.example.com/token\"\nclient_id = \"${X_ID}\"\nclient_secret = { app_setting = \"X_SECRET\" }\n",
    )
    .unwrap();
    let refused = run(true);
    assert!(!refused.status.success());
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(refusal.contains("connections.x.token_url"), "{refusal}");
    for output in [&good, &refused] {
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!printed.contains("do-not-print-me"), "{printed}");
    }
    std::fs::write(
        &config,
        "[connections.x]\ntoken_url = \"https://idp.example.com/token\"\nclient_id = \"${X_ID}\"\nclient_secret = { app_setting = \"X_SECRET\" }\n",
    )
    .unwrap();
    let bad = run(false);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("connections.x.client_id: app setting X_ID is not set"),
        "{stderr}"
    );
    assert!(
        stderr.contains("connections.x.client_secret.app_setting: app setting X_SECRET is not set"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_configuration_stops_startup_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "[connections.x]\ntoken_url = \"http://idp.example.com/token\"\nclient_id = \"x\"\nclient_secret = { app_setting = \"S\" }\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .env_clear()
        .env("TOKEN_BROKER_CONFIG", &config)
        .env("S", "secret")
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("connections.x.token_url: must be an https URL"),
        "{stdout}"
    );
}
