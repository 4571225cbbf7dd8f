//! The `function-rotation` function: Key Vault's Event Grid events, as the Functions host
//! delivers them to a custom handler (`POST /function-rotation`, JSON payload format).
//!
//! `SecretNewVersionCreated`, `SecretNearExpiry` and `SecretExpired` for a secret the broker
//! serves (and the same events of a signing key or certificate a `private_key_jwt` connection
//! uses) make the next use read Key Vault again, drop the tokens minted with the old version
//! and forget a rejection the connection's negative cache holds, so a rotation (or a repaired
//! secret) takes effect in seconds instead of at the next cache TTL.

use axum::Json;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::app_state::AppState;
use crate::config::{AssertionKey, ConnectionSettings, CredentialSource, SecretSource};
use crate::credentials::ObjectKind;
use crate::error::ApiError;

/// The function's folder name, which is its path.
pub const PATH: &str = "/function-rotation";

/// Largest invocation read. The request limits refuse a larger declared body before this
/// runs; this bounds one sent without `Content-Length`. Real events are a few hundred bytes.
const MAX_INVOCATION_BYTES: usize = 64 * 1024;

/// How many times a trigger value may be JSON-encoded as a string: the host encodes a string
/// value once more (an Event Grid event the binding hands over as a string arrives as a
/// string of a string); one level of margin beyond that.
const MAX_STRING_ENCODINGS: usize = 3;

/// Event types that mean "the object you hold is about to change or has changed", with the
/// kind of object they are about.
const ROTATION_EVENTS: &[(&str, ObjectKind)] = &[
    (
        "microsoft.keyvault.secretnewversioncreated",
        ObjectKind::Secret,
    ),
    ("microsoft.keyvault.secretnearexpiry", ObjectKind::Secret),
    ("microsoft.keyvault.secretexpired", ObjectKind::Secret),
    ("microsoft.keyvault.keynewversioncreated", ObjectKind::Key),
    ("microsoft.keyvault.keynearexpiry", ObjectKind::Key),
    ("microsoft.keyvault.keyexpired", ObjectKind::Key),
    (
        "microsoft.keyvault.certificatenewversioncreated",
        ObjectKind::Certificate,
    ),
    (
        "microsoft.keyvault.certificatenearexpiry",
        ObjectKind::Certificate,
    ),
    (
        "microsoft.keyvault.certificateexpired",
        ObjectKind::Certificate,
    ),
];

/// The Key Vault object of `kind` the connection uses, if any.
fn object_of(connection: &ConnectionSettings, kind: ObjectKind) -> Option<&str> {
    match (&connection.credential, kind) {
        (CredentialSource::Secret(SecretSource::KeyVault { secret_name }), ObjectKind::Secret) => {
            Some(secret_name)
        }
        (CredentialSource::Assertion(settings), _) => match (&settings.key, kind) {
            (AssertionKey::KeyVaultKey(name), ObjectKind::Key)
            | (AssertionKey::KeyVaultCertificate(name), ObjectKind::Certificate) => Some(name),
            _ => None,
        },
        _ => None,
    }
}

/// Handles one invocation. Malformed JSON is a 400 (the host never sends it); an event that
/// is not for this broker is acknowledged with a log line, since retrying it cannot help.
pub async fn handle(state: &AppState, body: Body) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, MAX_INVOCATION_BYTES).await else {
        return ApiError::InvalidRequest("the invocation body is too large or incomplete".into())
            .into_response();
    };
    let Ok(payload) = serde_json::from_slice::<Value>(&bytes) else {
        return ApiError::InvalidRequest("the invocation body is not JSON".into()).into_response();
    };
    let logs = match event_of(&payload) {
        Some(event) => apply(state, &event).await,
        None => vec!["ignored: the invocation carries no Event Grid event".to_string()],
    };
    for line in &logs {
        tracing::info!(target: "rotation", "{line}");
    }
    Json(json!({ "Outputs": {}, "Logs": logs, "ReturnValue": null })).into_response()
}

/// The event in `{"Data": {<binding>: event}}`. The event may be an object, a JSON string
/// holding it, or a JSON string holding such a string (the Functions host serializes a string
/// trigger value once more before sending it).
fn event_of(payload: &Value) -> Option<Map<String, Value>> {
    let data = get(payload.as_object()?, "data")?.as_object()?;
    let mut event = get(data, "event").or_else(|| data.values().next())?.clone();
    for _ in 0..MAX_STRING_ENCODINGS {
        match event {
            Value::String(text) => event = serde_json::from_str::<Value>(&text).ok()?,
            _ => break,
        }
    }
    match event {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// A key looked up case-insensitively: real traffic is PascalCase, the docs camelCase.
fn get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(key))
        .map(|(_, value)| value)
}

async fn apply(state: &AppState, event: &Map<String, Value>) -> Vec<String> {
    // Event Grid schema says `eventType`, CloudEvents says `type`.
    let event_type = get(event, "eventType")
        .or_else(|| get(event, "type"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let lowered = event_type.to_ascii_lowercase();
    let Some(&(_, kind)) = ROTATION_EVENTS.iter().find(|(name, _)| *name == lowered) else {
        return vec![format!(
            "ignored: event type '{}' is not a secret, key or certificate rotation",
            printable(event_type)
        )];
    };
    let data = get(event, "data").and_then(Value::as_object);
    let object_name = data
        .and_then(|data| get(data, "ObjectName"))
        .or_else(|| get(event, "subject"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let connections: Vec<&str> = state
        .connections
        .iter()
        .filter(|(_, connection)| {
            object_of(connection, kind).is_some_and(|name| name.eq_ignore_ascii_case(object_name))
        })
        .map(|(key, _)| key.as_str())
        .collect();
    if connections.is_empty() {
        return vec![format!(
            "ignored: no connection uses {kind} '{}'",
            printable(object_name)
        )];
    }
    let configured_name = connections
        .first()
        .and_then(|key| object_of(&state.connections[*key], kind))
        .unwrap_or_default()
        .to_string();
    state.credentials.invalidate(kind, &configured_name);
    for connection in &connections {
        state.token_client.connection_rotated(connection);
    }
    let evicted = state.cache.evict_connections(&connections);
    vec![format!(
        "{}: {kind} '{}' will be read again; dropped {} cached token(s) of connection(s) {}",
        printable(event_type),
        configured_name,
        evicted,
        connections.join(", ")
    )]
}

/// Event fields come from outside: keep log lines plain.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_may_be_an_object_or_a_string_with_any_key_casing() {
        let object = json!({"Data": {"event": {"EventType": "x", "Data": {"ObjectName": "s"}}}, "Metadata": {}});
        assert!(event_of(&object).is_some());
        let string = json!({"data": {"event": "{\"eventType\":\"x\"}"}});
        assert_eq!(get(&event_of(&string).unwrap(), "EVENTTYPE").unwrap(), "x");
        assert!(event_of(&json!({"Data": {}})).is_none());
    }

    #[test]
    fn a_string_of_a_string_is_decoded_as_the_host_sends_it() {
        let event = json!({"eventType": "Microsoft.KeyVault.SecretNewVersionCreated"});
        let once = Value::String(event.to_string());
        let twice = Value::String(once.to_string());
        for value in [event.clone(), once, twice] {
            let decoded = event_of(&json!({"Data": {"event": value}})).expect("decoded");
            assert_eq!(Value::Object(decoded), event);
        }
        // Nesting beyond what the host does, and a string that is not an event, are ignored.
        let deep = (0..4).fold(event, |value, _| Value::String(value.to_string()));
        assert!(event_of(&json!({"Data": {"event": deep}})).is_none());
        assert!(event_of(&json!({"Data": {"event": "\"plain text\""}})).is_none());
    }
}
