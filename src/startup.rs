//! Wires the data path together and binds the listener.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::app_state::AppState;
use crate::cache::{SharedTier, SharedTierParts, TokenCache, TokenSource};
use crate::caller_check::CallerCheck;
use crate::config::Settings;
use crate::credentials::Credentials;
use crate::http_client::LazyClient;
use crate::routes::router;
use crate::token_client::TokenClient;

/// A broker bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
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
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let http = Arc::new(LazyClient::new(std::time::Duration::from_secs(5)));
        let credentials = Arc::new(Credentials::new(
            settings.key_vault.as_ref(),
            &settings.identity,
            http.clone(),
            settings.cache.secret_ttl,
            settings.cache.secret_refusal_grace,
        ));
        let connections = Arc::new(settings.connections);
        let callers = Arc::new(CallerCheck::new(&settings.callers, http.clone()));
        let token_client = Arc::new(TokenClient::new(credentials.clone(), &connections));
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
                });
                (tier.clone(), Some(tier), Some(rotated))
            }
            None => (token_client.clone(), None, None),
        };
        let cache = Arc::new(TokenCache::new(source, settings.cache.max_tokens));
        let state = AppState::new(cache, credentials, callers, token_client, connections)
            .with_shared_tier(shared);
        if let Some(mut rotated) = rotated {
            let state = state.clone();
            tokio::spawn(async move {
                while let Some(object) = rotated.recv().await {
                    crate::rotation::apply_announced(&state, &object).await;
                }
            });
        }

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, settings.port));
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartupError::Bind {
                port: settings.port,
                source,
            })?;
        Ok(Self {
            listener,
            router: router(state),
        })
    }

    /// The bound port (differs from the setting when it was 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map_or(0, |address| address.port())
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
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
