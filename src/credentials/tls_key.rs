//! A TLS client key that never leaves Key Vault: rustls asks it for the handshake's signature
//! (TLS 1.3 `CertificateVerify`, or TLS 1.2's), and it asks Key Vault's `sign` on the
//! certificate's key. The hash is computed here; only the digest goes to the vault.
//!
//! rustls signs synchronously, inside the handshake, while Key Vault answers over the network.
//! The signer therefore blocks its worker thread for the call, after telling the runtime
//! (`block_in_place`, which moves the worker's other tasks to another thread) so that the
//! broker keeps serving meanwhile; the call has its own time bound, since nothing outside can
//! interrupt a blocked thread. A signature is made once per new TLS connection to the token
//! endpoint (connections are pooled), never per request a cache answers.

use std::sync::Arc;
use std::time::Duration;

use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::error::{CredentialError, ObjectKind};
use super::vault::Clients;
use super::vault_crypto;
use crate::config::SigningAlgorithm;
use crate::observe::otel::Otel;

/// Longest one handshake signature may take in Key Vault; past it the handshake fails, and the
/// token request with it, as a credential that could not be used ([`SignFailure`]).
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of key the certificate has, as its Key Vault policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyCurve {
    Rsa,
    P256,
    P384,
    P521,
}

impl KeyCurve {
    /// TLS signature schemes this key can make, most preferred first: RSA-PSS before PKCS #1
    /// v1.5 (TLS 1.3 allows only PSS in `CertificateVerify`), each ECDSA curve with its hash.
    fn schemes(self) -> &'static [(SignatureScheme, SigningAlgorithm)] {
        use SignatureScheme as S;
        use SigningAlgorithm as A;
        match self {
            KeyCurve::Rsa => &[
                (S::RSA_PSS_SHA256, A::Ps256),
                (S::RSA_PSS_SHA384, A::Ps384),
                (S::RSA_PSS_SHA512, A::Ps512),
                (S::RSA_PKCS1_SHA256, A::Rs256),
                (S::RSA_PKCS1_SHA384, A::Rs384),
                (S::RSA_PKCS1_SHA512, A::Rs512),
            ],
            KeyCurve::P256 => &[(S::ECDSA_NISTP256_SHA256, A::Es256)],
            KeyCurve::P384 => &[(S::ECDSA_NISTP384_SHA384, A::Es384)],
            KeyCurve::P521 => &[(S::ECDSA_NISTP521_SHA512, A::Es512)],
        }
    }
}

/// The certificate's key in Key Vault, as rustls' signing key.
pub(crate) struct VaultTlsKey {
    key: Arc<KeyInVault>,
}

/// The last signature Key Vault refused or did not make, kept for the token client: rustls
/// can only report a failed handshake, which would read as the provider's failure; with this
/// the token client answers what it is, a credential that could not be used, and neither
/// retries it nor counts it against the provider.
#[derive(Clone, Default)]
pub(crate) struct SignFailure(Arc<parking_lot::Mutex<Option<CredentialError>>>);

impl SignFailure {
    /// The failure since the last call, if any.
    pub(crate) fn take(&self) -> Option<CredentialError> {
        self.0.lock().take()
    }

    fn set(&self, error: CredentialError) {
        *self.0.lock() = Some(error);
    }
}

struct KeyInVault {
    clients: Arc<Clients>,
    /// The certificate's name, for messages.
    certificate: String,
    key_name: String,
    key_version: String,
    curve: KeyCurve,
    otel: Option<Arc<Otel>>,
    /// Longest one signature may block its thread: nothing outside can interrupt it. (The
    /// handshake as a whole must also end within the connection's connect timeout, which the
    /// connection checks once the signature is back.)
    timeout: Duration,
    failure: SignFailure,
}

impl VaultTlsKey {
    pub(super) fn new(
        clients: Arc<Clients>,
        certificate: &str,
        key_name: String,
        key_version: String,
        curve: KeyCurve,
        otel: Option<Arc<Otel>>,
        failure: SignFailure,
    ) -> Self {
        Self {
            key: Arc::new(KeyInVault {
                clients,
                certificate: certificate.to_string(),
                key_name,
                key_version,
                curve,
                otel,
                timeout: SIGN_TIMEOUT,
                failure,
            }),
        }
    }
}

impl std::fmt::Debug for VaultTlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultTlsKey")
            .field("certificate", &self.key.certificate)
            .field("key_version", &self.key.key_version)
            .field("curve", &self.key.curve)
            .finish()
    }
}

impl SigningKey for VaultTlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let (scheme, algorithm) = self
            .key
            .curve
            .schemes()
            .iter()
            .find(|(scheme, _)| offered.contains(scheme))?;
        Some(Box::new(VaultSigner {
            key: self.key.clone(),
            scheme: *scheme,
            algorithm: *algorithm,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.key.curve {
            KeyCurve::Rsa => SignatureAlgorithm::RSA,
            KeyCurve::P256 | KeyCurve::P384 | KeyCurve::P521 => SignatureAlgorithm::ECDSA,
        }
    }
}

struct VaultSigner {
    key: Arc<KeyInVault>,
    scheme: SignatureScheme,
    algorithm: SigningAlgorithm,
}

impl std::fmt::Debug for VaultSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSigner")
            .field("certificate", &self.key.certificate)
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl Signer for VaultSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let failed = |reason: String| {
            tracing::warn!(certificate = %self.key.certificate, %reason, "the TLS client certificate's key could not sign in key vault");
            rustls::Error::General(format!(
                "Key Vault could not sign for certificate '{}'",
                self.key.certificate
            ))
        };
        let handle = Handle::try_current().map_err(|_| failed("no runtime".to_string()))?;
        if handle.runtime_flavor() == RuntimeFlavor::CurrentThread {
            return Err(failed(
                "a signature inside the handshake needs the multi-thread runtime".to_string(),
            ));
        }
        let timeout = self.key.timeout;
        let signed = tokio::task::block_in_place(|| {
            handle.block_on(tokio::time::timeout(timeout, self.sign_in_vault(message)))
        });
        let result = match signed {
            Ok(result) => result,
            Err(_) => Err(CredentialError::Unavailable {
                kind: ObjectKind::Key,
                name: self.key.key_name.clone(),
                detail: format!("no signature within {} ms", timeout.as_millis()),
            }),
        };
        if let Some(otel) = &self.key.otel {
            otel.key_vault("sign", if result.is_ok() { "ok" } else { "error" });
        }
        result.map_err(|error| {
            let reason = error.to_string();
            self.key.failure.set(error);
            failed(reason)
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

impl VaultSigner {
    async fn sign_in_vault(&self, message: &[u8]) -> Result<Vec<u8>, CredentialError> {
        let key = &self.key;
        let started = tokio::time::Instant::now();
        let signature = vault_crypto::sign(
            &key.clients,
            (&key.key_name, &key.key_version),
            self.algorithm,
            message,
        )
        .await?;
        tracing::debug!(
            certificate = %key.certificate,
            version = %key.key_version,
            algorithm = self.algorithm.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "TLS handshake signed by key vault"
        );
        Ok(match key.curve {
            // Key Vault answers ECDSA as raw `R || S` (JWS's form); TLS wants the DER
            // `Ecdsa-Sig-Value` (RFC 8446 §4.2.3, RFC 3279 §2.2.3).
            KeyCurve::P256 | KeyCurve::P384 | KeyCurve::P521 => ecdsa_der(&signature),
            KeyCurve::Rsa => signature,
        })
    }
}

/// Raw `R || S` (two equal halves) as DER `SEQUENCE { r INTEGER, s INTEGER }`.
fn ecdsa_der(raw: &[u8]) -> Vec<u8> {
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = integer(r);
    body.extend(integer(s));
    let mut der = vec![0x30];
    der.extend(length(body.len()));
    der.extend(body);
    der
}

/// A non-negative big-endian integer as DER: leading zeros dropped, one added when the top bit
/// is set (it would read as negative).
fn integer(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    let trimmed = &bytes[start..];
    let mut value = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
        value.push(0);
    }
    value.extend_from_slice(trimmed);
    let mut der = vec![0x02];
    der.extend(length(value.len()));
    der.extend(value);
    der
}

/// A DER length: short form below 128, else long form (one or two bytes suffice here).
fn length(len: usize) -> Vec<u8> {
    match len {
        0..=0x7f => vec![len as u8],
        0x80..=0xff => vec![0x81, len as u8],
        _ => vec![0x82, (len >> 8) as u8, len as u8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};

    /// Key Vault's raw form turned into DER verifies with the DER verifier, for every curve,
    /// over many keys (so that high bits and leading zeros both occur).
    #[test]
    fn raw_ecdsa_signatures_become_der_that_verifies() {
        let random = SystemRandom::new();
        for (fixed, verify) in [
            (
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &signature::ECDSA_P256_SHA256_ASN1,
            ),
            (
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &signature::ECDSA_P384_SHA384_ASN1,
            ),
            (
                &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
                &signature::ECDSA_P521_SHA512_ASN1,
            ),
        ] {
            for round in 0..64u8 {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(fixed, &random).unwrap();
                let key = EcdsaKeyPair::from_pkcs8(fixed, pkcs8.as_ref()).unwrap();
                let message = [round; 32];
                let raw = key.sign(&random, &message).unwrap();
                UnparsedPublicKey::new(verify, key.public_key().as_ref())
                    .verify(&message, &ecdsa_der(raw.as_ref()))
                    .expect("DER from raw verifies");
            }
        }
    }

    #[test]
    fn integers_drop_leading_zeros_and_keep_a_sign_byte() {
        assert_eq!(integer(&[0, 0, 0x7f]), vec![0x02, 1, 0x7f]);
        assert_eq!(integer(&[0, 0x80]), vec![0x02, 2, 0, 0x80]);
        assert_eq!(integer(&[0, 0]), vec![0x02, 1, 0]);
        assert_eq!(length(200), vec![0x81, 200]);
    }

    #[test]
    fn only_the_schemes_the_key_can_make_are_chosen() {
        let offered_ec = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let rsa: Vec<_> = KeyCurve::Rsa.schemes().iter().map(|(s, _)| *s).collect();
        assert!(!rsa.iter().any(|s| offered_ec.contains(s)));
        assert_eq!(
            KeyCurve::Rsa.schemes()[0].0,
            SignatureScheme::RSA_PSS_SHA256
        );
        assert_eq!(
            KeyCurve::P384.schemes(),
            &[(
                SignatureScheme::ECDSA_NISTP384_SHA384,
                SigningAlgorithm::Es384
            )]
        );
    }
}
