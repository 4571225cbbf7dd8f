//! A TLS-terminating gateway that checks client certificates in the handshake itself, as an
//! Application Gateway, nginx or a bank's API gateway in front of a provider's mTLS endpoint
//! does: a certificate the client CA did not issue is refused with a TLS alert, before any
//! HTTP. (The test provider's Node listener cannot show this: Node checks certificates after
//! the handshake and closes the socket without an alert.) What passes the gate meets no
//! provider: its requests are answered 503.

use std::path::Path;
use std::sync::Arc;

use axum::http::StatusCode;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::serve::{self, Server};

/// A running gate; dropping it stops it.
pub struct TlsGate {
    server: Server,
}

impl TlsGate {
    /// Serves TLS with the doubles' server certificate (`server-cert.pem` and `server-key.pem`
    /// in `dir`), requiring a client certificate that `client_ca` issued.
    pub async fn start(
        dir: &Path,
        client_ca: &Path,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(client_ca)?)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let chain = vec![CertificateDer::from_pem_file(dir.join("server-cert.pem"))?];
        let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem"))?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        let router = axum::Router::new().fallback(|| async { StatusCode::SERVICE_UNAVAILABLE });
        let server = serve::spawn(router, 0, Some(TlsAcceptor::from(Arc::new(config)))).await?;
        Ok(Self { server })
    }

    /// The token endpoint behind the gate.
    pub fn token_url(&self) -> String {
        format!("https://127.0.0.1:{}/token", self.server.address.port())
    }
}
