//! What must never appear in a broker's log: every credential the test setup handed out,
//! and anything shaped like a JWT.

use base64::Engine as _;

use super::*;

impl TestApp {
    /// Every credential this test's traffic involved, in the forms a careless log line
    /// would show: client secrets (plain and form-encoded), their Basic credentials, the
    /// function key, and the managed identity's tokens. Access and caller tokens are JWTs,
    /// found by their shape.
    pub fn credentials(&self) -> Vec<String> {
        let mut needles: Vec<String> = [
            TRICKY_SECRET,
            "short-lived-secret",
            TWENTY_SECRET,
            "not-the-registered-secret",
            ROTATION_V1,
            ROTATION_V2,
            CALLER_SECRET,
            FUNCTION_KEY,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([post_secret(), setting_secret()])
        .collect();
        let form =
            |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
        // The Basic credential (RFC 6749 §2.3.1: base64 of the form-encoded `id:secret`, and
        // the unencoded form careless clients use) of every client id with every secret, so a
        // logged `Authorization` header is found whichever connection sent it.
        let client_ids: Vec<&str> = standard_clients().iter().map(|c| c.client_id).collect();
        let mut basic = Vec::new();
        for id in &client_ids {
            for secret in &needles {
                for credential in [
                    format!("{}:{}", form(id), form(secret)),
                    format!("{id}:{secret}"),
                ] {
                    basic.push(base64::engine::general_purpose::STANDARD.encode(credential));
                }
            }
        }
        let encoded: Vec<String> = needles.iter().map(|s| form(s)).collect();
        needles.extend(encoded);
        needles.extend(basic);
        needles.extend(self.azure.identity.issued().lock().unwrap().keys().cloned());
        needles
    }

    /// Log lines that carry a credential or a JWT.
    pub fn leaks(&self) -> Vec<String> {
        let mut needles = self.credentials();
        needles.extend(self.secretless_credentials());
        self.logs()
            .into_iter()
            .filter(|line| contains_jwt(line) || needles.iter().any(|n| line.contains(n.as_str())))
            .collect()
    }
}

/// Whether `text` holds something shaped like a JWT (`eyJ<b64url>.<b64url>.`).
pub fn contains_jwt(text: &str) -> bool {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices("eyJ").any(|(start, _)| {
        let rest = &text[start..];
        let mut parts = rest.splitn(3, '.');
        let header = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or_default();
        parts.next().is_some()
            && header.len() >= 10
            && header.chars().all(is_b64)
            && payload.len() >= 10
            && payload.chars().all(is_b64)
    })
}

impl TestApp {
    /// Credentials of the secretless methods that are not JWT-shaped (assertions are, and the
    /// managed identity's tokens are in `credentials`): every signature Key Vault made.
    fn secretless_credentials(&self) -> Vec<String> {
        self.azure.vault.signatures()
    }
}
