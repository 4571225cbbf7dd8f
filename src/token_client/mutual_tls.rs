//! A connection's HTTP client when it authenticates by mutual TLS (RFC 8705): one client per
//! certificate version, so that pooled connections (each made with one handshake, and for a
//! key in Key Vault one signature there) are reused while the version stays, and a renewed
//! certificate is presented on new connections only: a version's connections never carry
//! another version. The two latest versions keep their clients; an older one's client, and
//! its pool, is dropped when the last request using it ends.

use std::time::Duration;

use parking_lot::Mutex;

use crate::credentials::ClientCertificate;

pub(super) struct MutualTls {
    connect_timeout: Duration,
    /// The clients of the last versions presented, newest last: the previous one stays while
    /// a fetch may still present it (a retry begun before a rotation, or the fallback to the
    /// previous version while a provider does not know the new one), so that neither rebuilds
    /// the other's client (and its pool, handshakes and signatures) again and again.
    presenting: Mutex<Vec<Presenting>>,
}

/// How many versions keep their client.
const KEPT_VERSIONS: usize = 2;

struct Presenting {
    version: String,
    client: reqwest::Client,
}

impl MutualTls {
    pub(super) fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            presenting: Mutex::new(Vec::new()),
        }
    }

    /// The client presenting `certificate`: the one made for that version, else a new one
    /// (with its own, empty pool), built outside the lock.
    pub(super) fn client(
        &self,
        connection: &str,
        certificate: &ClientCertificate,
    ) -> Result<reqwest::Client, String> {
        if let Some(client) = self.find(certificate.version()) {
            return Ok(client);
        }
        let client =
            crate::http_client::build_presenting(self.connect_timeout, certificate.certified())?;
        let mut presenting = self.presenting.lock();
        if let Some(built) = presenting
            .iter()
            .find(|p| p.version == certificate.version())
        {
            // Another fetch built it meanwhile: one pool per version.
            return Ok(built.client.clone());
        }
        tracing::info!(
            connection,
            version = certificate.version(),
            previous_version = presenting.last().map(|p| p.version.as_str()),
            x5t_s256 = certificate.thumbprint_sha256(),
            "presenting client certificate on new connections"
        );
        presenting.push(Presenting {
            version: certificate.version().to_string(),
            client: client.clone(),
        });
        if presenting.len() > KEPT_VERSIONS {
            presenting.remove(0);
        }
        Ok(client)
    }

    fn find(&self, version: &str) -> Option<reqwest::Client> {
        self.presenting
            .lock()
            .iter()
            .find(|p| p.version == version)
            .map(|p| p.client.clone())
    }
}
