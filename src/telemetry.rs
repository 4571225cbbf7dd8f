//! Logging: `tracing` JSON lines on stdout, which the Functions host collects (stderr lines
//! would be logged as errors), at the level `RUST_LOG` asks for (default `info`).
//!
//! Lines go into one in-memory buffer that is written out when it fills and at least every
//! 200 ms (and at exit). Under load that is one `write` for hundreds of lines and no thread
//! wake-up per line: the profile of a cache hit showed per-line writes and wake-ups of a
//! writer thread as the largest cost after the network itself.

use std::io::{BufWriter, Stdout, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How often buffered lines are written out when the buffer does not fill first.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// The process's log output: stdout behind a 64 KiB buffer.
pub struct LogOutput {
    // A std mutex: held for one memory copy per line (or one write when the buffer is full).
    out: Mutex<BufWriter<Stdout>>,
}

static OUTPUT: OnceLock<LogOutput> = OnceLock::new();
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `init` ran (the audit writer falls back to `tracing` events otherwise).
pub fn installed() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The log output, shared by `tracing` and the audit writer.
pub fn output() -> &'static LogOutput {
    OUTPUT.get_or_init(|| LogOutput {
        out: Mutex::new(BufWriter::with_capacity(64 * 1024, std::io::stdout())),
    })
}

impl LogOutput {
    /// Appends whole lines (the caller passes complete records).
    pub fn write_lines(&self, lines: &[u8]) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.write_all(lines);
        }
    }

    /// Writes out everything buffered.
    pub fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}

/// One formatted event, handed to `LogOutput` in one piece.
pub struct LineWriter(&'static LogOutput);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_lines(buf);
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
        LineWriter(output())
    }
}

/// Flushes the log output when dropped: keep it until exit.
pub struct FlushGuard;

impl Drop for FlushGuard {
    fn drop(&mut self) {
        output().flush();
    }
}

/// Installs the global subscriber and the periodic flush. Called once from `main`.
pub fn init() -> FlushGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_span_events(FmtSpan::NONE)
        .with_env_filter(filter)
        .with_writer(MakeLineWriter)
        .init();
    INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = std::thread::Builder::new()
        .name("log-flush".to_string())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_INTERVAL);
                output().flush();
            }
        });
    FlushGuard
}
