//! The identity provider the end-to-end tests run against: the real oidc-provider
//! (`tests/idp/server.mjs`) as a child process, its clients, and what it counted.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::*;

/// One client registered at the identity provider.
#[derive(Clone)]
pub struct IdpClient {
    pub client_id: &'static str,
    pub client_secret: String,
    pub auth_method: &'static str,
    pub ttl_seconds: u64,
    pub roles: Option<Vec<&'static str>>,
    /// `private_key_jwt`: the client's public keys (a JWK Set) and the one algorithm accepted.
    pub jwks: Option<Value>,
    pub signing_alg: Option<&'static str>,
}

impl IdpClient {
    pub fn new(client_id: &'static str, client_secret: &str, auth_method: &'static str) -> Self {
        Self {
            client_id,
            client_secret: client_secret.to_string(),
            auth_method,
            ttl_seconds: 3600,
            roles: None,
            jwks: None,
            signing_alg: None,
        }
    }
}

/// The real oidc-provider, run by Node from `tests/idp`.
pub struct Idp {
    child: Child,
    _stdin: ChildStdin,
    config_path: std::path::PathBuf,
    clients: Vec<IdpClient>,
    port: u16,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub issuer: String,
}

/// Audience of the caller tokens the broker accepts in `jwt` mode.
pub const BROKER_AUDIENCE: &str = "api://token-broker";
/// Secret of the caller clients.
pub const CALLER_SECRET: &str = "caller-secret";

#[derive(Deserialize)]
pub(crate) struct IdpReady {
    issuer: String,
    token_endpoint: String,
    jwks_uri: String,
    port: u16,
}

/// Counters the provider keeps of its token endpoint.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdpStats {
    pub token_requests: u64,
    pub token_issued: u64,
    pub token_errors: u64,
}

pub const RESOURCE: &str = "api://demo";

/// One token request as the provider received it.
#[derive(Deserialize, Debug, Clone)]
pub struct IdpTokenRequest {
    /// Every form field, as the provider parsed it (a repeated field is a list).
    pub form: Option<serde_json::Map<String, Value>>,
    /// Whether the request carried Basic credentials (`client_secret_basic`).
    pub basic: bool,
    /// The provider's answer.
    pub status: u16,
}

impl IdpTokenRequest {
    /// Form field `name`, when the request had it once.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.as_ref()?.get(name)?.as_str()
    }
}

/// Counters the provider keeps of its key set and discovery document downloads.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdpKeyStats {
    pub jwks_requests: u64,
    pub discovery_requests: u64,
}

/// A provider process just started, and the line it will print when it is ready.
pub(crate) struct Launched {
    child: Child,
    stdin: ChildStdin,
    ready: std::sync::mpsc::Receiver<String>,
    config_path: std::path::PathBuf,
    clients: Vec<IdpClient>,
}

/// How long a provider start may take before it counts as failed.
pub(crate) const IDP_START: Duration = Duration::from_secs(20);

impl Launched {
    /// Writes the provider's configuration and starts it; does not wait.
    fn spawn(config_path: &Path, clients: &[IdpClient], port: u16) -> Self {
        let config = serde_json::json!({
            "port": port,
            "resource": RESOURCE,
            "extra_resources": [BROKER_AUDIENCE],
            "scopes": "read write",
            "clients": clients.iter().map(|c| serde_json::json!({
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "token_endpoint_auth_method": c.auth_method,
                "ttl": c.ttl_seconds,
                "roles": c.roles,
                "jwks": c.jwks,
                "token_endpoint_auth_signing_alg": c.signing_alg,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(config_path, config.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp/server.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .arg(config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node must be installed and tests/idp installed (npm ci)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        Self {
            child,
            stdin,
            ready,
            config_path: config_path.to_path_buf(),
            clients: clients.to_vec(),
        }
    }

    /// Waits for the ready line without blocking the runtime, which serves the doubles.
    async fn wait(self) -> Result<Idp, String> {
        let deadline = tokio::time::Instant::now() + IDP_START;
        let line = loop {
            match self.ready.try_recv() {
                Ok(line) => break Some(line),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break None,
                Err(std::sync::mpsc::TryRecvError::Empty)
                    if tokio::time::Instant::now() >= deadline =>
                {
                    break None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        match self.into_idp(line) {
            Ok(idp) => Ok(idp),
            Err((child, reason)) => {
                reap(child).await;
                Err(reason)
            }
        }
    }

    /// The running provider, or the process to stop and why.
    fn into_idp(self, line: Option<String>) -> Result<Idp, (Child, String)> {
        let Some(line) = line else {
            return Err((
                self.child,
                format!(
                    "oidc-provider did not print its ready line within {} s",
                    IDP_START.as_secs()
                ),
            ));
        };
        let Ok(ready) = serde_json::from_str::<IdpReady>(&line) else {
            return Err((
                self.child,
                format!("oidc-provider did not start (run npm ci in tests/idp): {line:?}"),
            ));
        };
        Ok(Idp {
            child: self.child,
            _stdin: self.stdin,
            config_path: self.config_path,
            clients: self.clients,
            port: ready.port,
            token_endpoint: ready.token_endpoint,
            jwks_uri: ready.jwks_uri,
            issuer: ready.issuer,
        })
    }
}

impl Idp {
    /// Starts the provider without blocking the runtime, which serves the doubles meanwhile.
    /// A start that prints nothing within 20 s is retried once (seen rarely on a loaded
    /// two-core machine), so a slow start cannot hang the suite.
    pub async fn start(dir: &Path, clients: &[IdpClient]) -> Idp {
        let config_path = dir.join("idp.json");
        match Launched::spawn(&config_path, clients, 0).wait().await {
            Ok(idp) => idp,
            Err(reason) => {
                eprintln!("oidc-provider start failed ({reason}); retrying once");
                Launched::spawn(&config_path, clients, 0)
                    .wait()
                    .await
                    .unwrap_or_else(|reason| panic!("{reason}"))
            }
        }
    }

    /// Restarts the provider on the same port (same issuer) with the clients `change` makes,
    /// without blocking the runtime, which serves the doubles meanwhile.
    pub async fn restart(&mut self, change: impl FnOnce(&mut Vec<IdpClient>)) {
        let _ = self.child.kill();
        while matches!(self.child.try_wait(), Ok(None)) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut clients = self.clients.clone();
        change(&mut clients);
        // Three starts' worth: a start that hangs (seen on a loaded CI machine) is retried,
        // as `start` does, instead of spending the whole budget on one attempt.
        let budget = IDP_START * 3;
        let deadline = tokio::time::Instant::now() + budget;
        let replacement = loop {
            match Launched::spawn(&self.config_path, &clients, self.port)
                .wait()
                .await
            {
                Ok(idp) => break idp,
                Err(reason) if tokio::time::Instant::now() < deadline => {
                    eprintln!(
                        "oidc-provider restart on port {} failed ({reason}); retrying",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(reason) => panic!(
                    "oidc-provider could not get its port {} back within {} s, so the issuer would change: {reason}",
                    self.port,
                    budget.as_secs()
                ),
            }
        };
        assert_eq!(
            replacement.port, self.port,
            "the restarted provider kept its port"
        );
        *self = replacement;
    }

    pub async fn stats(&self) -> IdpStats {
        let url = self.issuer.clone() + "/_test/stats";
        reqwest::get(url).await.unwrap().json().await.unwrap()
    }

    /// The provider's record of the token requests it received (the last 1,000), oldest
    /// first: the form of each, as the provider parsed it.
    pub async fn token_requests(&self) -> Vec<IdpTokenRequest> {
        #[derive(Deserialize)]
        struct Recorded {
            token_requests: Vec<IdpTokenRequest>,
        }
        let url = self.issuer.clone() + "/_test/requests";
        let recorded: Recorded = reqwest::get(url).await.unwrap().json().await.unwrap();
        recorded.token_requests
    }

    /// How often the provider's key set and discovery document were downloaded.
    pub async fn key_stats(&self) -> IdpKeyStats {
        let url = self.issuer.clone() + "/_test/stats";
        reqwest::get(url).await.unwrap().json().await.unwrap()
    }

    /// A caller's own access token for the broker's audience, issued by the provider.
    pub async fn caller_token(&self, client_id: &str) -> String {
        self.caller_token_for(client_id, BROKER_AUDIENCE).await
    }

    pub async fn caller_token_for(&self, client_id: &str, resource: &str) -> String {
        let response = reqwest::Client::new()
            .post(&self.token_endpoint)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", CALLER_SECRET),
                ("resource", resource),
                ("scope", "read"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "caller token for {client_id}");
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
