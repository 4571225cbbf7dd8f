//! The validated configuration the broker runs with: what `parse` makes of the file, and what
//! every stage reads.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::types::{ConnectionName, EndpointUrl, ScopeToken};

/// Where the configuration file is read from when `TOKEN_BROKER_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "broker.toml";
/// Port used when the Functions host did not pass `FUNCTIONS_CUSTOMHANDLER_PORT`.
pub const DEFAULT_PORT: u16 = 8080;

/// The validated configuration the broker runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    pub key_vault: Option<KeyVaultSettings>,
    pub identity: IdentitySettings,
    pub cache: CacheSettings,
    pub callers: CallerSettings,
    pub telemetry: TelemetrySettings,
    /// Connections by their lower-cased name: the URL's casing is the client's.
    pub connections: BTreeMap<ConnectionName, ConnectionSettings>,
    /// The Redis tier every instance shares; `None` keeps each instance to its own memory.
    pub shared_cache: Option<SharedCacheSettings>,
}

/// `[shared_cache]`: where the fleet's shared, encrypted token tier lives.
#[derive(Clone)]
pub struct SharedCacheSettings {
    /// `redis://` or `rediss://` (TLS), host and port, or a socket on this machine
    /// (`redis+unix:///path`), with no credentials in it; plain `redis://` with `auth` other
    /// than `none` only on loopback.
    pub redis_url: Url,
    /// Base64 of 32 random bytes: seals the values and keys the hashed key names.
    pub encryption_key: SecretSource,
    pub auth: RedisAuth,
    /// Every key the broker writes starts with this and a colon.
    pub key_prefix: String,
    /// Bound on one Redis operation; past it Redis counts as absent.
    pub timeout: Duration,
}

impl fmt::Debug for SharedCacheSettings {
    // By hand, like `ConnectionSettings`: the key and the password must never be printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCacheSettings")
            .field("redis_url", &self.redis_url.as_str())
            .field("encryption_key", &self.encryption_key)
            .field("auth", &self.auth)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How the broker authenticates to Redis.
#[derive(Clone, Debug)]
pub enum RedisAuth {
    None,
    /// `AUTH [username] password`, the password from Key Vault or an app setting.
    Password {
        username: Option<String>,
        password: SecretSource,
    },
    /// Microsoft Entra: the managed identity's token for Redis as the password, its object id
    /// as the user name (Azure Managed Redis, Azure Cache for Redis with Entra enabled).
    Entra {
        username: String,
    },
}

/// Bytes in a shared cache encryption key (AES-256).
pub const ENCRYPTION_KEY_BYTES: usize = 32;

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
        jwks_uri: Option<EndpointUrl>,
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

/// Default of `[telemetry] stats_interval_seconds`: one `stats` line a minute per instance is
/// what Application Insights' per-minute charts need, and costs nothing worth counting.
pub const DEFAULT_STATS_INTERVAL_SECONDS: u64 = 60;
/// Bounds of `stats_interval_seconds`: at least a second, at most an hour.
pub const STATS_INTERVAL_SECONDS: std::ops::RangeInclusive<u64> = 1..=3600;

/// `[telemetry]`: what the broker reports about itself besides its log and audit lines.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// How often the `stats` line is written.
    pub stats_interval: Duration,
}

/// One OAuth client the broker obtains tokens for.
#[derive(Clone)]
pub struct ConnectionSettings {
    /// The name as written in the configuration file.
    pub name: String,
    /// The token endpoint; with `issuer`, the issuer itself until the token client has read
    /// the endpoint from its discovery document (it stays the connection's identity).
    pub token_url: EndpointUrl,
    /// Where the token endpoint is discovered (mutual-TLS methods only): https, its discovery
    /// document's `mtls_endpoint_aliases.token_endpoint` preferred.
    pub issuer: Option<EndpointUrl>,
    pub client_id: String,
    /// What the broker authenticates with: a secret, a signed assertion or the managed
    /// identity's token; matches `auth_method`.
    pub credential: CredentialSource,
    pub auth_method: AuthMethod,
    pub scopes: Vec<ScopeToken>,
    /// The `audience` sent when a request names none.
    pub audience: Option<String>,
    /// The `resource` (RFC 8707) sent when a request names none.
    pub resource: Option<String>,
    /// Audiences a request may choose with `audience=`; the default alone when not configured.
    pub allowed_audiences: Vec<String>,
    /// Resources a request may choose with `resource=`; the default alone when not configured.
    pub allowed_resources: Vec<String>,
    pub extra_params: BTreeMap<String, String>,
    /// Callers allowed to use this connection, by object id (`oid`) or client id (`azp`,
    /// `appid`); `"*"` is any authenticated caller.
    pub allowed_callers: Vec<String>,
    /// Roles (`roles` claim) allowed to use this connection.
    pub allowed_roles: Vec<String>,
    /// Scopes a caller may ask for; the default scopes when not configured.
    pub allowed_scopes: Vec<ScopeToken>,
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
    /// Shortest time between two invalidations of one cache key (fleet-wide with the shared
    /// tier): a backend that refuses every token cannot make the broker hammer its provider.
    pub min_invalidation_interval: Duration,
}

impl fmt::Debug for ConnectionSettings {
    // Written by hand so that an app-setting secret can never be printed, even by a careless
    // `{:?}` somewhere up the stack.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("name", &self.name)
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("credential", &self.credential)
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

/// How the client authenticates at the token endpoint: RFC 6749 §2.3.1 with a secret, or
/// RFC 7523 §2.2 with a client assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    /// A JWT signed by a Key Vault key (or a certificate's key) that never leaves the vault.
    PrivateKeyJwt,
    /// Entra only: the managed identity's own token, as a federated credential of the app.
    ManagedIdentityFederation,
    /// RFC 8705 §2.1: a CA-issued certificate from Key Vault, presented in the TLS handshake;
    /// the provider matches its subject or a SAN.
    TlsClientAuth,
    /// RFC 8705 §2.2: a self-signed certificate from Key Vault the provider holds itself.
    SelfSignedTlsClientAuth,
}

impl AuthMethod {
    /// The RFC 8705 methods: the client certificate in the TLS handshake authenticates.
    pub fn is_mutual_tls(self) -> bool {
        matches!(
            self,
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
            AuthMethod::ManagedIdentityFederation => "managed_identity_federation",
        }
    }
}

/// What a connection authenticates with.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// `client_secret_basic` and `client_secret_post`.
    Secret(SecretSource),
    /// `private_key_jwt`.
    Assertion(AssertionSettings),
    /// `managed_identity_federation`: the managed identity's token for `audience`.
    Federation { audience: String },
    /// `tls_client_auth` and `self_signed_tls_client_auth`: the Key Vault certificate (and its
    /// key, exportable or not) presented in the TLS handshake with the token endpoint.
    ClientCertificate { certificate_name: String },
}

/// Default `federation_audience`: Entra's public cloud (other clouds name their own).
pub const DEFAULT_FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Default and largest `assertion_lifetime_seconds`: Auth0 accepts at most 5 minutes, Entra
/// and RFC 7523 deployments commonly 10.
pub const DEFAULT_ASSERTION_LIFETIME_SECONDS: u64 = 300;
pub const MAX_ASSERTION_LIFETIME_SECONDS: u64 = 600;

/// How a `private_key_jwt` connection's assertions are made.
#[derive(Debug, Clone)]
pub struct AssertionSettings {
    pub key: AssertionKey,
    /// `None`: chosen from the key (RSA RS256, EC by curve) or PS256 for a certificate.
    pub algorithm: Option<SigningAlgorithm>,
    /// The `aud` claim: the token URL unless configured.
    pub audience: String,
    pub lifetime: Duration,
    /// The header's `kid`; `None`: the Key Vault key id (keys) or none (certificates).
    pub key_id: Option<String>,
}

/// Which Key Vault object signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssertionKey {
    KeyVaultKey(String),
    /// The certificate's key signs; the header carries the certificate's `x5t#S256`.
    KeyVaultCertificate(String),
}

/// JWS algorithms Key Vault can sign with (RFC 7518 §3.1), asymmetric only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlgorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    Es512,
}

impl SigningAlgorithm {
    pub const ALL: [SigningAlgorithm; 9] = [
        SigningAlgorithm::Rs256,
        SigningAlgorithm::Rs384,
        SigningAlgorithm::Rs512,
        SigningAlgorithm::Ps256,
        SigningAlgorithm::Ps384,
        SigningAlgorithm::Ps512,
        SigningAlgorithm::Es256,
        SigningAlgorithm::Es384,
        SigningAlgorithm::Es512,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::Rs256 => "RS256",
            SigningAlgorithm::Rs384 => "RS384",
            SigningAlgorithm::Rs512 => "RS512",
            SigningAlgorithm::Ps256 => "PS256",
            SigningAlgorithm::Ps384 => "PS384",
            SigningAlgorithm::Ps512 => "PS512",
            SigningAlgorithm::Es256 => "ES256",
            SigningAlgorithm::Es384 => "ES384",
            SigningAlgorithm::Es512 => "ES512",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.as_str() == name)
    }

    /// Whether an RSA key signs with it (else an EC key does).
    pub fn is_rsa(self) -> bool {
        !matches!(
            self,
            SigningAlgorithm::Es256 | SigningAlgorithm::Es384 | SigningAlgorithm::Es512
        )
    }
}
