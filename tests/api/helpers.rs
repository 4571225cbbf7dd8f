//! Starting the broker the way the Functions host does, against the real oidc-provider and
//! the Azure doubles, and reading what it logged.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use token_broker_doubles::{AzureDoubles, ConnectProxy, key_vault};

/// Printable ASCII with every character brokers get wrong in Basic authentication.
pub const TRICKY_SECRET: &str = "a:b %25+/=&?~ c!\"#$'()*,;<>@[\\]^`{|}";

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
struct IdpReady {
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
struct Launched {
    child: Child,
    stdin: ChildStdin,
    ready: std::sync::mpsc::Receiver<String>,
    config_path: std::path::PathBuf,
    clients: Vec<IdpClient>,
}

/// How long a provider start may take before it counts as failed.
const IDP_START: Duration = Duration::from_secs(20);

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

/// Kills `child` and waits for it to end without blocking the runtime.
async fn reap(mut child: Child) {
    let _ = child.kill();
    while matches!(child.try_wait(), Ok(None)) {
        tokio::time::sleep(Duration::from_millis(5)).await;
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

/// The client id of the user-assigned managed identity the standard setup names.
pub const MANAGED_IDENTITY_CLIENT_ID: &str = "5e8c0a3e-7d41-4c1a-9b7e-0000000000c1";

/// The function key every helper request carries, as the host forwards it.
pub const FUNCTION_KEY: &str = "fk-test-function-key-7d1e0c2a";

/// A running broker process and everything it talks to.
pub struct TestApp {
    child: Child,
    log_readers: Vec<std::thread::JoinHandle<()>>,
    pub address: String,
    pub http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
    /// While `true`, the broker's stdout is not read (its pipe fills, as a stalled collector's).
    stdout_paused: Arc<(Mutex<bool>, std::sync::Condvar)>,
    pub idp: Idp,
    pub azure: AzureDoubles,
    pub proxy: Option<token_broker_doubles::FaultProxy>,
    /// The egress proxy the broker reaches `https://tests.vault.azure.net` through.
    pub vault_proxy: ConnectProxy,
    /// Keeps the `down` connection's port bound and refusing.
    _refusing_socket: tokio::net::TcpSocket,
    /// Holds the configuration, CA and provider files for the test's lifetime.
    _dir: tempfile::TempDir,
}

/// What a test can change about the standard setup.
pub struct Setup {
    /// Start a fault-injecting proxy in front of the provider (`{proxy_url}` in extra config).
    pub proxy: bool,
    pub rust_log: &'static str,
    /// Extra TOML appended to the standard configuration.
    pub extra_config: String,
    pub extra_env: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            proxy: false,
            // Every test runs at trace level, and every test's log is scanned for leaks.
            rust_log: "trace",
            extra_config: String::new(),
            extra_env: Vec::new(),
        }
    }
}

/// Caller authentication by the provider's tokens, and two guarded connections.
pub fn jwt_callers(issuer: &str, jwks_uri: Option<&str>, clock_skew_seconds: u64) -> String {
    let jwks = jwks_uri
        .map(|uri| format!("jwks_uri = \"{uri}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[callers]
mode = "jwt"
issuer = "{issuer}"
audience = "{BROKER_AUDIENCE}"
clock_skew_seconds = {clock_skew_seconds}
{jwks}
{GUARDED}"#
    )
}

/// Connections only some callers may use (appended to a `[callers]` setup).
pub const GUARDED: &str = r#"
[connections.guarded]
token_url = "{token_url}"
client_id = "broker-post"
client_secret = { key_vault_secret = "post-secret" }
auth_method = "client_secret_post"
scopes = ["read"]
allowed_callers = ["caller-app"]

[connections.byrole]
token_url = "{token_url}"
client_id = "broker-post"
client_secret = { key_vault_secret = "post-secret" }
auth_method = "client_secret_post"
scopes = ["read"]
allowed_roles = ["Tokens.Contoso"]
"#;

/// Secrets of the standard setup's clients.
pub fn post_secret() -> String {
    "post secret with spaces & symbols: %+/=?".to_string()
}
pub fn setting_secret() -> String {
    "app-setting-secret-Zq9#k".to_string()
}

/// The provider's clients: the broker's own, and callers that present tokens to the broker.
pub fn standard_clients() -> Vec<IdpClient> {
    let short = IdpClient {
        ttl_seconds: 6,
        ..IdpClient::new("broker-short", "short-lived-secret", "client_secret_basic")
    };
    // Long enough for a stale window: a 20 s token is handed out until 18 s, then served
    // `stale` while a refresh fails until 19 s (a 6 s token's window is empty: 5 s to 5 s).
    let twenty = IdpClient {
        ttl_seconds: 20,
        ..IdpClient::new("broker-twenty", TWENTY_SECRET, "client_secret_basic")
    };
    let caller_short = IdpClient {
        ttl_seconds: 1,
        ..IdpClient::new("caller-short", CALLER_SECRET, "client_secret_post")
    };
    let caller_admin = IdpClient {
        roles: Some(vec!["Tokens.Contoso"]),
        ..IdpClient::new("caller-admin", CALLER_SECRET, "client_secret_post")
    };
    vec![
        IdpClient::new("broker-basic", TRICKY_SECRET, "client_secret_basic"),
        IdpClient::new("broker-post", &post_secret(), "client_secret_post"),
        short,
        twenty,
        IdpClient::new("broker-setting", &setting_secret(), "client_secret_basic"),
        IdpClient::new("broker-rotating", ROTATION_V1, "client_secret_basic"),
        IdpClient::new("caller-app", CALLER_SECRET, "client_secret_post"),
        caller_admin,
        caller_short,
    ]
}

/// The secret of `broker-twenty`, the client with 20 s tokens (Key Vault: `twenty-secret`).
pub const TWENTY_SECRET: &str = "twenty-seconds-secret";

/// The rotating connection's secret before and after a rotation.
pub const ROTATION_V1: &str = "rotation secret v1 /+=";
pub const ROTATION_V2: &str = "rotation secret v2 :%&";

/// A loopback port nothing answers on, held for as long as the returned socket lives: the
/// socket is bound but never listens, so connecting is refused (as to a stopped server), and no
/// other process can take the port meanwhile, which a port picked and released could not promise.
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Setup::default()).await
}

/// Starts the IdP, the doubles and the broker, and waits until `/` answers.
pub async fn spawn_app_with(setup: Setup) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(dir.path(), &standard_clients()).await;
    // A user-assigned identity, as production uses: the identity double refuses requests
    // that do not name it.
    let azure = AzureDoubles::start(dir.path(), Some(MANAGED_IDENTITY_CLIENT_ID.to_string()))
        .await
        .unwrap();
    // The vault under its `vault.azure.net` name, through an egress proxy, so that Key Vault
    // challenge verification stays on (the production default).
    let vault_proxy = ConnectProxy::start(
        [key_vault::PUBLIC_HOST, key_vault::FOREIGN_HOST]
            .map(|host| (format!("{host}:443"), azure.vault.address())),
    )
    .await
    .unwrap();
    azure.vault.set_secret("basic-secret", TRICKY_SECRET);
    azure.vault.set_secret("post-secret", &post_secret());
    azure.vault.set_secret("short-secret", "short-lived-secret");
    azure.vault.set_secret("twenty-secret", TWENTY_SECRET);
    azure
        .vault
        .set_secret("wrong-secret", "not-the-registered-secret");
    azure.vault.set_secret("rotating-secret", ROTATION_V1);

    let proxy = if setup.proxy {
        Some(
            token_broker_doubles::FaultProxy::start(&idp.issuer)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let proxy_url = proxy.as_ref().map(|p| p.url()).unwrap_or_default();
    let token_url = &idp.token_endpoint;
    let (refusing_socket, closed_port) = refusing_port();
    // Caller modes fail closed: the standard connections then serve every authenticated
    // caller, on purpose.
    let open = if setup.extra_config.contains("[callers]") {
        r#"allowed_callers = ["*"]"#
    } else {
        ""
    };
    let config = format!(
        r#"
[key_vault]
uri = "${{KEY_VAULT_URI}}"
managed_identity_client_id = "${{MANAGED_IDENTITY_CLIENT_ID}}"

[connections.demo]
token_url = "{token_url}"
client_id = "${{DEMO_CLIENT_ID}}"
client_secret = {{ key_vault_secret = "basic-secret" }}
{open}
scopes = ["read"]
allowed_scopes = ["read", "write"]

[connections.posty]
token_url = "{token_url}"
client_id = "broker-post"
client_secret = {{ key_vault_secret = "post-secret" }}
{open}
auth_method = "client_secret_post"
scopes = ["read", "write"]

[connections.short]
token_url = "{token_url}"
client_id = "broker-short"
client_secret = {{ key_vault_secret = "short-secret" }}
{open}

[connections.setting]
token_url = "{token_url}"
client_id = "broker-setting"
client_secret = {{ app_setting = "SETTING_SECRET" }}
{open}

[connections.wrong]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = {{ key_vault_secret = "wrong-secret" }}
{open}

[connections.nosecret]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = {{ key_vault_secret = "absent-secret" }}
{open}

[connections.rotating]
token_url = "{token_url}"
client_id = "broker-rotating"
client_secret = {{ key_vault_secret = "rotating-secret" }}
{open}
allowed_scopes = ["read"]

[connections.badresource]
token_url = "{token_url}"
client_id = "broker-setting"
client_secret = {{ app_setting = "SETTING_SECRET" }}
{open}
resource = "api://unknown"

[connections.down]
token_url = "http://127.0.0.1:{closed_port}/token"
client_id = "broker-basic"
client_secret = {{ app_setting = "SETTING_SECRET" }}
{open}
{extra}
"#,
        extra = setup
            .extra_config
            .replace("{token_url}", token_url)
            .replace("{issuer}", &idp.issuer)
            .replace("{jwks_uri}", &idp.jwks_uri)
            .replace("{proxy_url}", &proxy_url)
    );
    let config_path = dir.path().join("broker.toml");
    std::fs::write(&config_path, config).unwrap();

    let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Port 0: the broker binds any free port and reports it, so no port is picked here
        // and bound later (a race between the parallel test processes).
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", "0")
        .env("FUNCTIONS_APP_ROOT_PATH", dir.path())
        .env("TOKEN_BROKER_CONFIG", &config_path)
        .env("IDENTITY_ENDPOINT", azure.identity.endpoint())
        .env("IDENTITY_HEADER", azure.identity.header())
        .env("KEY_VAULT_URI", azure.vault.public_uri())
        .env("MANAGED_IDENTITY_CLIENT_ID", MANAGED_IDENTITY_CLIENT_ID)
        .env("HTTPS_PROXY", vault_proxy.url())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("SSL_CERT_FILE", azure.vault.ca_file())
        .env("DEMO_CLIENT_ID", "broker-basic")
        .env("SETTING_SECRET", setting_secret())
        .env("RUST_LOG", rust_log(setup.rust_log))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in &setup.extra_env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let stdout_paused = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let mut log_readers = Vec::new();
    for (stream, gated) in [
        (
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            true,
        ),
        (Box::new(child.stderr.take().unwrap()), false),
    ] {
        let logs = logs.clone();
        let paused = stdout_paused.clone();
        log_readers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            loop {
                if gated {
                    let (lock, resumed) = &*paused;
                    let _running = resumed
                        .wait_while(lock.lock().unwrap(), |paused| *paused)
                        .unwrap();
                }
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => logs
                        .lock()
                        .unwrap()
                        .push(line.trim_end_matches(['\n', '\r']).to_string()),
                }
            }
        }));
    }
    let port = match try_listening_port(&mut child, &logs).await {
        Ok(port) => port,
        Err(reason) => {
            reap(child).await;
            // The readers end at the end of the pipes: the log is then complete.
            tokio::task::spawn_blocking(move || {
                for reader in log_readers {
                    let _ = reader.join();
                }
            })
            .await
            .unwrap();
            panic!(
                "the broker {reason} without a \"token-broker listening\" line with its port; logs:\n{}",
                logs.lock().unwrap().join("\n")
            );
        }
    };
    let app = TestApp {
        child,
        log_readers,
        _refusing_socket: refusing_socket,
        vault_proxy,
        address: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        logs,
        stdout_paused,
        idp,
        azure,
        proxy,
        _dir: dir,
    };
    app.wait_until_ready().await;
    app
}

/// `RUST_LOG` for the broker: the test's level, with the "listening" line (which names the
/// port) kept when that level would hide it.
fn rust_log(level: &str) -> String {
    if ["trace", "debug", "info"].contains(&level) {
        level.to_string()
    } else {
        format!("{level},token_broker::startup=info")
    }
}

/// The port a "token-broker listening" line in `logs` names, if one does.
fn reported_port(logs: &Mutex<Vec<String>>) -> Option<u16> {
    logs.lock().unwrap().iter().find_map(|line| {
        let record: Value = serde_json::from_str(line).ok()?;
        let port = (record["message"] == "token-broker listening").then(|| record["port"].as_u64());
        port.flatten()
            .map(|port| u16::try_from(port).expect("a port number"))
    })
}

/// The port the broker reports in its "token-broker listening" line, waited for at most 30 s
/// without blocking the runtime; else why not (it exited, or ran 30 s without saying).
async fn try_listening_port(child: &mut Child, logs: &Mutex<Vec<String>>) -> Result<u16, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(port) = reported_port(logs) {
            return Ok(port);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("exited ({status})"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("ran for 30 s".to_string());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `try_listening_port` for a launcher that has nothing to do on failure but fail: panics
/// with the broker's log. Does not block the runtime that serves the doubles.
pub async fn listening_port(child: &mut Child, logs: &Mutex<Vec<String>>) -> u16 {
    match try_listening_port(child, logs).await {
        Ok(port) => port,
        Err(reason) => {
            let _ = child.kill();
            let _ = child.wait();
            // Let the readers take in what the process wrote last.
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!(
                "the broker {reason} without a \"token-broker listening\" line with its port; logs:\n{}",
                logs.lock().unwrap().join("\n")
            );
        }
    }
}

impl TestApp {
    /// Polls `GET /` every 25 ms, as the Functions host does, for at most 30 s.
    pub async fn wait_until_ready(&self) {
        for _ in 0..1200 {
            if self.http.get(self.url("/")).send().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "broker never became ready; logs:\n{}",
            self.logs().join("\n")
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `GET /api/token/{connection}` with the headers the host adds.
    pub async fn token(&self, connection: &str) -> reqwest::Response {
        self.get(&format!("/api/token/{connection}")).await
    }

    /// `GET` with a caller's bearer token.
    pub async fn get_as(&self, path_and_query: &str, bearer: &str) -> reqwest::Response {
        self.request(path_and_query)
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap()
    }

    /// A `GET` with the headers the host forwards, to add more to.
    pub fn request(&self, path_and_query: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.url(path_and_query))
            .header(
                "X-Azure-Functions-InvocationId",
                "3f2b8c1e-0000-4000-8000-000000000001",
            )
            .header("x-functions-key", FUNCTION_KEY)
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.http
            .get(self.url(path_and_query))
            .header(
                "X-Azure-Functions-InvocationId",
                "3f2b8c1e-0000-4000-8000-000000000001",
            )
            .header("X-Azure-Functions-HostVersion", "4.1037.0")
            .send()
            .await
            .unwrap()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines parsed as JSON; every line the broker writes must be JSON.
    pub fn log_records(&self) -> Vec<Value> {
        self.logs()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect()
    }

    /// Audit records, once at least `at_least` have been written: the broker writes its log
    /// from a background thread, so a line may land just after the response.
    pub async fn audit_records_when(&self, at_least: usize) -> Vec<Value> {
        for _ in 0..500 {
            let records = self.audit_records();
            if records.len() >= at_least {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "fewer than {at_least} audit lines after 5 s:\n{}",
            self.logs().join("\n")
        );
    }

    /// Log records, once one matches `predicate` (see `audit_records_when`).
    pub async fn log_records_when(&self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        for _ in 0..500 {
            let records = self.log_records();
            if records.iter().any(&predicate) {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "no matching log line after 5 s:\n{}",
            self.logs().join("\n")
        );
    }

    /// How many log records match `predicate`, once at least `at_least` do (waited for at most
    /// 30 s): how a test learns that the broker has reached a point it logs.
    pub async fn log_count_when(
        &self,
        predicate: impl Fn(&Value) -> bool,
        at_least: usize,
    ) -> usize {
        let count = || self.log_records().iter().filter(|r| predicate(r)).count();
        for _ in 0..3000 {
            let matching = count();
            if matching >= at_least {
                return matching;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{} matching log lines, fewer than {at_least}, after 30 s:\n{}",
            count(),
            self.logs().join("\n")
        );
    }

    /// The tokens handed out that audit records matching `predicate` account for (the sum of
    /// their `count`), once it reaches `at_least`: cache hits are written as one record per
    /// caller and token every 5 s, so this waits up to 15 s.
    pub async fn audit_count_when(&self, predicate: impl Fn(&Value) -> bool, at_least: u64) -> u64 {
        let total = || -> u64 {
            self.audit_records()
                .iter()
                .filter(|record| predicate(record))
                .map(|record| {
                    record["count"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("an audit record without a count: {record}"))
                })
                .sum()
        };
        for _ in 0..1500 {
            let sum = total();
            if sum >= at_least {
                return sum;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "audit records account for {} tokens, fewer than {at_least}, after 15 s:\n{}",
            total(),
            self.logs().join("\n")
        );
    }

    /// Audit records ("token handed out") written so far.
    pub fn audit_records(&self) -> Vec<Value> {
        self.log_records()
            .into_iter()
            .filter(|record| record["target"] == "audit")
            .collect()
    }

    /// Stops reading the broker's stdout: its pipe fills and its writes block, as when the
    /// host's log collector stalls.
    pub fn pause_stdout(&self) {
        *self.stdout_paused.0.lock().unwrap() = true;
    }

    /// Reads the broker's stdout again.
    pub fn resume_stdout(&self) {
        *self.stdout_paused.0.lock().unwrap() = false;
        self.stdout_paused.1.notify_all();
    }

    /// Invokes `function-rotation` with `event` the way the Functions host does (JSON payload
    /// format) and returns the invocation's answer, which must be a 200 with the host's
    /// `Outputs`, `Logs` and `ReturnValue`.
    pub async fn deliver_event(&self, event: Value) -> Value {
        let response = self
            .http
            .post(self.url("/function-rotation"))
            .json(&serde_json::json!({ "Data": { "event": event }, "Metadata": { "sys": { "MethodName": "function-rotation" } } }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "a non-2xx answer fails the invocation"
        );
        let body = json(response).await;
        assert!(
            body["Outputs"].is_object() && body["Logs"].is_array(),
            "{body}"
        );
        assert!(body.get("ReturnValue").is_some(), "{body}");
        body
    }

    /// Sends SIGTERM and returns once it is sent.
    pub async fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
    }

    /// Waits for the process to end, at most `within`; its exit status, if it ended.
    pub async fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM and waits (at most 60 s, without blocking the runtime, which serves the
    /// doubles a request in flight may still need) for the process to end; its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm().await;
        let Some(status) = self.wait_for_exit(Duration::from_secs(60)).await else {
            panic!(
                "the broker did not exit within 60 s of SIGTERM; logs:\n{}",
                self.logs().join("\n")
            );
        };
        // The process has exited, but its last lines may still be in the pipe: read them all
        // before the caller looks at the log (the readers end at end of file).
        let readers: Vec<_> = self.log_readers.drain(..).collect();
        tokio::task::spawn_blocking(move || {
            for reader in readers {
                let _ = reader.join();
            }
        })
        .await
        .unwrap();
        status
    }
}

impl TestApp {
    /// Every credential this test's traffic involved, in the forms a careless log line
    /// would show: client secrets (plain and form-encoded), their Basic credentials, the
    /// function key, and the managed identity's tokens. Access and caller tokens are JWTs,
    /// found by their shape.
    pub fn credentials(&self) -> Vec<String> {
        let mut needles: Vec<String> = [
            TRICKY_SECRET,
            "short-lived-secret",
            TWENTY_SECRET,
            "not-the-registered-secret",
            ROTATION_V1,
            ROTATION_V2,
            CALLER_SECRET,
            FUNCTION_KEY,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([post_secret(), setting_secret()])
        .collect();
        let form =
            |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
        // The Basic credential (RFC 6749 §2.3.1: base64 of the form-encoded `id:secret`, and
        // the unencoded form careless clients use) of every client id with every secret, so a
        // logged `Authorization` header is found whichever connection sent it.
        let client_ids: Vec<&str> = standard_clients().iter().map(|c| c.client_id).collect();
        let mut basic = Vec::new();
        for id in &client_ids {
            for secret in &needles {
                for credential in [
                    format!("{}:{}", form(id), form(secret)),
                    format!("{id}:{secret}"),
                ] {
                    basic.push(base64::engine::general_purpose::STANDARD.encode(credential));
                }
            }
        }
        let encoded: Vec<String> = needles.iter().map(|s| form(s)).collect();
        needles.extend(encoded);
        needles.extend(basic);
        needles.extend(self.azure.identity.issued().lock().unwrap().keys().cloned());
        needles
    }

    /// Log lines that carry a credential or a JWT.
    pub fn leaks(&self) -> Vec<String> {
        let mut needles = self.credentials();
        needles.extend(self.secretless_credentials());
        self.logs()
            .into_iter()
            .filter(|line| contains_jwt(line) || needles.iter().any(|n| line.contains(n.as_str())))
            .collect()
    }
}

/// Whether `text` holds something shaped like a JWT (`eyJ<b64url>.<b64url>.`).
pub fn contains_jwt(text: &str) -> bool {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices("eyJ").any(|(start, _)| {
        let rest = &text[start..];
        let mut parts = rest.splitn(3, '.');
        let header = parts.next().unwrap_or_default();
        let payload = parts.next().unwrap_or_default();
        parts.next().is_some()
            && header.len() >= 10
            && header.chars().all(is_b64)
            && payload.len() >= 10
            && payload.chars().all(is_b64)
    })
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.resume_stdout();
        // SIGTERM first, so the broker flushes its log; the scan below must see every line.
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = self.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.log_readers.drain(..) {
            let _ = reader.join();
        }
        if std::thread::panicking() {
            return;
        }
        let leaks = self.leaks();
        assert!(
            leaks.is_empty(),
            "credentials in the broker's log:\n{}",
            leaks.join("\n")
        );
    }
}

/// The body of a JSON answer.
pub async fn json(response: reqwest::Response) -> Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

impl TestApp {
    /// Credentials of the secretless methods that are not JWT-shaped (assertions are, and the
    /// managed identity's tokens are in `credentials`): every signature Key Vault made.
    fn secretless_credentials(&self) -> Vec<String> {
        self.azure.vault.signatures()
    }
}
