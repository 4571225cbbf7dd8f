//! The audit line: one JSON record per token handed out.
//!
//! It is written whatever `RUST_LOG` says: an audit trail that a log level can switch off is
//! not one. The record has its own path to the log output: serialized straight into one line
//! (same stream, same order, same JSON shape as the other lines) and queued without waiting,
//! instead of going through the generic `tracing` JSON formatter, which showed up as the
//! largest user-space cost of a cache hit. The queue never blocks a request; a record it has
//! no room for is counted and reported (see `telemetry`).

use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// What one audit line says. Never the token: its fingerprint only.
#[derive(Serialize)]
pub struct AuditRecord<'a> {
    pub connection: &'a str,
    pub caller: &'a str,
    pub scopes: &'a str,
    pub cache: &'a str,
    pub expires_on: u64,
    pub fingerprint: &'a str,
    #[serde(skip)]
    pub invocation_id: &'a str,
    #[serde(skip)]
    pub method: &'a str,
    #[serde(skip)]
    pub path: &'a str,
}

/// Writes the record (queued; see `telemetry`).
pub fn record(record: &AuditRecord<'_>) {
    if !crate::telemetry::installed() {
        // No log output installed (library use): fall back to an ordinary event.
        tracing::info!(
            target: "audit",
            connection = record.connection,
            caller = record.caller,
            scopes = record.scopes,
            cache = record.cache,
            expires_on = record.expires_on,
            fingerprint = record.fingerprint,
            "token handed out"
        );
        return;
    }
    crate::telemetry::write_audit(format_line(record, SystemTime::now()));
}

/// The line as written: the other log lines' shape (flattened fields, `target`, and the
/// request's `span`).
#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    message: &'static str,
    #[serde(flatten)]
    record: &'a AuditRecord<'a>,
    target: &'static str,
    span: Span<'a>,
}

#[derive(Serialize)]
struct Span<'a> {
    invocation_id: &'a str,
    method: &'a str,
    path: &'a str,
    name: &'static str,
}

/// The record as one JSON line, newline included.
fn format_line(record: &AuditRecord<'_>, now: SystemTime) -> Vec<u8> {
    let line = Line {
        timestamp: rfc3339_micros(now),
        level: "INFO",
        message: "token handed out",
        record,
        target: "audit",
        span: Span {
            invocation_id: record.invocation_id,
            method: record.method,
            path: record.path,
            name: "request",
        },
    };
    let mut bytes = Vec::with_capacity(384);
    // Serializing borrowed strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut bytes, &line);
    bytes.push(b'\n');
    bytes
}

/// RFC 3339 UTC with microseconds, as the other log lines have it.
pub(crate) fn rfc3339_micros(now: SystemTime) -> String {
    DateTime::<Utc>::from(now).to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_line_is_json_with_the_documented_fields() {
        let record = AuditRecord {
            connection: "demo",
            caller: "weird \"caller\"\n\u{1}",
            scopes: "read write",
            cache: "hit",
            expires_on: 1_795_846_471,
            fingerprint: "08430b6a962f",
            invocation_id: "inv-1",
            method: "GET",
            path: "/api/token/demo",
        };
        let now = UNIX_EPOCH + Duration::from_micros(1_795_842_871_123_456);
        let line = format_line(&record, now);
        assert!(line.ends_with(b"\n"));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["timestamp"], "2026-11-28T05:14:31.123456Z");
        assert_eq!(value["target"], "audit");
        assert_eq!(value["caller"], "weird \"caller\"\n\u{1}");
        assert_eq!(value["expires_on"], 1_795_846_471u64);
        assert_eq!(value["span"]["invocation_id"], "inv-1");
        assert_eq!(value["span"]["name"], "request");
        // The other log lines' order, as written (a parsed `Value` would sort the keys).
        let text = String::from_utf8(line).unwrap();
        let positions: Vec<usize> = [
            "timestamp",
            "level",
            "message",
            "connection",
            "caller",
            "scopes",
            "cache",
            "expires_on",
            "fingerprint",
            "target",
            "span",
        ]
        .iter()
        .map(|key| text.find(&format!("\"{key}\":")).unwrap())
        .collect();
        assert!(positions.is_sorted(), "{text}");
    }

    #[test]
    fn timestamps_have_microseconds_and_a_z() {
        let leap_day = UNIX_EPOCH + Duration::from_secs(11_016 * 86_400);
        assert_eq!(rfc3339_micros(leap_day), "2000-02-29T00:00:00.000000Z");
    }
}
