//! Where a managed identity's federation token may be sent.
//!
//! With `managed_identity_federation` the client assertion is the identity's own token for
//! the exchange audience, and every app registration that federates this identity accepts it:
//! whoever receives it can obtain those apps' tokens. An identity provider that is not Entra
//! has no use for it, so the token goes to Entra's token endpoints only, or to this machine
//! (a local Entra double in tests and local runs).

use super::types::{EndpointUrl, is_loopback};

/// Microsoft Entra's authority hosts: the public cloud, Azure Government, and Azure operated
/// by 21Vianet under both the name Microsoft's national cloud page gives
/// (`login.partner.microsoftonline.cn`) and the one the Azure Identity libraries use
/// (`login.chinacloudapi.cn`). Azure Germany (`login.microsoftonline.de`) closed in 2021 and
/// is not listed.
pub(super) const ENTRA_AUTHORITY_HOSTS: [&str; 4] = [
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn",
];

/// Whether the federation token may be sent to `token_url`: https to an Entra authority
/// host (the host exactly, as the URL parser lower-cases it), or loopback.
pub(super) fn may_receive_federation_token(token_url: &EndpointUrl) -> bool {
    let url = token_url.url();
    let entra = url.scheme() == "https"
        && url
            .host_str()
            .is_some_and(|host| ENTRA_AUTHORITY_HOSTS.contains(&host));
    entra || is_loopback(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(url: &str) -> bool {
        may_receive_federation_token(&EndpointUrl::parse(url).unwrap())
    }

    #[test]
    fn only_entra_authority_hosts_and_loopback_receive_the_federation_token() {
        for url in [
            "https://login.microsoftonline.com/tenant/oauth2/v2.0/token",
            "https://LOGIN.microsoftonline.com/tenant/oauth2/v2.0/token",
            "https://login.microsoftonline.us/tenant/oauth2/v2.0/token",
            "https://login.partner.microsoftonline.cn/tenant/oauth2/v2.0/token",
            "https://login.chinacloudapi.cn/tenant/oauth2/v2.0/token",
            "http://127.0.0.1:8400/tenant/oauth2/v2.0/token",
            "http://localhost/tenant/oauth2/v2.0/token",
            "https://[::1]:8443/token",
        ] {
            assert!(accepted(url), "{url}");
        }
        for url in [
            "https://idp.example/oauth/token",
            "https://login.microsoftonline.com.attacker.example/t/oauth2/v2.0/token",
            "https://attacker.example/login.microsoftonline.com/t/oauth2/v2.0/token",
            "https://evil-login.microsoftonline.com/t/oauth2/v2.0/token",
            "https://login.microsoftonline.de/t/oauth2/v2.0/token",
            "https://login.microsoftonline.com./t/oauth2/v2.0/token",
            "https://20.190.128.1/t/oauth2/v2.0/token",
        ] {
            assert!(!accepted(url), "{url}");
        }
    }
}
