//! The token cache, in two tiers.
//!
//! - [`memory`]: each instance's own tokens, refreshed ahead of expiry, one fetch per cold
//!   key; every request is served from here when it can be.
//! - [`shared`]: an optional Redis tier under it (`[shared_cache]`), so that a fleet of
//!   instances fetches each token once, refreshes it once, and hears of rotations; values are
//!   sealed and key names hashed ([`seal`]), and Redis trouble never reaches a caller
//!   ([`redis_link`]). Entra authentication to Azure's Redis lives in [`entra`].
//! - [`invalidation`]: dropping a token a backend refused, verified against the cached one.
//!
//! The cache depends only on the leaf module [`crate::token`] for what a fetch yields, never
//! on the OAuth client above it.

pub(crate) mod entra;
mod hot;
mod invalidation;
pub(crate) mod memory;
pub(crate) mod redis_link;
pub(crate) mod seal;
pub(crate) mod shared;

pub(crate) use invalidation::{Invalidation, Invalidator};
pub use memory::CachedToken;
pub(crate) use memory::fingerprint;
pub(crate) use memory::{CacheKey, CacheOutcome, Target, TokenCache, TokenSource, panic_message};
pub(crate) use shared::{Announced, SharedTier, SharedTierParts};
