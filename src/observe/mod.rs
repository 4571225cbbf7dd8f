//! What the broker says about itself: the JSON log pipeline ([`telemetry`]), the audit records
//! of every token handed out ([`audit`]) and the counters written every interval ([`stats`]).
//!
//! A leaf: nothing here imports the domain. Domain code reports what happened as plain values
//! (a hand-out, a fetch's result, a Key Vault read), and `main` hands the log writer its
//! periodic work (the aggregated hit records) and its loss counter, so the pipeline does not
//! import its producers either: `telemetry` imports nothing, `audit` and `stats` import
//! `telemetry` and [`shard`].

pub mod audit;
mod shard;
pub mod stats;
pub mod telemetry;
