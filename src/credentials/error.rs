//! Why a connection's credential could not be had. A leaf of the credentials module: the
//! cache, the vault clients and the token errors all name it.

pub(crate) use crate::config::ObjectKind;

/// The role an identity needs to use an object of this kind.
fn role(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Secret => "Key Vault Secrets User",
        ObjectKind::Key => "Key Vault Crypto User",
        ObjectKind::Certificate => "Key Vault Certificate User",
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a credential could not be had. Messages are for operators (they go to the log, not to
/// callers) and never hold a secret value, an assertion or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CredentialError {
    #[error("Key Vault {kind} '{name}' was not found")]
    NotFound { kind: ObjectKind, name: String },
    #[error(
        "Key Vault refused to use {kind} '{name}' ({code}); check the identity's '{}' role and that the {kind} is enabled",
        role(*kind)
    )]
    Forbidden {
        kind: ObjectKind,
        name: String,
        code: String,
    },
    #[error("Key Vault secret '{name}' has no value")]
    Empty { name: String },
    /// The key or certificate exists but cannot sign as configured (wrong key type for the
    /// algorithm, a curve the broker does not support, no certificate body).
    #[error("Key Vault {kind} '{name}' cannot be used: {detail}")]
    Unusable {
        kind: ObjectKind,
        name: String,
        detail: String,
    },
    #[error("the managed identity could not obtain a token for {purpose}")]
    Identity { purpose: &'static str },
    #[error("Key Vault did not answer about {kind} '{name}' ({detail})")]
    Unavailable {
        kind: ObjectKind,
        name: String,
        detail: String,
    },
    #[error("no Key Vault is configured")]
    NoVault,
    #[error("the Key Vault client could not be built (the log says why)")]
    Client,
}

impl CredentialError {
    /// Whether Key Vault said no for good (deleted, disabled, access revoked), as opposed to
    /// not answering: only then does a copy in memory stop being used.
    pub(crate) fn is_definitive(&self) -> bool {
        matches!(
            self,
            CredentialError::NotFound { .. }
                | CredentialError::Forbidden { .. }
                | CredentialError::Empty { .. }
                | CredentialError::Unusable { .. }
        )
    }

    /// The step that failed, as a caller may be told it: no object name, no code.
    pub(crate) fn step(&self) -> &'static str {
        match self {
            CredentialError::Identity { .. } => "getting a managed identity token",
            CredentialError::NotFound { kind, .. }
            | CredentialError::Forbidden { kind, .. }
            | CredentialError::Unusable { kind, .. }
            | CredentialError::Unavailable { kind, .. } => match kind {
                ObjectKind::Secret => "reading it from Key Vault",
                // An assertion's signature, or a mutual-TLS handshake's.
                ObjectKind::Key => "signing with Key Vault",
                ObjectKind::Certificate => "reading the certificate from Key Vault",
            },
            _ => "reading it from Key Vault",
        }
    }
}
