//! The second pass: every value expanded and checked, every problem collected, messages that
//! name the connection and field but never echo a value.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::entra_authority;
use super::environment::Environment;
use super::raw::{
    OneOrMany, RESERVED_PARAMS, RawCallers, RawConnection, RawFile, RawKeyVault, RawSharedCache,
    RawTelemetry,
};
use super::settings::*;
use super::types::{ConnectionName, EndpointUrl, ScopeToken, is_loopback, is_valid_key_vault_name};
use super::vault_objects::decode_encryption_key;

mod callers;
mod connections;
mod shared_cache;

/// Renders a TOML shape error without the source excerpt toml prints by default: the excerpt
/// is the raw line, which could be a literal secret pasted into the wrong key.
pub(super) fn shape_error(error: &toml::de::Error) -> String {
    let mut message = error.message().to_string();
    if let Some(span) = error.span() {
        message.push_str(&format!(" (at byte {})", span.start));
    }
    message
}

/// The second pass: expands and checks every value, collecting every problem.
pub(super) struct Validator<'e> {
    pub(super) env: &'e dyn Environment,
    pub(super) problems: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn settings(&mut self, raw: RawFile) -> Settings {
        let port = self.port();
        let key_vault = raw.key_vault.and_then(|kv| self.key_vault(kv));
        let identity = if self.env.var("IDENTITY_ENDPOINT").is_some()
            && self.env.var("IDENTITY_HEADER").is_some()
        {
            IdentitySettings::ManagedIdentity
        } else {
            IdentitySettings::DeveloperCli
        };
        let cache = CacheSettings {
            secret_ttl: self.seconds(
                "cache.secret_ttl_seconds",
                raw.cache.secret_ttl_seconds.unwrap_or(300),
                0..=86_400,
            ),
            max_tokens: raw.cache.max_tokens.unwrap_or(1024),
            secret_refusal_grace: self.seconds(
                "cache.secret_refusal_grace_seconds",
                raw.cache.secret_refusal_grace_seconds.unwrap_or(300),
                0..=86_400,
            ),
        };
        if cache.max_tokens == 0 {
            self.problems
                .push("cache.max_tokens: must be at least 1".to_string());
        }

        let callers = self.callers(raw.callers);
        let telemetry = self.telemetry(&raw.telemetry);

        let mut connections = BTreeMap::new();
        if raw.connections.is_empty() {
            self.problems
                .push("connections: at least one [connections.<name>] table is needed".into());
        }
        for (name, raw_connection) in raw.connections {
            let Some(key) = ConnectionName::parse(&name) else {
                self.problems.push(format!(
                    "connections.{name}: a connection name is 1 to 64 characters of letters, digits, '-' and '_' (it is part of the URL)"
                ));
                continue;
            };
            if let Some(connection) = self.connection(&name, raw_connection) {
                if connections.contains_key(&key) {
                    self.problems.push(format!(
                        "connections.{name}: names are matched case-insensitively and another connection has the same name"
                    ));
                }
                connections.insert(key, connection);
            }
        }
        self.caller_lists(&callers, &connections);
        let shared_cache = raw.shared_cache.and_then(|raw| self.shared_cache(raw));
        let shared_cache_vault = shared_cache.as_ref().is_some_and(|shared| {
            matches!(shared.encryption_key, SecretSource::KeyVault { .. })
                || matches!(
                    shared.auth,
                    RedisAuth::Password {
                        password: SecretSource::KeyVault { .. },
                        ..
                    }
                )
        });
        let needs_vault = shared_cache_vault
            || connections.values().any(|c| {
                !matches!(
                    c.credential,
                    CredentialSource::Secret(SecretSource::AppSetting { .. })
                )
            });
        if needs_vault && key_vault.is_none() && self.problems.is_empty() {
            self.problems.push(
                "key_vault.uri: required because a connection reads its secret or signing key from Key Vault or uses the managed identity, or the shared cache reads a secret from Key Vault"
                    .into(),
            );
        }
        self.federation_identity(key_vault.as_ref(), &connections);
        Settings {
            port,
            key_vault,
            identity,
            cache,
            callers,
            telemetry,
            connections,
            shared_cache,
        }
    }

    fn telemetry(&mut self, raw: &RawTelemetry) -> TelemetrySettings {
        let seconds = raw
            .stats_interval_seconds
            .unwrap_or(DEFAULT_STATS_INTERVAL_SECONDS);
        if !STATS_INTERVAL_SECONDS.contains(&seconds) {
            self.problems.push(format!(
                "telemetry.stats_interval_seconds: must be from {} to {}",
                STATS_INTERVAL_SECONDS.start(),
                STATS_INTERVAL_SECONDS.end()
            ));
        }
        TelemetrySettings {
            stats_interval: Duration::from_secs(seconds),
        }
    }

    fn port(&mut self) -> u16 {
        match self.env.var("FUNCTIONS_CUSTOMHANDLER_PORT") {
            None => DEFAULT_PORT,
            Some(value) => value.trim().parse().unwrap_or_else(|_| {
                self.problems.push(
                    "FUNCTIONS_CUSTOMHANDLER_PORT: not a port number (0 to 65535)".to_string(),
                );
                DEFAULT_PORT
            }),
        }
    }

    fn key_vault(&mut self, raw: RawKeyVault) -> Option<KeyVaultSettings> {
        let uri = self.expand("key_vault.uri", &raw.uri)?;
        let uri = match Url::parse(&uri) {
            Ok(uri) if uri.scheme() == "https" && uri.host_str().is_some() => uri,
            Ok(_) => {
                self.problems.push(
                    "key_vault.uri: must be an https URL (the SDK refuses bearer tokens over http)"
                        .into(),
                );
                return None;
            }
            Err(error) => {
                self.problems
                    .push(format!("key_vault.uri: not a valid URL ({error})"));
                return None;
            }
        };
        let managed_identity_client_id = match raw.managed_identity_client_id {
            Some(id) => Some(self.expand("key_vault.managed_identity_client_id", &id)?)
                .filter(|id| !id.is_empty()),
            None => None,
        };
        Some(KeyVaultSettings {
            uri,
            managed_identity_client_id,
            verify_challenge_resource: raw.verify_challenge_resource.unwrap_or(true),
        })
    }

    /// A number of seconds within `range`, reported (naming the field and the bounds, which
    /// are not secret) when outside it.
    fn seconds(
        &mut self,
        field: &str,
        value: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Duration {
        if !range.contains(&value) {
            self.problems.push(format!(
                "{field}: must be between {} and {}",
                range.start(),
                range.end()
            ));
        }
        Duration::from_secs(value.clamp(*range.start(), *range.end()))
    }

    /// An https URL, or http on loopback only (a local identity provider).
    fn endpoint_url(&mut self, field: &str, value: &str) -> Option<EndpointUrl> {
        EndpointUrl::parse(value)
            .map_err(|problem| self.problems.push(format!("{field}: {problem}")))
            .ok()
    }

    fn secret_source(&mut self, name: &str, raw: Option<toml::Value>) -> Option<SecretSource> {
        self.secret_source_at(&format!("connections.{name}.client_secret"), raw)
    }

    /// A `{ key_vault_secret = .. }` or `{ app_setting = .. }` table at `field`.
    fn secret_source_at(&mut self, field: &str, raw: Option<toml::Value>) -> Option<SecretSource> {
        let expected = "must be { key_vault_secret = \"<secret name>\" } or { app_setting = \"<NAME>\" }; a literal secret is not accepted";
        let Some(toml::Value::Table(table)) = raw else {
            self.problems.push(format!("{field}: {expected}"));
            return None;
        };
        if table.len() != 1 {
            self.problems.push(format!("{field}: {expected}"));
            return None;
        }
        let (kind, value) = table.into_iter().next()?;
        let toml::Value::String(value) = value else {
            self.problems
                .push(format!("{field}.{kind}: must be a string"));
            return None;
        };
        match kind.as_str() {
            "key_vault_secret" => {
                let secret_name = self.expand(&format!("{field}.key_vault_secret"), &value)?;
                if !is_valid_key_vault_name(&secret_name) {
                    self.problems.push(format!(
                        "{field}.key_vault_secret: a Key Vault secret name is 1 to 127 letters, digits and '-'"
                    ));
                    return None;
                }
                Some(SecretSource::KeyVault { secret_name })
            }
            "app_setting" => {
                let setting = self.expand(&format!("{field}.app_setting"), &value)?;
                let secret = self.setting(&format!("{field}.app_setting"), &setting)?;
                if secret.is_empty() {
                    self.problems.push(format!(
                        "{field}.app_setting: app setting {setting} is empty"
                    ));
                    return None;
                }
                Some(SecretSource::AppSetting {
                    setting,
                    value: SecretString::from(secret),
                })
            }
            _ => {
                self.problems.push(format!("{field}: {expected}"));
                None
            }
        }
    }
}
