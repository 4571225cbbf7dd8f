//! The configuration file's shape, as serde reads it: the first of the two passes. Strings
//! here are still raw (`${NAME}` not yet expanded), so a shape error may quote field names but
//! never holds a setting's value.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) key_vault: Option<RawKeyVault>,
    #[serde(default)]
    pub(super) cache: RawCache,
    pub(super) callers: Option<RawCallers>,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
    #[serde(default)]
    pub(super) connections: BTreeMap<String, RawConnection>,
    pub(super) shared_cache: Option<RawSharedCache>,
}

/// `[shared_cache]`: the optional Redis tier shared by every instance.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSharedCache {
    pub(super) redis_url: String,
    /// Kept untyped for the same reason as `client_secret`: a literal key is refused unechoed.
    pub(super) encryption_key: Option<toml::Value>,
    pub(super) auth: Option<String>,
    pub(super) password: Option<toml::Value>,
    pub(super) username: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeyVault {
    pub(super) uri: String,
    pub(super) managed_identity_client_id: Option<String>,
    pub(super) verify_challenge_resource: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCallers {
    pub(super) mode: Option<String>,
    pub(super) issuer: Option<OneOrMany>,
    pub(super) audience: Option<OneOrMany>,
    pub(super) tenant: Option<String>,
    pub(super) jwks_uri: Option<String>,
    pub(super) clock_skew_seconds: Option<u64>,
}

/// A setting written as one string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) secret_ttl_seconds: Option<u64>,
    pub(super) max_tokens: Option<usize>,
    pub(super) secret_refusal_grace_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) stats_interval_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnection {
    /// Required unless `issuer` names where to discover it (mutual-TLS methods only).
    pub(super) token_url: Option<String>,
    /// Mutual-TLS methods: the issuer whose discovery document names the token endpoint (its
    /// `mtls_endpoint_aliases` entry first, RFC 8705 §5).
    pub(super) issuer: Option<String>,
    pub(super) client_id: String,
    /// Kept untyped so that a literal secret written here is refused without being echoed
    /// by a serde "invalid type" message.
    pub(super) client_secret: Option<toml::Value>,
    pub(super) auth_method: Option<String>,
    /// `private_key_jwt`: where the signing key is, as `{ key_vault_key = "..." }` or
    /// `{ key_vault_certificate = "..." }`.
    pub(super) client_assertion_key: Option<toml::Value>,
    pub(super) signing_algorithm: Option<String>,
    pub(super) assertion_audience: Option<String>,
    pub(super) assertion_lifetime_seconds: Option<u64>,
    pub(super) assertion_key_id: Option<String>,
    /// `tls_client_auth` / `self_signed_tls_client_auth`: `{ key_vault_certificate = "..." }`.
    pub(super) client_certificate: Option<toml::Value>,
    /// `managed_identity_federation`: the audience of the managed identity's token.
    pub(super) federation_audience: Option<String>,
    #[serde(default)]
    pub(super) scopes: Vec<String>,
    pub(super) audience: Option<String>,
    pub(super) resource: Option<String>,
    #[serde(default)]
    pub(super) extra_params: BTreeMap<String, String>,
    pub(super) default_lifetime_seconds: Option<u64>,
    pub(super) connect_timeout_seconds: Option<u64>,
    pub(super) timeout_seconds: Option<u64>,
    pub(super) max_retries: Option<u32>,
    pub(super) deadline_seconds: Option<u64>,
    pub(super) negative_cache_seconds: Option<u64>,
    pub(super) breaker_failures: Option<u32>,
    pub(super) breaker_open_seconds: Option<u64>,
    #[serde(default)]
    pub(super) allowed_callers: Vec<String>,
    #[serde(default)]
    pub(super) allowed_roles: Vec<String>,
    pub(super) allowed_scopes: Option<Vec<String>>,
    pub(super) allowed_audiences: Option<Vec<String>>,
    pub(super) allowed_resources: Option<Vec<String>>,
    pub(super) min_invalidation_interval_seconds: Option<u64>,
}

/// Form fields the broker sets itself; `extra_params` may not override them.
pub(super) const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
    "resource",
    "client_assertion",
    "client_assertion_type",
];
