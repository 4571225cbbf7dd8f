//! Every input in `fuzz/regressions/<target>/` (inputs that once broke a property) and in the
//! seed corpus `fuzz/corpus/<target>/`, replayed through the fuzz targets' own properties on
//! every test run: a bug a fuzzer found stays fixed without a fuzzer installed.

use std::path::Path;

#[path = "../fuzz/properties.rs"]
mod properties;

/// Runs `property` on every file of the target's regression and corpus folders; returns how
/// many regressions there were (the corpus only has to pass).
fn replay(target: &str, property: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut regressions = 0;
    for (folder, is_regression) in [("regressions", true), ("corpus", false)] {
        let dir = root.join(folder).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert!(!is_regression, "{} is missing", dir.display());
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| property(&data));
            assert!(outcome.is_ok(), "{} breaks the property", path.display());
            regressions += usize::from(is_regression);
        }
    }
    regressions
}

#[test]
fn token_response_regressions_still_hold() {
    assert!(replay("token_response", properties::token_response) >= 2);
}

#[test]
fn config_parser_regressions_still_hold() {
    assert!(replay("config_parser", properties::config_parser) >= 3);
}

/// The Debug check is not vacuous: the regression input parses, and its secret is the value
/// the property builds (quotes and backslashes included), which `Debug` would escape.
#[test]
fn the_config_regression_reaches_the_debug_check() {
    use secrecy::ExposeSecret;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/config_parser/secret-with-quotes-and-backslashes.toml");
    let input = std::fs::read_to_string(path).unwrap();
    let (seed, text) = input.split_once('\n').unwrap();
    let env = |name: &str| (!name.starts_with("FUNCTIONS_")).then(|| format!("{seed}-{name}-v9Q"));
    let settings = token_broker::config::parse(text, Path::new("broker.toml"), &env)
        .unwrap_or_else(|error| panic!("{error}"));
    let token_broker::config::CredentialSource::Secret(
        token_broker::config::SecretSource::AppSetting { value, .. },
    ) = &settings.connections["contoso"].credential
    else {
        panic!("an app setting secret");
    };
    assert_eq!(value.expose_secret(), r#"q"u\o te-CONTOSO_SECRET-v9Q"#);
}
