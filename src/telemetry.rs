//! Logging: `tracing` JSON lines on stdout, which the Functions host collects (stderr lines
//! would be logged as errors), at the level `RUST_LOG` asks for (default `info`).
//!
//! Lines are written by a background thread so that a request never waits on a `write`
//! system call, and in batches under load; the writer blocks rather than drops when its
//! queue is full, because audit lines must not be lost.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Installs the global subscriber. Keep the returned guard until exit: dropping it flushes.
pub fn init() -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        // A bounded queue: a burst waits for the writer rather than growing memory.
        .buffered_lines_limit(8192)
        // The worker drains every queued line, then flushes: under load, one write for many
        // lines instead of one system call per line.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_span_events(FmtSpan::NONE)
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .init();
    crate::audit::install(writer);
    guard
}
