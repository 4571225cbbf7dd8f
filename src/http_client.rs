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
pub(crate) fn build(connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// A client built on first use. Loading the TLS roots takes milliseconds per client, and the
/// Functions host's readiness probe (and so every cold start) should not wait for them.
pub(crate) struct LazyClient {
    connect_timeout: Duration,
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl LazyClient {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            client: std::sync::OnceLock::new(),
        }
    }

    /// The client, built now if this is the first use.
    pub(crate) fn get(&self) -> Result<&reqwest::Client, &str> {
        self.client
            .get_or_init(|| {
                build(self.connect_timeout)
                    .map_err(|error| format!("cannot build the HTTP client: {error}"))
            })
            .as_ref()
            .map_err(String::as_str)
    }
}
