//! The configuration parser takes a file an operator wrote and app settings the platform
//! filled in: any text must yield settings or a list of problems, never a panic, and no
//! problem may repeat an app setting's value.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

const SETTING_VALUE: &str = "fuzz-setting-value-5e1f";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Every app setting exists and holds the same recognisable value.
    let env = |_: &str| Some(SETTING_VALUE.to_string());
    if let Err(error) = token_broker::config::parse(text, Path::new("broker.toml"), &env) {
        let message = error.to_string();
        assert!(!message.contains(SETTING_VALUE), "a setting's value leaked: {message}");
    }
});
