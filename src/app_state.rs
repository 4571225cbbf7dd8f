//! What every request handler shares, in a module of its own so that the handlers beside the
//! router (`rotation`) can use it without importing the router.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cache::{CacheKey, SharedTier, TokenCache};
use crate::caller_check::CallerCheck;
use crate::config::{ConnectionName, ConnectionSettings};
use crate::credentials::Credentials;
use crate::observe::stats::{ConnectionStats, connection_stats};
use crate::token_client::TokenClient;

/// What every request handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub cache: Arc<TokenCache>,
    pub credentials: Arc<Credentials>,
    pub callers: Arc<CallerCheck>,
    /// The token client behind the cache, held here so that a rotation event can reach its
    /// per-connection guards (a rotated secret must not stay refused by the negative cache).
    pub token_client: Arc<TokenClient>,
    /// Connections by lower-cased name.
    pub connections: Arc<BTreeMap<ConnectionName, ConnectionSettings>>,
    /// Each connection's cache key for its default scopes, built once: most requests name no
    /// scope, and this keeps their path free of allocations.
    pub default_keys: Arc<BTreeMap<ConnectionName, CacheKey>>,
    /// The shared Redis tier under the cache, when configured: a rotation event is announced
    /// through it to every instance.
    pub shared: Option<Arc<SharedTier>>,
    /// What each connection's requests observed (the last token handed out), for
    /// `/api/health`; looked up once here so a request does not search the stats registry.
    pub observed: Arc<BTreeMap<ConnectionName, Arc<ConnectionStats>>>,
}

impl AppState {
    pub(crate) fn new(
        cache: Arc<TokenCache>,
        credentials: Arc<Credentials>,
        callers: Arc<CallerCheck>,
        token_client: Arc<TokenClient>,
        connections: Arc<BTreeMap<ConnectionName, ConnectionSettings>>,
    ) -> Self {
        let default_keys = connections
            .iter()
            .map(|(key, connection)| (key.clone(), CacheKey::new(key, connection.scopes.clone())))
            .collect();
        let observed = connections
            .keys()
            .map(|key| (key.clone(), connection_stats(key.as_str())))
            .collect();
        Self {
            cache,
            credentials,
            callers,
            token_client,
            connections,
            default_keys: Arc::new(default_keys),
            shared: None,
            observed: Arc::new(observed),
        }
    }

    /// The same state with the shared tier the cache fetches through.
    pub(crate) fn with_shared_tier(mut self, shared: Option<Arc<SharedTier>>) -> Self {
        self.shared = shared;
        self
    }

    /// The connection called `name`, any casing, without allocating. Configured names are
    /// valid by construction, so a malformed name (a traversal attempt included) matches none.
    pub(crate) fn connection(&self, name: &str) -> Option<(&ConnectionName, &ConnectionSettings)> {
        // Names as configured (lower case) are found by one look-up; only another casing
        // needs the comparison with each.
        self.connections.get_key_value(name).or_else(|| {
            self.connections
                .iter()
                .find(|(key, _)| key.as_str().eq_ignore_ascii_case(name))
        })
    }
}
