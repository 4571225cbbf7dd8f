//! The memory tier's key: what makes two tokens differ (the connection, the scopes, the chosen
//! audience and resource), hashed once when the key is made.

use std::sync::Arc;

use crate::config::{ConnectionName, ScopeToken};

impl From<&CacheKey> for CacheKey {
    /// What the map stores when a key is first seen (`HashMap::entry_ref`).
    fn from(key: &CacheKey) -> Self {
        key.clone()
    }
}

/// A connection (lower-cased name), a sorted, de-duplicated scope set, and the audience and
/// resource a request chose when they differ from the connection's defaults.
#[derive(Clone, Debug, Eq)]
pub(crate) struct CacheKey {
    connection: ConnectionName,
    scopes: Arc<[ScopeToken]>,
    /// The request's `audience` and `resource` (RFC 8707), only where they differ from the
    /// connection's: a request that names the default shares the default's entry.
    target: Option<Arc<Target>>,
    /// The scopes joined by spaces, for the audit line; computed once per key, not per request.
    display: Arc<str>,
    /// A digest of the connection, the scopes and the target, computed once: what the key
    /// hashes as, so that a look-up (two per request on the slow path, one on the fast one)
    /// hashes a word, not the names.
    digest: u64,
}

/// The audience and resource a request chose instead of its connection's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub(crate) struct Target {
    pub audience: Option<String>,
    pub resource: Option<String>,
}

impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

/// The connection, the scopes and the target decide; the same key (one of the defaults,
/// built once) is recognised by its allocation before any name is compared.
impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
            && (Arc::ptr_eq(&self.scopes, &other.scopes) || self.scopes == other.scopes)
            && self.connection == other.connection
            && self.target == other.target
    }
}

/// One hasher state for every key's digest, so that equal keys digest equally.
static DIGEST: std::sync::LazyLock<hashbrown::DefaultHashBuilder> =
    std::sync::LazyLock::new(hashbrown::DefaultHashBuilder::default);

impl CacheKey {
    pub(crate) fn new(
        connection: &ConnectionName,
        scopes: impl IntoIterator<Item = ScopeToken>,
    ) -> Self {
        Self::with_target(connection, scopes, None)
    }

    /// A key for a request that chose `target` (`None`, or a target with neither field,
    /// for the connection's defaults).
    pub(crate) fn with_target(
        connection: &ConnectionName,
        scopes: impl IntoIterator<Item = ScopeToken>,
        target: Option<Target>,
    ) -> Self {
        let mut scopes: Vec<ScopeToken> = scopes.into_iter().collect();
        scopes.sort();
        scopes.dedup();
        let target = target
            .filter(|target| target.audience.is_some() || target.resource.is_some())
            .map(Arc::new);
        let display = scopes
            .iter()
            .map(ScopeToken::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        let digest = {
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut hasher = DIGEST.build_hasher();
            connection.hash(&mut hasher);
            scopes.hash(&mut hasher);
            target.hash(&mut hasher);
            hasher.finish()
        };
        Self {
            connection: connection.clone(),
            display: Arc::from(display),
            scopes: Arc::from(scopes),
            target,
            digest,
        }
    }

    /// The scopes joined by spaces.
    pub(crate) fn scopes_display(&self) -> &str {
        &self.display
    }

    pub(crate) fn connection(&self) -> &str {
        self.connection.as_str()
    }

    pub(crate) fn scopes(&self) -> &[ScopeToken] {
        &self.scopes
    }

    /// The audience this key's request chose instead of the connection's, if any.
    pub(crate) fn audience(&self) -> Option<&str> {
        self.target.as_ref()?.audience.as_deref()
    }

    /// The resource this key's request chose instead of the connection's, if any.
    pub(crate) fn resource(&self) -> Option<&str> {
        self.target.as_ref()?.resource.as_deref()
    }
}
