//! Deployment checks: the Bicep passes checkov, the shipped configuration only uses app settings
//! the Bicep sets, names are lower-cased where Azure needs it, Key Vault's events reach
//! `function-rotation` (`rotation`), Flex Consumption's scale settings (`scale`), what reaches
//! Application Insights and the queries over it (`operations`), the API Management wiring
//! (`apim`), the smoke test (`smoke_test`), the deployment commands in `docs/deployment.md`,
//! the files and folders the documentation names (`readme`), and the package holds exactly what
//! the Functions host needs, with a binary linked against glibc 2.28 at most.

mod apim;
mod architecture;
mod bicep;
mod operations;
mod readme;
mod rotation;
mod scale;
mod secretless;
mod shared_cache;
mod smoke_test;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A section of a Markdown file: from its heading to the next heading of the same or a higher
/// level (lines starting with `#` inside fenced code blocks are shell comments, not headings).
fn markdown_section(path: &str, heading: &str) -> String {
    let readme = read(path);
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = readme.lines().skip_while(|line| *line != heading);
    let mut section = lines
        .next()
        .unwrap_or_else(|| panic!("{path} has no section {heading}"))
        .to_string();
    let mut in_code = false;
    for line in lines {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !in_code && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        section.push('\n');
        section.push_str(line);
    }
    section
}

/// Every `${NAME}` in a configuration text.
fn references(text: &str) -> BTreeSet<String> {
    let text: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_string()))
        .collect()
}

/// Keys of a Bicep object literal `var <name> = { KEY: value ... }`.
fn bicep_object_keys(text: &str, var: &str) -> BTreeSet<String> {
    let start = text
        .find(&format!("var {var} = {{"))
        .unwrap_or_else(|| panic!("var {var} not found"));
    let body = &text[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()];
    body.lines()
        .filter_map(|line| {
            line.trim()
                .split_once(':')
                .map(|(key, _)| key.trim().to_string())
        })
        .filter(|key| !key.is_empty() && !key.starts_with("//"))
        .collect()
}

#[test]
fn every_setting_the_shipped_configuration_uses_is_set_by_the_bicep() {
    let used = references(&read("infra/broker.toml"));
    assert!(used.contains("KEY_VAULT_URI"));
    let app = read("infra/modules/functionapp.bicep");
    let mut set = bicep_object_keys(&app, "brokerSettings");
    set.extend(bicep_object_keys(&app, "platformSettings"));
    let parameters: Value = serde_json::from_str(&read("infra/main.parameters.json")).unwrap();
    let connection_settings = parameters["parameters"]["connectionSettings"]["value"]
        .as_object()
        .unwrap();
    set.extend(connection_settings.keys().cloned());
    let missing: Vec<&String> = used.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "broker.toml uses settings the Bicep does not set: {missing:?}"
    );
    // The settings the Bicep sets make the shipped configuration valid.
    let mut check = Command::new(env!("CARGO_BIN_EXE_token-broker"));
    check
        .arg("check")
        .env_clear()
        .env("TOKEN_BROKER_CONFIG", root().join("infra/broker.toml"));
    for (name, value) in connection_settings {
        check.env(name, value.as_str().unwrap());
    }
    check
        .env("KEY_VAULT_URI", "https://tokbroker-kv.vault.azure.net/")
        .env("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001");
    let output = check.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// checkov from `CHECKOV`, else the virtualenv `scripts/test` installs it in.
fn checkov() -> PathBuf {
    std::env::var_os("CHECKOV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-checkov/bin/checkov"))
}

#[test]
fn checkov_finds_no_failed_check_and_every_skip_says_why() {
    let program = checkov();
    assert!(
        program.exists(),
        "{} is missing: run scripts/test, which installs it",
        program.display()
    );
    let output = Command::new(program)
        .current_dir(root())
        .args([
            "-d",
            "infra",
            "--framework",
            "bicep",
            "--output",
            "json",
            "--skip-download",
        ])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).expect("checkov JSON report");
    let report = if report.is_array() {
        report[0].clone()
    } else {
        report
    };
    let summary = &report["summary"];
    println!("checkov summary: {summary}");
    assert_eq!(summary["parsing_errors"], 0, "a template did not parse");
    assert!(
        summary["resource_count"].as_u64().unwrap() >= 20,
        "{summary}"
    );
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .map(|checks| {
            checks
                .iter()
                .map(|c| format!("{} {} {}", c["check_id"], c["resource"], c["file_path"]))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        failed.is_empty(),
        "checkov failed checks:\n{}",
        failed.join("\n")
    );
    // Each inline skip carries a reason a reviewer can read.
    for path in bicep::files() {
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            if let Some(skip) = line.trim().strip_prefix("// checkov:skip=") {
                let (_, reason) = skip.split_once(':').expect("checkov:skip=ID: reason");
                assert!(
                    reason.trim().len() >= 30,
                    "{}: a skip without a real reason: {line}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn names_built_from_base_name_are_lower_cased() {
    let main = read("infra/main.bicep");
    assert!(main.contains("var base = toLower(baseName)"));
    // `baseName` itself is used only to declare it and to lower-case it.
    let uses: Vec<&str> = main
        .lines()
        .filter(|line| !line.trim_start().starts_with("//") && line.contains("baseName"))
        .collect();
    assert_eq!(uses.len(), 2, "{uses:#?}");
    assert!(uses[0].starts_with("param baseName string"));
    let params_name = |path: &str| -> String {
        let module = bicep::declarations_in(&bicep::root_file("infra/main.bicep"), "module")
            .into_iter()
            .find(|m| m.target == path)
            .unwrap_or_else(|| panic!("{path}"));
        let params = &module.body[module.body.find("params:").unwrap()..];
        params
            .lines()
            .find_map(|line| line.trim().strip_prefix("name: "))
            .unwrap()
            .to_string()
    };
    // Storage accounts: 3-24 lower-case letters and digits.
    let storage = params_name("modules/storage.bicep");
    assert_eq!(
        storage, "take('${replace(base, '-', '')}st${suffix}', 24)",
        "storage account name"
    );
    // Key Vault: 3-24 letters, digits and hyphens, lower-cased here too.
    let vault = params_name("modules/keyvault.bicep");
    assert_eq!(vault, "take('${base}-kv-${suffix}', 24)", "vault name");
    // uniqueString() is lower case already; every other resource name derives from `base`.
    assert!(main.contains("var suffix = uniqueString(resourceGroup().id, base)"));
    for name_line in main.lines().filter(|l| l.trim().starts_with("name: '$")) {
        assert!(name_line.contains("${base}"), "{name_line}");
    }
}

#[test]
fn the_func_start_steps_start_azurite_and_export_the_local_settings_for_check() {
    let section = markdown_section(
        "docs/deployment.md",
        "## Running under `func start` against a real Key Vault",
    );
    assert!(section.contains("npx azurite"), "Azurite is started");
    assert!(section.contains("UseDevelopmentStorage=true"));
    let export = section
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("eval ") && line.contains("local.settings.json"))
        .expect("a command exports local.settings.json's values");
    assert!(section.contains("./token-broker check"));
    // The documented command exports every value, whatever characters it holds.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("local.settings.json"),
        r#"{"IsEncrypted": false, "Values": {"FUNCTIONS_WORKER_RUNTIME": "custom",
            "KEY_VAULT_URI": "https://kv.vault.azure.net/", "CONTOSO_CLIENT_ID": "a b'c\"d$e"}}"#,
    )
    .unwrap();
    let output = Command::new("bash")
        .current_dir(dir.path())
        .arg("-c")
        .arg(format!(
            "set -eu; {export}; bash -c 'printf \"%s|%s|%s\" \"$FUNCTIONS_WORKER_RUNTIME\" \"$KEY_VAULT_URI\" \"$CONTOSO_CLIENT_ID\"'"
        ))
        .env_remove("KEY_VAULT_URI")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "custom|https://kv.vault.azure.net/|a b'c\"d$e"
    );
}

#[test]
fn the_deployment_steps_take_names_and_the_url_from_the_deployment_outputs() {
    let steps = markdown_section("docs/deployment.md", "### Step by step");
    assert!(steps.contains("out functionAppUrl"), "{steps}");
    assert!(
        !steps.contains(".azurewebsites.net"),
        "no URL built by hand"
    );
    assert!(!steps.contains("<functionAppName>"));
    let main = read("infra/main.bicep");
    for output in ["functionAppUrl", "functionAppName", "keyVaultName"] {
        assert!(
            main.contains(&format!("output {output} string")),
            "{output}"
        );
        assert!(steps.contains(&format!("out {output}")), "{output}");
    }
    // The key reaches the smoke test through a pipe.
    assert!(steps.contains("-o tsv | scripts/smoke-test"), "{steps}");
}

#[test]
fn the_package_holds_exactly_what_the_host_needs_and_runs_on_glibc_2_28() {
    let status = Command::new(root().join("scripts/package"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/package failed");
    let zip = root().join("dist/token-broker.zip");
    let listing = Command::new("python3")
        .args(["-c", "import zipfile,sys,json; z=zipfile.ZipFile(sys.argv[1]); print(json.dumps({i.filename: i.external_attr >> 16 for i in z.infolist()}))"])
        .arg(&zip)
        .output()
        .unwrap();
    let entries: serde_json::Map<String, Value> = serde_json::from_slice(&listing.stdout).unwrap();
    let names: BTreeSet<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "broker.toml",
            "function-health/function.json",
            "function-invalidate/function.json",
            "function-rotation/function.json",
            "function-token/function.json",
            "host.json",
            "token-broker"
        ])
    );
    assert_eq!(entries["token-broker"].as_u64().unwrap() & 0o777, 0o755);
    let host: Value = serde_json::from_str(&read("host.json")).unwrap();
    assert_eq!(
        host["customHandler"]["description"]["defaultExecutablePath"],
        "token-broker"
    );

    // Where scripts/package found it: CARGO_TARGET_DIR when set, else target/.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), |dir| root().join(dir));
    let binary = target_dir.join("x86_64-unknown-linux-gnu/release/token-broker");
    let symbols = Command::new("objdump")
        .arg("-T")
        .arg(&binary)
        .output()
        .unwrap();
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    let newest = symbols
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let version: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            Some((parts.next()?, parts.next().unwrap_or(0)))
        })
        .max()
        .expect("the binary links glibc");
    println!(
        "package: {} bytes; newest glibc symbol version GLIBC_{}.{}",
        std::fs::metadata(&zip).unwrap().len(),
        newest.0,
        newest.1
    );
    assert!(newest <= (2, 28), "needs GLIBC_{}.{}", newest.0, newest.1);
}

#[test]
fn the_binary_carries_one_http_and_tls_stack_opentelemetry_included() {
    let output = Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "tree",
            "-d",
            "-e",
            "normal",
            "--depth",
            "0",
            "-p",
            "token-broker",
            "--locked",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let duplicates = String::from_utf8(output.stdout).unwrap();
    let names: BTreeSet<&str> = duplicates
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for stack in [
        "reqwest",
        "hyper",
        "hyper-util",
        "http",
        "h2",
        "rustls",
        "tokio-rustls",
        "tonic",
    ] {
        assert!(!names.contains(stack), "a second {stack}: {duplicates}");
    }
    // The check reads the real tree: the crates it names are there once.
    let tree = Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "tree",
            "-e",
            "normal",
            "-p",
            "token-broker",
            "--locked",
            "-i",
            "reqwest",
        ])
        .output()
        .unwrap();
    let tree = String::from_utf8(tree.stdout).unwrap();
    assert!(tree.starts_with("reqwest v0.13"), "{tree}");
    assert!(
        !tree.contains("opentelemetry-otlp"),
        "the exporter brings no client: {tree}"
    );
}
