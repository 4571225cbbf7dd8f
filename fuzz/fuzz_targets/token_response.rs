//! The token endpoint's answer comes from outside the broker: see `properties::token_response`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the shared properties.
#[allow(dead_code)]
#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| properties::token_response(data));
