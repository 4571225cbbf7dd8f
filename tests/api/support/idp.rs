//! The identity provider the end-to-end tests run against: the real oidc-provider
//! (`tests/idp/server.mjs`) as a child process, its clients, and what it counted. Started
//! with TLS it serves HTTPS and authenticates clients by their certificate (RFC 8705) on a
//! second listener, the token endpoint's mTLS alias.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::Value;
use token_broker_doubles::KeyVaultDouble;
use token_broker_doubles::key_vault_keys::PublicKey;

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
    /// `self_signed_tls_client_auth`: its certificates, as JWKs with `x5c`
    /// ([`certificate_jwk`]).
    pub jwks: Option<Value>,
    pub signing_alg: Option<&'static str>,
    /// `tls_client_auth`: the subject its certificate must have (`CN=<name>`).
    pub tls_client_auth_subject_dn: Option<String>,
    /// Whether its access tokens are bound to its certificate (`cnf.x5t#S256`, RFC 8705 §3),
    /// so that the provider refuses its token requests without one.
    pub certificate_bound: bool,
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
            tls_client_auth_subject_dn: None,
            certificate_bound: false,
        }
    }
}

/// The provider's TLS: its server certificate and key (PEM files, signed by the tests' CA,
/// which the broker trusts), the CA it trusts for `tls_client_auth` certificates, and the
/// tests' CA again, for this support's own requests to the provider.
#[derive(Clone, Debug)]
pub struct IdpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub ca: PathBuf,
}

impl IdpTls {
    /// The doubles' files: the server certificate written beside the vault's CA (for
    /// `localhost` and `127.0.0.1`), and the vault's client CA, which issues its
    /// `TestCa` certificates.
    pub fn of_vault(vault: &KeyVaultDouble) -> Self {
        let dir = vault.ca_file().parent().expect("the CA is in a directory");
        Self {
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
            client_ca: vault.client_ca_file().to_path_buf(),
            ca: vault.ca_file().to_path_buf(),
        }
    }
}

/// A certificate's `x5t#S256`: base64url of the SHA-256 of its DER (RFC 8705 §3.1), what
/// the provider puts in `cnf`, records of a request, and revokes.
pub fn x5t_s256(der: &[u8]) -> String {
    use sha2::Digest as _;
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

/// The JWK a `self_signed_tls_client_auth` client registers for a vault certificate version
/// (`KeyVaultDouble::public_key` of the certificate's name): the key's public parameters
/// from the vault's JWK of that version (oidc-provider loads no key without them), the
/// certificate in `x5c` (what oidc-provider matches a presented certificate against: it works
/// `x5t#S256` out from `x5c[0]` itself) and its `x5t#S256` for readers.
pub fn certificate_jwk(certificate: &PublicKey) -> Value {
    let der = certificate
        .certificate
        .as_deref()
        .expect("a certificate's key, not a bare key");
    let mut jwk = serde_json::Map::new();
    for member in ["kty", "n", "e", "crv", "x", "y", "kid"] {
        if let Some(value) = certificate.jwk.get(member) {
            jwk.insert(member.to_string(), value.clone());
        }
    }
    jwk.insert("x5c".to_string(), serde_json::json!([STANDARD.encode(der)]));
    jwk.insert("x5t#S256".to_string(), x5t_s256(der).into());
    Value::Object(jwk)
}

/// The real oidc-provider, run by Node from `tests/idp`.
pub struct Idp {
    child: Child,
    _stdin: ChildStdin,
    config_path: std::path::PathBuf,
    clients: Vec<IdpClient>,
    port: u16,
    tls: Option<IdpTls>,
    mtls_port: Option<u16>,
    /// The certificates revoked so far, which a restarted provider still refuses.
    revoked: Vec<String>,
    /// This support's requests to the provider (trusting the tests' CA under TLS).
    http: reqwest::Client,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub issuer: String,
    /// With TLS: the token endpoint's mTLS alias, where clients present certificates.
    pub mtls_token_endpoint: Option<String>,
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
    mtls_token_endpoint: Option<String>,
    mtls_port: Option<u16>,
}

/// Counters the provider keeps of its token endpoint (and, with TLS, of its mTLS listener).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdpStats {
    pub token_requests: u64,
    pub token_issued: u64,
    pub token_errors: u64,
    /// TLS connections the mTLS listener accepted.
    #[serde(default)]
    pub mtls_connections: u64,
    /// Those of them whose client presented a certificate.
    #[serde(default)]
    pub mtls_connections_with_certificate: u64,
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
    /// With TLS: the `x5t#S256` of the certificate the client presented (revoked or not).
    #[serde(default)]
    pub certificate: Option<String>,
    /// With TLS: whether the request reached the mTLS listener.
    #[serde(default)]
    pub mtls: bool,
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
    tls: Option<IdpTls>,
}

/// How long a provider start may take before it counts as failed.
pub(crate) const IDP_START: Duration = Duration::from_secs(20);

impl Launched {
    /// Writes the provider's configuration and starts it (its mTLS listener, with `tls`, on
    /// `mtls_port`, 0 for any, with the certificates `revoked` already); does not wait.
    fn spawn(
        config_path: &Path,
        clients: &[IdpClient],
        port: u16,
        tls: Option<&IdpTls>,
        mtls_port: u16,
        revoked: &[String],
    ) -> Self {
        let mut config = serde_json::json!({
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
                "tls_client_auth_subject_dn": c.tls_client_auth_subject_dn,
                "certificate_bound": c.certificate_bound,
            })).collect::<Vec<_>>(),
        });
        if let Some(tls) = tls {
            config["tls"] = serde_json::json!({
                "cert": tls.cert,
                "key": tls.key,
                "client_ca": tls.client_ca,
                "mtls_port": mtls_port,
                "revoked": revoked,
            });
        }
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
            tls: tls.cloned(),
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
        let http = http_client(self.tls.as_ref());
        Ok(Idp {
            child: self.child,
            _stdin: self.stdin,
            config_path: self.config_path,
            clients: self.clients,
            port: ready.port,
            tls: self.tls,
            mtls_port: ready.mtls_port,
            revoked: Vec::new(),
            http,
            token_endpoint: ready.token_endpoint,
            jwks_uri: ready.jwks_uri,
            issuer: ready.issuer,
            mtls_token_endpoint: ready.mtls_token_endpoint,
        })
    }
}

impl Idp {
    /// Starts the provider without blocking the runtime, which serves the doubles meanwhile.
    /// A start that prints nothing within 20 s is retried once (seen rarely on a loaded
    /// two-core machine), so a slow start cannot hang the suite.
    pub async fn start(dir: &Path, clients: &[IdpClient]) -> Idp {
        Self::start_with(dir, clients, None).await
    }

    /// Starts the provider over HTTPS with `tls` (an `https://127.0.0.1:<port>` issuer), with
    /// the mTLS listener that authenticates `tls_client_auth` and
    /// `self_signed_tls_client_auth` clients ([`Idp::mtls_token_endpoint`]).
    pub async fn start_tls(dir: &Path, clients: &[IdpClient], tls: IdpTls) -> Idp {
        Self::start_with(dir, clients, Some(tls)).await
    }

    async fn start_with(dir: &Path, clients: &[IdpClient], tls: Option<IdpTls>) -> Idp {
        let config_path = dir.join("idp.json");
        match Launched::spawn(&config_path, clients, 0, tls.as_ref(), 0, &[])
            .wait()
            .await
        {
            Ok(idp) => idp,
            Err(reason) => {
                eprintln!("oidc-provider start failed ({reason}); retrying once");
                Launched::spawn(&config_path, clients, 0, tls.as_ref(), 0, &[])
                    .wait()
                    .await
                    .unwrap_or_else(|reason| panic!("{reason}"))
            }
        }
    }

    /// Restarts the provider on the same port (same issuer) with the clients `change` makes,
    /// without blocking the runtime, which serves the doubles meanwhile. With TLS it keeps its
    /// TLS and its mTLS listener's port too.
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
            let launched = Launched::spawn(
                &self.config_path,
                &clients,
                self.port,
                self.tls.as_ref(),
                self.mtls_port.unwrap_or(0),
                &self.revoked,
            );
            match launched.wait().await {
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
        assert_eq!(
            replacement.mtls_port, self.mtls_port,
            "the restarted provider kept its mTLS listener's port"
        );
        let revoked = std::mem::take(&mut self.revoked);
        *self = replacement;
        self.revoked = revoked;
    }

    pub async fn stats(&self) -> IdpStats {
        self.get_json("/_test/stats").await
    }

    /// One of the provider's test endpoints, `path` under the issuer.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let url = self.issuer.clone() + path;
        let response = self.http.get(url).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// The provider's record of the token requests it received (the last 1,000), oldest
    /// first: the form of each, as the provider parsed it.
    pub async fn token_requests(&self) -> Vec<IdpTokenRequest> {
        #[derive(Deserialize)]
        struct Recorded {
            token_requests: Vec<IdpTokenRequest>,
        }
        let recorded: Recorded = self.get_json("/_test/requests").await;
        recorded.token_requests
    }

    /// How often the provider's key set and discovery document were downloaded.
    pub async fn key_stats(&self) -> IdpKeyStats {
        self.get_json("/_test/stats").await
    }

    /// From now on the provider treats the certificate with this `x5t#S256` ([`x5t_s256`]) as
    /// not presented: a client that presents it gets invalid_client, as from a provider that
    /// no longer accepts an old certificate, a restarted provider too. With TLS only.
    pub async fn revoke(&mut self, x5t_s256: &str) {
        let response = self
            .http
            .post(self.issuer.clone() + "/_test/revoke")
            .json(&serde_json::json!({ "x5t#S256": x5t_s256 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "revoking needs a provider with TLS");
        self.revoked.push(x5t_s256.to_string());
    }

    /// A caller's own access token for the broker's audience, issued by the provider.
    pub async fn caller_token(&self, client_id: &str) -> String {
        self.caller_token_for(client_id, BROKER_AUDIENCE).await
    }

    pub async fn caller_token_for(&self, client_id: &str, resource: &str) -> String {
        let response = self
            .http
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

/// The client this support reaches the provider with: under TLS it trusts the tests' CA.
fn http_client(tls: Option<&IdpTls>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder();
    if let Some(tls) = tls {
        let ca = std::fs::read(&tls.ca).expect("the tests' CA");
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
    }
    builder.build().unwrap()
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
