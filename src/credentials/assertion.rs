//! `private_key_jwt` (RFC 7523 §2.2): a client assertion signed by a Key Vault key, or by a
//! Key Vault certificate's key (Entra's certificate credentials).
//!
//! The broker assembles the JWS itself (header and claims are a few lines of JSON) and asks
//! Key Vault to sign the digest of its signing input: the private key never leaves the vault,
//! so it is never in this process's memory, a log or a dump. What the broker keeps is the
//! key's public metadata (id, type, the certificate's thumbprint), cached like a secret.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use azure_security_keyvault_keys::models::{CurveName, KeyClientGetKeyOptions, KeyType};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;
use sha2::Digest as _;
use tokio::time::Instant;

use super::cache::Versioned;
use super::error::{CredentialError, ObjectKind};
use super::vault::{Clients, classify};
use super::vault_crypto::{self, VaultCertificate, key_name_and_version};
use crate::config::{AssertionSettings, SigningAlgorithm};

/// A client assertion: a signed JWT, or the managed identity's token. Bearer credentials
/// both, so held as secrets.
pub(crate) struct ClientAssertion {
    pub value: SecretString,
    /// The key or certificate version that signed it; `None` for federation.
    pub version: Option<String>,
    /// The key that signed it, so that a retry can send a newly signed assertion from the
    /// same version; `None` for federation (the managed identity's token is not single-use).
    pub(super) signer: Option<Arc<SigningKey>>,
}

/// The public side of a signing key, as read from Key Vault: enough to build the header and
/// to ask Key Vault for a signature.
#[derive(Debug)]
pub(crate) struct SigningKey {
    /// Where it was read from (a key or a certificate), for messages.
    kind: ObjectKind,
    /// The configured name (of the key or the certificate).
    name: String,
    /// The key that signs, by name and version (a certificate's key has its own).
    key_name: String,
    key_version: String,
    /// The full key id, `https://{vault}/keys/{name}/{version}`: the JWK's `kid`.
    key_id: String,
    key_type: KeyShape,
    /// Certificates only: base64url SHA-256 of the DER certificate (`x5t#S256`).
    thumbprint_sha256: Option<String>,
    /// The version of the object read (key or certificate): what rotation compares.
    version: String,
}

impl Versioned for SigningKey {
    fn version(&self) -> Option<&str> {
        Some(&self.version)
    }
}

/// What a key can sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyShape {
    Rsa,
    /// An EC key on the curve of this ES algorithm.
    Ec(SigningAlgorithm),
    /// A certificate's key: Entra certificates are RSA; Key Vault refuses a sign that does not
    /// fit the key.
    CertificateKey,
}

/// Reads the latest version of key `name`.
pub(super) async fn read_key(clients: &Clients, name: &str) -> Result<SigningKey, CredentialError> {
    let started = Instant::now();
    let failed = |error: azure_core::Error| classify(ObjectKind::Key, name, &error);
    let key = clients
        .keys
        .get_key(name, None::<KeyClientGetKeyOptions<'_>>)
        .await
        .map_err(failed)?
        .into_model()
        .map_err(failed)?;
    let unusable = |detail: &str| CredentialError::Unusable {
        kind: ObjectKind::Key,
        name: name.to_string(),
        detail: detail.to_string(),
    };
    let jwk = key.key.ok_or_else(|| unusable("the answer has no key"))?;
    let key_id = jwk.kid.ok_or_else(|| unusable("the key has no id"))?;
    let (key_name, key_version) =
        key_name_and_version(&key_id).ok_or_else(|| unusable("the key id is not a key URL"))?;
    let key_type = match (jwk.kty, jwk.crv) {
        (Some(KeyType::Rsa | KeyType::RsaHsm), _) => KeyShape::Rsa,
        (Some(KeyType::Ec | KeyType::EcHsm), Some(CurveName::P256)) => {
            KeyShape::Ec(SigningAlgorithm::Es256)
        }
        (Some(KeyType::Ec | KeyType::EcHsm), Some(CurveName::P384)) => {
            KeyShape::Ec(SigningAlgorithm::Es384)
        }
        (Some(KeyType::Ec | KeyType::EcHsm), Some(CurveName::P521)) => {
            KeyShape::Ec(SigningAlgorithm::Es512)
        }
        _ => {
            return Err(unusable(
                "only RSA keys and EC keys on P-256, P-384 or P-521 can sign a client assertion",
            ));
        }
    };
    tracing::info!(
        key = name,
        version = %key_version,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read signing key metadata from key vault"
    );
    Ok(SigningKey {
        kind: ObjectKind::Key,
        name: name.to_string(),
        version: key_version.clone(),
        key_name,
        key_version,
        key_id,
        key_type,
        thumbprint_sha256: None,
    })
}

/// Reads the latest version of certificate `name`: its thumbprint, and which key signs for it.
pub(super) async fn read_certificate(
    clients: &Clients,
    name: &str,
) -> Result<SigningKey, CredentialError> {
    let started = Instant::now();
    let VaultCertificate {
        der,
        key_id,
        key_name,
        key_version,
        version,
        ..
    } = vault_crypto::read_certificate(clients, name).await?;
    tracing::info!(
        certificate = name,
        version = %version,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "read certificate metadata from key vault"
    );
    Ok(SigningKey {
        kind: ObjectKind::Certificate,
        name: name.to_string(),
        version,
        key_name,
        key_version,
        key_id,
        key_type: KeyShape::CertificateKey,
        thumbprint_sha256: Some(URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der))),
    })
}

/// The algorithm a key signs with: the configured one when it fits the key, else the key's
/// natural one (RSA RS256, EC by curve, PS256 for Entra certificates).
fn algorithm(
    settings: &AssertionSettings,
    key: &SigningKey,
) -> Result<SigningAlgorithm, CredentialError> {
    let unusable = |detail: String| CredentialError::Unusable {
        kind: key.kind,
        name: key.name.clone(),
        detail,
    };
    match (key.key_type, settings.algorithm) {
        (KeyShape::Rsa, None) => Ok(SigningAlgorithm::Rs256),
        (KeyShape::CertificateKey, None) => Ok(SigningAlgorithm::Ps256),
        (KeyShape::Ec(natural), None) => Ok(natural),
        (KeyShape::Rsa | KeyShape::CertificateKey, Some(chosen)) if chosen.is_rsa() => Ok(chosen),
        (KeyShape::Ec(natural), Some(chosen)) if chosen == natural => Ok(chosen),
        (KeyShape::Ec(natural), Some(chosen)) => Err(unusable(format!(
            "signing_algorithm {} does not fit this EC key, which signs {}",
            chosen.as_str(),
            natural.as_str()
        ))),
        (_, Some(chosen)) => Err(unusable(format!(
            "signing_algorithm {} needs an EC key; this is an RSA key",
            chosen.as_str()
        ))),
    }
}

/// The JWS header and claims, base64url-encoded and joined: what gets signed.
fn signing_input(
    settings: &AssertionSettings,
    client_id: &str,
    key: &SigningKey,
    algorithm: SigningAlgorithm,
    now: u64,
) -> String {
    let mut header = serde_json::json!({ "alg": algorithm.as_str(), "typ": "JWT" });
    match (&settings.key_id, &key.thumbprint_sha256) {
        (Some(key_id), _) => header["kid"] = key_id.clone().into(),
        (None, None) => header["kid"] = key.key_id.clone().into(),
        (None, Some(_)) => {}
    }
    if let Some(thumbprint) = &key.thumbprint_sha256 {
        header["x5t#S256"] = thumbprint.clone().into();
    }
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": settings.audience,
        "jti": URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()),
        "iat": now,
        "nbf": now,
        "exp": now + settings.lifetime.as_secs(),
    });
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A fresh assertion for `client_id`, signed by Key Vault: one sign operation.
pub(super) async fn sign(
    clients: &Clients,
    settings: &AssertionSettings,
    client_id: &str,
    key: &Arc<SigningKey>,
) -> Result<ClientAssertion, CredentialError> {
    let algorithm = algorithm(settings, key)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let input = signing_input(settings, client_id, key, algorithm, now);
    let started = Instant::now();
    let signature = vault_crypto::sign(
        clients,
        (&key.key_name, &key.key_version),
        algorithm,
        input.as_bytes(),
    )
    .await?;
    tracing::debug!(
        object = key.kind.as_str(),
        name = %key.name,
        version = %key.version,
        algorithm = algorithm.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "client assertion signed by key vault"
    );
    Ok(ClientAssertion {
        value: SecretString::from(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))),
        version: Some(key.version.clone()),
        signer: Some(key.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AssertionKey;
    use std::time::Duration;

    fn settings(key_id: Option<&str>) -> AssertionSettings {
        AssertionSettings {
            key: AssertionKey::KeyVaultKey("k".into()),
            algorithm: None,
            audience: "https://idp.example/token".into(),
            lifetime: Duration::from_secs(300),
            key_id: key_id.map(str::to_string),
        }
    }

    fn key(shape: KeyShape, thumbprint: Option<&str>) -> SigningKey {
        SigningKey {
            kind: ObjectKind::Key,
            name: "k".into(),
            key_name: "k".into(),
            key_version: "v1".into(),
            key_id: "https://kv.vault.azure.net/keys/k/v1".into(),
            key_type: shape,
            thumbprint_sha256: thumbprint.map(str::to_string),
            version: "v1".into(),
        }
    }

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn the_claims_follow_rfc_7523_and_the_kid_is_the_key_vault_key_id() {
        let input = signing_input(
            &settings(None),
            "client-1",
            &key(KeyShape::Rsa, None),
            SigningAlgorithm::Rs256,
            1_000,
        );
        let (header, claims) = input.split_once('.').unwrap();
        let header = decode(header);
        let claims = decode(claims);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], "https://kv.vault.azure.net/keys/k/v1");
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://idp.example/token");
        assert_eq!(claims["iat"], 1_000);
        assert_eq!(claims["nbf"], 1_000);
        assert_eq!(claims["exp"], 1_300);
        let again = signing_input(
            &settings(None),
            "client-1",
            &key(KeyShape::Rsa, None),
            SigningAlgorithm::Rs256,
            1_000,
        );
        assert_ne!(
            decode(again.split_once('.').unwrap().1)["jti"],
            claims["jti"],
            "every assertion has its own jti"
        );
    }

    #[test]
    fn a_certificate_assertion_carries_its_sha256_thumbprint_and_a_configured_kid_wins() {
        let input = signing_input(
            &settings(None),
            "c",
            &key(KeyShape::CertificateKey, Some("thumb")),
            SigningAlgorithm::Ps256,
            0,
        );
        let header = decode(input.split_once('.').unwrap().0);
        assert_eq!(header["x5t#S256"], "thumb");
        assert!(header.get("kid").is_none(), "{header}");
        let input = signing_input(
            &settings(Some("my-kid")),
            "c",
            &key(KeyShape::Rsa, None),
            SigningAlgorithm::Rs256,
            0,
        );
        assert_eq!(decode(input.split_once('.').unwrap().0)["kid"], "my-kid");
    }

    #[test]
    fn the_algorithm_follows_the_key_unless_configured_and_must_fit_it() {
        let mut chosen = settings(None);
        let rsa = key(KeyShape::Rsa, None);
        let p256 = key(KeyShape::Ec(SigningAlgorithm::Es256), None);
        let certificate = key(KeyShape::CertificateKey, Some("t"));
        assert_eq!(algorithm(&chosen, &rsa).unwrap(), SigningAlgorithm::Rs256);
        assert_eq!(algorithm(&chosen, &p256).unwrap(), SigningAlgorithm::Es256);
        assert_eq!(
            algorithm(&chosen, &certificate).unwrap(),
            SigningAlgorithm::Ps256
        );
        chosen.algorithm = Some(SigningAlgorithm::Ps256);
        assert_eq!(algorithm(&chosen, &rsa).unwrap(), SigningAlgorithm::Ps256);
        assert!(algorithm(&chosen, &p256).unwrap_err().is_definitive());
        chosen.algorithm = Some(SigningAlgorithm::Es384);
        assert!(algorithm(&chosen, &p256).is_err());
        assert!(algorithm(&chosen, &rsa).is_err());
    }

    #[test]
    fn key_ids_are_split_into_name_and_version() {
        assert_eq!(
            key_name_and_version("https://kv.vault.azure.net/keys/signing/abc123"),
            Some(("signing".to_string(), "abc123".to_string()))
        );
        assert_eq!(
            key_name_and_version("https://kv.vault.azure.net/secrets/s/v"),
            None
        );
        assert_eq!(
            key_name_and_version("https://kv.vault.azure.net/keys/k"),
            None
        );
    }
}
