//! The configuration's validation, pass by pass.

use super::*;
use secrecy::ExposeSecret;
use std::time::Duration;

fn env(pairs: &[(&str, &str)]) -> impl Environment {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

fn parse_with(text: &str, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    parse(text, Path::new("broker.toml"), &env(pairs))
}

const FULL: &str = r#"
        [key_vault]
        uri = "${KEY_VAULT_URI}"
        managed_identity_client_id = "${MI_CLIENT_ID}"

        [connections.Contoso]
        token_url = "https://login.contoso.com/oauth2/token"
        client_id = "${CONTOSO_CLIENT_ID}"
        client_secret = { key_vault_secret = "contoso-client-secret" }
        auth_method = "client_secret_post"
        scopes = ["api://contoso/.default"]
        audience = "https://api.contoso.com"
        resource = "https://api.contoso.com"
        extra_params = { tenant = "x" }

        [connections.local]
        token_url = "http://127.0.0.1:9000/token"
        client_id = "local"
        client_secret = { app_setting = "LOCAL_SECRET" }
    "#;

fn full_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KEY_VAULT_URI", "https://kv.vault.azure.net"),
        ("MI_CLIENT_ID", "00000000-0000-0000-0000-000000000001"),
        ("CONTOSO_CLIENT_ID", "contoso-app"),
        ("LOCAL_SECRET", "s3cret"),
    ]
}

#[test]
fn a_complete_file_resolves_settings_and_lowercases_connection_names() {
    let settings = parse_with(FULL, &full_env()).expect("valid");
    let contoso = &settings.connections["contoso"];
    assert_eq!(contoso.name, "Contoso");
    assert_eq!(contoso.client_id, "contoso-app");
    assert_eq!(contoso.auth_method, AuthMethod::ClientSecretPost);
    assert_eq!(contoso.extra_params["tenant"], "x");
    assert_eq!(settings.port, DEFAULT_PORT);
    assert_eq!(settings.identity, IdentitySettings::DeveloperCli);
    let kv = settings.key_vault.expect("key vault");
    assert!(kv.verify_challenge_resource);
    assert_eq!(
        kv.managed_identity_client_id.as_deref(),
        Some("00000000-0000-0000-0000-000000000001")
    );
    match &settings.connections["local"].credential {
        CredentialSource::Secret(SecretSource::AppSetting { value, .. }) => {
            assert_eq!(value.expose_secret(), "s3cret")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn an_unset_variable_is_an_error_that_names_it() {
    let mut pairs = full_env();
    pairs.retain(|(k, _)| *k != "CONTOSO_CLIENT_ID");
    let error = parse_with(FULL, &pairs).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("connections.Contoso.client_id: app setting CONTOSO_CLIENT_ID is not set"),
        "{error}"
    );
}

#[test]
fn an_unresolved_key_vault_reference_is_refused_without_printing_it() {
    let mut pairs = full_env();
    pairs.retain(|(k, _)| *k != "LOCAL_SECRET");
    pairs.push((
        "LOCAL_SECRET",
        "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/x/)",
    ));
    let error = parse_with(FULL, &pairs).unwrap_err().to_string();
    assert!(error.contains("connections.local.client_secret.app_setting: app setting LOCAL_SECRET still holds an unresolved @Microsoft.KeyVault(...) reference"), "{error}");
    assert!(!error.contains("SecretUri"), "{error}");
}

#[test]
fn unknown_keys_are_refused() {
    let text = FULL.replace("audience =", "audiense =");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(error.contains("unknown field `audiense`"), "{error}");
}

#[test]
fn a_literal_secret_is_refused_and_never_echoed() {
    let text = FULL.replace(
        "client_secret = { app_setting = \"LOCAL_SECRET\" }",
        "client_secret = \"hunter2-literal\"",
    );
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(error.contains("connections.local.client_secret"), "{error}");
    assert!(!error.contains("hunter2-literal"), "{error}");
}

#[test]
fn a_missing_secret_source_names_the_connection() {
    let text = FULL.replace("client_secret = { app_setting = \"LOCAL_SECRET\" }", "");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(
        error.contains("connections.local.client_secret: must be"),
        "{error}"
    );
}

#[test]
fn plain_http_token_urls_are_only_accepted_on_loopback() {
    let text = FULL.replace(
        "http://127.0.0.1:9000/token",
        "http://idp.example.com/token",
    );
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(
        error.contains("connections.local.token_url: must be an https URL"),
        "{error}"
    );
    for loopback in [
        "http://localhost:1/t",
        "http://[::1]:1/t",
        "http://127.0.0.2/t",
    ] {
        let text = FULL.replace("http://127.0.0.1:9000/token", loopback);
        parse_with(&text, &full_env()).expect(loopback);
    }
}

#[test]
fn a_bad_url_is_reported_with_its_field() {
    let text = FULL.replace("https://login.contoso.com/oauth2/token", "not a url");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(
        error.contains("connections.Contoso.token_url: not a valid URL"),
        "{error}"
    );
}

#[test]
fn key_vault_is_required_when_a_connection_reads_from_it() {
    let text = FULL.replace("[key_vault]\n        uri = \"${KEY_VAULT_URI}\"\n        managed_identity_client_id = \"${MI_CLIENT_ID}\"", "");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(error.contains("key_vault.uri: required"), "{error}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = FULL
        .replace("client_secret_post", "client_secret_jwt")
        .replace("http://127.0.0.1:9000/token", "ftp://x");
    let error = parse_with(&text, &full_env()).unwrap_err();
    assert_eq!(error.problems.len(), 2, "{error}");
}

#[test]
fn reserved_form_fields_cannot_be_overridden() {
    let text = FULL.replace("tenant = \"x\"", "grant_type = \"password\"");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(error.contains("extra_params.grant_type"), "{error}");
}

#[test]
fn the_port_comes_from_the_host() {
    let mut pairs = full_env();
    pairs.push(("FUNCTIONS_CUSTOMHANDLER_PORT", "34567"));
    assert_eq!(parse_with(FULL, &pairs).unwrap().port, 34567);
    pairs.pop();
    pairs.push(("FUNCTIONS_CUSTOMHANDLER_PORT", "http"));
    assert!(parse_with(FULL, &pairs).is_err());
}

#[test]
fn managed_identity_is_chosen_when_app_service_sets_its_variables() {
    let mut pairs = full_env();
    pairs.push(("IDENTITY_ENDPOINT", "http://127.0.0.1:41741/msi/token"));
    pairs.push(("IDENTITY_HEADER", "h"));
    assert_eq!(
        parse_with(FULL, &pairs).unwrap().identity,
        IdentitySettings::ManagedIdentity
    );
}

#[test]
fn debug_output_never_shows_an_app_setting_secret() {
    let settings = parse_with(FULL, &full_env()).unwrap();
    let debug = format!("{settings:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("AppSetting(LOCAL_SECRET)"), "{debug}");
}

const SHARED_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

mod callers;
mod credentials;
mod mutual_tls;
mod shared_cache;

#[test]
fn the_stats_interval_defaults_to_a_minute_and_is_bounded() {
    let settings = parse_with(FULL, &full_env()).unwrap();
    assert_eq!(settings.telemetry.stats_interval, Duration::from_secs(60));
    let with = |seconds: u64| format!("[telemetry]\nstats_interval_seconds = {seconds}\n{FULL}");
    let settings = parse_with(&with(5), &full_env()).unwrap();
    assert_eq!(settings.telemetry.stats_interval, Duration::from_secs(5));
    for bad in [0, 3601] {
        let error = parse_with(&with(bad), &full_env()).unwrap_err().to_string();
        assert!(
            error.contains("telemetry.stats_interval_seconds: must be from 1 to 3600"),
            "{error}"
        );
    }
}

fn targeted(lists: &str) -> Result<Settings, ConfigError> {
    parse_with(
        &format!(
            r#"
        [connections.api]
        token_url = "https://idp.example/token"
        client_id = "c"
        client_secret = {{ app_setting = "S" }}
        {lists}
        "#
        ),
        &[("S", "s")],
    )
}

#[test]
fn allowed_audiences_and_resources_are_uris_that_hold_the_default() {
    let settings = targeted(
        r#"audience = "https://a.example"
        allowed_audiences = ["https://a.example", "api://b", "https://a.example"]
        resource = "urn:example:orders"
        allowed_resources = ["urn:example:orders"]"#,
    )
    .unwrap();
    let api = &settings.connections["api"];
    assert_eq!(api.allowed_audiences, ["https://a.example", "api://b"]);
    assert_eq!(api.allowed_resources, ["urn:example:orders"]);
    assert_eq!(api.min_invalidation_interval, Duration::from_secs(30));

    // Not configured: the default alone, or nothing.
    let settings = targeted(r#"resource = "api://r""#).unwrap();
    assert_eq!(settings.connections["api"].allowed_resources, ["api://r"]);
    assert!(settings.connections["api"].allowed_audiences.is_empty());

    for (lists, named) in [
        (
            r#"allowed_audiences = ["not a uri"]"#,
            "connections.api.allowed_audiences[0]: must be an absolute URI",
        ),
        (
            r#"allowed_resources = ["https://r.example/#part"]"#,
            "connections.api.allowed_resources[0]: must be an absolute URI",
        ),
        (
            r#"audience = "https://a.example"
            allowed_audiences = ["https://b.example"]"#,
            "connections.api.allowed_audiences: must contain the connection's audience",
        ),
        (
            "min_invalidation_interval_seconds = 0",
            "connections.api.min_invalidation_interval_seconds",
        ),
    ] {
        let error = targeted(lists).unwrap_err().to_string();
        assert!(error.contains(named), "{lists}: {error}");
    }
}
