//! The second pass: every value expanded and checked, every problem collected, messages that
//! name the connection and field but never echo a value.

use std::collections::BTreeMap;
use std::time::Duration;

use url::Url;

use super::entra_authority;
use super::raw::{
    OneOrMany, RESERVED_PARAMS, RawCallers, RawConnection, RawFile, RawKeyVault, RawSharedCache,
    RawTelemetry,
};
use super::types::{ConnectionName, EndpointUrl, ScopeToken, is_loopback, is_valid_key_vault_name};
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

    /// `[shared_cache]`: messages name the field, never the URL's or a secret's value.
    fn shared_cache(&mut self, raw: RawSharedCache) -> Option<SharedCacheSettings> {
        let before = self.problems.len();
        let redis_url = self
            .expand("shared_cache.redis_url", &raw.redis_url)
            .and_then(|url| match Url::parse(&url) {
                // A socket on this machine: nothing crosses a network, like loopback.
                Ok(url) if matches!(url.scheme(), "redis+unix" | "unix") => {
                    let credentials = !url.username().is_empty()
                        || url.password().is_some()
                        || url
                            .query_pairs()
                            .any(|(name, _)| matches!(name.as_ref(), "user" | "pass"));
                    if credentials {
                        self.problems.push(
                            "shared_cache.redis_url: must not hold credentials; use auth, username and password".into(),
                        );
                        return None;
                    }
                    if url.host_str().is_some_and(|host| !host.is_empty())
                        || url.path().len() < 2
                    {
                        self.problems.push(
                            "shared_cache.redis_url: a socket is redis+unix:///path/to/socket (no host)"
                                .into(),
                        );
                        return None;
                    }
                    Some(url)
                }
                Ok(url)
                    if matches!(url.scheme(), "redis" | "rediss")
                        && url.host_str().is_some_and(|host| !host.is_empty()) =>
                {
                    if !url.username().is_empty() || url.password().is_some() {
                        self.problems.push(
                            "shared_cache.redis_url: must not hold credentials; use auth, username and password".into(),
                        );
                        return None;
                    }
                    Some(url)
                }
                Ok(_) => {
                    self.problems.push(
                        "shared_cache.redis_url: must be redis://host:port, rediss://host:port (TLS) or redis+unix:///path/to/socket"
                            .into(),
                    );
                    None
                }
                Err(error) => {
                    self.problems
                        .push(format!("shared_cache.redis_url: not a valid URL ({error})"));
                    None
                }
            });
        let encryption_key =
            self.secret_source_at("shared_cache.encryption_key", raw.encryption_key);
        if let Some(SecretSource::AppSetting { setting, value }) = &encryption_key
            && crate::cache::decode_encryption_key(value).is_none()
        {
            self.problems.push(format!(
                "shared_cache.encryption_key.app_setting: app setting {setting} is not base64 of {ENCRYPTION_KEY_BYTES} bytes"
            ));
        }
        let username = raw
            .username
            .as_deref()
            .and_then(|name| self.expand("shared_cache.username", name))
            .filter(|name| !name.is_empty());
        let auth = match raw.auth.as_deref().unwrap_or("none") {
            "none" => {
                for (field, set) in [
                    ("password", raw.password.is_some()),
                    ("username", raw.username.is_some()),
                ] {
                    if set {
                        self.problems.push(format!(
                            "shared_cache.{field}: only used with auth \"password\" or \"entra\""
                        ));
                    }
                }
                Some(RedisAuth::None)
            }
            "password" => self
                .secret_source_at("shared_cache.password", raw.password)
                .map(|password| RedisAuth::Password { username, password }),
            "entra" => {
                if raw.password.is_some() {
                    self.problems.push(
                        "shared_cache.password: not used with auth \"entra\" (the identity's token is the password)".into(),
                    );
                }
                match username {
                    Some(username) => Some(RedisAuth::Entra { username }),
                    None => {
                        self.problems.push(
                            "shared_cache.username: auth \"entra\" needs the identity's object (principal) id".into(),
                        );
                        None
                    }
                }
            }
            _ => {
                self.problems
                    .push("shared_cache.auth: must be \"none\", \"password\" or \"entra\"".into());
                None
            }
        };
        // A password or the identity's Redis token sent over plain `redis://` can be read by
        // anyone on the path. Sealed entries alone can be (they open only with the key), so
        // `auth = "none"` may use plain redis:// to any host; credentials need TLS off loopback.
        if let (Some(url), Some(method @ ("password" | "entra"))) =
            (&redis_url, raw.auth.as_deref())
            && url.scheme() == "redis"
            && !is_loopback(url)
        {
            self.problems.push(format!(
                "shared_cache.redis_url: auth \"{method}\" sends credentials, which need rediss:// (TLS); plain redis:// is accepted only on loopback (localhost, 127.0.0.0/8, ::1)"
            ));
        }
        let key_prefix = match raw.key_prefix {
            None => "token-broker".to_string(),
            Some(prefix) => self
                .expand("shared_cache.key_prefix", &prefix)
                .unwrap_or_default(),
        };
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || !key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            self.problems.push(
                "shared_cache.key_prefix: 1 to 64 letters, digits, '-', '_', '.' or ':'".into(),
            );
        }
        let timeout_ms = raw.timeout_ms.unwrap_or(100);
        if !(1..=10_000).contains(&timeout_ms) {
            self.problems
                .push("shared_cache.timeout_ms: between 1 and 10000".into());
        }
        if self.problems.len() != before {
            return None;
        }
        Some(SharedCacheSettings {
            redis_url: redis_url?,
            encryption_key: encryption_key?,
            auth: auth?,
            key_prefix,
            timeout: Duration::from_millis(timeout_ms),
        })
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
        let auth_method = match raw.auth_method.as_deref() {
            None | Some("client_secret_basic") => Some(AuthMethod::ClientSecretBasic),
            Some("client_secret_post") => Some(AuthMethod::ClientSecretPost),
            Some("private_key_jwt") => Some(AuthMethod::PrivateKeyJwt),
            Some("managed_identity_federation") => Some(AuthMethod::ManagedIdentityFederation),
            Some(_) => {
                self.problems.push(format!(
                    "{}: must be \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\" or \"managed_identity_federation\"",
                    at("auth_method")
                ));
                None
            }
        };
        let credential = auth_method
            .and_then(|method| self.credential_source(name, method, &raw, token_url.as_ref()));
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
        // Every duration is bounded: no configured value can overflow the clock, and none can
        // outlast what the platform allows a request (230 s at the Functions front end).
        let default_lifetime = self.seconds(
            &at("default_lifetime_seconds"),
            raw.default_lifetime_seconds.unwrap_or(300),
            1..=86_400,
        );
        let connect_timeout = self.seconds(
            &at("connect_timeout_seconds"),
            raw.connect_timeout_seconds.unwrap_or(3),
            1..=60,
        );
        let timeout = self.seconds(
            &at("timeout_seconds"),
            raw.timeout_seconds.unwrap_or(10),
            1..=120,
        );
        let deadline = self.seconds(
            &at("deadline_seconds"),
            raw.deadline_seconds.unwrap_or(20),
            1..=230,
        );
        let breaker_open = self.seconds(
            &at("breaker_open_seconds"),
            raw.breaker_open_seconds.unwrap_or(15),
            1..=3600,
        );
        let negative_cache = self.seconds(
            &at("negative_cache_seconds"),
            raw.negative_cache_seconds.unwrap_or(30),
            0..=3600,
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
        // Each attempt sends a newly signed assertion; it must still be valid when the
        // provider reads it, at the end of the attempt's timeout.
        if let Some(CredentialSource::Assertion(assertion)) = &credential
            && assertion.lifetime <= timeout
        {
            self.problems.push(format!(
                "{}: must be longer than timeout_seconds (each attempt sends a newly signed assertion that must outlive it)",
                at("assertion_lifetime_seconds")
            ));
        }

        if self.problems.len() != before {
            return None;
        }
        Some(ConnectionSettings {
            name: name.to_string(),
            token_url: token_url?,
            client_id: client_id?,
            credential: credential?,
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
            negative_cache,
            breaker_failures,
            breaker_open,
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

    /// Only a user-assigned identity can be a federated credential of an app registration:
    /// without its client id, `managed_identity_federation` cannot work, so it is refused here
    /// (and by `token-broker check`) instead of failing at the first token request.
    fn federation_identity(
        &mut self,
        key_vault: Option<&KeyVaultSettings>,
        connections: &BTreeMap<ConnectionName, ConnectionSettings>,
    ) {
        let named = key_vault.is_some_and(|kv| kv.managed_identity_client_id.is_some());
        if named {
            return;
        }
        for connection in connections.values() {
            if matches!(connection.credential, CredentialSource::Federation { .. }) {
                self.problems.push(format!(
                    "connections.{}.auth_method: \"managed_identity_federation\" needs a user-assigned identity (system-assigned identities cannot be federated credentials); set key_vault.managed_identity_client_id",
                    connection.name
                ));
            }
        }
    }

    /// What the connection authenticates with, checked against its `auth_method`: each method
    /// takes its own settings, and a setting another method reads is refused rather than
    /// silently ignored (a `client_secret` left beside an assertion would suggest it is used).
    fn credential_source(
        &mut self,
        name: &str,
        method: AuthMethod,
        raw: &RawConnection,
        token_url: Option<&EndpointUrl>,
    ) -> Option<CredentialSource> {
        let at = |field: &str| format!("connections.{name}.{field}");
        let assertion_fields = [
            ("client_assertion_key", raw.client_assertion_key.is_some()),
            ("signing_algorithm", raw.signing_algorithm.is_some()),
            ("assertion_audience", raw.assertion_audience.is_some()),
            (
                "assertion_lifetime_seconds",
                raw.assertion_lifetime_seconds.is_some(),
            ),
            ("assertion_key_id", raw.assertion_key_id.is_some()),
        ];
        let refuse = |problems: &mut Vec<String>, field: &str, used_by: &str| {
            problems.push(format!(
                "{}: only used with auth_method = {used_by}; remove it",
                at(field)
            ));
        };
        if method != AuthMethod::PrivateKeyJwt {
            for (field, set) in assertion_fields {
                if set {
                    refuse(&mut self.problems, field, "\"private_key_jwt\"");
                }
            }
        }
        if method != AuthMethod::ManagedIdentityFederation && raw.federation_audience.is_some() {
            refuse(
                &mut self.problems,
                "federation_audience",
                "\"managed_identity_federation\"",
            );
        }
        match method {
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => self
                .secret_source(name, raw.client_secret.clone())
                .map(CredentialSource::Secret),
            AuthMethod::PrivateKeyJwt | AuthMethod::ManagedIdentityFederation => {
                if raw.client_secret.is_some() {
                    self.problems.push(format!(
                        "{}: not used with auth_method = \"{}\", which sends no secret; remove it (and the secret, once the identity provider no longer needs it)",
                        at("client_secret"),
                        method.as_str()
                    ));
                }
                if method == AuthMethod::PrivateKeyJwt {
                    self.assertion(name, raw, token_url)
                        .map(CredentialSource::Assertion)
                } else {
                    if let Some(url) = token_url
                        && !entra_authority::may_receive_federation_token(url)
                    {
                        self.problems.push(format!(
                            "{}: must be an Entra token endpoint (host {}) or loopback: auth_method = \"managed_identity_federation\" sends the identity's token there, and every app that federates the identity accepts it",
                            at("token_url"),
                            entra_authority::ENTRA_AUTHORITY_HOSTS.join(", ")
                        ));
                    }
                    let audience = match &raw.federation_audience {
                        Some(value) => self.expand(&at("federation_audience"), value)?,
                        None => DEFAULT_FEDERATION_AUDIENCE.to_string(),
                    };
                    if audience.is_empty() {
                        self.problems
                            .push(format!("{}: must not be empty", at("federation_audience")));
                        return None;
                    }
                    Some(CredentialSource::Federation { audience })
                }
            }
        }
    }

    fn assertion(
        &mut self,
        name: &str,
        raw: &RawConnection,
        token_url: Option<&EndpointUrl>,
    ) -> Option<AssertionSettings> {
        let at = |field: &str| format!("connections.{name}.{field}");
        let before = self.problems.len();
        let key = self.assertion_key(
            &at("client_assertion_key"),
            raw.client_assertion_key.as_ref(),
        );
        let algorithm = match raw.signing_algorithm.as_deref() {
            None => None,
            Some(value) => match SigningAlgorithm::parse(value) {
                Some(algorithm) => Some(algorithm),
                None => {
                    self.problems.push(format!(
                        "{}: must be one of {}",
                        at("signing_algorithm"),
                        SigningAlgorithm::ALL
                            .map(SigningAlgorithm::as_str)
                            .join(", ")
                    ));
                    None
                }
            },
        };
        if let (Some(AssertionKey::KeyVaultCertificate(_)), Some(algorithm)) = (&key, algorithm)
            && !algorithm.is_rsa()
        {
            self.problems.push(format!(
                "{}: a certificate credential signs with its RSA key: RS256 or PS256 (PS384, PS512, RS384, RS512)",
                at("signing_algorithm")
            ));
        }
        let audience = match &raw.assertion_audience {
            Some(value) => self.expand(&at("assertion_audience"), value),
            None => token_url.map(|url| url.as_str().to_string()),
        };
        if audience.as_deref() == Some("") {
            self.problems
                .push(format!("{}: must not be empty", at("assertion_audience")));
        }
        let lifetime_seconds = raw
            .assertion_lifetime_seconds
            .unwrap_or(DEFAULT_ASSERTION_LIFETIME_SECONDS);
        if !(1..=MAX_ASSERTION_LIFETIME_SECONDS).contains(&lifetime_seconds) {
            self.problems.push(format!(
                "{}: 1 to {MAX_ASSERTION_LIFETIME_SECONDS} (identity providers refuse long-lived assertions)",
                at("assertion_lifetime_seconds")
            ));
        }
        let key_id = match &raw.assertion_key_id {
            Some(value) => self.expand(&at("assertion_key_id"), value),
            None => None,
        };
        if key_id.as_deref() == Some("") {
            self.problems
                .push(format!("{}: must not be empty", at("assertion_key_id")));
        }
        if self.problems.len() != before {
            return None;
        }
        Some(AssertionSettings {
            key: key?,
            algorithm,
            audience: audience?,
            lifetime: Duration::from_secs(lifetime_seconds),
            key_id,
        })
    }

    fn assertion_key(&mut self, field: &str, raw: Option<&toml::Value>) -> Option<AssertionKey> {
        let expected = "must be { key_vault_key = \"<key name>\" } or { key_vault_certificate = \"<certificate name>\" }";
        let Some(raw) = raw else {
            self.problems.push(format!(
                "{field}: required by auth_method = \"private_key_jwt\"; {expected}"
            ));
            return None;
        };
        let entry = match raw {
            toml::Value::Table(table) if table.len() == 1 => table.iter().next(),
            _ => None,
        };
        let Some((kind, toml::Value::String(value))) = entry else {
            self.problems.push(format!("{field}: {expected}"));
            return None;
        };
        let object_name = self.expand(&format!("{field}.{kind}"), value)?;
        if !is_valid_key_vault_name(&object_name) {
            self.problems.push(format!(
                "{field}.{kind}: a Key Vault object name is 1 to 127 letters, digits and '-'"
            ));
            return None;
        }
        match kind.as_str() {
            "key_vault_key" => Some(AssertionKey::KeyVaultKey(object_name)),
            "key_vault_certificate" => Some(AssertionKey::KeyVaultCertificate(object_name)),
            _ => {
                self.problems.push(format!("{field}: {expected}"));
                None
            }
        }
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
