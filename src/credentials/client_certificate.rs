//! The client certificate of RFC 8705 mutual-TLS client authentication, read from Key Vault.
//!
//! Key Vault keeps a certificate as three objects of one name and version: the certificate
//! (public: `cer`, and the `policy` it was made by), its key (`kid`) and a secret (`sid`) that
//! holds the key beside the chain when the policy made the key exportable. So:
//! - **exportable key**: the secret is read once per version, as PEM (Key Vault converts a
//!   PKCS #12 secret when asked with `outContentType`), and its key becomes rustls' signing key
//!   in memory; the text it came in is dropped at once, never logged, never in `Debug`;
//! - **non-exportable key** (HSM-backed or not): the chain is `cer` alone and the handshake's
//!   signature is made by Key Vault's `sign` on the certificate's key ([`super::tls_key`]); the
//!   secret is never read, so the identity needs no right to it.
//!
//! The certificate's version names the whole: a renewal is a new version, which the token
//! client presents on new connections only.

use std::sync::Arc;

use azure_security_keyvault_certificates::models::{CurveName, KeyType};
use azure_security_keyvault_secrets::models::{ContentType, SecretClientGetSecretOptions};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Digest as _;
use tokio::time::Instant;

use super::cache::Versioned;
use super::error::{CredentialError, ObjectKind};
use super::tls_key::{KeyCurve, SignFailure, VaultTlsKey};
use super::vault::{Clients, classify};
use super::vault_crypto::{self, VaultCertificate};
use crate::observe::otel::Otel;

/// A certificate and its key, ready for the TLS handshake.
pub(crate) struct ClientCertificate {
    name: String,
    version: String,
    /// base64url SHA-256 of the leaf certificate's DER: the `x5t#S256` a provider binds the
    /// tokens it issues to (RFC 8705 §3.1).
    thumbprint_sha256: String,
    /// Whether the key stays in Key Vault (each handshake asks it to sign).
    key_in_vault: bool,
    certified: Arc<CertifiedKey>,
    /// Where a signature Key Vault refused during a handshake is reported.
    sign_failure: SignFailure,
}

impl ClientCertificate {
    /// The chain and key rustls presents.
    pub(crate) fn certified(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn thumbprint_sha256(&self) -> &str {
        &self.thumbprint_sha256
    }

    /// Why Key Vault did not sign for the last handshake that needed it, once: a failed
    /// connection with this set is the credential's failure, not the provider's.
    pub(crate) fn take_sign_failure(&self) -> Option<CredentialError> {
        self.sign_failure.take()
    }
}

impl Versioned for ClientCertificate {
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("x5t#S256", &self.thumbprint_sha256)
            .field("key_in_vault", &self.key_in_vault)
            .finish_non_exhaustive()
    }
}

/// Reads the latest version of certificate `name`: its metadata, and its key as the policy
/// says (the secret for an exportable one, a Key Vault signer otherwise).
pub(super) async fn read(
    clients: &Arc<Clients>,
    name: &str,
    otel: Option<Arc<Otel>>,
) -> Result<ClientCertificate, CredentialError> {
    let started = Instant::now();
    let unusable = |detail: &str| CredentialError::Unusable {
        kind: ObjectKind::Certificate,
        name: name.to_string(),
        detail: detail.to_string(),
    };
    let VaultCertificate {
        der,
        key_name,
        key_version,
        version,
        policy,
        ..
    } = vault_crypto::read_certificate(clients, name).await?;
    let leaf = CertificateDer::from(der);
    let key_properties = policy
        .and_then(|policy| policy.key_properties)
        .ok_or_else(|| unusable("the answer has no key properties (policy.key_props)"))?;
    let thumbprint_sha256 = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(leaf.as_ref()));
    let exportable = key_properties.exportable == Some(true);
    let sign_failure = SignFailure::default();
    // The key that stays in the vault, signing there; the chain is the leaf alone (`cer`).
    let in_vault = || -> Result<Arc<CertifiedKey>, CredentialError> {
        let curve = match (&key_properties.key_type, &key_properties.curve) {
            (Some(KeyType::Rsa | KeyType::RsaHsm), _) => KeyCurve::Rsa,
            (Some(KeyType::Ec | KeyType::EcHsm), Some(CurveName::P256)) => KeyCurve::P256,
            (Some(KeyType::Ec | KeyType::EcHsm), Some(CurveName::P384)) => KeyCurve::P384,
            (Some(KeyType::Ec | KeyType::EcHsm), Some(CurveName::P521)) => KeyCurve::P521,
            _ => {
                return Err(unusable(
                    "its key is neither RSA nor EC on P-256, P-384 or P-521, which TLS cannot sign with",
                ));
            }
        };
        let key = VaultTlsKey::new(
            clients.clone(),
            name,
            key_name.clone(),
            key_version.clone(),
            curve,
            otel.clone(),
            sign_failure.clone(),
        );
        Ok(Arc::new(CertifiedKey::new(
            vec![leaf.clone()],
            Arc::new(key),
        )))
    };
    let (certified, key_in_vault) = if exportable {
        let pem = read_secret(clients, name, &version).await?;
        match from_pem(&pem, &leaf) {
            Ok(certified) => (certified, false),
            // The policy says exportable, the version was made before it did: its key is
            // in the vault only, and signs there.
            Err(PemProblem::NoKey) => {
                tracing::warn!(
                    certificate = name,
                    version = %version,
                    "the certificate's policy makes its key exportable, but this version's secret holds no key: signing in key vault"
                );
                (in_vault()?, true)
            }
            Err(PemProblem::Unusable(detail)) => return Err(unusable(detail)),
        }
    } else {
        (in_vault()?, true)
    };
    tracing::info!(
        certificate = name,
        version = %version,
        x5t_s256 = %thumbprint_sha256,
        key = if key_in_vault { "in key vault" } else { "exportable" },
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read client certificate from key vault"
    );
    Ok(ClientCertificate {
        name: name.to_string(),
        version,
        thumbprint_sha256,
        key_in_vault,
        certified,
        sign_failure,
    })
}

/// The certificate's secret of `version`, as PEM whatever it was stored as.
async fn read_secret(
    clients: &Clients,
    name: &str,
    version: &str,
) -> Result<SecretString, CredentialError> {
    // The certificate's secret has the certificate's name: a refusal names the secret, and
    // the role reading it needs (Key Vault Secrets User).
    let failed = |error: azure_core::Error| classify(ObjectKind::Secret, name, &error);
    let options = SecretClientGetSecretOptions {
        secret_version: Some(version.to_string()),
        out_content_type: Some(ContentType::Pem),
        ..Default::default()
    };
    let secret = clients
        .secrets
        .get_secret(name, Some(options))
        .await
        .map_err(failed)?
        .into_model()
        .map_err(failed)?;
    secret
        .value
        .filter(|value| !value.is_empty())
        .map(SecretString::from)
        .ok_or_else(|| CredentialError::Unusable {
            kind: ObjectKind::Certificate,
            name: name.to_string(),
            detail: "its secret has no value".to_string(),
        })
}

/// Why a PEM secret gives no key for TLS.
#[derive(Debug, PartialEq, Eq)]
enum PemProblem {
    /// Certificates only: the version's key is not exportable.
    NoKey,
    Unusable(&'static str),
}

/// The key and chain of a PEM secret, `leaf` (the certificate Key Vault named) first. The key
/// must be the leaf's: a mismatch would fail every handshake with a less helpful message.
fn from_pem(
    pem: &SecretString,
    leaf: &CertificateDer<'static>,
) -> Result<Arc<CertifiedKey>, PemProblem> {
    let bytes = pem.expose_secret().as_bytes();
    let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|_| PemProblem::NoKey)?;
    let mut chain = vec![leaf.clone()];
    for certificate in CertificateDer::pem_slice_iter(bytes) {
        let certificate = certificate.map_err(|_| {
            PemProblem::Unusable("its secret holds a certificate that is not valid PEM")
        })?;
        if certificate != *leaf {
            chain.push(certificate);
        }
    }
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| PemProblem::Unusable("its private key is of a kind TLS cannot sign with"))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|_| {
        PemProblem::Unusable("the private key in its secret is not the certificate's key")
    })?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::engine::general_purpose::STANDARD;
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// A non-exportable key's secret holds certificates only: read as if exportable, it says
    /// so (and the key signs in Key Vault instead).
    #[test]
    fn a_secret_without_a_key_is_told_apart_from_an_unusable_one() {
        let leaf = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let text = SecretString::from(pem("CERTIFICATE", leaf.as_ref()));
        assert_eq!(from_pem(&text, &leaf).err(), Some(PemProblem::NoKey));
        let garbage = SecretString::from(format!(
            "{}-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            pem("PRIVATE KEY", &[0x30, 0x00])
        ));
        assert!(matches!(
            from_pem(&garbage, &leaf).err(),
            Some(PemProblem::Unusable(_))
        ));
    }
}
