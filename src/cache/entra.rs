//! Microsoft Entra authentication to Azure's Redis: the managed identity's token for Redis is
//! the password and its object id the user name, sent again on every live connection before
//! the token expires.
//!
//! The token comes from the broker's own azure_identity credential through the redis crate's
//! credentials hook (`StreamingCredentialsProvider`); the crate's `entra-id` feature would
//! bring a second, older Azure SDK into the binary.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::TokenCredential;
use futures_util::Stream;
use redis::RedisResult;
use redis::auth::{BasicAuth, StreamingCredentialsProvider};
use tokio::sync::watch;

use crate::config::IdentitySettings;
use crate::credentials::vault::azure_credential;
use crate::http_client::LazyClient;

/// The scope of a token Azure Managed Redis and Azure Cache for Redis accept.
pub(crate) const REDIS_SCOPE: &str = "https://redis.azure.com/.default";
/// Microsoft asks for re-authentication at least 3 minutes before expiry; a random extra
/// minute keeps a fleet of instances from asking the identity endpoint at the same moment.
const RENEW_BEFORE: Duration = Duration::from_secs(180);
const RENEW_JITTER_SECONDS: u64 = 60;
/// Wait after a failed token request before the next.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The broker's identity for Redis: the same credential, HTTP client and retry bounds as the
/// Key Vault clients' (`credentials::vault::azure_credential`).
pub(crate) fn credential(
    identity: &IdentitySettings,
    client_id: Option<String>,
    http: &LazyClient,
) -> Result<Arc<dyn TokenCredential>, String> {
    let http = http.get().map_err(str::to_string)?;
    azure_credential(identity, client_id, http)
        .map_err(|error| format!("cannot build the credential ({:?})", error.kind()))
}

/// The latest credentials, renewed by a background task ahead of each token's expiry.
pub(crate) struct EntraCredentials {
    latest: watch::Receiver<Option<BasicAuth>>,
}

impl EntraCredentials {
    /// Starts renewing tokens for `username` (the identity's object id) from `credential`.
    pub(crate) fn start(credential: Arc<dyn TokenCredential>, username: String) -> Self {
        let (sender, latest) = watch::channel(None);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                if sender.is_closed() {
                    return;
                }
                match credential.get_token(&[REDIS_SCOPE], None).await {
                    Ok(token) => {
                        if failing {
                            tracing::info!(target: "shared_cache", "redis token obtained again");
                            failing = false;
                        }
                        let expires_on =
                            u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0);
                        sender.send_replace(Some(BasicAuth::new(
                            username.clone(),
                            token.token.secret().to_string(),
                        )));
                        tokio::time::sleep(renew_in(expires_on, now_seconds())).await;
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(target: "shared_cache", kind = ?error.kind(), "cannot get a token for redis from the managed identity");
                            failing = true;
                        }
                        tokio::time::sleep(RETRY_AFTER_FAILURE).await;
                    }
                }
            }
        });
        Self { latest }
    }
}

impl StreamingCredentialsProvider for EntraCredentials {
    /// The current credentials as soon as there are any, then each renewal.
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let receiver = self.latest.clone();
        Box::pin(futures_util::stream::unfold(
            (receiver, true),
            |(mut receiver, first)| async move {
                if !first {
                    receiver.changed().await.ok()?;
                }
                let auth = receiver.wait_for(Option::is_some).await.ok()?.clone()?;
                Some((Ok(auth), (receiver, false)))
            },
        ))
    }
}

/// How long to wait before renewing a token that expires at `expires_on` (unix seconds):
/// 3 to 4 minutes before expiry, at least 30 s from now.
fn renew_in(expires_on: u64, now: u64) -> Duration {
    let jitter = rand::random_range(0..=RENEW_JITTER_SECONDS);
    let renew_at = expires_on.saturating_sub(RENEW_BEFORE.as_secs() + jitter);
    Duration::from_secs(renew_at.saturating_sub(now).max(30))
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_renewed_three_to_four_minutes_before_it_expires() {
        for _ in 0..100 {
            let wait = renew_in(10_000 + 3600, 10_000).as_secs();
            assert!((3600 - 240..=3600 - 180).contains(&wait), "{wait}");
        }
        assert_eq!(renew_in(10_100, 10_000), Duration::from_secs(30));
    }
}
