//! Starting the broker the way the Functions host does, against the real oidc-provider and
//! the Azure doubles, and reading what it logged.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use token_broker_doubles::AzureDoubles;

/// Printable ASCII with every character brokers get wrong in Basic authentication.
pub const TRICKY_SECRET: &str = "a:b %25+/=&?~ c!\"#$'()*,;<>@[\\]^`{|}";

/// One client registered at the identity provider.
pub struct IdpClient {
    pub client_id: &'static str,
    pub client_secret: String,
    pub auth_method: &'static str,
    pub ttl_seconds: u64,
}

/// The real oidc-provider, run by Node from `tests/idp`.
pub struct Idp {
    child: Child,
    _stdin: ChildStdin,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub issuer: String,
}

#[derive(Deserialize)]
struct IdpReady {
    issuer: String,
    token_endpoint: String,
    jwks_uri: String,
}

/// Counters the provider keeps of its token endpoint.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdpStats {
    pub token_requests: u64,
    pub token_issued: u64,
    pub token_errors: u64,
}

pub const RESOURCE: &str = "api://demo";

impl Idp {
    pub fn start(dir: &Path, clients: &[IdpClient]) -> Idp {
        let config = serde_json::json!({
            "port": 0,
            "resource": RESOURCE,
            "scopes": "read write",
            "clients": clients.iter().map(|c| serde_json::json!({
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "token_endpoint_auth_method": c.auth_method,
                "ttl": c.ttl_seconds,
            })).collect::<Vec<_>>(),
        });
        let config_path = dir.join("idp.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp/server.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .arg(&config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node must be installed and tests/idp installed (npm ci)");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: IdpReady = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!("oidc-provider did not start (run npm ci in tests/idp): {line}")
        });
        Idp {
            child,
            _stdin: stdin,
            token_endpoint: ready.token_endpoint,
            jwks_uri: ready.jwks_uri,
            issuer: ready.issuer,
        }
    }

    pub async fn stats(&self) -> IdpStats {
        let url = self.issuer.clone() + "/_test/stats";
        reqwest::get(url).await.unwrap().json().await.unwrap()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running broker process and everything it talks to.
pub struct TestApp {
    child: Child,
    pub address: String,
    pub http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
    pub idp: Idp,
    pub azure: AzureDoubles,
    /// Holds the configuration, CA and provider files for the test's lifetime.
    _dir: tempfile::TempDir,
}

/// What a test can change about the standard setup.
pub struct Setup {
    pub rust_log: &'static str,
    /// Extra TOML appended to the standard configuration.
    pub extra_config: String,
    pub extra_env: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            rust_log: "debug",
            extra_config: String::new(),
            extra_env: Vec::new(),
        }
    }
}

/// Secrets of the standard setup's clients.
pub fn post_secret() -> String {
    "post secret with spaces & symbols: %+/=?".to_string()
}
pub fn setting_secret() -> String {
    "app-setting-secret-Zq9#k".to_string()
}

/// Any free loopback port, as the host would pick one.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Setup::default()).await
}

/// Starts the IdP, the doubles and the broker, and waits until `/` answers.
pub async fn spawn_app_with(setup: Setup) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::start(
        dir.path(),
        &[
            IdpClient {
                client_id: "broker-basic",
                client_secret: TRICKY_SECRET.to_string(),
                auth_method: "client_secret_basic",
                ttl_seconds: 3600,
            },
            IdpClient {
                client_id: "broker-post",
                client_secret: post_secret(),
                auth_method: "client_secret_post",
                ttl_seconds: 3600,
            },
            IdpClient {
                client_id: "broker-short",
                client_secret: "short-lived-secret".to_string(),
                auth_method: "client_secret_basic",
                ttl_seconds: 4,
            },
            IdpClient {
                client_id: "broker-setting",
                client_secret: setting_secret(),
                auth_method: "client_secret_basic",
                ttl_seconds: 3600,
            },
        ],
    );
    let azure = AzureDoubles::start(dir.path(), None).await.unwrap();
    azure.vault.set_secret("basic-secret", TRICKY_SECRET);
    azure.vault.set_secret("post-secret", &post_secret());
    azure.vault.set_secret("short-secret", "short-lived-secret");
    azure
        .vault
        .set_secret("wrong-secret", "not-the-registered-secret");

    let token_url = &idp.token_endpoint;
    let closed_port = free_port();
    let config = format!(
        r#"
[key_vault]
uri = "${{KEY_VAULT_URI}}"
verify_challenge_resource = false

[connections.demo]
token_url = "{token_url}"
client_id = "${{DEMO_CLIENT_ID}}"
client_secret = {{ key_vault_secret = "basic-secret" }}
scopes = ["read"]

[connections.posty]
token_url = "{token_url}"
client_id = "broker-post"
client_secret = {{ key_vault_secret = "post-secret" }}
auth_method = "client_secret_post"
scopes = ["read", "write"]

[connections.short]
token_url = "{token_url}"
client_id = "broker-short"
client_secret = {{ key_vault_secret = "short-secret" }}

[connections.setting]
token_url = "{token_url}"
client_id = "broker-setting"
client_secret = {{ app_setting = "SETTING_SECRET" }}

[connections.wrong]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = {{ key_vault_secret = "wrong-secret" }}

[connections.nosecret]
token_url = "{token_url}"
client_id = "broker-basic"
client_secret = {{ key_vault_secret = "absent-secret" }}

[connections.badresource]
token_url = "{token_url}"
client_id = "broker-setting"
client_secret = {{ app_setting = "SETTING_SECRET" }}
resource = "api://unknown"

[connections.down]
token_url = "http://127.0.0.1:{closed_port}/token"
client_id = "broker-basic"
client_secret = {{ app_setting = "SETTING_SECRET" }}
{extra}
"#,
        extra = setup.extra_config
    );
    let config_path = dir.path().join("broker.toml");
    std::fs::write(&config_path, config).unwrap();

    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .env("FUNCTIONS_APP_ROOT_PATH", dir.path())
        .env("TOKEN_BROKER_CONFIG", &config_path)
        .env("IDENTITY_ENDPOINT", azure.identity.endpoint())
        .env("IDENTITY_HEADER", azure.identity.header())
        .env("KEY_VAULT_URI", azure.vault.uri())
        .env("SSL_CERT_FILE", azure.vault.ca_file())
        .env("DEMO_CLIENT_ID", "broker-basic")
        .env("SETTING_SECRET", setting_secret())
        .env("RUST_LOG", setup.rust_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in &setup.extra_env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                logs.lock().unwrap().push(line);
            }
        });
    }
    let app = TestApp {
        child,
        address: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        logs,
        idp,
        azure,
        _dir: dir,
    };
    app.wait_until_ready().await;
    app
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

    /// Audit records ("token handed out").
    pub fn audit_records(&self) -> Vec<Value> {
        self.log_records()
            .into_iter()
            .filter(|record| record["target"] == "audit")
            .collect()
    }

    /// Sends SIGTERM and waits for the process to end; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a JSON answer.
pub async fn json(response: reqwest::Response) -> Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}
