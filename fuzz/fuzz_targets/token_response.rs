//! The token endpoint's answer comes from outside the broker: any bytes must parse or fail
//! cleanly, a parsed answer's Debug output must never show the access token, and whatever
//! lifetime it claims, the cache's insert must not panic and must hand the token out with
//! `0 < expires_in <= 24 h`.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(response) = token_broker::token_response::parse(data) else {
        return;
    };
    let debug = format!("{response:?}");
    let _ = (response.refresh_in(), response.granted_scope());
    // The token as JSON decoded it: re-parse the body generically to learn it. Debug shows
    // field names and other fields (token_type, scope), which may happen to contain the
    // token's text; so compare with the Debug of the same answer holding another token.
    if let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice::<serde_json::Value>(data)
        && let Some(token) = fields.get("access_token").and_then(|t| t.as_str()).map(str::to_string)
        && token.len() >= 8
    {
        fields.insert("access_token".to_string(), serde_json::Value::from("\u{1}"));
        let reference = serde_json::to_vec(&fields).unwrap();
        let reference = token_broker::token_response::parse(&reference)
            .map(|r| format!("{r:?}"))
            .unwrap_or_default();
        if !reference.contains(&token) {
            assert!(!debug.contains(&token), "the access token appears in Debug output");
        }
    }
    // Through the cache's insert, as a fetched token goes.
    let fresh = response.into_fresh_token(Duration::from_secs(300), &["read".to_string()]);
    let now = tokio::time::Instant::now();
    let cached = token_broker::token_cache::CachedToken::new(fresh, now);
    let left = cached.expires_in(now);
    assert!(
        left > 0 && left <= token_broker::token::MAX_LIFETIME.as_secs(),
        "a token handed out with expires_in {left}"
    );
});
