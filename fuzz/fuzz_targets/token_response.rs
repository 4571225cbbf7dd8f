//! The token endpoint's answer comes from outside the broker: any bytes must parse or fail
//! cleanly, and a parsed answer's Debug output must never show the access token.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(response) = token_broker::token_response::parse(data) else {
        return;
    };
    let debug = format!("{response:?}");
    let _ = (response.refresh_in(), response.granted_scope());
    // The token as JSON decoded it: re-parse the body generically to learn it. Other fields
    // (token_type, scope) are shown by Debug, so the property holds only when none of them
    // happens to contain the token's text.
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(data)
        && let Some(token) = fields.get("access_token").and_then(|t| t.as_str())
        && token.len() >= 8
    {
        let elsewhere = fields
            .iter()
            .filter(|(name, _)| name.as_str() != "access_token")
            .any(|(_, value)| value.to_string().contains(token));
        if !elsewhere {
            assert!(!debug.contains(token), "the access token appears in Debug output");
        }
    }
});
