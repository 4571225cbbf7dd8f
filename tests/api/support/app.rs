//! One broker against the identity provider and the Azure doubles, with the standard
//! connections (`TestApp`), and the requests a test sends it.

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use token_broker_doubles::{AzureDoubles, ConnectProxy, key_vault};

use super::*;

/// Printable ASCII with every character brokers get wrong in Basic authentication.
pub const TRICKY_SECRET: &str = "a:b %25+/=&?~ c!\"#$'()*,;<>@[\\]^`{|}";

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

    let mut env: Vec<(String, String)> = [
        ("FUNCTIONS_APP_ROOT_PATH", dir.path().display().to_string()),
        ("IDENTITY_ENDPOINT", azure.identity.endpoint()),
        ("IDENTITY_HEADER", azure.identity.header().to_string()),
        ("KEY_VAULT_URI", azure.vault.public_uri()),
        (
            "MANAGED_IDENTITY_CLIENT_ID",
            MANAGED_IDENTITY_CLIENT_ID.to_string(),
        ),
        ("HTTPS_PROXY", vault_proxy.url()),
        ("NO_PROXY", "127.0.0.1,localhost".to_string()),
        ("SSL_CERT_FILE", azure.vault.ca_file().display().to_string()),
        ("DEMO_CLIENT_ID", "broker-basic".to_string()),
        ("SETTING_SECRET", setting_secret()),
    ]
    .map(|(name, value)| (name.to_string(), value))
    .into();
    env.extend(setup.extra_env.iter().cloned());
    let started = Launch {
        config: &config_path,
        env,
        log_level: setup.rust_log,
    }
    .start()
    .await;
    TestApp {
        child: started.child,
        log_readers: started.readers,
        _refusing_socket: refusing_socket,
        vault_proxy,
        address: started.address,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        logs: started.logs,
        stdout_paused: started.stdout_paused,
        idp,
        azure,
        proxy,
        _dir: dir,
    }
}

impl TestApp {
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
