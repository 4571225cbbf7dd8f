//! Logging: `tracing` JSON lines on stdout, which the Functions host collects (stderr lines
//! would be logged as errors), at the level `RUST_LOG` asks for (default `info`), and the
//! audit records and `stats` lines, which are written whatever `RUST_LOG` says.
//!
//! No request ever waits for stdout. Every line goes into a bounded queue (`try_send`, never a
//! blocking send) and one writer thread empties it every 100 ms, or as soon as it is half full,
//! in one `write` per batch: under load that is one write for hundreds of lines and no thread
//! wake-up per line (the profile of a cache hit showed per-line writes and wake-ups of a writer
//! thread as the largest cost after the network itself). When stdout cannot keep up (a full
//! pipe, a stalled collector), the queue fills and lines are dropped, never waited for; log
//! lines are dropped first, so that they cannot crowd out audit records. Every loss is counted
//! and reported by the writer in a line of its own as soon as it can write again:
//! `"audit records lost"` (target `audit`, fields `dropped` and `write_errors`; `dropped`
//! counts tokens, an aggregated record's whole `count`, so that the `count`s written plus the
//! `dropped` reported equal the tokens handed out) and `"log lines lost"` (field `dropped`).
//!
//! The writer also writes the audit aggregator's cache-hit records (see `audit`): every
//! `audit::HIT_INTERVAL`, and whenever the log is flushed, so that shutdown writes them too.
//! They go straight into its batch, never through the queue, so a full queue cannot lose them.
//!
//! A hand-made pipeline rather than `tracing-appender`'s non-blocking writer: that one drops
//! silently on write errors, cannot tell audit records from other lines, and wakes its worker
//! for every line when idle.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How often queued lines are written out when the queue does not reach half full first.
/// Records must reach stdout within a second; this leaves a wide margin.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Lines the queue holds by default: at the benchmark's peak rate, several flush intervals.
pub const DEFAULT_QUEUE_LINES: usize = 16_384;
/// The app setting that changes the queue's size (lines, 16 to 1,048,576).
pub const QUEUE_LINES_SETTING: &str = "TOKEN_BROKER_LOG_QUEUE_LINES";
/// Bytes gathered before a write when the queue holds more.
const BATCH_BYTES: usize = 256 * 1024;
/// How long shutdown waits for the log to be written out (stdout may be a full pipe).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// What a queued line is, for the loss accounting.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An audit record standing for this many tokens.
    Audit(u64),
    Log,
    /// A `stats` line: one per interval, so it may use the whole queue like an audit record;
    /// its loss is counted with the log lines'.
    Stats,
    /// A loss report: regenerated until written, never counted as lost itself.
    Report,
}

struct Line {
    bytes: Vec<u8>,
    kind: Kind,
}

/// Where periodic work hands its records: a whole line, and the number of tokens it stands for.
pub type RecordSink<'a> = dyn FnMut(Vec<u8>, u64) + 'a;

/// What the log writer is given to do besides writing queued lines, by `main`: the pipeline
/// does not import its producers.
#[derive(Clone)]
pub struct Producers {
    /// Called every `every` and at each flush with a sink for records (a whole line and the
    /// number of tokens it stands for): the audit's aggregated hit records.
    pub periodic: Arc<Periodic>,
    pub every: Duration,
    /// Told how many tokens' audit records were lost (dropped at a full queue, or lost to a
    /// failed write), so that the counters can report it.
    pub audit_lost: Arc<LossCounter>,
}

/// The writer's periodic work: records handed to the sink it is given.
pub type Periodic = dyn Fn(SystemTime, &mut RecordSink<'_>) + Send + Sync;

/// Where lost audit records (as the tokens they stand for) are counted.
pub type LossCounter = dyn Fn(u64) + Send + Sync;

impl Producers {
    /// No periodic work and no loss counter: the writer only writes what is queued.
    pub fn none() -> Self {
        Self {
            periodic: Arc::new(|_, _| {}),
            every: Duration::from_secs(3600),
            audit_lost: Arc::new(|_| {}),
        }
    }
}

/// The producer side, shared by every thread.
struct Pipeline {
    producers: Producers,
    sender: SyncSender<Line>,
    capacity: usize,
    /// Lines sent and not yet taken by the writer (an upper bound of the queue's length).
    pending: AtomicUsize,
    writer: Thread,
    audit_dropped: AtomicU64,
    log_dropped: AtomicU64,
    /// Flush requests made and completed, so that `flush` can wait for its own.
    flush_requested: AtomicU64,
    flush_completed: Mutex<u64>,
    flushed: Condvar,
}

/// The one process-wide static: the `tracing` subscriber that writes through it is
/// process-wide too.
static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// Whether `init` ran (the audit writer falls back to `tracing` events otherwise).
pub fn installed() -> bool {
    PIPELINE.get().is_some()
}

/// `now` as the log lines write it: RFC 3339, UTC, microseconds (the audit records, the stats
/// lines and the loss reports alike).
pub(crate) fn rfc3339_micros(now: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(now).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `value` as one JSON log line, newline included. Serializing the broker's own records
/// (numbers and borrowed strings) into a `Vec` cannot fail, so there is no error to return.
pub fn json_line(value: &impl Serialize, capacity: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(capacity);
    let _ = serde_json::to_writer(&mut bytes, value);
    bytes.push(b'\n');
    bytes
}

/// Queues one audit record (a whole line) standing for `count` tokens. Never blocks; a record
/// that finds the queue full is counted (its `count`) and reported by the writer.
pub fn write_audit(line: Vec<u8>, count: u64) {
    if let Some(pipeline) = PIPELINE.get() {
        pipeline.send(line, Kind::Audit(count));
    }
}

/// Queues one `stats` line. Never blocks. Before `init` (library use) it becomes an ordinary
/// event.
pub fn write_stats(line: Vec<u8>) {
    match PIPELINE.get() {
        Some(pipeline) => pipeline.send(line, Kind::Stats),
        None => tracing::info!(target: "stats", line = %String::from_utf8_lossy(&line).trim_end()),
    }
}

impl Pipeline {
    fn send(&self, bytes: Vec<u8>, kind: Kind) {
        let before = self.pending.fetch_add(1, Ordering::Relaxed);
        // Log lines leave the last quarter of the queue to audit records.
        let room = match kind {
            Kind::Log => self.capacity - self.capacity / 4,
            Kind::Audit(_) | Kind::Report | Kind::Stats => self.capacity,
        };
        let sent = before < room
            && match self.sender.try_send(Line { bytes, kind }) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            };
        if !sent {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            match kind {
                Kind::Audit(count) => {
                    self.audit_dropped.fetch_add(count, Ordering::Relaxed);
                    (self.producers.audit_lost)(count);
                }
                // Reports are made by the writer itself, never queued.
                Kind::Report => {}
                Kind::Log | Kind::Stats => {
                    self.log_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else if before + 1 == self.capacity / 2 {
            // Half full: write now rather than at the next tick.
            self.writer.unpark();
        }
    }

    /// Waits until every line queued before the call was written out (or failed), at most
    /// `timeout`. Returns whether it finished.
    fn flush(&self, timeout: Duration) -> bool {
        let request = self.flush_requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.writer.unpark();
        let deadline = Instant::now() + timeout;
        let mut completed = self
            .flush_completed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while *completed < request {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            completed = self
                .flushed
                .wait_timeout(completed, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        true
    }
}

/// Writes out everything queued so far, waiting at most `timeout`; `false` when it could not
/// (stdout blocked). Nothing to do before `init`.
pub fn flush(timeout: Duration) -> bool {
    PIPELINE
        .get()
        .is_none_or(|pipeline| pipeline.flush(timeout))
}

/// One formatted `tracing` event, queued in one piece.
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(pipeline) = PIPELINE.get() {
            pipeline.send(buf.to_vec(), Kind::Log);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hands `tracing` a writer per event.
pub struct MakeLineWriter;

impl<'a> MakeWriter<'a> for MakeLineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter
    }
}

/// Writes the log out when dropped (at most 5 s, as stdout may be blocked): keep it until exit.
pub struct FlushGuard;

impl Drop for FlushGuard {
    fn drop(&mut self) {
        flush(SHUTDOWN_FLUSH);
    }
}

/// Installs the global subscriber and starts the writer thread, which also does `producers`'
/// periodic work. Called once from `main`.
pub fn init(producers: Producers, traces: Option<TraceLayer>) -> FlushGuard {
    let (capacity, bad_setting) = match std::env::var(QUEUE_LINES_SETTING) {
        Err(_) => (DEFAULT_QUEUE_LINES, false),
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(lines) if (16..=1_048_576).contains(&lines) => (lines, false),
            _ => (DEFAULT_QUEUE_LINES, true),
        },
    };
    start(capacity, std::io::stdout, producers);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match traces {
        // Without a span exporter, the filter is the subscriber's own (the cheapest check).
        None => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_span_events(FmtSpan::NONE)
            .with_env_filter(filter)
            .with_writer(MakeLineWriter)
            .init(),
        // With one, each output filters for itself: `RUST_LOG` decides the lines, the
        // exporter's own filter the spans it exports.
        Some(traces) => {
            let lines = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_span_events(FmtSpan::NONE)
                .with_writer(MakeLineWriter)
                .with_filter(filter);
            tracing_subscriber::registry()
                .with(traces)
                .with(lines)
                .init();
        }
    }
    if bad_setting {
        tracing::warn!(
            setting = QUEUE_LINES_SETTING,
            default = DEFAULT_QUEUE_LINES,
            "not a number of lines from 16 to 1048576; using the default"
        );
    }
    FlushGuard
}

/// A layer that exports spans (OpenTelemetry's), with its own filter.
pub type TraceLayer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Starts the writer thread on `output` (a factory, as `Stdout` handles are cheap and the
/// writer takes one per batch). Only the first call has an effect.
fn start<W: Write + 'static>(capacity: usize, output: fn() -> W, producers: Producers) {
    let (sender, receiver) = std::sync::mpsc::sync_channel(capacity);
    let audit_lost = producers.audit_lost.clone();
    let handle = std::thread::Builder::new()
        .name("log-writer".to_string())
        .spawn(move || {
            // The pipeline is set before the thread can be unparked for anything.
            let pipeline = loop {
                match PIPELINE.get() {
                    Some(pipeline) => break pipeline,
                    None => std::thread::park(),
                }
            };
            Writer::new(output, audit_lost).run(pipeline, &receiver);
        });
    let Ok(handle) = handle else {
        // No thread, no log: the process still serves (lines are counted as dropped).
        return;
    };
    let writer = handle.thread().clone();
    let _ = PIPELINE.set(Pipeline {
        producers,
        sender,
        capacity,
        pending: AtomicUsize::new(0),
        writer: writer.clone(),
        audit_dropped: AtomicU64::new(0),
        log_dropped: AtomicU64::new(0),
        flush_requested: AtomicU64::new(0),
        flush_completed: Mutex::new(0),
        flushed: Condvar::new(),
    });
    writer.unpark();
}

/// The consumer side, owned by the writer thread.
struct Writer<W> {
    output: fn() -> W,
    /// Where lost audit records are counted besides the writer's own report.
    audit_lost_to: Arc<LossCounter>,
    batch: Vec<u8>,
    /// Where each line of the batch ends, and what it is.
    lines: Vec<(usize, Kind)>,
    /// Losses not yet reported (a report that could not be written keeps them here).
    audit_lost: u64,
    log_lost: u64,
    write_errors: u64,
    /// The last failed write stopped inside a line: start the next one on a new line.
    mid_line: bool,
}

/// The report of lost lines, shaped like the other log lines.
#[derive(Serialize)]
struct LossReport<'a> {
    timestamp: String,
    level: &'static str,
    message: &'static str,
    dropped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    write_errors: Option<u64>,
    target: &'a str,
}

impl<W: Write> Writer<W> {
    fn new(output: fn() -> W, audit_lost_to: Arc<LossCounter>) -> Self {
        Self {
            output,
            audit_lost_to,
            batch: Vec::with_capacity(BATCH_BYTES),
            lines: Vec::new(),
            audit_lost: 0,
            log_lost: 0,
            write_errors: 0,
            mid_line: false,
        }
    }

    fn run(mut self, pipeline: &Pipeline, receiver: &Receiver<Line>) {
        let producers = &pipeline.producers;
        let mut periodic_due = Instant::now() + producers.every;
        let mut flushes_seen = 0;
        loop {
            std::thread::park_timeout(FLUSH_INTERVAL);
            // Lines queued before this load are all taken below: flush waits on it.
            let flush_request = pipeline.flush_requested.load(Ordering::SeqCst);
            // At most the lines queued now: producers that keep the queue full must not keep
            // this round from ending, or the loss reports and the hit records would wait for
            // the load to drop.
            let queued = pipeline.pending.load(Ordering::Relaxed);
            for line in receiver.try_iter().take(queued.max(1)) {
                pipeline.pending.fetch_sub(1, Ordering::Relaxed);
                self.push(&line.bytes, line.kind);
                if self.batch.len() >= BATCH_BYTES {
                    self.write_batch();
                }
            }
            // Hits counted before a flush request are written by that flush (shutdown), after
            // the records queued before them.
            let now = Instant::now();
            if now >= periodic_due || flush_request > flushes_seen {
                periodic_due = now + producers.every;
                flushes_seen = flush_request;
                (producers.periodic)(SystemTime::now(), &mut |line, count| {
                    self.push(&line, Kind::Audit(count));
                });
            }
            self.audit_lost += pipeline.audit_dropped.swap(0, Ordering::Relaxed);
            self.log_lost += pipeline.log_dropped.swap(0, Ordering::Relaxed);
            self.push_reports();
            self.write_batch();
            let mut completed = pipeline
                .flush_completed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *completed < flush_request {
                *completed = flush_request;
                pipeline.flushed.notify_all();
            }
        }
    }

    fn push(&mut self, bytes: &[u8], kind: Kind) {
        self.batch.extend_from_slice(bytes);
        if !bytes.ends_with(b"\n") {
            self.batch.push(b'\n');
        }
        self.lines.push((self.batch.len(), kind));
    }

    /// Appends the loss reports last: they are written only if everything before them was,
    /// so the counts they carry are cleared only once they are out.
    fn push_reports(&mut self) {
        let timestamp = || rfc3339_micros(SystemTime::now());
        if self.audit_lost > 0 || self.write_errors > 0 {
            let report = LossReport {
                timestamp: timestamp(),
                level: "WARN",
                message: "audit records lost",
                dropped: self.audit_lost,
                write_errors: Some(self.write_errors),
                target: "audit",
            };
            self.push_report(&report);
        }
        if self.log_lost > 0 {
            let report = LossReport {
                timestamp: timestamp(),
                level: "WARN",
                message: "log lines lost",
                dropped: self.log_lost,
                write_errors: None,
                target: module_path!(),
            };
            self.push_report(&report);
        }
    }

    fn push_report(&mut self, report: &LossReport<'_>) {
        if let Ok(bytes) = serde_json::to_vec(report) {
            self.push(&bytes, Kind::Report);
        }
    }

    /// Writes the batch. A failed write counts the lines it did not get out as lost and is
    /// itself counted; a would-block answer (stdout set non-blocking by the parent) is waited
    /// out here, on the writer thread, where waiting costs no request anything.
    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut output = (self.output)();
        let mut written = 0;
        if self.mid_line && output.write_all(b"\n").is_ok() {
            self.mid_line = false;
        }
        let mut failed = false;
        while written < self.batch.len() {
            match output.write(&self.batch[written..]) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(count) => written += count,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if output.flush().is_err() {
            failed = true;
        }
        let reports_written = !failed;
        if failed {
            self.write_errors += 1;
            self.mid_line = written > 0 && self.batch[written - 1] != b'\n';
            for &(end, kind) in &self.lines {
                if end > written {
                    match kind {
                        Kind::Audit(count) => {
                            self.audit_lost += count;
                            (self.audit_lost_to)(count);
                        }
                        Kind::Log | Kind::Stats => self.log_lost += 1,
                        Kind::Report => {}
                    }
                }
            }
        }
        if reports_written && self.lines.iter().any(|(_, kind)| *kind == Kind::Report) {
            self.audit_lost = 0;
            self.log_lost = 0;
            self.write_errors = 0;
        }
        self.batch.clear();
        self.lines.clear();
    }
}

#[cfg(test)]
mod tests;
