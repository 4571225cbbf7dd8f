//! The token endpoint's success body, as real identity providers send it.
//!
//! oauth2's standard response type reads `expires_in` only as a JSON number, but Entra's v1
//! endpoint sends `"expires_in": "3599"` (a string), and long-lived Entra tokens carry a
//! `refresh_in` hint. This type accepts both forms and plugs into oauth2 as its `TokenResponse`.

use std::time::Duration;

use oauth2::basic::BasicTokenType;
use oauth2::{AccessToken, RefreshToken, Scope, TokenResponse};
use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize};

use crate::token::{FreshToken, MAX_LIFETIME};

/// A client-credentials token response (RFC 6749 §5.1) with Entra's variations.
#[derive(Debug, Deserialize, Serialize)]
pub struct BrokerTokenResponse {
    access_token: AccessToken,
    #[serde(deserialize_with = "lenient_token_type")]
    token_type: BasicTokenType,
    #[serde(
        default,
        deserialize_with = "seconds",
        skip_serializing_if = "Option::is_none"
    )]
    expires_in: Option<u64>,
    #[serde(
        default,
        deserialize_with = "seconds",
        skip_serializing_if = "Option::is_none"
    )]
    refresh_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip)]
    scopes: Option<Vec<Scope>>,
}

impl BrokerTokenResponse {
    /// Entra's hint for when to refresh, earlier than expiry.
    pub fn refresh_in(&self) -> Option<Duration> {
        self.refresh_in.map(Duration::from_secs)
    }

    /// Whether the answer carries a token at all: `"access_token": ""` is not one.
    pub fn has_access_token(&self) -> bool {
        !self.access_token.secret().is_empty()
    }

    /// The scope string as the server granted it, when it said.
    pub fn granted_scope(&self) -> Option<&str> {
        self.scope.as_deref().filter(|scope| !scope.is_empty())
    }

    /// The token as the cache takes it. A missing, zero or negative `expires_in` means "not
    /// given": the connection's `default_lifetime` applies. The cache clamps whatever results to
    /// `[MIN_LIFETIME, MAX_LIFETIME]`; a claim beyond the maximum is logged.
    pub fn into_fresh_token<S: AsRef<str>>(
        self,
        default_lifetime: Duration,
        requested: &[S],
    ) -> FreshToken {
        let scope = self.granted_scope().map(str::to_string).or_else(|| {
            (!requested.is_empty()).then(|| {
                let scopes: Vec<&str> = requested.iter().map(AsRef::as_ref).collect();
                scopes.join(" ")
            })
        });
        let lifetime = self
            .expires_in()
            .filter(|lifetime| !lifetime.is_zero())
            .unwrap_or(default_lifetime);
        if lifetime > MAX_LIFETIME {
            tracing::info!(
                claimed_seconds = lifetime.as_secs(),
                used_seconds = MAX_LIFETIME.as_secs(),
                "the token endpoint claims a lifetime beyond the broker's maximum; using the maximum"
            );
        }
        let refresh_in = self.refresh_in();
        FreshToken {
            access_token: SecretString::from(self.access_token.into_secret()),
            // RFC 6750 spells it "Bearer"; callers paste this into an Authorization header.
            token_type: match self.token_type {
                BasicTokenType::Bearer => "Bearer".to_string(),
                BasicTokenType::Mac => "MAC".to_string(),
                BasicTokenType::Extension(other) => other,
            },
            lifetime,
            refresh_in,
            scope,
        }
    }
}

impl TokenResponse for BrokerTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }

    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }

    fn refresh_token(&self) -> Option<&RefreshToken> {
        None
    }

    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

/// `token_type` is case-insensitive (RFC 6749 §5.1); oauth2 already lower-cases known types,
/// this keeps unknown ones instead of failing the whole response.
fn lenient_token_type<'de, D: Deserializer<'de>>(d: D) -> Result<BasicTokenType, D::Error> {
    let value = String::deserialize(d)?;
    Ok(match value.to_ascii_lowercase().as_str() {
        "bearer" => BasicTokenType::Bearer,
        "mac" => BasicTokenType::Mac,
        _ => BasicTokenType::Extension(value),
    })
}

/// A number of seconds, sent as a JSON number or a numeric string. Identity providers send
/// all sorts here: `9223372036854775807` or `1e19` for "never", fractions, zero, negatives.
/// Zero and anything below become 0 (the caller treats that as "not given"); fractions are
/// cut to whole seconds; anything beyond `u64` saturates. Only text that is not a number at
/// all is an error. Bounding the lifetime is the cache's job (`token::clamp_lifetime`).
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Number(serde_json::Number),
        String(String),
    }
    let parsed = Option::<NumberOrString>::deserialize(d)?;
    let number = match parsed {
        None => return Ok(None),
        Some(NumberOrString::Number(n)) => whole_seconds(&n),
        Some(NumberOrString::String(s)) => s
            .trim()
            .parse::<serde_json::Number>()
            .ok()
            .and_then(|n| whole_seconds(&n)),
    };
    number
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("expected a number of seconds"))
}

/// A JSON number as whole non-negative seconds, saturating at both ends.
fn whole_seconds(number: &serde_json::Number) -> Option<u64> {
    if let Some(n) = number.as_u64() {
        return Some(n);
    }
    if number.as_i64().is_some() {
        return Some(0);
    }
    // `as` saturates: negative floats become 0, huge ones u64::MAX.
    number.as_f64().filter(|f| f.is_finite()).map(|f| f as u64)
}

/// Parses a success body; public for the fuzz target and tests.
pub fn parse(body: &[u8]) -> Result<BrokerTokenResponse, serde_json::Error> {
    serde_json::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_may_be_a_number_or_a_string() {
        let number =
            parse(br#"{"access_token":"a","token_type":"Bearer","expires_in":3599}"#).unwrap();
        assert_eq!(number.expires_in(), Some(Duration::from_secs(3599)));
        let string = parse(
            br#"{"access_token":"a","token_type":"Bearer","expires_in":"3599","expires_on":"1700000000","resource":"r"}"#,
        )
        .unwrap();
        assert_eq!(string.expires_in(), Some(Duration::from_secs(3599)));
    }

    #[test]
    fn refresh_in_is_read_when_present() {
        let response = parse(
            br#"{"access_token":"a","token_type":"Bearer","expires_in":86399,"refresh_in":43199}"#,
        )
        .unwrap();
        assert_eq!(response.refresh_in(), Some(Duration::from_secs(43199)));
    }

    #[test]
    fn a_missing_expires_in_is_none_and_a_garbage_one_is_an_error() {
        let missing = parse(br#"{"access_token":"a","token_type":"bearer"}"#).unwrap();
        assert_eq!(missing.expires_in(), None);
        assert!(
            parse(br#"{"access_token":"a","token_type":"bearer","expires_in":"soon"}"#).is_err()
        );
    }

    #[test]
    fn huge_negative_and_fractional_lifetimes_parse_without_error() {
        let expires = |value: &str| {
            let body =
                format!(r#"{{"access_token":"a","token_type":"bearer","expires_in":{value}}}"#);
            parse(body.as_bytes()).unwrap().expires_in()
        };
        let max = Some(Duration::from_secs(u64::MAX));
        assert_eq!(
            expires("9223372036854775807"),
            Some(Duration::from_secs(i64::MAX as u64))
        );
        assert_eq!(
            expires("1e19"),
            Some(Duration::from_secs(10_000_000_000_000_000_000))
        );
        assert_eq!(expires("1e300"), max);
        assert_eq!(
            expires("\"1e19\""),
            Some(Duration::from_secs(10_000_000_000_000_000_000))
        );
        assert_eq!(expires("-5"), Some(Duration::ZERO));
        assert_eq!(expires("-1.5"), Some(Duration::ZERO));
        assert_eq!(expires("\"-5\""), Some(Duration::ZERO));
        assert_eq!(expires("0"), Some(Duration::ZERO));
        assert_eq!(expires("59.9"), Some(Duration::from_secs(59)));
    }

    #[test]
    fn token_type_is_case_insensitive_and_unknown_types_survive() {
        let upper = parse(br#"{"access_token":"a","token_type":"BEARER"}"#).unwrap();
        assert_eq!(upper.token_type(), &BasicTokenType::Bearer);
        let dpop = parse(br#"{"access_token":"a","token_type":"DPoP"}"#).unwrap();
        assert_eq!(
            dpop.token_type(),
            &BasicTokenType::Extension("DPoP".to_string())
        );
    }

    #[test]
    fn debug_output_does_not_show_the_access_token() {
        let response =
            parse(br#"{"access_token":"very-secret-token","token_type":"bearer"}"#).unwrap();
        assert!(!format!("{response:?}").contains("very-secret-token"));
    }
}
