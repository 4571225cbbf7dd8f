//! Values checked once where they enter the broker, then carried as types: a connection
//! name, a scope token, an endpoint URL. Code past the check (routes, the cache, the token
//! client, caller checks) takes these instead of re-validating strings.

use std::borrow::Borrow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use url::Url;

/// A connection's name, lower-cased: 1 to 64 letters, digits, `-` and `_`. It appears in URLs
/// and log lines, so the character set is conservative. Borrows as `str`, so maps keyed by it
/// are looked up with a plain name; a request's name that is malformed simply matches nothing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionName(Arc<str>);

impl ConnectionName {
    /// The name in its lower-cased form, or `None` when it is not a valid name.
    pub fn parse(name: &str) -> Option<Self> {
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then(|| Self(Arc::from(name.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ConnectionName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An OAuth scope token (RFC 6749 §3.3: `1*( %x21 / %x23-5B / %x5D-7E )`), at most 256 bytes:
/// nothing that could break a form body, a header, a log line or the audit record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopeToken(String);

impl ScopeToken {
    pub fn parse(scope: &str) -> Option<Self> {
        let valid = !scope.is_empty()
            && scope.len() <= 256
            && scope
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b));
        valid.then(|| Self(scope.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ScopeToken {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScopeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A URL the broker sends credentials to or trusts keys from: https, or plain http to this
/// machine only (a local identity provider in development and tests), and no credentials of
/// its own in the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointUrl(Url);

/// Why a URL is not an acceptable endpoint; the messages never quote the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointUrlError {
    #[error("not a valid URL ({0})")]
    NotUrl(String),
    #[error("must be an https URL (plain http is accepted only on loopback)")]
    NotSecure,
    #[error("must not carry credentials")]
    Credentials,
}

impl EndpointUrl {
    pub fn parse(value: &str) -> Result<Self, EndpointUrlError> {
        let url = Url::parse(value).map_err(|error| EndpointUrlError::NotUrl(error.to_string()))?;
        Self::try_from(url)
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<Url> for EndpointUrl {
    type Error = EndpointUrlError;

    fn try_from(url: Url) -> Result<Self, EndpointUrlError> {
        let secure = match url.scheme() {
            "https" => url.host().is_some(),
            "http" => is_loopback(&url),
            _ => false,
        };
        if !secure {
            return Err(EndpointUrlError::NotSecure);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EndpointUrlError::Credentials);
        }
        Ok(Self(url))
    }
}

impl From<EndpointUrl> for Url {
    fn from(endpoint: EndpointUrl) -> Url {
        endpoint.0
    }
}

/// Whether `url` names this machine: `localhost`, 127.0.0.0/8 or ::1. Traffic to it never
/// crosses a network, which is what makes plain http or plain `redis://` acceptable there.
/// Schemes the URL standard does not know (`redis`) keep an IPv4 address as an opaque host
/// name, so a name is also read as an address; anything else (`127.1`, `localhost.`) is not
/// loopback, which only ever refuses more.
pub(super) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => {
            domain.eq_ignore_ascii_case("localhost")
                || domain.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Key Vault object names: 1 to 127 letters, digits and `-`.
pub(super) fn is_valid_key_vault_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names_are_lower_cased_and_malformed_ones_refused() {
        assert_eq!(
            ConnectionName::parse("Contoso_1").unwrap().as_str(),
            "contoso_1"
        );
        for bad in ["", "a b", "../x", "a/b", "é", &"a".repeat(65)] {
            assert!(ConnectionName::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn scope_tokens_follow_rfc_6749() {
        assert!(ScopeToken::parse("api://contoso/.default").is_some());
        for bad in ["a b", "a\"b", "a\\b", "", "a\u{7f}", &"s".repeat(257)] {
            assert!(ScopeToken::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn loopback_is_localhost_127_0_0_0_8_and_ipv6_one_in_every_scheme() {
        for scheme in ["http", "redis", "rediss"] {
            for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.9.8.7", "[::1]"] {
                let url = Url::parse(&format!("{scheme}://{host}:6379")).unwrap();
                assert!(is_loopback(&url), "{url}");
            }
            for host in [
                "cache.example",
                "10.0.0.4",
                "[::2]",
                "localhost.example",
                "127.0.0.1.example",
                "128.0.0.1",
            ] {
                let url = Url::parse(&format!("{scheme}://{host}:6379")).unwrap();
                assert!(!is_loopback(&url), "{url}");
            }
        }
    }

    #[test]
    fn endpoints_are_https_or_loopback_http_without_credentials() {
        for good in [
            "https://login.microsoftonline.com/t/oauth2/v2.0/token",
            "http://127.0.0.1:9000/token",
            "http://localhost/token",
            "http://[::1]:8080/token",
        ] {
            assert!(EndpointUrl::parse(good).is_ok(), "{good}");
        }
        assert_eq!(
            EndpointUrl::parse("http://login.contoso.com/token"),
            Err(EndpointUrlError::NotSecure)
        );
        assert_eq!(
            EndpointUrl::parse("ftp://127.0.0.1/x"),
            Err(EndpointUrlError::NotSecure)
        );
        assert_eq!(
            EndpointUrl::parse("https://user:pw@login.contoso.com/token"),
            Err(EndpointUrlError::Credentials)
        );
        assert!(matches!(
            EndpointUrl::parse("not a url"),
            Err(EndpointUrlError::NotUrl(_))
        ));
    }
}
