//! token-broker: an Azure Functions custom handler that hands out OAuth 2.0 access tokens.
//!
//! The modules follow a request along the data path:
//!
//! - [`routes`]: the HTTP API the Functions host forwards to (`/api/token/{connection}`, and
//!   [`health`] for operators), with [`error`] mapping every failure to the documented JSON
//!   contract;
//! - [`caller_check`]: who is asking (JWT or Easy Auth) and whether they may use the connection;
//! - [`cache`]: tokens in memory ([`token`]: what a fetch yields), refreshed ahead of expiry, one
//!   fetch per cold key, over an optional shared Redis tier that makes a fleet fetch once;
//! - [`token_client`]: the OAuth 2.0 client-credentials exchange (with [`token_response`]
//!   parsing what real identity providers send), retried and bounded, behind a per-connection
//!   [`upstream_guard`] (circuit breaker, retry budget, negative cache);
//! - [`credentials`]: what the broker authenticates with: a client secret from Key Vault,
//!   a client assertion signed inside Key Vault, or the managed identity's own token.
//!
//! Around them: [`config`] (the validated `broker.toml`), [`http_client`] (the one outgoing
//! HTTP stack), [`observe`] (what the broker says about itself: the JSON log pipeline, the
//! audit records of every token handed out, the counters written every interval; a leaf that
//! imports nothing from the domain), [`startup`] (wiring and the listener) and
//! [`rotation`] (Key Vault events that make a rotated secret, key or certificate take effect at once).

#![deny(unreachable_pub)]

// The binary's needs: the configuration, the listener, and the log pipeline it starts.
pub mod config;
pub mod observe;
pub mod startup;

mod app_state;
mod cache;
mod caller_check;
mod credentials;
mod error;
mod health;
mod http_client;
mod rotation;
mod routes;
mod single_flight;
mod token;
mod token_client;
mod token_response;
mod upstream_guard;

/// What the fuzz targets and their regression test reach past the public surface for: the
/// token endpoint's parser and the cache's insert, as a fetched token goes. Not an API.
#[doc(hidden)]
pub mod testing {
    pub use crate::cache::CachedToken;
    pub use crate::token::MAX_LIFETIME;
    pub use crate::token_response::parse as parse_token_response;
}
