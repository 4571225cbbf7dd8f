//! Configuration tests of the `[shared_cache]` section: Redis URL, authentication, TLS, the encryption key.

use super::*;

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
