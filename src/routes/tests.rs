//! Unit tests of `routes`.

use super::token::{requested, token_route};

fn requested_scopes(
    query: Option<&str>,
    form: &[u8],
) -> Result<Option<Vec<ScopeToken>>, crate::error::ApiError> {
    requested(query, form).map(|requested| requested.scopes)
}
use super::*;
use crate::config::ScopeToken;
use axum::http::StatusCode;

#[test]
fn the_token_route_prefix_is_case_insensitive() {
    assert_eq!(token_route("/api/token/contoso"), Some("contoso"));
    assert_eq!(token_route("/API/Token/Contoso"), Some("Contoso"));
    assert_eq!(token_route("/api/token/contoso/"), Some("contoso"));
    assert_eq!(token_route("/api/tokens/contoso"), None);
    assert_eq!(token_route("/api/token"), None);
}

#[test]
fn traversal_is_just_an_invalid_name() {
    let name = token_route("/api/token/../../secrets").unwrap();
    assert!(crate::config::ConnectionName::parse(name).is_none());
}

#[test]
fn scopes_are_split_on_spaces_and_host_commas() {
    let scopes = requested_scopes(Some("scope=a%20b&code=key&scope=c,d"), b"").unwrap();
    let scopes: Vec<String> = scopes.unwrap().iter().map(|s| s.to_string()).collect();
    assert_eq!(scopes, ["a", "b", "c", "d"]);
    assert_eq!(requested_scopes(Some("scope="), b"").unwrap(), None);
    assert_eq!(requested_scopes(None, b"").unwrap(), None);
    assert!(requested_scopes(Some("scope=a%22b"), b"").is_err());
}

#[tokio::test]
async fn a_panicking_handler_is_answered_with_a_json_500() {
    let response =
        answer_even_on_panic(async { panic!("a bug in a handler") }, tracing::Span::none)
            .await
            .unwrap_err()
            .into_response();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "internal_error");
    assert!(body["error_description"].as_str().unwrap().contains("bug"));
}

#[test]
fn a_form_body_scope_counts_like_the_query_scope() {
    let text =
        |scopes: Vec<ScopeToken>| -> Vec<String> { scopes.iter().map(|s| s.to_string()).collect() };
    let scopes = requested_scopes(None, b"grant_type=client_credentials&scope=read+write");
    assert_eq!(text(scopes.unwrap().unwrap()), ["read", "write"]);
    let both = requested_scopes(Some("scope=a"), b"scope=b")
        .unwrap()
        .unwrap();
    assert_eq!(text(both), ["a", "b"]);
    assert!(requested_scopes(None, b"scope=a%22b").is_err());
}

#[test]
fn one_audience_and_one_resource_are_read_from_the_query_and_the_form() {
    let asked = requested(
        Some("audience=https%3A%2F%2Fa.example&scope=read"),
        b"resource=api%3A%2F%2Fr&audience=https://a.example",
    )
    .unwrap();
    assert_eq!(asked.audience.as_deref(), Some("https://a.example"));
    assert_eq!(asked.resource.as_deref(), Some("api://r"));
    assert_eq!(asked.scopes.unwrap().len(), 1);
    let two = requested(Some("resource=api://a&resource=api://b"), b"").unwrap_err();
    assert!(
        matches!(two, crate::error::ApiError::InvalidTarget(_)),
        "{two:?}"
    );
    let long = format!("audience={}", "a".repeat(3000));
    assert!(matches!(
        requested(Some(&long), b""),
        Err(crate::error::ApiError::InvalidRequest(_))
    ));
    assert_eq!(requested(Some("code=x"), b"").unwrap(), Default::default());
    // A name spelled with percent-escapes is still that name.
    let escaped = requested(Some("%61udience=https://a.example"), b"").unwrap();
    assert_eq!(escaped.audience.as_deref(), Some("https://a.example"));
}
