//! The configuration's validation, pass by pass.

use super::*;
use secrecy::ExposeSecret;

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

/// `FULL` with a `[callers]` section; `lists` goes into every connection.
fn with_callers(callers: &str, lists: &str) -> String {
    let text = FULL.replace(
        "[connections.Contoso]",
        &format!("[callers]\n{callers}\n[connections.Contoso]"),
    );
    text.replace(
        "client_secret = { app_setting = \"LOCAL_SECRET\" }",
        &format!("client_secret = {{ app_setting = \"LOCAL_SECRET\" }}\n{lists}"),
    )
    .replace(
        "extra_params = { tenant = \"x\" }",
        &format!("extra_params = {{ tenant = \"x\" }}\n{lists}"),
    )
}

const JWT: &str = r#"mode = "jwt"
        issuer = "https://login.microsoftonline.com/t/v2.0"
        audience = "api://token-broker""#;

#[test]
fn identified_callers_need_every_connection_to_say_who_may_use_it() {
    let error = parse_with(&with_callers(JWT, ""), &full_env())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("connections.Contoso.allowed_callers: required in [callers] mode"),
        "{error}"
    );
    assert!(
        error.contains("connections.local.allowed_callers"),
        "{error}"
    );
    for lists in [
        r#"allowed_callers = ["*"]"#,
        r#"allowed_roles = ["Tokens.Contoso"]"#,
    ] {
        parse_with(&with_callers(JWT, lists), &full_env()).expect(lists);
    }
    // Lists without a caller mode restrict nobody, and say so.
    let error = parse_with(&with_callers("", r#"allowed_callers = ["*"]"#), &full_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("need [callers] mode"), "{error}");
}

#[test]
fn easy_auth_needs_app_service_authentication_on() {
    let text = with_callers(r#"mode = "easy_auth""#, r#"allowed_callers = ["*"]"#);
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(error.contains("WEBSITE_AUTH_ENABLED"), "{error}");
    for off in ["false", "", "1"] {
        let mut pairs = full_env();
        pairs.push(("WEBSITE_AUTH_ENABLED", off));
        let error = parse_with(&text, &pairs).unwrap_err().to_string();
        assert!(error.contains("WEBSITE_AUTH_ENABLED"), "{off}: {error}");
    }
    for on in ["true", "True", "TRUE"] {
        let mut pairs = full_env();
        pairs.push(("WEBSITE_AUTH_ENABLED", on));
        let settings = parse_with(&text, &pairs).expect(on);
        assert!(matches!(settings.callers.mode, CallerMode::EasyAuth));
    }
}

#[test]
fn issuer_and_audience_take_a_string_or_a_list_and_tenant_is_optional() {
    let callers = r#"mode = "jwt"
            issuer = ["https://sts.windows.net/${TENANT}/", "https://login.microsoftonline.com/${TENANT}/v2.0"]
            audience = ["api://token-broker", "6e1f3a2b-0000-4000-8000-00000000b20c"]
            tenant = "${TENANT}""#;
    let mut pairs = full_env();
    pairs.push(("TENANT", "72f988bf-86f1-41af-91ab-2d7cd011db47"));
    let settings =
        parse_with(&with_callers(callers, r#"allowed_callers = ["*"]"#), &pairs).unwrap();
    let CallerMode::Jwt {
        issuers,
        audiences,
        tenant,
        clock_skew,
        ..
    } = settings.callers.mode
    else {
        panic!("jwt mode expected");
    };
    assert_eq!(
        issuers,
        [
            "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
        ]
    );
    assert_eq!(audiences.len(), 2);
    assert_eq!(
        tenant.as_deref(),
        Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
    );
    assert_eq!(clock_skew, Duration::from_secs(60));
    let settings = parse_with(
        &with_callers(JWT, r#"allowed_callers = ["*"]"#),
        &full_env(),
    )
    .unwrap();
    assert!(matches!(
        settings.callers.mode,
        CallerMode::Jwt { ref issuers, ref audiences, tenant: None, .. }
            if issuers.len() == 1 && audiences.len() == 1
    ));
    let error = parse_with(
        &with_callers(
            r#"mode = "jwt"
                issuer = []
                audience = "api://token-broker""#,
            r#"allowed_callers = ["*"]"#,
        ),
        &full_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("needs issuer and audience"), "{error}");
}

#[test]
fn clock_skew_is_bounded_and_jwt_settings_are_refused_in_other_modes() {
    let skewed = format!("{JWT}\nclock_skew_seconds = 301");
    let error = parse_with(
        &with_callers(&skewed, r#"allowed_callers = ["*"]"#),
        &full_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("callers.clock_skew_seconds: at most 300"),
        "{error}"
    );
    let at_most = format!("{JWT}\nclock_skew_seconds = 300");
    parse_with(
        &with_callers(&at_most, r#"allowed_callers = ["*"]"#),
        &full_env(),
    )
    .expect("300 is allowed");
    let mut pairs = full_env();
    pairs.push(("WEBSITE_AUTH_ENABLED", "true"));
    let error = parse_with(
        &with_callers(
            "mode = \"easy_auth\"\ntenant = \"t\"",
            r#"allowed_callers = ["*"]"#,
        ),
        &pairs,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("callers.tenant: only used in mode \"jwt\""),
        "{error}"
    );
}

const SHARED_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn with_shared(block: &str) -> String {
    format!("{FULL}\n[shared_cache]\n{block}")
}

#[test]
fn a_shared_cache_section_resolves_with_defaults() {
    let mut env = full_env();
    env.extend([
        ("REDIS_URL", "rediss://cache.example:6380"),
        ("CACHE_KEY", SHARED_KEY),
    ]);
    let text = with_shared(
        "redis_url = \"${REDIS_URL}\"\nencryption_key = { app_setting = \"CACHE_KEY\" }\n",
    );
    let shared = parse_with(&text, &env)
        .expect("valid")
        .shared_cache
        .unwrap();
    assert_eq!(shared.redis_url.scheme(), "rediss");
    assert_eq!(shared.key_prefix, "token-broker");
    assert_eq!(shared.timeout, Duration::from_millis(100));
    assert!(matches!(shared.auth, RedisAuth::None));
    assert!(!format!("{shared:?}").contains(SHARED_KEY));
    assert!(
        parse_with(FULL, &full_env())
            .unwrap()
            .shared_cache
            .is_none()
    );
}

#[test]
fn shared_cache_mistakes_are_named_without_echoing_values() {
    let mut env = full_env();
    env.extend([("SHORT_KEY", "c2hvcnQ="), ("PW", "hunter2-password")]);
    let cases = [
        (
            "redis_url = \"redis://:hunter2-password@h:6379\"\nencryption_key = { key_vault_secret = \"k\" }",
            "shared_cache.redis_url: must not hold credentials",
        ),
        (
            "redis_url = \"http://h\"\nencryption_key = { key_vault_secret = \"k\" }",
            "shared_cache.redis_url: must be redis://",
        ),
        (
            "redis_url = \"redis+unix:///run/redis.sock?pass=hunter2-password\"\nencryption_key = { key_vault_secret = \"k\" }",
            "shared_cache.redis_url: must not hold credentials",
        ),
        (
            "redis_url = \"unix:///run/redis.sock?user=admin&db=1\"\nencryption_key = { key_vault_secret = \"k\" }",
            "shared_cache.redis_url: must not hold credentials",
        ),
        (
            "redis_url = \"redis+unix://cache.example/run/redis.sock\"\nencryption_key = { key_vault_secret = \"k\" }",
            "shared_cache.redis_url: a socket is redis+unix:///path/to/socket",
        ),
        (
            "redis_url = \"redis+unix://\"\nencryption_key = { key_vault_secret = \"k\" }",
            "shared_cache.redis_url: a socket is redis+unix:///path/to/socket",
        ),
        (
            "redis_url = \"redis://h:6379\"\nencryption_key = { app_setting = \"SHORT_KEY\" }",
            "app setting SHORT_KEY is not base64 of 32 bytes",
        ),
        (
            "redis_url = \"redis://h:6379\"\nencryption_key = \"c2hvcnQ=\"",
            "shared_cache.encryption_key: must be { key_vault_secret",
        ),
        (
            "redis_url = \"redis://h:6379\"\nencryption_key = { key_vault_secret = \"k\" }\nauth = \"entra\"",
            "shared_cache.username: auth \"entra\" needs",
        ),
        (
            "redis_url = \"redis://h:6379\"\nencryption_key = { key_vault_secret = \"k\" }\npassword = { app_setting = \"PW\" }",
            "shared_cache.password: only used with auth",
        ),
        (
            "redis_url = \"redis://h:6379\"\nencryption_key = { key_vault_secret = \"k\" }\ntimeout_ms = 0",
            "shared_cache.timeout_ms: between 1 and 10000",
        ),
        (
            "redis_url = \"redis://h:6379\"\nencryption_key = { key_vault_secret = \"k\" }\nkey_prefix = \"a b\"",
            "shared_cache.key_prefix",
        ),
    ];
    for (block, expected) in cases {
        let error = parse_with(&with_shared(block), &env)
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{block}: {error}");
        assert!(
            !error.contains("hunter2-password") && !error.contains("c2hvcnQ="),
            "{error}"
        );
    }
}

#[test]
fn password_and_entra_auth_resolve() {
    let mut env = full_env();
    env.extend([
        ("PW", "hunter2-password"),
        ("OID", "00000000-0000-0000-0000-0000000000aa"),
    ]);
    let text = with_shared(
        "redis_url = \"redis://127.0.0.1:6379\"\nencryption_key = { key_vault_secret = \"k\" }\nauth = \"password\"\npassword = { app_setting = \"PW\" }",
    );
    let shared = parse_with(&text, &env).unwrap().shared_cache.unwrap();
    let RedisAuth::Password {
        password,
        username: None,
    } = shared.auth
    else {
        panic!("{:?}", shared.auth)
    };
    assert!(
        matches!(password, SecretSource::AppSetting { value, .. } if value.expose_secret() == "hunter2-password")
    );
    let text = with_shared(
        "redis_url = \"rediss://h:10000\"\nencryption_key = { key_vault_secret = \"k\" }\nauth = \"entra\"\nusername = \"${OID}\"",
    );
    let shared = parse_with(&text, &env).unwrap().shared_cache.unwrap();
    assert!(matches!(shared.auth, RedisAuth::Entra { username } if username.ends_with("aa")));
}

/// `[shared_cache]` at `url` with `auth` ("none", "password" or "entra") and what it needs.
fn shared_at(url: &str, auth: &str) -> String {
    let credentials = match auth {
        "password" => "password = { app_setting = \"PW\" }",
        "entra" => "username = \"00000000-0000-0000-0000-0000000000aa\"",
        _ => "",
    };
    with_shared(&format!(
        "redis_url = \"{url}\"\nencryption_key = {{ key_vault_secret = \"k\" }}\nauth = \"{auth}\"\n{credentials}\n"
    ))
}

#[test]
fn redis_credentials_cross_the_network_only_over_tls() {
    let mut env = full_env();
    env.push(("PW", "hunter2-password"));
    for auth in ["password", "entra"] {
        for url in [
            "redis://cache.example:6379",
            "redis://10.0.0.4:6379",
            "redis://[2001:db8::4]:6379",
        ] {
            let error = parse_with(&shared_at(url, auth), &env)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!(
                    "shared_cache.redis_url: auth \"{auth}\" sends credentials, which need rediss:// (TLS)"
                )),
                "{url} {auth}: {error}"
            );
            assert!(
                !error.contains("hunter2-password") && !error.contains("cache.example"),
                "{error}"
            );
        }
        for url in [
            "rediss://cache.example:6380",
            "redis://127.0.0.1:6379",
            "redis://127.0.0.2:6379",
            "redis://localhost:6379",
            "redis://[::1]:6379",
        ] {
            let settings = parse_with(&shared_at(url, auth), &env);
            assert!(settings.is_ok(), "{url} {auth}: {:?}", settings.err());
        }
    }
    // A socket on this machine never crosses a network either.
    for url in [
        "redis+unix:///run/redis/redis.sock",
        "unix:///tmp/redis.sock",
    ] {
        for auth in ["none", "password", "entra"] {
            let settings = parse_with(&shared_at(url, auth), &env);
            assert!(settings.is_ok(), "{url} {auth}: {:?}", settings.err());
        }
    }
    // Without credentials only sealed entries travel: plain redis:// to another host is allowed.
    let shared = parse_with(&shared_at("redis://cache.example:6379", "none"), &env)
        .expect("valid")
        .shared_cache
        .unwrap();
    assert!(matches!(shared.auth, RedisAuth::None));
}

/// `FULL` with one more connection, written after the standard ones.
fn with_connection(connection: &str) -> String {
    format!(
        "{FULL}\n[connections.secretless]\ntoken_url = \"https://idp.example/oauth/token\"\nclient_id = \"app\"\n{connection}\n"
    )
}

#[test]
fn private_key_jwt_takes_its_defaults_from_the_key_and_the_token_url() {
    let text = with_connection(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"signing\" }",
    );
    let settings = parse_with(&text, &full_env()).expect("valid");
    let connection = &settings.connections["secretless"];
    assert_eq!(connection.auth_method, AuthMethod::PrivateKeyJwt);
    let CredentialSource::Assertion(assertion) = &connection.credential else {
        panic!("{:?}", connection.credential);
    };
    assert_eq!(assertion.key, AssertionKey::KeyVaultKey("signing".into()));
    assert_eq!(assertion.algorithm, None, "chosen from the key at run time");
    assert_eq!(assertion.audience, "https://idp.example/oauth/token");
    assert_eq!(assertion.lifetime, Duration::from_secs(300));
    assert_eq!(assertion.key_id, None);

    let text = with_connection(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_certificate = \"entra-cert\" }\nsigning_algorithm = \"RS256\"\nassertion_audience = \"https://tenant.auth0.com/\"\nassertion_lifetime_seconds = 600\nassertion_key_id = \"k1\"",
    );
    let settings = parse_with(&text, &full_env()).expect("valid");
    let CredentialSource::Assertion(assertion) = &settings.connections["secretless"].credential
    else {
        panic!("not an assertion");
    };
    assert_eq!(
        assertion.key,
        AssertionKey::KeyVaultCertificate("entra-cert".into())
    );
    assert_eq!(assertion.algorithm, Some(SigningAlgorithm::Rs256));
    assert_eq!(assertion.audience, "https://tenant.auth0.com/");
    assert_eq!(assertion.lifetime, Duration::from_secs(600));
    assert_eq!(assertion.key_id.as_deref(), Some("k1"));
}

#[test]
fn check_refuses_private_key_jwt_without_a_key_beside_a_secret_or_with_an_unknown_algorithm() {
    let refused = |connection: &str, expected: &str| {
        let error = parse_with(&with_connection(connection), &full_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    };
    refused(
        "auth_method = \"private_key_jwt\"",
        "connections.secretless.client_assertion_key: required by auth_method = \"private_key_jwt\"",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }\nclient_secret = { key_vault_secret = \"s\" }",
        "connections.secretless.client_secret: not used with auth_method = \"private_key_jwt\"",
    );
    refused(
        "auth_method = \"managed_identity_federation\"\nclient_secret = { key_vault_secret = \"s\" }",
        "connections.secretless.client_secret: not used with auth_method = \"managed_identity_federation\"",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }\nsigning_algorithm = \"HS256\"",
        "connections.secretless.signing_algorithm: must be one of RS256",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_certificate = \"c\" }\nsigning_algorithm = \"ES256\"",
        "connections.secretless.signing_algorithm: a certificate credential signs with its RSA key",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }\nassertion_lifetime_seconds = 601",
        "connections.secretless.assertion_lifetime_seconds: 1 to 600",
    );
    refused(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_secret = \"k\" }",
        "connections.secretless.client_assertion_key: must be { key_vault_key",
    );
    refused(
        "client_secret = { key_vault_secret = \"s\" }\nclient_assertion_key = { key_vault_key = \"k\" }",
        "connections.secretless.client_assertion_key: only used with auth_method = \"private_key_jwt\"",
    );
    refused(
        "client_secret = { key_vault_secret = \"s\" }\nfederation_audience = \"api://x\"",
        "connections.secretless.federation_audience: only used with auth_method = \"managed_identity_federation\"",
    );
}

/// `FULL` with a `managed_identity_federation` connection to `token_url`.
fn with_federation(token_url: &str) -> String {
    format!(
        "{FULL}\n[connections.secretless]\ntoken_url = \"{token_url}\"\nclient_id = \"app\"\nauth_method = \"managed_identity_federation\"\n"
    )
}

const ENTRA_TOKEN_URL: &str = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token";

#[test]
fn the_federation_token_goes_to_entra_or_loopback_only() {
    for token_url in [
        "https://idp.example/oauth/token",
        "https://login.microsoftonline.com.idp.example/tenant/oauth2/v2.0/token",
        "https://login.microsoftonline.de/tenant/oauth2/v2.0/token",
    ] {
        let error = parse_with(&with_federation(token_url), &full_env())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("connections.secretless.token_url: must be an Entra token endpoint (host login.microsoftonline.com, login.microsoftonline.us, login.partner.microsoftonline.cn, login.chinacloudapi.cn) or loopback"),
            "{token_url}: {error}"
        );
        assert!(!error.contains("idp.example"), "{error}");
    }
    for token_url in [
        ENTRA_TOKEN_URL,
        "https://login.microsoftonline.us/tenant/oauth2/v2.0/token",
        "https://login.partner.microsoftonline.cn/tenant/oauth2/v2.0/token",
        "https://login.chinacloudapi.cn/tenant/oauth2/v2.0/token",
        "http://127.0.0.1:8400/tenant/oauth2/v2.0/token",
    ] {
        let settings = parse_with(&with_federation(token_url), &full_env());
        assert!(settings.is_ok(), "{token_url}: {:?}", settings.err());
    }
    // Other methods send their own credential, meant for that provider: any https host.
    let text = with_connection(
        "auth_method = \"private_key_jwt\"\nclient_assertion_key = { key_vault_key = \"k\" }",
    );
    assert!(parse_with(&text, &full_env()).is_ok());
}

#[test]
fn managed_identity_federation_needs_a_user_assigned_identity() {
    let settings = parse_with(&with_federation(ENTRA_TOKEN_URL), &full_env()).expect("valid");
    match &settings.connections["secretless"].credential {
        CredentialSource::Federation { audience } => {
            assert_eq!(audience, DEFAULT_FEDERATION_AUDIENCE)
        }
        other => panic!("{other:?}"),
    }
    let text = with_federation(ENTRA_TOKEN_URL)
        .replace("managed_identity_client_id = \"${MI_CLIENT_ID}\"", "");
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(
        error.contains("connections.secretless.auth_method: \"managed_identity_federation\" needs a user-assigned identity"),
        "{error}"
    );
}

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
