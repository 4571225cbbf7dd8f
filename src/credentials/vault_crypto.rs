//! What the broker asks Key Vault of certificates and keys, for both uses of them (the
//! `private_key_jwt` assertion and the mutual-TLS handshake): a certificate's public part, and
//! a signature over a digest made by a key that never leaves the vault.

use azure_security_keyvault_certificates::models::{
    CertificateClientGetCertificateOptions, CertificatePolicy,
};
use azure_security_keyvault_keys::models::{
    KeyClientSignOptions, SignParameters, SignatureAlgorithm,
};
use sha2::Digest as _;

use super::error::{CredentialError, ObjectKind};
use super::vault::{Clients, classify};
use crate::config::SigningAlgorithm;

/// A certificate's public part as Key Vault answers it.
pub(super) struct VaultCertificate {
    /// The leaf certificate, DER.
    pub(super) der: Vec<u8>,
    /// The full id of the key that signs for it, `https://{vault}/keys/{name}/{version}`.
    pub(super) key_id: String,
    pub(super) key_name: String,
    pub(super) key_version: String,
    /// The certificate's version (its key's when the answer names none).
    pub(super) version: String,
    /// The certificate's current policy: how its key is kept.
    pub(super) policy: Option<CertificatePolicy>,
}

/// Reads the latest version of certificate `name`.
pub(super) async fn read_certificate(
    clients: &Clients,
    name: &str,
) -> Result<VaultCertificate, CredentialError> {
    let failed = |error: azure_core::Error| classify(ObjectKind::Certificate, name, &error);
    let certificate = clients
        .certificates
        .get_certificate(name, None::<CertificateClientGetCertificateOptions<'_>>)
        .await
        .map_err(failed)?
        .into_model()
        .map_err(failed)?;
    let unusable = |detail: &str| CredentialError::Unusable {
        kind: ObjectKind::Certificate,
        name: name.to_string(),
        detail: detail.to_string(),
    };
    let der = certificate
        .cer
        .filter(|der| !der.is_empty())
        .ok_or_else(|| unusable("the answer has no certificate (cer)"))?;
    let key_id = certificate
        .kid
        .ok_or_else(|| unusable("the certificate names no key (kid)"))?;
    let (key_name, key_version) =
        key_name_and_version(&key_id).ok_or_else(|| unusable("the kid is not a key URL"))?;
    let version = certificate
        .id
        .as_deref()
        .and_then(|id| id.trim_end_matches('/').rsplit('/').next())
        .map_or_else(|| key_version.clone(), str::to_string);
    Ok(VaultCertificate {
        der,
        key_id,
        key_name,
        key_version,
        version,
        policy: certificate.policy,
    })
}

/// Key Vault's signature with key `key_name` at `key_version` over the digest of `message`
/// for `algorithm` (one sign operation), checked for the length the algorithm gives. Errors
/// name the key (a certificate's key has the certificate's name), so that a refusal points at
/// the role signing needs, Key Vault Crypto User.
pub(super) async fn sign(
    clients: &Clients,
    (key_name, key_version): (&str, &str),
    algorithm: SigningAlgorithm,
    message: &[u8],
) -> Result<Vec<u8>, CredentialError> {
    let (kind, name) = (ObjectKind::Key, key_name);
    let failed = |error: azure_core::Error| classify(kind, name, &error);
    let parameters = SignParameters {
        algorithm: Some(sdk_algorithm(algorithm)),
        value: Some(digest(algorithm, message)),
    };
    let options = KeyClientSignOptions {
        key_version: Some(key_version.to_string()),
        ..Default::default()
    };
    clients
        .keys
        .sign(
            key_name,
            parameters.try_into().map_err(failed)?,
            Some(options),
        )
        .await
        .map_err(failed)?
        .into_model()
        .map_err(failed)?
        .result
        .filter(|signature| signature_fits(algorithm, signature.len()))
        .ok_or_else(|| CredentialError::Unusable {
            kind,
            name: name.to_string(),
            detail: format!(
                "Key Vault's {} signature has an unexpected length",
                algorithm.as_str()
            ),
        })
}

/// `https://{vault}/keys/{name}/{version}` split into name and version.
pub(super) fn key_name_and_version(key_id: &str) -> Option<(String, String)> {
    let url = url::Url::parse(key_id).ok()?;
    let mut segments = url.path_segments()?;
    match (segments.next(), segments.next(), segments.next()) {
        (Some("keys"), Some(name), Some(version)) if !name.is_empty() && !version.is_empty() => {
            Some((name.to_string(), version.to_string()))
        }
        _ => None,
    }
}

/// The digest Key Vault signs for `algorithm`.
fn digest(algorithm: SigningAlgorithm, input: &[u8]) -> Vec<u8> {
    use SigningAlgorithm::*;
    match algorithm {
        Rs256 | Ps256 | Es256 => sha2::Sha256::digest(input).to_vec(),
        Rs384 | Ps384 | Es384 => sha2::Sha384::digest(input).to_vec(),
        Rs512 | Ps512 | Es512 => sha2::Sha512::digest(input).to_vec(),
    }
}

fn sdk_algorithm(algorithm: SigningAlgorithm) -> SignatureAlgorithm {
    use SigningAlgorithm::*;
    match algorithm {
        Rs256 => SignatureAlgorithm::Rs256,
        Rs384 => SignatureAlgorithm::Rs384,
        Rs512 => SignatureAlgorithm::Rs512,
        Ps256 => SignatureAlgorithm::Ps256,
        Ps384 => SignatureAlgorithm::Ps384,
        Ps512 => SignatureAlgorithm::Ps512,
        Es256 => SignatureAlgorithm::Es256,
        Es384 => SignatureAlgorithm::Es384,
        Es512 => SignatureAlgorithm::Es512,
    }
}

/// Whether a signature has the length the algorithm gives: ES signatures are raw `R || S`
/// (RFC 7518 §3.4), which is what Key Vault returns; RSA ones are as long as the modulus
/// (2048 bits at least).
fn signature_fits(algorithm: SigningAlgorithm, length: usize) -> bool {
    match algorithm {
        SigningAlgorithm::Es256 => length == 64,
        SigningAlgorithm::Es384 => length == 96,
        SigningAlgorithm::Es512 => length == 132,
        _ => length >= 256,
    }
}
