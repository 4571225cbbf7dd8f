//! The provider's OAuth error body (RFC 6749 §5.2, with Entra's `error_codes`), and the
//! error code as the broker passes it on: only a printable OAuth code, never free text.

/// An OAuth error answer (RFC 6749 §5.2) with Entra's `error_codes`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub(crate) struct OAuthErrorBody {
    pub(super) error: String,
    pub(super) error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u64>,
}

impl std::fmt::Display for OAuthErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&oauth_error_code(&self.error))
    }
}

impl oauth2::ErrorResponse for OAuthErrorBody {}

/// Entra's codes for an invalid (7000215) and an expired (7000222) client secret.
pub(super) const ENTRA_BAD_SECRET_CODES: &[u64] = &[7000215, 7000222];

impl OAuthErrorBody {
    /// `invalid_client` for a client certificate the provider's TLS endpoint refused in the
    /// handshake (an alert such as `bad_certificate` or `unknown_ca`): RFC 8705 §2 has the
    /// provider answer `invalid_client` for a certificate it does not accept, and endpoints
    /// that check certificates in the TLS layer say the same thing there.
    pub(super) fn certificate_refused(alert: &str) -> Self {
        Self {
            error: "invalid_client".to_string(),
            error_description: Some(format!(
                "the TLS handshake refused the client certificate (alert {alert})"
            )),
            error_codes: Vec::new(),
        }
    }

    /// Whether a different client secret might succeed.
    pub(super) fn means_bad_secret(&self) -> bool {
        self.error == "invalid_client"
            || self
                .error_codes
                .iter()
                .any(|code| ENTRA_BAD_SECRET_CODES.contains(code))
    }
}

/// An upstream error code as the broker repeats it: RFC 6749 restricts codes to printable
/// ASCII without `"` and `\`; anything else is replaced so it cannot smuggle text into logs
/// or the caller's JSON.
pub(super) fn oauth_error_code(code: &str) -> String {
    let valid = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| (0x20..=0x7E).contains(&b) && b != b'"' && b != b'\\');
    if valid {
        code.to_string()
    } else {
        "unrecognised_error".to_string()
    }
}
