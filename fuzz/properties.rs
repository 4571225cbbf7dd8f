//! The properties the fuzz targets check, shared with the ordinary test that replays
//! `fuzz/regressions/*` and the corpus on every run (`tests/fuzz_regressions.rs`), so a found
//! bug stays found without a fuzzer installed. Each function panics when its property fails.

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret;
use token_broker::config::{CredentialSource, SecretSource};

/// The token endpoint's answer comes from outside the broker: any bytes must parse or fail
/// cleanly, a parsed answer's Debug output must never show the access token, and whatever
/// lifetime it claims, the cache's insert must not panic and must hand the token out with
/// `0 < expires_in <= 24 h`.
pub fn token_response(data: &[u8]) {
    let Ok(response) = token_broker::testing::parse_token_response(data) else {
        return;
    };
    let debug = format!("{response:?}");
    let _ = (response.refresh_in(), response.granted_scope());
    // The token as JSON decoded it: re-parse the body generically to learn it. Debug shows
    // field names and other fields (token_type, scope), which may happen to contain the
    // token's text; so compare with the Debug of the same answer holding another token.
    if let Ok(serde_json::Value::Object(mut fields)) =
        serde_json::from_slice::<serde_json::Value>(data)
        && let Some(token) = fields
            .get("access_token")
            .and_then(|t| t.as_str())
            .map(str::to_string)
        && token.len() >= 8
    {
        fields.insert("access_token".to_string(), serde_json::Value::from("\u{1}"));
        let reference = serde_json::to_vec(&fields).unwrap();
        let reference = token_broker::testing::parse_token_response(&reference)
            .map(|r| format!("{r:?}"))
            .unwrap_or_default();
        if !reference.contains(&token) {
            assert!(
                !debug.contains(&token),
                "the access token appears in Debug output"
            );
        }
    }
    // Through the cache's insert, as a fetched token goes.
    let fresh = response.into_fresh_token(Duration::from_secs(300), &["read".to_string()]);
    let now = tokio::time::Instant::now();
    let cached = token_broker::testing::CachedToken::new(fresh, now);
    let left = cached.expires_in(now);
    assert!(
        left > 0 && left <= token_broker::testing::MAX_LIFETIME.as_secs(),
        "a token handed out with expires_in {left}"
    );
}

/// The configuration parser takes a file an operator wrote and app settings the platform
/// filled in. The input's first line is material for the settings' values (each setting
/// gets its own: `<first line>-<NAME>-v9Q`), the rest is the file. Any input must yield
/// settings or a list of problems, never a panic; no problem may repeat a setting's value;
/// and a successful parse's `Debug` must not show a client secret taken from a setting.
pub fn config_parser(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (seed, text) = input.split_once('\n').unwrap_or(("", input));
    let handed_out = RefCell::new(Vec::<String>::new());
    let env = |name: &str| {
        // The platform's own settings have fixed formats; only the operator's vary.
        if name.starts_with("FUNCTIONS_") || name.starts_with("WEBSITE_") {
            return None;
        }
        let value = format!("{seed}-{name}-v9Q");
        handed_out.borrow_mut().push(value.clone());
        Some(value)
    };
    // A value shows as itself or, inside a Debug string, escaped.
    let shows = |haystack: &str, value: &str| {
        let escaped = format!("{value:?}");
        haystack.contains(value) || haystack.contains(&escaped[1..escaped.len() - 1])
    };
    match token_broker::config::parse(text, Path::new("broker.toml"), &env) {
        Err(error) => {
            let message = error.to_string();
            for value in handed_out.borrow().iter() {
                // Text the operator wrote may repeat it; the parser must not.
                if !shows(text, value) {
                    assert!(
                        !shows(&message, value),
                        "a setting's value leaked: {message}"
                    );
                }
            }
        }
        Ok(settings) => {
            let debug = format!("{settings:?}");
            for connection in settings.connections.values() {
                let CredentialSource::Secret(SecretSource::AppSetting { setting, value }) =
                    &connection.credential
                else {
                    continue;
                };
                let value = value.expose_secret();
                // The same setting expanded into a field that is not secret (`${NAME}`), or
                // the value written out in the file, is the operator's choice to show it.
                if text.contains(&format!("${{{setting}}}")) || shows(text, value) {
                    continue;
                }
                assert!(
                    !shows(&debug, value),
                    "the client secret from app setting {setting} appears in Debug: {debug}"
                );
            }
        }
    }
}
