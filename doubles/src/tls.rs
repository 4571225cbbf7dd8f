//! A throwaway certificate authority and a server certificate for `localhost`, `127.0.0.1`
//! and the extra host names a double answers for (a name under `vault.azure.net`, reached
//! through the CONNECT proxy double), so the Key Vault double can speak TLS: the Azure SDK refuses to send a bearer
//! token over plain http. The CA's PEM goes to a file that callers pass as `SSL_CERT_FILE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA written to disk and a TLS acceptor whose certificate it signed.
pub struct TestTls {
    pub ca_file: PathBuf,
    pub acceptor: TlsAcceptor,
}

/// Creates the CA in `dir` (as `ca.pem`) and a server certificate for loopback names and
/// `extra_names`.
pub fn create(
    dir: &Path,
    extra_names: &[&str],
) -> Result<TestTls, Box<dyn std::error::Error + Send + Sync>> {
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "token-broker test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem())?;

    let server_key = KeyPair::generate()?;
    let names = ["localhost", "127.0.0.1"]
        .iter()
        .chain(extra_names)
        .map(|name| name.to_string())
        .collect::<Vec<_>>();
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    // Beside the CA, for servers the tests start that read PEM files (redis-server's TLS).
    std::fs::write(dir.join("server-cert.pem"), server_cert.pem())?;
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem())?;

    let chain = vec![CertificateDer::from(server_cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TestTls {
        ca_file,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    })
}
