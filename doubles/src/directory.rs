//! What the identity doubles share about the directory they stand in for: the tenant, the
//! tokens the managed identity endpoint issued (which Key Vault and the Entra token endpoint
//! accept), and the clock they stamp tokens with. It imports no double, so every double can
//! import it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// The tenant the identities live in and the Entra token endpoint double serves (its URL, and
/// tokens' `tid` and issuer), so that a federated credential naming that tenant's issuer
/// matches the identity's tokens.
pub const TENANT: &str = "c0ffee00-0000-4000-8000-00000000e17a";

/// What the doubles that check a bearer or an assertion need to know about a token this
/// endpoint issued (the registry stands in for Entra's signature, which no double can make).
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub resource: String,
    pub expires_on: u64,
    /// The user-assigned identity's client id (`None`: the system-assigned identity).
    pub client_id: Option<String>,
    /// The identity's object (principal) id: the token's `sub` and `oid`.
    pub object_id: String,
}

/// Tokens issued so far, by value: the "directory" the Key Vault double checks bearers against.
pub type Issued = Arc<Mutex<HashMap<String, IssuedToken>>>;

/// Now, in unix seconds: what `expires_on`, `exp` and Key Vault's attributes carry.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
