//! The configuration parser, with app setting values the fuzzer chooses: see
//! `properties::config_parser`.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the shared properties.
#[allow(dead_code)]
#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| properties::config_parser(data));
