//! Wires the data path together and binds the listener.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::ServiceExt as _;
use tokio::net::TcpListener;

use crate::app_state::AppState;
use crate::cache::{Announced, SharedTier, SharedTierParts, TokenCache, TokenSource};
use crate::caller_check::CallerCheck;
use crate::config::Settings;
use crate::credentials::Credentials;
use crate::http_client::LazyClient;
use crate::observe::Observers;
use crate::routes::{BrokerService, service};
use crate::token_client::TokenClient;

/// A broker bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    service: BrokerService,
    /// For the `stats` line's gauges (open circuit breakers).
    state: AppState,
    stats_interval: Duration,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

impl Application {
    /// Wires the data path and binds `127.0.0.1:<port>`; the host always calls IPv4 loopback.
    /// Nothing here touches the network or loads TLS roots (the HTTP clients are built on first
    /// use), so the first readiness probe is answered at once.
    pub async fn build(settings: Settings, observers: Observers) -> Result<Self, StartupError> {
        let http = Arc::new(LazyClient::new(std::time::Duration::from_secs(5)));
        let credentials = Arc::new(Credentials::new(
            settings.key_vault.as_ref(),
            &settings.identity,
            http.clone(),
            settings.cache.secret_ttl,
            settings.cache.secret_refusal_grace,
            &observers,
        ));
        let connections = Arc::new(settings.connections);
        let callers = Arc::new(CallerCheck::new(
            &settings.callers,
            http.clone(),
            observers.stats.clone(),
        ));
        let token_client = Arc::new(TokenClient::new(
            credentials.clone(),
            &connections,
            &observers,
        ));
        // With `[shared_cache]`, the memory tier fetches through the shared tier, which
        // fetches through the token client; it connects in the background.
        let (source, shared, rotated): (Arc<dyn TokenSource>, _, _) = match &settings.shared_cache {
            Some(shared_settings) => {
                let (tier, rotated) = SharedTier::start(SharedTierParts {
                    settings: shared_settings,
                    source: token_client.clone(),
                    connections: connections.clone(),
                    credentials: credentials.clone(),
                    identity: &settings.identity,
                    key_vault: settings.key_vault.as_ref(),
                    http: http.clone(),
                    otel: observers.otel.clone(),
                });
                (tier.clone(), Some(tier), Some(rotated))
            }
            None => (token_client.clone(), None, None),
        };
        let cache = Arc::new(
            TokenCache::new(source, settings.cache.max_tokens)
                .with_traced_fetches(observers.otel.as_ref().is_some_and(|otel| otel.traces())),
        );
        let state = AppState::new(
            cache,
            credentials,
            callers,
            token_client,
            connections,
            observers,
        )
        .with_shared_tier(shared);
        if let Some(mut rotated) = rotated {
            let state = state.clone();
            tokio::spawn(async move {
                while let Some(announced) = rotated.recv().await {
                    match announced {
                        Announced::Rotated(object) => {
                            crate::rotation::apply_announced(&state, &object).await;
                        }
                        Announced::Invalidated(fingerprint) => {
                            let dropped = state.invalidator.announced(&fingerprint);
                            tracing::info!(
                                target: "shared_cache",
                                fingerprint = %fingerprint,
                                dropped,
                                "token invalidated by another instance: dropped from memory"
                            );
                        }
                    }
                }
            });
        }
        let stats_interval = settings.telemetry.stats_interval;

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, settings.port));
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartupError::Bind {
                port: settings.port,
                source,
            })?;
        Ok(Self {
            listener,
            service: service(state.clone()),
            state,
            stats_interval,
        })
    }

    /// The bound port (differs from the setting when it was 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map_or(0, |address| address.port())
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight. Writes the
    /// `stats` line every interval, and once more at the end for the last partial period.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let last_report = Arc::new(parking_lot::Mutex::new(LastReport {
            at: tokio::time::Instant::now(),
            shared: crate::observe::stats::SharedTierCounts::default(),
        }));
        let reporter = tokio::spawn(report_stats_every(
            self.stats_interval,
            self.state.clone(),
            last_report.clone(),
        ));
        let served = axum::serve(self.listener, self.service.into_make_service())
            .with_graceful_shutdown(shutdown)
            .await;
        reporter.abort();
        let _ = reporter.await;
        report_stats(&self.state, &last_report);
        served
    }
}

/// Writes the `stats` line every `interval` (the first one `interval` after the start).
async fn report_stats_every(
    interval: Duration,
    state: AppState,
    last_report: Arc<parking_lot::Mutex<LastReport>>,
) {
    let start = tokio::time::Instant::now() + interval;
    let mut ticker = tokio::time::interval_at(start, interval);
    // A late tick (a stalled runtime) is not made up for with a burst of lines.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        report_stats(&state, &last_report);
    }
}

/// When the last `stats` line was written, and the shared tier's totals then.
#[derive(Clone, Copy)]
struct LastReport {
    at: tokio::time::Instant,
    shared: crate::observe::stats::SharedTierCounts,
}

/// One `stats` line: the counts since the last one, and the circuit breakers open now.
fn report_stats(state: &AppState, last_report: &parking_lot::Mutex<LastReport>) {
    let open: Vec<&str> = state
        .served
        .iter()
        .filter(|(key, _)| {
            state.token_client.breaker(key.as_str())
                == Some(crate::upstream_guard::BreakerState::Open)
        })
        .map(|(_, served)| served.settings.name.as_str())
        .collect();
    let now = LastReport {
        at: tokio::time::Instant::now(),
        shared: state
            .shared
            .as_ref()
            .map(|tier| tier.counters().totals())
            .unwrap_or_default(),
    };
    let last = std::mem::replace(&mut *last_report.lock(), now);
    let shared = state
        .shared
        .as_ref()
        .map(|_| now.shared.since(&last.shared));
    state
        .observers
        .stats
        .report(now.at - last.at, &open, shared);
}

/// Completes on SIGTERM (how the host and App Service stop a worker) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing requests in flight");
}
