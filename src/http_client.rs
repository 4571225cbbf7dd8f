//! The broker's one outgoing HTTP client, shared by the Azure SDK clients and the token
//! exchange so that the binary carries a single HTTP and TLS stack.
//!
//! TLS trust comes from the platform's roots, which `SSL_CERT_FILE` replaces when it is set
//! (private CAs, test doubles). Redirects are never followed: a token endpoint that redirects
//! is misconfigured, and following it would carry client credentials to another address.

use std::time::Duration;

/// Builds a client with the given connect timeout. The Azure SDK clients share one; each
/// connection's token endpoint gets its own, with its own connection pool, so that a slow or
/// dead identity provider cannot tie up connections another one needs.
/// Fails only when the TLS roots cannot be loaded.
pub fn build(connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}
