//! The `function-rotation` function: Key Vault's Event Grid events, as the Functions host
//! delivers them to a custom handler (`POST /function-rotation`, JSON payload format).
//!
//! `SecretNewVersionCreated`, `SecretNearExpiry` and `SecretExpired` for a secret the broker
//! serves (and the same events of a signing key or certificate a `private_key_jwt` connection
//! uses) make the next use read Key Vault again, drop the tokens minted with the old version
//! and forget a rejection the connection's negative cache holds, so a rotation (or a repaired
//! secret) takes effect at once in the process that receives the event instead of at the next
//! cache TTL. On Flex Consumption that process serves no token requests (per-function
//! scaling): with the shared cache it tells every instance; without it, HTTP instances pick
//! the new version up at their next re-read (see the README's "How it runs on Flex
//! Consumption").

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
    let Some(rotated) = rotate_locally(state, kind, object_name) else {
        return vec![format!(
            "ignored: no connection uses {kind} '{}'",
            printable(object_name)
        )];
    };
    let mut line = format!(
        "{}: {kind} '{}' will be read again; dropped {} cached token(s) of connection(s) {}",
        printable(event_type),
        rotated.object_name,
        rotated.evicted,
        rotated.connections.join(", ")
    );
    // On Flex Consumption this process serves no token request (the rotation function runs
    // on instances of its own): only the shared tier carries the rotation to those that do.
    if let Some(shared) = &state.shared {
        let connections: Vec<&str> = rotated.connections.iter().map(String::as_str).collect();
        match shared
            .announce_rotation(&announced_object(kind, &rotated.object_name), &connections)
            .await
        {
            Ok(deleted) => line.push_str(&format!(
                "; told every instance through the shared cache and deleted {deleted} shared token(s)"
            )),
            Err(reason) => {
                tracing::warn!(target: "rotation", reason, "rotation not announced to the other instances");
                line.push_str(&format!(
                    "; not announced to the other instances ({reason}): they read it again within secret_ttl_seconds or at their first refusal"
                ));
            }
        }
    }
    vec![line]
}

/// What a rotation changed in this process.
struct Rotated {
    /// The object's name as configured.
    object_name: String,
    connections: Vec<String>,
    evicted: usize,
}

/// How a rotated object is named between instances: its kind and its configured name
/// (`secret/contoso-secret`); Key Vault names hold no `/`.
pub fn announced_object(kind: ObjectKind, name: &str) -> String {
    format!("{}/{}", kind.as_str(), name.to_ascii_lowercase())
}

/// The Key Vault objects a connection uses, as `announced_object` names them.
pub fn objects_of(connection: &ConnectionSettings) -> Vec<String> {
    [ObjectKind::Secret, ObjectKind::Key, ObjectKind::Certificate]
        .into_iter()
        .filter_map(|kind| object_of(connection, kind).map(|name| announced_object(kind, name)))
        .collect()
}

/// Makes this process read the object again before its next use, forget a rejection the
/// negative cache holds for the connections using it, and drop their tokens from memory.
/// `None` when no connection uses that object.
fn rotate_locally(state: &AppState, kind: ObjectKind, object_name: &str) -> Option<Rotated> {
    let connections: Vec<&str> = state
        .connections
        .iter()
        .filter(|(_, connection)| {
            object_of(connection, kind).is_some_and(|name| name.eq_ignore_ascii_case(object_name))
        })
        .map(|(key, _)| key.as_str())
        .collect();
    let configured_name = connections
        .first()
        .and_then(|key| object_of(&state.connections[*key], kind))?
        .to_string();
    state.credentials.invalidate(kind, &configured_name);
    for connection in &connections {
        state.token_client.connection_rotated(connection);
    }
    let evicted = state.cache.evict_connections(&connections);
    Some(Rotated {
        object_name: configured_name,
        connections: connections.iter().map(|name| name.to_string()).collect(),
        evicted,
    })
}

/// Applies a rotation another instance announced through the shared cache (`object` as
/// `announced_object` names it).
pub async fn apply_announced(state: &AppState, object: &str) {
    let Some((kind, name)) = object.split_once('/') else {
        return;
    };
    let kind = match kind {
        "secret" => ObjectKind::Secret,
        "key" => ObjectKind::Key,
        "certificate" => ObjectKind::Certificate,
        _ => return,
    };
    if let Some(rotated) = rotate_locally(state, kind, name) {
        tracing::info!(
            target: "rotation",
            kind = kind.as_str(),
            object = %rotated.object_name,
            connections = %rotated.connections.join(", "),
            dropped = rotated.evicted,
            "rotation announced by another instance: it will be read again"
        );
    }
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
