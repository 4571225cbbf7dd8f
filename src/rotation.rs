//! The `function-rotation` function: Key Vault's Event Grid events, as the Functions host
//! delivers them to a custom handler (`POST /function-rotation`, JSON payload format).
//!
//! `SecretNewVersionCreated` for a secret the broker serves (and `KeyNewVersionCreated` or
//! `CertificateNewVersionCreated` for a signing key or certificate a `private_key_jwt`
//! connection uses) makes the next use read Key Vault again, drops the tokens minted with the
//! old version and forgets a rejection the connection's negative cache holds, so a rotation
//! (or a repaired secret) takes effect at once in the process that receives the event instead
//! of at the next cache TTL. On Flex Consumption that process serves no token requests
//! (per-function scaling): with the shared cache it tells every instance; without it, HTTP
//! instances pick the new version up at their next re-read (see "How it runs on
//! Flex Consumption" in docs/deployment.md).
//!
//! `*NearExpiry` and `*Expired` are reminders, not changes: nothing has a new version yet, so
//! they change nothing but a warning line (the near-expiry alert is Azure Monitor's job).
//! Dropping tokens on a reminder would cost every instance a fetch 30 days before anything
//! changes.
//!
//! The host fails an invocation, and Event Grid delivers the event again, only on a non-2xx
//! answer: a rotation this instance applied but could not announce to the fleet is answered
//! 503, so that the announcement is retried rather than lost.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::app_state::AppState;
use crate::credentials::ObjectKind;
use crate::error::ApiError;

/// The function's folder name, which is its path.
pub(crate) const PATH: &str = "/function-rotation";

/// How many times a trigger value may be JSON-encoded as a string: the host encodes a string
/// value once more (an Event Grid event the binding hands over as a string arrives as a
/// string of a string); one level of margin beyond that.
const MAX_STRING_ENCODINGS: usize = 3;

/// Event types that mean "the object you hold has a new version", with the kind of object
/// they are about.
const ROTATION_EVENTS: &[(&str, ObjectKind)] = &[
    (
        "microsoft.keyvault.secretnewversioncreated",
        ObjectKind::Secret,
    ),
    ("microsoft.keyvault.keynewversioncreated", ObjectKind::Key),
    (
        "microsoft.keyvault.certificatenewversioncreated",
        ObjectKind::Certificate,
    ),
];

/// Reminders that an object will expire or has expired: logged as a warning, nothing else.
const EXPIRY_EVENTS: &[&str] = &[
    "microsoft.keyvault.secretnearexpiry",
    "microsoft.keyvault.secretexpired",
    "microsoft.keyvault.keynearexpiry",
    "microsoft.keyvault.keyexpired",
    "microsoft.keyvault.certificatenearexpiry",
    "microsoft.keyvault.certificateexpired",
];

/// The Key Vault object of `kind` the connection uses, if any.
/// Handles one invocation. Malformed JSON is a 400 (the host never sends it); an event that
/// is not for this broker is acknowledged with a log line, since retrying it cannot help. A
/// rotation that could not be announced to the fleet is a 503: the host then fails the
/// invocation and Event Grid delivers the event again.
pub(crate) async fn handle(state: &AppState, bytes: &[u8]) -> Result<Response, ApiError> {
    let Ok(payload) = serde_json::from_slice::<Value>(bytes) else {
        return Err(ApiError::InvalidRequest(
            "the invocation body is not JSON".into(),
        ));
    };
    let outcome = match event_of(&payload) {
        Some(event) => apply(state, &event).await,
        None => Outcome::done("ignored: the invocation carries no Event Grid event".to_string()),
    };
    for line in &outcome.logs {
        tracing::info!(target: "rotation", "{line}");
    }
    if let Some(reason) = outcome.not_announced {
        return Err(ApiError::RotationNotAnnounced(reason));
    }
    Ok(Json(json!({ "Outputs": {}, "Logs": outcome.logs, "ReturnValue": null })).into_response())
}

/// What an invocation did: its log lines, and why the fleet was not told when it was not.
struct Outcome {
    logs: Vec<String>,
    not_announced: Option<&'static str>,
}

impl Outcome {
    fn done(line: String) -> Self {
        Self {
            logs: vec![line],
            not_announced: None,
        }
    }
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

async fn apply(state: &AppState, event: &Map<String, Value>) -> Outcome {
    // Event Grid schema says `eventType`, CloudEvents says `type`.
    let event_type = get(event, "eventType")
        .or_else(|| get(event, "type"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let lowered = event_type.to_ascii_lowercase();
    let data = get(event, "data").and_then(Value::as_object);
    let object_name = data
        .and_then(|data| get(data, "ObjectName"))
        .or_else(|| get(event, "subject"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    if EXPIRY_EVENTS.contains(&lowered.as_str()) {
        // A reminder: the object has no new version, so nothing the broker holds is stale.
        tracing::warn!(
            target: "rotation",
            event_type = %printable(event_type),
            object = %printable(object_name),
            "key vault object near expiry or expired: rotate it (nothing was dropped or re-read)"
        );
        return Outcome::done(format!(
            "{}: {} '{}' is near expiry or expired; nothing changed (a new version's event will)",
            printable(event_type),
            kind_word(&lowered),
            printable(object_name)
        ));
    }
    let Some(&(_, kind)) = ROTATION_EVENTS.iter().find(|(name, _)| *name == lowered) else {
        return Outcome::done(format!(
            "ignored: event type '{}' is not a secret, key or certificate rotation",
            printable(event_type)
        ));
    };
    if let Some(shared) = &state.shared
        && kind == ObjectKind::Secret
        && shared.uses_encryption_key(object_name)
    {
        return match shared.rotate_encryption_key().await {
            Ok(line) => Outcome::done(format!("{}: {line}", printable(event_type))),
            Err(reason) => {
                tracing::warn!(target: "rotation", reason, "shared cache key rotation not completed");
                Outcome {
                    logs: vec![format!(
                        "{}: the shared cache's encryption key was not rotated ({reason}); asking for a redelivery",
                        printable(event_type)
                    )],
                    not_announced: Some(reason),
                }
            }
        };
    }
    let Some(rotated) = rotate_locally(state, kind, object_name) else {
        return Outcome::done(format!(
            "ignored: no connection uses {kind} '{}'",
            printable(object_name)
        ));
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
    let mut not_announced = None;
    if let Some(shared) = &state.shared {
        let connections: Vec<&str> = rotated.connections.iter().map(String::as_str).collect();
        match shared
            .announce_rotation(&kind.object_id(&rotated.object_name), &connections)
            .await
        {
            Ok(deleted) => line.push_str(&format!(
                "; told every instance through the shared cache and deleted {deleted} shared token(s)"
            )),
            Err(reason) => {
                tracing::warn!(target: "rotation", reason, "rotation not announced to the other instances");
                line.push_str(&format!(
                    "; not announced to the other instances ({reason}): answered 503 so that Event Grid delivers it again"
                ));
                not_announced = Some(reason);
            }
        }
    }
    Outcome {
        logs: vec![line],
        not_announced,
    }
}

/// "secret", "key" or "certificate", from an event type's name.
fn kind_word(event_type: &str) -> &'static str {
    let name = event_type.trim_start_matches("microsoft.keyvault.");
    if name.starts_with("secret") {
        "secret"
    } else if name.starts_with("key") {
        "key"
    } else {
        "certificate"
    }
}

/// What a rotation changed in this process.
struct Rotated {
    /// The object's name as configured.
    object_name: String,
    connections: Vec<String>,
    evicted: usize,
}

/// Makes this process read the object again before its next use, forget a rejection the
/// negative cache holds for the connections using it, and drop their tokens from memory.
/// `None` when no connection uses that object.
fn rotate_locally(state: &AppState, kind: ObjectKind, object_name: &str) -> Option<Rotated> {
    let connections: Vec<&str> = state
        .served
        .iter()
        .filter(|(_, served)| {
            served
                .settings
                .vault_object(kind)
                .is_some_and(|name| name.eq_ignore_ascii_case(object_name))
        })
        .map(|(key, _)| key.as_str())
        .collect();
    let configured_name = connections
        .first()
        .and_then(|key| state.served[*key].settings.vault_object(kind))?
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
/// `ObjectKind::object_id` names it).
pub(crate) async fn apply_announced(state: &AppState, object: &str) {
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
