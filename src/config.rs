//! The broker's configuration: one TOML file, validated whole at startup.
//!
//! The file is parsed in two passes. Serde first checks the *shape* of the raw file (unknown
//! keys, wrong types), which is safe to report verbatim because the raw file holds `${NAME}`
//! references, not values. Then every string is expanded from the environment and checked by
//! hand, with messages that name the connection and field but never echo an expanded value:
//! an app setting may hold a secret, and a startup error lands in the host's log.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

/// Where the configuration file is read from when `TOKEN_BROKER_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "broker.toml";
/// Port used when the Functions host did not pass `FUNCTIONS_CUSTOMHANDLER_PORT`.
pub const DEFAULT_PORT: u16 = 8080;

/// Prefix of an app setting that the platform failed to resolve from Key Vault.
const KEY_VAULT_REFERENCE_PREFIX: &str = "@Microsoft.KeyVault(";

/// The validated configuration the broker runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    pub key_vault: Option<KeyVaultSettings>,
    pub identity: IdentitySettings,
    pub cache: CacheSettings,
    pub callers: CallerSettings,
    /// Connections by their lower-cased name: the URL's casing is the client's.
    pub connections: BTreeMap<String, ConnectionSettings>,
}

/// How the broker reaches Key Vault.
#[derive(Debug, Clone)]
pub struct KeyVaultSettings {
    pub uri: Url,
    pub managed_identity_client_id: Option<String>,
    pub verify_challenge_resource: bool,
}

/// Which credential the Azure SDK uses to read Key Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySettings {
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set: App Service managed identity.
    ManagedIdentity,
    /// Neither is set: a developer's Azure CLI login (`func start` on a laptop).
    DeveloperCli,
}

/// Most leeway `clock_skew_seconds` may give on `exp` and `nbf`: more would keep expired
/// caller tokens usable for long, and no sane clock is that far off.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 300;

/// The caller list entry that opens a connection to every authenticated caller, stated on
/// purpose rather than implied by an empty list.
pub const ANY_CALLER: &str = "*";

/// How callers are authenticated.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    pub mode: CallerMode,
}

/// `[callers] mode`.
#[derive(Debug, Clone)]
pub enum CallerMode {
    /// The function key, checked by the host, is the only gate.
    None,
    /// `Authorization: Bearer` validated against the issuer's keys.
    Jwt {
        /// Accepted `iss` values: Entra's v1 and v2 issuers differ for the same tenant.
        issuers: Vec<String>,
        /// Accepted `aud` values: v1 tokens carry the app ID URI, v2 tokens the client id.
        audiences: Vec<String>,
        /// When set, the `tid` claim must equal it.
        tenant: Option<String>,
        /// When absent, read from the first issuer's OpenID discovery document.
        jwks_uri: Option<Url>,
        clock_skew: Duration,
    },
    /// `X-MS-CLIENT-PRINCIPAL` from App Service Authentication.
    EasyAuth,
}

/// Lifetimes and bounds of the in-memory caches.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// How long a client secret read from Key Vault is reused before it is read again.
    pub secret_ttl: Duration,
    /// Most token cache entries kept at once (connection x scope set).
    pub max_tokens: usize,
    /// How long a secret Key Vault now refuses definitively (disabled, deleted, access
    /// revoked) is still used from memory before the broker stops using it.
    pub secret_refusal_grace: Duration,
}

/// One OAuth client the broker obtains tokens for.
#[derive(Clone)]
pub struct ConnectionSettings {
    /// The name as written in the configuration file.
    pub name: String,
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: SecretSource,
    pub auth_method: AuthMethod,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub extra_params: BTreeMap<String, String>,
    /// Callers allowed to use this connection, by object id (`oid`) or client id (`azp`,
    /// `appid`); `"*"` is any authenticated caller.
    pub allowed_callers: Vec<String>,
    /// Roles (`roles` claim) allowed to use this connection.
    pub allowed_roles: Vec<String>,
    /// Scopes a caller may ask for; the default scopes when not configured.
    pub allowed_scopes: Vec<String>,
    /// Lifetime assumed when the token endpoint omits `expires_in`.
    pub default_lifetime: Duration,
    /// Bound on establishing a connection to the token endpoint.
    pub connect_timeout: Duration,
    /// Bound on one token-endpoint call, connect to last byte.
    pub timeout: Duration,
    /// Retries after a connection error, a timeout, 5xx or 429.
    pub max_retries: u32,
    /// Bound on everything one token fetch may take (secret, attempts, backoff): no caller
    /// waits longer for a token.
    pub deadline: Duration,
    /// How long an `invalid_client`/`unauthorized_client` answer is remembered.
    pub negative_cache: Duration,
    /// Consecutive unavailable answers that open the circuit, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

impl fmt::Debug for ConnectionSettings {
    // Written by hand so that an app-setting secret can never be printed, even by a careless
    // `{:?}` somewhere up the stack.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("name", &self.name)
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("auth_method", &self.auth_method)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Where a connection's client secret comes from.
#[derive(Clone)]
pub enum SecretSource {
    /// A secret in the configured Key Vault, read through the managed identity.
    KeyVault { secret_name: String },
    /// An app setting (environment variable), already read at startup.
    AppSetting {
        setting: String,
        value: SecretString,
    },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::KeyVault { secret_name } => {
                write!(f, "KeyVault({secret_name})")
            }
            SecretSource::AppSetting { setting, .. } => write!(f, "AppSetting({setting})"),
        }
    }
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
}

/// Every problem found in the configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration in {path}:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub path: String,
    pub problems: Vec<String>,
}

// ---- raw file shape -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    key_vault: Option<RawKeyVault>,
    #[serde(default)]
    cache: RawCache,
    callers: Option<RawCallers>,
    #[serde(default)]
    connections: BTreeMap<String, RawConnection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyVault {
    uri: String,
    managed_identity_client_id: Option<String>,
    verify_challenge_resource: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallers {
    mode: Option<String>,
    issuer: Option<OneOrMany>,
    audience: Option<OneOrMany>,
    tenant: Option<String>,
    jwks_uri: Option<String>,
    clock_skew_seconds: Option<u64>,
}

/// A setting written as one string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    secret_ttl_seconds: Option<u64>,
    max_tokens: Option<usize>,
    secret_refusal_grace_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    token_url: String,
    client_id: String,
    /// Kept untyped so that a literal secret written here is refused without being echoed
    /// by a serde "invalid type" message.
    client_secret: Option<toml::Value>,
    auth_method: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    audience: Option<String>,
    resource: Option<String>,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    default_lifetime_seconds: Option<u64>,
    connect_timeout_seconds: Option<u64>,
    timeout_seconds: Option<u64>,
    max_retries: Option<u32>,
    deadline_seconds: Option<u64>,
    negative_cache_seconds: Option<u64>,
    breaker_failures: Option<u32>,
    breaker_open_seconds: Option<u64>,
    #[serde(default)]
    allowed_callers: Vec<String>,
    #[serde(default)]
    allowed_roles: Vec<String>,
    allowed_scopes: Option<Vec<String>>,
}

/// Form fields the broker sets itself; `extra_params` may not override them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
    "resource",
    "client_assertion",
    "client_assertion_type",
];

/// The environment the configuration is resolved against. A trait object rather than
/// `std::env` so that validation can be tested without touching the process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment (app settings in Azure).
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Environment for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
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
    let raw: RawFile = toml::from_str(text).map_err(|error| fail(vec![shape_error(&error)]))?;
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

/// Renders a TOML shape error without the source excerpt toml prints by default: the excerpt
/// is the raw line, which could be a literal secret pasted into the wrong key.
fn shape_error(error: &toml::de::Error) -> String {
    let mut message = error.message().to_string();
    if let Some(span) = error.span() {
        message.push_str(&format!(" (at byte {})", span.start));
    }
    message
}

struct Validator<'e> {
    env: &'e dyn Environment,
    problems: Vec<String>,
}

impl Validator<'_> {
    fn settings(&mut self, raw: RawFile) -> Settings {
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

        let mut connections = BTreeMap::new();
        if raw.connections.is_empty() {
            self.problems
                .push("connections: at least one [connections.<name>] table is needed".into());
        }
        for (name, raw_connection) in raw.connections {
            if let Some(connection) = self.connection(&name, raw_connection) {
                let key = name.to_ascii_lowercase();
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
            connections,
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
        connections: &BTreeMap<String, ConnectionSettings>,
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
        if !is_valid_connection_name(name) {
            self.problems.push(format!(
                "connections.{name}: a connection name is 1 to 64 characters of letters, digits, '-' and '_' (it is part of the URL)"
            ));
            return None;
        }
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
                if is_valid_scope_token(&scope) {
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
                        if is_valid_scope_token(&scope) {
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
    fn endpoint_url(&mut self, field: &str, value: &str) -> Option<Url> {
        let url = match Url::parse(value) {
            Ok(url) => url,
            Err(error) => {
                self.problems
                    .push(format!("{field}: not a valid URL ({error})"));
                return None;
            }
        };
        let loopback = match url.host() {
            Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            None => false,
        };
        let allowed = match url.scheme() {
            "https" => url.host().is_some(),
            "http" => loopback,
            _ => false,
        };
        if !allowed {
            self.problems.push(format!(
                "{field}: must be an https URL (plain http is accepted only on loopback)"
            ));
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problems
                .push(format!("{field}: must not carry credentials"));
            return None;
        }
        Some(url)
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
                if !is_valid_key_vault_secret_name(&secret_name) {
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

    /// Replaces every `${NAME}` in `value` with the app setting `NAME`.
    fn expand(&mut self, field: &str, value: &str) -> Option<String> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        let mut ok = true;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.problems
                    .push(format!("{field}: unterminated ${{ in value"));
                return None;
            };
            let name = &after[..end];
            if !is_valid_setting_name(name) {
                self.problems.push(format!(
                    "{field}: ${{{name}}} is not a valid app setting name"
                ));
                ok = false;
            } else if let Some(setting) = self.setting(field, name) {
                out.push_str(&setting);
            } else {
                ok = false;
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    /// Reads one app setting, refusing unset ones and unresolved Key Vault references.
    fn setting(&mut self, field: &str, name: &str) -> Option<String> {
        match self.env.var(name) {
            None => {
                self.problems
                    .push(format!("{field}: app setting {name} is not set"));
                None
            }
            Some(value) if value.trim_start().starts_with(KEY_VAULT_REFERENCE_PREFIX) => {
                self.problems.push(format!(
                    "{field}: app setting {name} still holds an unresolved @Microsoft.KeyVault(...) reference; check the app's identity has access to that secret"
                ));
                None
            }
            Some(value) => Some(value),
        }
    }
}

/// Connection names appear in URLs and logs: a conservative character set keeps both plain.
pub fn is_valid_connection_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn is_valid_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= 256
        && scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

fn is_valid_key_vault_secret_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn is_valid_setting_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> impl Environment {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn parse_with(text: &str, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        parse(text, Path::new("broker.toml"), &env(pairs))
    }

    const FULL: &str = r#"
        [key_vault]
        uri = "${KEY_VAULT_URI}"
        managed_identity_client_id = "${MI_CLIENT_ID}"

        [connections.Contoso]
        token_url = "https://login.contoso.com/oauth2/token"
        client_id = "${CONTOSO_CLIENT_ID}"
        client_secret = { key_vault_secret = "contoso-client-secret" }
        auth_method = "client_secret_post"
        scopes = ["api://contoso/.default"]
        audience = "https://api.contoso.com"
        resource = "https://api.contoso.com"
        extra_params = { tenant = "x" }

        [connections.local]
        token_url = "http://127.0.0.1:9000/token"
        client_id = "local"
        client_secret = { app_setting = "LOCAL_SECRET" }
    "#;

    fn full_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("KEY_VAULT_URI", "https://kv.vault.azure.net"),
            ("MI_CLIENT_ID", "00000000-0000-0000-0000-000000000001"),
            ("CONTOSO_CLIENT_ID", "contoso-app"),
            ("LOCAL_SECRET", "s3cret"),
        ]
    }

    #[test]
    fn a_complete_file_resolves_settings_and_lowercases_connection_names() {
        let settings = parse_with(FULL, &full_env()).expect("valid");
        let contoso = &settings.connections["contoso"];
        assert_eq!(contoso.name, "Contoso");
        assert_eq!(contoso.client_id, "contoso-app");
        assert_eq!(contoso.auth_method, AuthMethod::ClientSecretPost);
        assert_eq!(contoso.extra_params["tenant"], "x");
        assert_eq!(settings.port, DEFAULT_PORT);
        assert_eq!(settings.identity, IdentitySettings::DeveloperCli);
        let kv = settings.key_vault.expect("key vault");
        assert!(kv.verify_challenge_resource);
        assert_eq!(
            kv.managed_identity_client_id.as_deref(),
            Some("00000000-0000-0000-0000-000000000001")
        );
        match &settings.connections["local"].client_secret {
            SecretSource::AppSetting { value, .. } => assert_eq!(value.expose_secret(), "s3cret"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_unset_variable_is_an_error_that_names_it() {
        let mut pairs = full_env();
        pairs.retain(|(k, _)| *k != "CONTOSO_CLIENT_ID");
        let error = parse_with(FULL, &pairs).unwrap_err();
        assert!(
            error.to_string().contains(
                "connections.Contoso.client_id: app setting CONTOSO_CLIENT_ID is not set"
            ),
            "{error}"
        );
    }

    #[test]
    fn an_unresolved_key_vault_reference_is_refused_without_printing_it() {
        let mut pairs = full_env();
        pairs.retain(|(k, _)| *k != "LOCAL_SECRET");
        pairs.push((
            "LOCAL_SECRET",
            "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/x/)",
        ));
        let error = parse_with(FULL, &pairs).unwrap_err().to_string();
        assert!(error.contains("connections.local.client_secret.app_setting: app setting LOCAL_SECRET still holds an unresolved @Microsoft.KeyVault(...) reference"), "{error}");
        assert!(!error.contains("SecretUri"), "{error}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = FULL.replace("audience =", "audiense =");
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(error.contains("unknown field `audiense`"), "{error}");
    }

    #[test]
    fn a_literal_secret_is_refused_and_never_echoed() {
        let text = FULL.replace(
            "client_secret = { app_setting = \"LOCAL_SECRET\" }",
            "client_secret = \"hunter2-literal\"",
        );
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(error.contains("connections.local.client_secret"), "{error}");
        assert!(!error.contains("hunter2-literal"), "{error}");
    }

    #[test]
    fn a_missing_secret_source_names_the_connection() {
        let text = FULL.replace("client_secret = { app_setting = \"LOCAL_SECRET\" }", "");
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(
            error.contains("connections.local.client_secret: must be"),
            "{error}"
        );
    }

    #[test]
    fn plain_http_token_urls_are_only_accepted_on_loopback() {
        let text = FULL.replace(
            "http://127.0.0.1:9000/token",
            "http://idp.example.com/token",
        );
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(
            error.contains("connections.local.token_url: must be an https URL"),
            "{error}"
        );
        for loopback in [
            "http://localhost:1/t",
            "http://[::1]:1/t",
            "http://127.0.0.2/t",
        ] {
            let text = FULL.replace("http://127.0.0.1:9000/token", loopback);
            parse_with(&text, &full_env()).expect(loopback);
        }
    }

    #[test]
    fn a_bad_url_is_reported_with_its_field() {
        let text = FULL.replace("https://login.contoso.com/oauth2/token", "not a url");
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(
            error.contains("connections.Contoso.token_url: not a valid URL"),
            "{error}"
        );
    }

    #[test]
    fn key_vault_is_required_when_a_connection_reads_from_it() {
        let text = FULL.replace("[key_vault]\n        uri = \"${KEY_VAULT_URI}\"\n        managed_identity_client_id = \"${MI_CLIENT_ID}\"", "");
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(error.contains("key_vault.uri: required"), "{error}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = FULL
            .replace("client_secret_post", "client_secret_jwt")
            .replace("http://127.0.0.1:9000/token", "ftp://x");
        let error = parse_with(&text, &full_env()).unwrap_err();
        assert_eq!(error.problems.len(), 2, "{error}");
    }

    #[test]
    fn reserved_form_fields_cannot_be_overridden() {
        let text = FULL.replace("tenant = \"x\"", "grant_type = \"password\"");
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(error.contains("extra_params.grant_type"), "{error}");
    }

    #[test]
    fn the_port_comes_from_the_host() {
        let mut pairs = full_env();
        pairs.push(("FUNCTIONS_CUSTOMHANDLER_PORT", "34567"));
        assert_eq!(parse_with(FULL, &pairs).unwrap().port, 34567);
        pairs.pop();
        pairs.push(("FUNCTIONS_CUSTOMHANDLER_PORT", "http"));
        assert!(parse_with(FULL, &pairs).is_err());
    }

    #[test]
    fn managed_identity_is_chosen_when_app_service_sets_its_variables() {
        let mut pairs = full_env();
        pairs.push(("IDENTITY_ENDPOINT", "http://127.0.0.1:41741/msi/token"));
        pairs.push(("IDENTITY_HEADER", "h"));
        assert_eq!(
            parse_with(FULL, &pairs).unwrap().identity,
            IdentitySettings::ManagedIdentity
        );
    }

    #[test]
    fn debug_output_never_shows_an_app_setting_secret() {
        let settings = parse_with(FULL, &full_env()).unwrap();
        let debug = format!("{settings:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("AppSetting(LOCAL_SECRET)"), "{debug}");
    }

    /// `FULL` with a `[callers]` section; `lists` goes into every connection.
    fn with_callers(callers: &str, lists: &str) -> String {
        let text = FULL.replace(
            "[connections.Contoso]",
            &format!("[callers]\n{callers}\n[connections.Contoso]"),
        );
        text.replace(
            "client_secret = { app_setting = \"LOCAL_SECRET\" }",
            &format!("client_secret = {{ app_setting = \"LOCAL_SECRET\" }}\n{lists}"),
        )
        .replace(
            "extra_params = { tenant = \"x\" }",
            &format!("extra_params = {{ tenant = \"x\" }}\n{lists}"),
        )
    }

    const JWT: &str = r#"mode = "jwt"
        issuer = "https://login.microsoftonline.com/t/v2.0"
        audience = "api://token-broker""#;

    #[test]
    fn identified_callers_need_every_connection_to_say_who_may_use_it() {
        let error = parse_with(&with_callers(JWT, ""), &full_env())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("connections.Contoso.allowed_callers: required in [callers] mode"),
            "{error}"
        );
        assert!(
            error.contains("connections.local.allowed_callers"),
            "{error}"
        );
        for lists in [
            r#"allowed_callers = ["*"]"#,
            r#"allowed_roles = ["Tokens.Contoso"]"#,
        ] {
            parse_with(&with_callers(JWT, lists), &full_env()).expect(lists);
        }
        // Lists without a caller mode restrict nobody, and say so.
        let error = parse_with(&with_callers("", r#"allowed_callers = ["*"]"#), &full_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains("need [callers] mode"), "{error}");
    }

    #[test]
    fn easy_auth_needs_app_service_authentication_on() {
        let text = with_callers(r#"mode = "easy_auth""#, r#"allowed_callers = ["*"]"#);
        let error = parse_with(&text, &full_env()).unwrap_err().to_string();
        assert!(error.contains("WEBSITE_AUTH_ENABLED"), "{error}");
        for off in ["false", "", "1"] {
            let mut pairs = full_env();
            pairs.push(("WEBSITE_AUTH_ENABLED", off));
            let error = parse_with(&text, &pairs).unwrap_err().to_string();
            assert!(error.contains("WEBSITE_AUTH_ENABLED"), "{off}: {error}");
        }
        for on in ["true", "True", "TRUE"] {
            let mut pairs = full_env();
            pairs.push(("WEBSITE_AUTH_ENABLED", on));
            let settings = parse_with(&text, &pairs).expect(on);
            assert!(matches!(settings.callers.mode, CallerMode::EasyAuth));
        }
    }

    #[test]
    fn issuer_and_audience_take_a_string_or_a_list_and_tenant_is_optional() {
        let callers = r#"mode = "jwt"
            issuer = ["https://sts.windows.net/${TENANT}/", "https://login.microsoftonline.com/${TENANT}/v2.0"]
            audience = ["api://token-broker", "6e1f3a2b-0000-4000-8000-00000000b20c"]
            tenant = "${TENANT}""#;
        let mut pairs = full_env();
        pairs.push(("TENANT", "72f988bf-86f1-41af-91ab-2d7cd011db47"));
        let settings =
            parse_with(&with_callers(callers, r#"allowed_callers = ["*"]"#), &pairs).unwrap();
        let CallerMode::Jwt {
            issuers,
            audiences,
            tenant,
            clock_skew,
            ..
        } = settings.callers.mode
        else {
            panic!("jwt mode expected");
        };
        assert_eq!(
            issuers,
            [
                "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
                "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
            ]
        );
        assert_eq!(audiences.len(), 2);
        assert_eq!(
            tenant.as_deref(),
            Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
        );
        assert_eq!(clock_skew, Duration::from_secs(60));
        let settings = parse_with(
            &with_callers(JWT, r#"allowed_callers = ["*"]"#),
            &full_env(),
        )
        .unwrap();
        assert!(matches!(
            settings.callers.mode,
            CallerMode::Jwt { ref issuers, ref audiences, tenant: None, .. }
                if issuers.len() == 1 && audiences.len() == 1
        ));
        let error = parse_with(
            &with_callers(
                r#"mode = "jwt"
                issuer = []
                audience = "api://token-broker""#,
                r#"allowed_callers = ["*"]"#,
            ),
            &full_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("needs issuer and audience"), "{error}");
    }

    #[test]
    fn clock_skew_is_bounded_and_jwt_settings_are_refused_in_other_modes() {
        let skewed = format!("{JWT}\nclock_skew_seconds = 301");
        let error = parse_with(
            &with_callers(&skewed, r#"allowed_callers = ["*"]"#),
            &full_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("callers.clock_skew_seconds: at most 300"),
            "{error}"
        );
        let at_most = format!("{JWT}\nclock_skew_seconds = 300");
        parse_with(
            &with_callers(&at_most, r#"allowed_callers = ["*"]"#),
            &full_env(),
        )
        .expect("300 is allowed");
        let mut pairs = full_env();
        pairs.push(("WEBSITE_AUTH_ENABLED", "true"));
        let error = parse_with(
            &with_callers(
                "mode = \"easy_auth\"\ntenant = \"t\"",
                r#"allowed_callers = ["*"]"#,
            ),
            &pairs,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("callers.tenant: only used in mode \"jwt\""),
            "{error}"
        );
    }

    #[test]
    fn scope_tokens_follow_rfc_6749() {
        assert!(is_valid_scope_token("api://contoso/.default"));
        assert!(!is_valid_scope_token("a b"));
        assert!(!is_valid_scope_token("a\"b"));
        assert!(!is_valid_scope_token("a\\b"));
        assert!(!is_valid_scope_token(""));
    }
}
