//! Faithful doubles of the Azure services token-broker talks to that have no local emulator:
//! the App Service managed identity endpoint and Key Vault (secrets, keys, certificates, and
//! the CA that issues its mTLS client certificates); a fault-injecting proxy to put in front
//! of the real identity provider; a CONNECT proxy that makes the vault reachable under a
//! `vault.azure.net` name; and a hostile token endpoint. They follow the
//! protocol facts the broker is built against (challenge flow, error bodies, string
//! `expires_on`, TLS), so the broker reaches them through the real Azure SDK clients.
//!
//! One place, shared by the integration tests (in-process, so a test can add a secret version
//! or inject a fault mid-run) and the local demo (the `token-broker-doubles` binary).

pub mod connect_proxy;
pub mod directory;
pub mod entra_keys;
pub mod entra_token;
pub mod fault_proxy;
pub mod hostile_idp;
pub mod key_vault;
pub mod key_vault_certificates;
pub mod key_vault_keys;
pub mod managed_identity;
pub mod serve;
pub mod tls;
pub mod tls_gate;
mod vault_error;

pub use connect_proxy::ConnectProxy;
pub use entra_token::EntraTokenDouble;
pub use fault_proxy::FaultProxy;
pub use hostile_idp::{Behaviour, HostileIdp};
pub use key_vault::{ChallengeForm, Fault, KeyVaultDouble};
pub use key_vault_certificates::{CertificateIssuer, CertificateSpec, SecretContentType};
pub use key_vault_keys::KeyKind;
pub use managed_identity::ManagedIdentityDouble;
pub use tls_gate::TlsGate;

/// Random lower-case hex, `bytes` bytes long: version ids, tokens, header values.
pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Both doubles, wired together: the vault accepts the identity endpoint's tokens.
pub struct AzureDoubles {
    pub identity: ManagedIdentityDouble,
    pub vault: KeyVaultDouble,
}

impl AzureDoubles {
    /// Starts both on any free ports; the vault's CA goes to `dir/ca.pem`.
    pub async fn start(
        dir: &std::path::Path,
        client_id: Option<String>,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_on(dir, client_id, 0, 0).await
    }

    /// Starts both on the given ports (0 for any).
    pub async fn start_on(
        dir: &std::path::Path,
        client_id: Option<String>,
        identity_port: u16,
        vault_port: u16,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let identity = ManagedIdentityDouble::start(identity_port, client_id).await?;
        let vault = KeyVaultDouble::start(vault_port, dir, identity.issued()).await?;
        Ok(Self { identity, vault })
    }
}
