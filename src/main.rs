//! `token-broker` serves tokens; `token-broker check` validates the configuration and exits.

use std::process::ExitCode;

use token_broker::config::{self, ProcessEnvironment};
use token_broker::observe::otel::Otel;
use token_broker::observe::{Observers, telemetry};
use token_broker::startup::{Application, shutdown_signal};

/// mimalloc rather than the C library's allocator: a request's buffers are often freed on
/// another worker thread than the one that allocated them, and glibc's per-thread arenas then
/// contend on a lock per free (seen in profiles of the cache-hit path). The price is memory:
/// it keeps more resident (about 30 MiB at peak under the benchmark, against about 20). The
/// benchmark's bare servers use it too, so that they compare work done, not allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => serve(),
        Some("check") => check(),
        Some("--version") => {
            println!("token-broker {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(_) => {
            eprintln!("usage: token-broker [serve | check | --version]");
            ExitCode::from(2)
        }
    }
}

fn check() -> ExitCode {
    let path = config::config_path(&ProcessEnvironment);
    match config::load(&ProcessEnvironment) {
        Ok(settings) => {
            println!(
                "{}: valid ({} connection{})",
                path.display(),
                settings.connections.len(),
                if settings.connections.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> ExitCode {
    // The runtime first: OpenTelemetry's exporter (when configured) sends on it, and its span
    // layer is part of the log subscriber made next.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut observers = Observers::default();
    let otel = runtime.block_on(async { Otel::from_env() });
    let (otel, otel_problem) = match otel {
        Ok(otel) => (otel, None),
        Err(problem) => (None, Some(problem)),
    };
    observers.otel = otel.clone();
    // Dropped last: writes out the log, audit records included, before the process exits.
    // The writer is told what to do besides writing lines: the audit's hit records every
    // interval, and where lost audit records are counted.
    let _log_writer = telemetry::init(
        observers.producers(),
        otel.as_ref().and_then(|otel| otel.layer()),
    );
    if let Some(problem) = otel_problem {
        tracing::error!(%problem, "OpenTelemetry is configured but cannot start; not exporting");
    } else if let Some(otel) = &otel {
        tracing::info!(
            traces = otel.traces(),
            "OpenTelemetry: exporting over OTLP/HTTP"
        );
    }
    let settings = match config::load(&ProcessEnvironment) {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!(problems = ?error.problems, path = %error.path, "invalid configuration; not starting");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let connections = settings.connections.len();
        let application = match Application::build(settings, observers).await {
            Ok(application) => application,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        // Its own target, so that `RUST_LOG=warn,token_broker::startup=info` keeps the bound
        // port visible (with `FUNCTIONS_CUSTOMHANDLER_PORT=0` it is the only way to learn it).
        tracing::info!(
            target: "token_broker::startup",
            port = application.port(),
            connections,
            "token-broker listening"
        );
        // Out now rather than at the log writer's next interval: whoever started the broker
        // on port 0 is waiting for this line to learn where to send requests.
        telemetry::flush(std::time::Duration::from_millis(250));
        match application.run_until(shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(%error, "server failed");
                ExitCode::FAILURE
            }
        }
    });
    // The last metrics and spans, sent on the runtime while it still runs (the export blocks,
    // so not on one of its workers).
    if let Some(otel) = otel {
        let _ = runtime.block_on(tokio::task::spawn_blocking(move || otel.shutdown()));
    }
    code
}
