//! What every request handler shares, in a module of its own so that the handlers beside the
//! router (`rotation`) can use it without importing the router.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cache::{CacheKey, Invalidator, SharedTier, TokenCache};
use crate::caller_check::CallerCheck;
use crate::config::{ConnectionName, ConnectionSettings};
use crate::credentials::Credentials;
use crate::observe::Observers;
use crate::observe::stats::ConnectionStats;
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
    /// Every connection by lower-cased name, with what a token request needs of it (found by
    /// one look-up per request): the one copy of the connections' settings the handlers read.
    pub served: Arc<BTreeMap<ConnectionName, Served>>,
    /// What requests report to: the counters and the audit's hit tallies.
    pub observers: Observers,
    /// The shared Redis tier under the cache, when configured: a rotation event is announced
    /// through it to every instance.
    pub shared: Option<Arc<SharedTier>>,
    /// Drops a token a backend refused, in both tiers (`POST .../invalidate`).
    pub invalidator: Arc<Invalidator>,
}

impl AppState {
    pub(crate) fn new(
        cache: Arc<TokenCache>,
        credentials: Arc<Credentials>,
        callers: Arc<CallerCheck>,
        token_client: Arc<TokenClient>,
        connections: Arc<BTreeMap<ConnectionName, ConnectionSettings>>,
        observers: Observers,
    ) -> Self {
        let served = connections
            .iter()
            .map(|(key, connection)| {
                let served = Served {
                    settings: connection.clone(),
                    default_key: CacheKey::new(key, connection.scopes.clone()),
                    observed: observers.stats.connection_stats(key.as_str()),
                };
                (key.clone(), served)
            })
            .collect();
        Self {
            invalidator: Arc::new(Invalidator::new(cache.clone(), None)),
            cache,
            credentials,
            callers,
            token_client,
            served: Arc::new(served),
            observers,
            shared: None,
        }
    }

    /// The same state with the shared tier the cache fetches through.
    pub(crate) fn with_shared_tier(mut self, shared: Option<Arc<SharedTier>>) -> Self {
        self.invalidator = Arc::new(Invalidator::new(self.cache.clone(), shared.clone()));
        self.shared = shared;
        self
    }

    /// The connection called `name`, any casing, without allocating. Configured names are
    /// valid by construction, so a malformed name (a traversal attempt included) matches none.
    pub(crate) fn connection(&self, name: &str) -> Option<(&ConnectionName, &Served)> {
        // Names as configured (lower case) are found by one look-up; only another casing
        // needs the comparison with each.
        self.served.get_key_value(name).or_else(|| {
            self.served
                .iter()
                .find(|(key, _)| key.as_str().eq_ignore_ascii_case(name))
        })
    }
}

/// One connection as its token requests use it: its settings, the cache key of its default
/// scopes (built once: most requests name no scope, and this keeps their path free of
/// allocations), and what its requests observed (the last token handed out) for
/// `/api/health`.
pub(crate) struct Served {
    pub settings: ConnectionSettings,
    pub default_key: CacheKey,
    pub observed: Arc<ConnectionStats>,
}
