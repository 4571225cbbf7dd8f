//! The audit line: one JSON record per token handed out.
//!
//! It is the one record written on every request, so it has its own writer: the fixed record
//! is formatted by hand into one buffer and appended to the same log output as every other
//! line (same stream, same order, same JSON shape), instead of going through the generic
//! `tracing` JSON formatter, which showed up as the largest user-space cost of a cache hit.
//! `RUST_LOG` still decides whether it is written (target `audit`, level INFO).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::Level;

/// What one audit line says. Never the token: its fingerprint only.
pub struct AuditRecord<'a> {
    pub connection: &'a str,
    pub caller: &'a str,
    pub scopes: &'a str,
    pub cache: &'a str,
    pub expires_on: u64,
    pub fingerprint: &'a str,
    pub invocation_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
}

/// Writes the record, when `RUST_LOG` enables target `audit` at INFO.
pub fn record(record: &AuditRecord<'_>) {
    if !tracing::enabled!(target: "audit", Level::INFO) {
        return;
    }
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
    let line = format_line(record, SystemTime::now());
    crate::telemetry::output().write_lines(line.as_bytes());
}

/// The record as one JSON line, shaped like the other log lines (flattened fields, `target`,
/// and the request's `span`).
fn format_line(record: &AuditRecord<'_>, now: SystemTime) -> String {
    let mut line = String::with_capacity(384);
    line.push_str("{\"timestamp\":\"");
    push_timestamp(&mut line, now);
    line.push_str("\",\"level\":\"INFO\",\"message\":\"token handed out\",\"connection\":");
    push_json_string(&mut line, record.connection);
    line.push_str(",\"caller\":");
    push_json_string(&mut line, record.caller);
    line.push_str(",\"scopes\":");
    push_json_string(&mut line, record.scopes);
    line.push_str(",\"cache\":");
    push_json_string(&mut line, record.cache);
    let _ = write!(line, ",\"expires_on\":{}", record.expires_on);
    line.push_str(",\"fingerprint\":");
    push_json_string(&mut line, record.fingerprint);
    line.push_str(",\"target\":\"audit\",\"span\":{\"invocation_id\":");
    push_json_string(&mut line, record.invocation_id);
    line.push_str(",\"method\":");
    push_json_string(&mut line, record.method);
    line.push_str(",\"path\":");
    push_json_string(&mut line, record.path);
    line.push_str(",\"name\":\"request\"}}\n");
    line
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// RFC 3339 UTC with microseconds, as the other log lines have it.
fn push_timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert!(line.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["timestamp"], "2026-11-28T05:14:31.123456Z");
        assert_eq!(value["target"], "audit");
        assert_eq!(value["caller"], "weird \"caller\"\n\u{1}");
        assert_eq!(value["expires_on"], 1_795_846_471u64);
        assert_eq!(value["span"]["invocation_id"], "inv-1");
    }

    #[test]
    fn dates_match_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
    }
}
