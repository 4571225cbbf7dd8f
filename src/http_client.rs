//! The broker's one outgoing HTTP client, shared by the Azure SDK clients and the token
//! exchange so that the binary carries a single HTTP and TLS stack.
//!
//! TLS trust comes from the platform's roots, which `SSL_CERT_FILE` replaces when it is set
//! (private CAs, test doubles). Redirects are never followed: a token endpoint that redirects
//! is misconfigured, and following it would carry client credentials to another address.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;

/// Builds a client with the given connect timeout. The Azure SDK clients share one; each
/// connection's token endpoint gets its own, with its own connection pool, so that a slow or
/// dead identity provider cannot tie up connections another one needs.
/// Fails only when the TLS roots cannot be loaded.
pub(crate) fn build(connect_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    builder(connect_timeout).build()
}

/// A client like [`build`]'s that presents `certificate` when a server asks for one (mutual
/// TLS, RFC 8705): reqwest's own rustls stack, given the client configuration reqwest would
/// make itself (the platform's roots through `rustls-platform-verifier`, so `SSL_CERT_FILE`
/// applies alike; HTTP/1.1) plus the certificate. Its key may sign inside Key Vault.
pub(crate) fn build_presenting(
    connect_timeout: Duration,
    certificate: Arc<CertifiedKey>,
) -> Result<reqwest::Client, String> {
    let (provider, verifier) = VERIFIER
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            rustls_platform_verifier::Verifier::new(provider.clone())
                .map(|verifier| (provider, Arc::new(verifier)))
                .map_err(|error| format!("cannot load the TLS roots: {error}"))
        })
        .clone()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("cannot configure TLS: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Presented(certificate)));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    builder(connect_timeout)
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|error| format!("cannot build the HTTP client: {error}"))
}

/// The crypto provider and the platform's verifier, made once: loading the roots reads files,
/// and each new certificate version builds a client.
type Verifying = (
    Arc<rustls::crypto::CryptoProvider>,
    Arc<rustls_platform_verifier::Verifier>,
);
static VERIFIER: std::sync::OnceLock<Result<Verifying, String>> = std::sync::OnceLock::new();

fn builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
}

/// The one certificate a client presents, whatever the server hints: a token endpoint that
/// asks for a certificate gets the connection's.
#[derive(Debug)]
struct Presented(Arc<CertifiedKey>);

impl ResolvesClientCert for Presented {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Only when the key can make one of the offered signatures; otherwise no certificate
        // is better than a handshake that fails on the signature.
        self.0.key.choose_scheme(schemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
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
