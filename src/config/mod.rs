//! The broker's configuration: one TOML file, validated whole at startup.
//!
//! The file is parsed in two passes. Serde first checks the *shape* of the raw file (unknown
//! keys, wrong types), which is safe to report verbatim because the raw file holds `${NAME}`
//! references, not values. Then every string is expanded from the environment and checked by
//! hand, with messages that name the connection and field but never echo an expanded value:
//! an app setting may hold a secret, and a startup error lands in the host's log.

mod entra_authority;
mod environment;
mod expand;
mod raw;
mod settings;
#[cfg(test)]
mod tests;
mod types;
mod validate;
mod vault_objects;

use std::path::{Path, PathBuf};

pub use environment::{Environment, ProcessEnvironment};
pub use settings::*;
pub use types::{ConnectionName, EndpointUrl, EndpointUrlError, ScopeToken};
use validate::{Validator, shape_error};
pub use vault_objects::{ObjectKind, decode_encryption_key};

/// Every problem found in the configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration in {path}:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub path: String,
    pub problems: Vec<String>,
}

/// The configuration file's path: `TOKEN_BROKER_CONFIG`, else `broker.toml`.
pub fn config_path(env: &dyn Environment) -> PathBuf {
    env.var("TOKEN_BROKER_CONFIG")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Reads and validates the configuration the way the broker does at startup.
pub fn load(env: &dyn Environment) -> Result<Settings, ConfigError> {
    let path = config_path(env);
    let text = std::fs::read_to_string(&path).map_err(|error| ConfigError {
        path: path.display().to_string(),
        problems: vec![format!("cannot read the file: {error}")],
    })?;
    parse(&text, &path, env)
}

/// Validates configuration text; `path` is only used in messages.
pub fn parse(text: &str, path: &Path, env: &dyn Environment) -> Result<Settings, ConfigError> {
    let fail = |problems: Vec<String>| ConfigError {
        path: path.display().to_string(),
        problems,
    };
    let raw: raw::RawFile =
        toml::from_str(text).map_err(|error| fail(vec![shape_error(&error)]))?;
    let mut validator = Validator {
        env,
        problems: Vec::new(),
    };
    let settings = validator.settings(raw);
    if validator.problems.is_empty() {
        Ok(settings)
    } else {
        Err(fail(validator.problems))
    }
}
