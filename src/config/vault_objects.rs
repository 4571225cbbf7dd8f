//! The Key Vault objects a connection's credential comes from, and the shared cache's
//! encryption key format: what the configuration names, so that the stages that read, rotate
//! or check them (credentials, rotation, the shared tier, validation) all ask the
//! configuration rather than each other.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use secrecy::{ExposeSecret, SecretBox, SecretString};

use super::settings::{
    AssertionKey, ConnectionSettings, CredentialSource, ENCRYPTION_KEY_BYTES, SecretSource,
};

/// The kind of Key Vault object a credential comes from, as operators read it in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Secret,
    Key,
    Certificate,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Secret => "secret",
            ObjectKind::Key => "key",
            ObjectKind::Certificate => "certificate",
        }
    }

    /// `name` as a rotation names an object of this kind to the fleet and in the log
    /// (`secret/contoso-secret`); Key Vault names hold no `/` and ignore case.
    pub fn object_id(self, name: &str) -> String {
        format!("{}/{}", self.as_str(), name.to_ascii_lowercase())
    }
}

impl ConnectionSettings {
    /// The name of the Key Vault object of `kind` this connection's credential comes from.
    pub fn vault_object(&self, kind: ObjectKind) -> Option<&str> {
        match (&self.credential, kind) {
            (
                CredentialSource::Secret(SecretSource::KeyVault { secret_name }),
                ObjectKind::Secret,
            ) => Some(secret_name),
            (CredentialSource::ClientCertificate { certificate_name }, ObjectKind::Certificate) => {
                Some(certificate_name)
            }
            (CredentialSource::Assertion(settings), _) => match (&settings.key, kind) {
                (AssertionKey::KeyVaultKey(name), ObjectKind::Key)
                | (AssertionKey::KeyVaultCertificate(name), ObjectKind::Certificate) => Some(name),
                _ => None,
            },
            _ => None,
        }
    }

    /// Every Key Vault object this connection uses, as [`ObjectKind::object_id`] names them.
    pub fn vault_objects(&self) -> Vec<String> {
        [ObjectKind::Secret, ObjectKind::Key, ObjectKind::Certificate]
            .into_iter()
            .filter_map(|kind| self.vault_object(kind).map(|name| kind.object_id(name)))
            .collect()
    }
}

/// A shared cache encryption key as bytes: base64 (standard alphabet, padded or not) of
/// exactly [`ENCRYPTION_KEY_BYTES`] bytes; `None` for anything else.
pub fn decode_encryption_key(text: &SecretString) -> Option<SecretBox<[u8; ENCRYPTION_KEY_BYTES]>> {
    let text = text.expose_secret().trim();
    let decoded = STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()?;
    let bytes: [u8; ENCRYPTION_KEY_BYTES] = decoded.as_slice().try_into().ok()?;
    Some(SecretBox::new(Box::new(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_base64_of_32_bytes_is_a_key() {
        let good = STANDARD.encode([9u8; 32]);
        assert!(decode_encryption_key(&SecretString::from(good.clone())).is_some());
        assert!(
            decode_encryption_key(&SecretString::from(good.trim_end_matches('=').to_string()))
                .is_some()
        );
        assert!(decode_encryption_key(&SecretString::from(STANDARD.encode([9u8; 16]))).is_none());
        assert!(decode_encryption_key(&SecretString::from("not base64!".to_string())).is_none());
    }
}
