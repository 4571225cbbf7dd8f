//! A connection's HTTP client when it authenticates by mutual TLS (RFC 8705): one client per
//! certificate version, so that pooled connections (each made with one handshake, and for a
//! key in Key Vault one signature there) are reused while the version stays, and a renewed
//! certificate is presented on new connections only. The previous version's client, and with
//! it its pool, is dropped when the last request using it ends.

use std::time::Duration;

use parking_lot::Mutex;

use crate::credentials::ClientCertificate;

pub(super) struct MutualTls {
    connect_timeout: Duration,
    current: Mutex<Option<Presenting>>,
}

struct Presenting {
    version: String,
    client: reqwest::Client,
}

impl MutualTls {
    pub(super) fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            current: Mutex::new(None),
        }
    }

    /// The client presenting `certificate`: the one in use when it is that version, else a new
    /// one (with its own, empty pool) that replaces it.
    pub(super) fn client(
        &self,
        connection: &str,
        certificate: &ClientCertificate,
    ) -> Result<reqwest::Client, String> {
        let mut current = self.current.lock();
        if let Some(presenting) = current.as_ref()
            && presenting.version == certificate.version()
        {
            return Ok(presenting.client.clone());
        }
        let client =
            crate::http_client::build_presenting(self.connect_timeout, certificate.certified())?;
        tracing::info!(
            connection,
            version = certificate.version(),
            previous_version = current.as_ref().map(|p| p.version.as_str()),
            x5t_s256 = certificate.thumbprint_sha256(),
            "presenting client certificate on new connections"
        );
        *current = Some(Presenting {
            version: certificate.version().to_string(),
            client: client.clone(),
        });
        Ok(client)
    }
}
