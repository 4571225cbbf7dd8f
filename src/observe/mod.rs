//! What the broker says about itself: the JSON log pipeline ([`telemetry`]), the audit records
//! of every token handed out ([`audit`]), the counters written every interval ([`stats`]), and
//! OpenTelemetry metrics and traces when an OTLP endpoint is configured ([`otel`]).
//!
//! A leaf: nothing here imports the domain. Domain code reports what happened as plain values
//! (a hand-out, a fetch's result, a Key Vault read), and `main` hands the log writer its
//! periodic work (the aggregated hit records) and its loss counter, so the pipeline does not
//! import its producers either: `telemetry` imports nothing, `audit` and `stats` import
//! `telemetry` and [`shard`]. The counters and the hit tallies are values ([`Observers`]) made
//! once and handed out; the log pipeline is the one process-wide static, since the `tracing`
//! subscriber it serves is process-wide too.

pub mod audit;
pub mod otel;
mod shard;
pub mod stats;
pub mod telemetry;

use std::sync::Arc;

/// What the broker's parts report to: the counters (with each connection's observations for
/// `/api/health`) and the audit's hit tallies. One per process, made by `main` (or a test),
/// handed to the parts that report and to the log writer that drains them; not a static, so
/// that what a part reports to is in its signature.
#[derive(Clone, Default)]
pub struct Observers {
    pub stats: Arc<stats::Registry>,
    pub hits: Arc<audit::HitAggregator>,
    /// OpenTelemetry's instruments, when its exporter is configured (see [`otel`]).
    pub otel: Option<Arc<otel::Otel>>,
}

impl Observers {
    /// What the log writer does besides writing lines: every [`audit::HIT_INTERVAL`] it
    /// writes the hit records, and it counts lost audit records in the stats.
    pub fn producers(&self) -> telemetry::Producers {
        let (hits, stats) = (self.hits.clone(), self.stats.clone());
        telemetry::Producers {
            periodic: Arc::new(move |now, sink| hits.drain_hits(now, sink)),
            every: audit::HIT_INTERVAL,
            audit_lost: Arc::new(move |tokens| stats.record_audit_dropped(tokens)),
        }
    }
}
