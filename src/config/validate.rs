//! The second pass: every value expanded and checked, every problem collected, messages that
//! name the connection and field but never echo a value.

use std::collections::BTreeMap;
use std::time::Duration;

use url::Url;

use super::raw::{
    OneOrMany, RESERVED_PARAMS, RawCallers, RawConnection, RawFile, RawKeyVault, RawTelemetry,
};
use super::types::{ConnectionName, EndpointUrl, ScopeToken, is_valid_key_vault_name};
use super::*;

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
            secret_ttl: Duration::from_secs(raw.cache.secret_ttl_seconds.unwrap_or(300)),
            max_tokens: raw.cache.max_tokens.unwrap_or(1024),
            secret_refusal_grace: Duration::from_secs(
                raw.cache.secret_refusal_grace_seconds.unwrap_or(300),
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
        let needs_vault = connections
            .values()
            .any(|c| matches!(c.client_secret, SecretSource::KeyVault { .. }));
        if needs_vault && key_vault.is_none() && self.problems.is_empty() {
            self.problems.push(
                "key_vault.uri: required because a connection reads its secret from Key Vault"
                    .into(),
            );
        }
        Settings {
            port,
            key_vault,
            identity,
            cache,
            callers,
            telemetry,
            connections,
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

    fn callers(&mut self, raw: Option<RawCallers>) -> CallerSettings {
        let none = CallerSettings {
            mode: CallerMode::None,
        };
        let Some(raw) = raw else {
            return none;
        };
        let mode = raw.mode.as_deref().unwrap_or("none");
        if mode != "jwt" {
            // Settings that only `jwt` reads would be silently ignored: an operator who sets
            // `tenant` believes it is checked.
            for (field, set) in [
                ("issuer", raw.issuer.is_some()),
                ("audience", raw.audience.is_some()),
                ("tenant", raw.tenant.is_some()),
                ("jwks_uri", raw.jwks_uri.is_some()),
                ("clock_skew_seconds", raw.clock_skew_seconds.is_some()),
            ] {
                if set {
                    self.problems
                        .push(format!("callers.{field}: only used in mode \"jwt\""));
                }
            }
        }
        match mode {
            "none" => none,
            "easy_auth" => {
                // Without App Service Authentication the platform does not strip
                // client-supplied X-MS-CLIENT-PRINCIPAL headers: anyone could claim anyone.
                let enabled = self
                    .env
                    .var("WEBSITE_AUTH_ENABLED")
                    .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
                if !enabled {
                    self.problems.push(
                        "callers.mode: \"easy_auth\" trusts X-MS-CLIENT-PRINCIPAL, which is safe only with App Service Authentication on, and WEBSITE_AUTH_ENABLED is not \"true\"; turn authentication on or use mode \"jwt\"".to_string(),
                    );
                }
                CallerSettings {
                    mode: CallerMode::EasyAuth,
                }
            }
            "jwt" => {
                let issuers = self.expand_list("callers.issuer", raw.issuer);
                for (index, issuer) in issuers.iter().enumerate() {
                    self.endpoint_url(&format!("callers.issuer[{index}]"), issuer);
                }
                let audiences: Vec<String> = self.expand_list("callers.audience", raw.audience);
                if audiences.iter().any(String::is_empty) {
                    self.problems
                        .push("callers.audience: must not be empty".to_string());
                }
                let tenant = raw
                    .tenant
                    .as_deref()
                    .and_then(|v| self.expand("callers.tenant", v));
                if tenant.as_deref() == Some("") {
                    self.problems
                        .push("callers.tenant: must not be empty".to_string());
                }
                let jwks_uri = raw
                    .jwks_uri
                    .as_deref()
                    .and_then(|v| self.expand("callers.jwks_uri", v))
                    .and_then(|v| self.endpoint_url("callers.jwks_uri", &v));
                let clock_skew_seconds = raw.clock_skew_seconds.unwrap_or(60);
                if clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
                    self.problems.push(format!(
                        "callers.clock_skew_seconds: at most {MAX_CLOCK_SKEW_SECONDS} (leeway on exp and nbf)"
                    ));
                }
                if issuers.is_empty() || audiences.is_empty() {
                    self.problems.push(
                        "callers: mode \"jwt\" needs issuer and audience (a string or a list)"
                            .to_string(),
                    );
                    return none;
                }
                CallerSettings {
                    mode: CallerMode::Jwt {
                        issuers,
                        audiences,
                        tenant,
                        jwks_uri,
                        clock_skew: Duration::from_secs(
                            clock_skew_seconds.min(MAX_CLOCK_SKEW_SECONDS),
                        ),
                    },
                }
            }
            _ => {
                self.problems
                    .push("callers.mode: must be \"none\", \"jwt\" or \"easy_auth\"".to_string());
                none
            }
        }
    }

    /// Expands each entry of a string-or-list setting; entries that fail are reported and left out.
    fn expand_list(&mut self, field: &str, raw: Option<OneOrMany>) -> Vec<String> {
        let values = raw.map(OneOrMany::into_vec).unwrap_or_default();
        let mut expanded = Vec::new();
        for (index, value) in values.iter().enumerate() {
            if let Some(value) = self.expand(&format!("{field}[{index}]"), value) {
                expanded.push(value);
            }
        }
        expanded
    }

    /// Fails closed: where callers are identified, every connection says who may use it, and
    /// where they are not, no connection pretends to restrict them.
    fn caller_lists(
        &mut self,
        callers: &CallerSettings,
        connections: &BTreeMap<ConnectionName, ConnectionSettings>,
    ) {
        let identified = !matches!(callers.mode, CallerMode::None);
        for connection in connections.values() {
            let listed =
                !connection.allowed_callers.is_empty() || !connection.allowed_roles.is_empty();
            if !identified && listed {
                self.problems.push(format!(
                    "connections.{}.allowed_callers/allowed_roles: need [callers] mode \"jwt\" or \"easy_auth\" to know who the caller is",
                    connection.name
                ));
            }
            if identified && !listed {
                self.problems.push(format!(
                    "connections.{}.allowed_callers: required in [callers] mode \"jwt\" or \"easy_auth\" (or allowed_roles); write allowed_callers = [\"*\"] to serve every authenticated caller",
                    connection.name
                ));
            }
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

    fn connection(&mut self, name: &str, raw: RawConnection) -> Option<ConnectionSettings> {
        let at = |field: &str| format!("connections.{name}.{field}");
        let before = self.problems.len();

        let token_url = self
            .expand(&at("token_url"), &raw.token_url)
            .and_then(|url| self.endpoint_url(&at("token_url"), &url));
        let client_id = self.expand(&at("client_id"), &raw.client_id);
        if client_id.as_deref() == Some("") {
            self.problems
                .push(format!("{}: must not be empty", at("client_id")));
        }
        let client_secret = self.secret_source(name, raw.client_secret);
        let auth_method = match raw.auth_method.as_deref() {
            None | Some("client_secret_basic") => Some(AuthMethod::ClientSecretBasic),
            Some("client_secret_post") => Some(AuthMethod::ClientSecretPost),
            Some(_) => {
                self.problems.push(format!(
                    "{}: must be \"client_secret_basic\" or \"client_secret_post\"",
                    at("auth_method")
                ));
                None
            }
        };
        let mut scopes = Vec::new();
        for (index, scope) in raw.scopes.iter().enumerate() {
            let field = format!("{}[{index}]", at("scopes"));
            if let Some(scope) = self.expand(&field, scope) {
                if let Some(scope) = ScopeToken::parse(&scope) {
                    scopes.push(scope);
                } else {
                    self.problems.push(format!(
                        "{field}: not a valid OAuth scope token (printable ASCII, no spaces, quotes or backslashes)"
                    ));
                }
            }
        }
        let allowed_scopes = match &raw.allowed_scopes {
            None => scopes.clone(),
            Some(allowed) => {
                let mut valid = Vec::new();
                for (index, scope) in allowed.iter().enumerate() {
                    let field = format!("{}[{index}]", at("allowed_scopes"));
                    if let Some(scope) = self.expand(&field, scope) {
                        if let Some(scope) = ScopeToken::parse(&scope) {
                            valid.push(scope);
                        } else {
                            self.problems
                                .push(format!("{field}: not a valid OAuth scope token"));
                        }
                    }
                }
                valid
            }
        };
        let mut allowed_callers = Vec::new();
        for (index, caller) in raw.allowed_callers.iter().enumerate() {
            if let Some(caller) =
                self.expand(&format!("{}[{index}]", at("allowed_callers")), caller)
            {
                allowed_callers.push(caller);
            }
        }
        let mut allowed_roles = Vec::new();
        for (index, role) in raw.allowed_roles.iter().enumerate() {
            if let Some(role) = self.expand(&format!("{}[{index}]", at("allowed_roles")), role) {
                allowed_roles.push(role);
            }
        }
        let audience = raw.audience.and_then(|v| self.expand(&at("audience"), &v));
        let resource = raw.resource.and_then(|v| self.expand(&at("resource"), &v));
        let mut extra_params = BTreeMap::new();
        for (key, value) in &raw.extra_params {
            let field = format!("{}.{key}", at("extra_params"));
            if RESERVED_PARAMS.contains(&key.as_str()) {
                self.problems.push(format!(
                    "{field}: the broker sets this form field itself; use the dedicated setting"
                ));
                continue;
            }
            if let Some(value) = self.expand(&field, value) {
                extra_params.insert(key.clone(), value);
            }
        }
        let default_lifetime = Duration::from_secs(raw.default_lifetime_seconds.unwrap_or(300));
        if default_lifetime.is_zero() {
            self.problems.push(format!(
                "{}: must be at least 1",
                at("default_lifetime_seconds")
            ));
        }
        let mut at_least_one = |field: &str, value: u64| {
            if value == 0 {
                self.problems
                    .push(format!("{}: must be at least 1", at(field)));
            }
            Duration::from_secs(value)
        };
        let connect_timeout = at_least_one(
            "connect_timeout_seconds",
            raw.connect_timeout_seconds.unwrap_or(3),
        );
        let timeout = at_least_one("timeout_seconds", raw.timeout_seconds.unwrap_or(10));
        let deadline = at_least_one("deadline_seconds", raw.deadline_seconds.unwrap_or(20));
        let breaker_open = at_least_one(
            "breaker_open_seconds",
            raw.breaker_open_seconds.unwrap_or(15),
        );
        let breaker_failures = raw.breaker_failures.unwrap_or(5);
        if breaker_failures == 0 {
            self.problems
                .push(format!("{}: must be at least 1", at("breaker_failures")));
        }
        if deadline < timeout {
            self.problems.push(format!(
                "{}: must be at least timeout_seconds",
                at("deadline_seconds")
            ));
        }

        if self.problems.len() != before {
            return None;
        }
        Some(ConnectionSettings {
            name: name.to_string(),
            token_url: token_url?,
            client_id: client_id?,
            client_secret: client_secret?,
            auth_method: auth_method?,
            scopes,
            audience,
            resource,
            extra_params,
            allowed_callers,
            allowed_roles,
            allowed_scopes,
            default_lifetime,
            connect_timeout,
            timeout,
            max_retries: raw.max_retries.unwrap_or(2),
            deadline,
            negative_cache: Duration::from_secs(raw.negative_cache_seconds.unwrap_or(30)),
            breaker_failures,
            breaker_open,
        })
    }

    /// An https URL, or http on loopback only (a local identity provider).
    fn endpoint_url(&mut self, field: &str, value: &str) -> Option<EndpointUrl> {
        EndpointUrl::parse(value)
            .map_err(|problem| self.problems.push(format!("{field}: {problem}")))
            .ok()
    }

    fn secret_source(&mut self, name: &str, raw: Option<toml::Value>) -> Option<SecretSource> {
        let field = format!("connections.{name}.client_secret");
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
