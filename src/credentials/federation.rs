//! `managed_identity_federation` (Entra): the managed identity's own token for the federation
//! audience is the client assertion of an app registration that trusts the identity (a
//! federated identity credential). No secret and no key exist to leak or rotate.
//!
//! Only user-assigned identities can be federated; configuration refuses the method without
//! one. The token comes from the same azure_identity credential that reads Key Vault, which
//! caches it and renews it five minutes before it expires, so a token fetch rarely costs an
//! identity endpoint call.

use secrecy::SecretString;
use tokio::time::Instant;

use super::assertion::ClientAssertion;
use super::error::CredentialError;
use super::vault::Clients;

/// The managed identity's token for `audience`, as a client assertion.
pub(super) async fn assertion(
    clients: &Clients,
    audience: &str,
) -> Result<ClientAssertion, CredentialError> {
    let scope = format!("{}/.default", audience.trim_end_matches('/'));
    let started = Instant::now();
    let token = clients
        .credential
        .get_token(&[scope.as_str()], None)
        .await
        .map_err(|error| {
            // The error text names the endpoint and status, never a token.
            tracing::warn!(%audience, reason = %error, "managed identity token for federation failed");
            CredentialError::Identity {
                purpose: "the federated credential",
            }
        })?;
    tracing::debug!(
        %audience,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "managed identity token for federation obtained"
    );
    Ok(ClientAssertion {
        value: SecretString::from(token.token.secret().to_string()),
        version: None,
        signer: None,
    })
}
