//! The token endpoint of a connection that names its `issuer` instead (mutual-TLS methods):
//! read from the issuer's discovery document (OpenID Connect Discovery, else RFC 8414) once
//! per process (again after a failed read), its `mtls_endpoint_aliases.token_endpoint`
//! preferred (RFC 8705 §5), since a provider that serves mutual TLS on another host or port
//! says so there and nowhere else.
//!
//! The document must name the configured issuer (RFC 8414 §3.3), and the endpoint must be
//! https: the certificate, and the client id with it, go to no other address.

use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use url::Url;

use super::failure::Failure;
use super::transport::{TransportError, read_bounded, transport_error};
use crate::config::EndpointUrl;

/// Largest discovery document read; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// The endpoint once known; asked again after a failure, never after a success.
#[derive(Default)]
pub(super) struct Discovered {
    token_url: Mutex<Option<Url>>,
}

#[derive(Deserialize)]
struct Document {
    issuer: Option<String>,
    token_endpoint: Option<String>,
    #[serde(default)]
    mtls_endpoint_aliases: Option<Aliases>,
}

#[derive(Deserialize)]
struct Aliases {
    token_endpoint: Option<String>,
}

impl Discovered {
    pub(super) async fn token_url(
        &self,
        http: &reqwest::Client,
        connection: &str,
        issuer: &EndpointUrl,
        timeout: Duration,
    ) -> Result<Url, Failure> {
        if let Some(url) = self.token_url.lock().clone() {
            return Ok(url);
        }
        let url = discover(http, issuer, timeout).await.inspect_err(|failure| {
            tracing::warn!(connection, issuer = issuer.as_str(), reason = %failure, "token endpoint discovery failed");
        })?;
        tracing::info!(
            connection,
            issuer = issuer.as_str(),
            token_endpoint = url.as_str(),
            "token endpoint discovered"
        );
        *self.token_url.lock() = Some(url.clone());
        Ok(url)
    }
}

async fn discover(
    http: &reqwest::Client,
    issuer: &EndpointUrl,
    timeout: Duration,
) -> Result<Url, Failure> {
    let base = issuer.as_str().trim_end_matches('/');
    let mut last = None;
    for url in document_urls(issuer.url()) {
        match fetch(http, &url, timeout).await {
            Ok(document) => return endpoint_of(document, base),
            // Not served under this name: try the other one.
            Err(TransportError::Status { status, .. }) if status.as_u16() == 404 => {
                last = Some(Failure::Invalid {
                    detail: "the issuer serves no discovery document (HTTP 404)".to_string(),
                });
            }
            Err(error) => return Err(unavailable(&error)),
        }
    }
    Err(last.unwrap_or_else(|| Failure::Invalid {
        detail: "the issuer serves no discovery document".to_string(),
    }))
}

/// Where the metadata may be: OpenID Connect Discovery appends its well-known path to the
/// issuer (`{issuer}/.well-known/openid-configuration`); RFC 8414 §3.1 inserts its own
/// between the host and the issuer's path (`https://host/.well-known/oauth-authorization-server/tenant`).
fn document_urls(issuer: &Url) -> [String; 2] {
    let openid = format!(
        "{}/.well-known/openid-configuration",
        issuer.as_str().trim_end_matches('/')
    );
    let mut oauth = issuer.clone();
    let path = issuer.path().trim_end_matches('/');
    oauth.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    oauth.set_query(None);
    [openid, oauth.to_string()]
}

async fn fetch(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    let mut response = http
        .get(url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|error| transport_error(&error, timeout))?;
    if !response.status().is_success() {
        return Err(TransportError::Status {
            status: response.status(),
            retry_after: None,
            error: None,
        });
    }
    read_bounded(&mut response, MAX_DOCUMENT_BYTES, timeout).await
}

fn unavailable(error: &TransportError) -> Failure {
    Failure::Unavailable {
        detail: format!("the issuer's discovery document could not be read: {error}"),
        retry_after: None,
    }
}

/// The token endpoint the document names for mutual TLS, else its plain one.
fn endpoint_of(document: Vec<u8>, issuer: &str) -> Result<Url, Failure> {
    let invalid = |detail: &str| Failure::Invalid {
        detail: format!("the issuer's discovery document {detail}"),
    };
    let document: Document =
        serde_json::from_slice(&document).map_err(|_| invalid("is not JSON"))?;
    if document
        .issuer
        .as_deref()
        .map(|named| named.trim_end_matches('/'))
        != Some(issuer)
    {
        return Err(invalid("names another issuer"));
    }
    let endpoint = document
        .mtls_endpoint_aliases
        .and_then(|aliases| aliases.token_endpoint)
        .or(document.token_endpoint)
        .ok_or_else(|| invalid("names no token endpoint"))?;
    let url =
        Url::parse(&endpoint).map_err(|_| invalid("names a token endpoint that is not a URL"))?;
    let url = EndpointUrl::try_from(url)
        .ok()
        .filter(|url| url.url().scheme() == "https")
        .ok_or_else(|| invalid("names a token endpoint that is not https"))?;
    Ok(url.url().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_is_looked_for_where_each_specification_puts_it() {
        let issuer = Url::parse("https://idp.example/realms/bank/").unwrap();
        assert_eq!(
            document_urls(&issuer),
            [
                "https://idp.example/realms/bank/.well-known/openid-configuration".to_string(),
                "https://idp.example/.well-known/oauth-authorization-server/realms/bank"
                    .to_string()
            ]
        );
        let issuer = Url::parse("https://idp.example").unwrap();
        assert_eq!(
            document_urls(&issuer)[1],
            "https://idp.example/.well-known/oauth-authorization-server"
        );
    }

    #[test]
    fn the_mtls_alias_is_preferred_and_must_be_https_at_the_same_issuer() {
        let issuer = "https://idp.example";
        let document = |body: &str| body.as_bytes().to_vec();
        let url = endpoint_of(
            document(r#"{"issuer":"https://idp.example/","token_endpoint":"https://idp.example/token","mtls_endpoint_aliases":{"token_endpoint":"https://mtls.idp.example/token"}}"#),
            issuer,
        )
        .unwrap();
        assert_eq!(url.as_str(), "https://mtls.idp.example/token");
        let url = endpoint_of(
            document(
                r#"{"issuer":"https://idp.example","token_endpoint":"https://idp.example/token"}"#,
            ),
            issuer,
        )
        .unwrap();
        assert_eq!(url.as_str(), "https://idp.example/token");
        for refused in [
            r#"{"issuer":"https://evil.example","token_endpoint":"https://idp.example/token"}"#,
            r#"{"issuer":"https://idp.example","token_endpoint":"http://idp.example/token"}"#,
            r#"{"issuer":"https://idp.example","mtls_endpoint_aliases":{"token_endpoint":"http://127.0.0.1/token"}}"#,
            r#"{"issuer":"https://idp.example"}"#,
            "not json",
        ] {
            assert!(
                matches!(
                    endpoint_of(document(refused), issuer),
                    Err(Failure::Invalid { .. })
                ),
                "{refused}"
            );
        }
    }
}
