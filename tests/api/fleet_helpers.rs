//! Several broker processes against one identity provider, one set of Azure doubles and a
//! real `redis-server`: the shared tier's tests need a fleet, not one `TestApp`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_broker_doubles::AzureDoubles;

use crate::helpers::{FUNCTION_KEY, Idp, IdpClient, contains_jwt, wait_for_listening_port};

/// The encryption key every fleet broker is given unless a test says otherwise (base64 of 32
/// bytes), and the Key Vault secret the brokers read their client secret from.
pub const CACHE_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
pub const OTHER_CACHE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const FLEET_SECRET: &str = "fleet client secret /+= v1";
pub const FLEET_SECRET_V2: &str = "fleet client secret :%& v2";
/// The Redis password of `RedisOptions::password`.
pub const REDIS_PASSWORD: &str = "redis-password-9f3b2c";

/// How a test's `redis-server` is started.
#[derive(Default, Clone)]
pub struct RedisOptions {
    pub password: bool,
    /// TLS only, with a certificate from the Key Vault double's test CA.
    pub tls_dir: Option<PathBuf>,
}

/// A loopback port that was free a moment ago. Only for `redis-server`, which cannot report a
/// port it chose itself: the race with another process is handled by `RedisServer::start`
/// trying again when the bind fails.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// A `redis-server` process of this test, on a port of its own; killed by PID on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    options: RedisOptions,
}

impl RedisServer {
    pub fn start(options: RedisOptions) -> RedisServer {
        // A free port may be taken between finding it and redis-server binding it: try again.
        for _ in 0..5 {
            let port = free_port();
            if let Some(server) = Self::start_on(port, options.clone()) {
                return server;
            }
        }
        panic!("redis-server did not start (scripts/test installs it)");
    }

    fn start_on(port: u16, options: RedisOptions) -> Option<RedisServer> {
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.args(["--protected-mode", "no", "--loglevel", "warning"]);
        match &options.tls_dir {
            Some(dir) => {
                let file = |name: &str| dir.join(name).display().to_string();
                command.args(["--port", "0", "--tls-port", &port.to_string()]);
                command.args(["--tls-cert-file", &file("server-cert.pem")]);
                command.args(["--tls-key-file", &file("server-key.pem")]);
                command.args(["--tls-ca-cert-file", &file("ca.pem")]);
                command.args(["--tls-auth-clients", "no"]);
            }
            None => {
                command.args(["--port", &port.to_string()]);
            }
        }
        if options.password {
            command.args(["--requirepass", REDIS_PASSWORD]);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        for _ in 0..200 {
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(RedisServer {
                    child: Some(child),
                    port,
                    options,
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The URL brokers are configured with.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls_dir.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://localhost:{}", self.port)
    }

    /// Kills the server (SIGKILL, by PID): what a crash looks like to the brokers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        for _ in 0..40 {
            if let Some(mut server) = Self::start_on(self.port, self.options.clone()) {
                self.child = server.child.take();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// A plain connection for the test to look inside (no TLS; password when needed).
    pub fn inspect(&self) -> redis::Connection {
        assert!(self.options.tls_dir.is_none(), "inspect a plain server");
        let mut url = format!("redis://127.0.0.1:{}", self.port);
        if self.options.password {
            url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", self.port);
        }
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The identity provider, the Azure doubles and the configuration the brokers share.
pub struct Fleet {
    pub idp: Idp,
    pub azure: AzureDoubles,
    pub dir: tempfile::TempDir,
}

/// The provider's clients for fleet tests: two clients, 10 s tokens.
pub fn fleet_clients(ttl_seconds: u64) -> Vec<IdpClient> {
    vec![
        IdpClient {
            ttl_seconds,
            ..IdpClient::new("fleet-a", FLEET_SECRET, "client_secret_basic")
        },
        IdpClient {
            ttl_seconds,
            ..IdpClient::new("fleet-b", FLEET_SECRET, "client_secret_basic")
        },
    ]
}

impl Fleet {
    pub async fn start(ttl_seconds: u64) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let idp = Idp::start(dir.path(), &fleet_clients(ttl_seconds));
        let azure = AzureDoubles::start(dir.path(), None).await.unwrap();
        azure.vault.set_secret("fleet-secret", FLEET_SECRET);
        azure.vault.set_secret("cache-key", CACHE_KEY);
        azure.vault.set_secret("redis-password", REDIS_PASSWORD);
        Fleet { idp, azure, dir }
    }

    /// The configuration of a broker: connection `demo` for `client_id` (and `other`, a
    /// second connection of the same client), with `shared_cache` appended when given.
    pub fn config(&self, client_id: &str, shared_cache: Option<&str>) -> String {
        let token_url = &self.idp.token_endpoint;
        let shared = shared_cache
            .map(|block| format!("[shared_cache]\n{block}"))
            .unwrap_or_default();
        format!(
            r#"
[key_vault]
uri = "${{KEY_VAULT_URI}}"
verify_challenge_resource = false

[connections.demo]
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = {{ key_vault_secret = "fleet-secret" }}
scopes = ["read"]
allowed_scopes = ["read", "write"]

[connections.other]
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = {{ key_vault_secret = "fleet-secret" }}
scopes = ["write"]

{shared}
"#
        )
    }

    /// The usual `[shared_cache]` block for `redis`, the key from an app setting.
    pub fn shared_block(redis: &RedisServer) -> String {
        format!(
            "redis_url = \"{}\"\nencryption_key = {{ app_setting = \"CACHE_KEY\" }}\ntimeout_ms = 100\n",
            redis.url()
        )
    }

    /// Starts a broker with `config`; returns once it answers `/`.
    pub async fn broker(&self, config: &str, env: &[(&str, &str)]) -> Broker {
        let path = self.dir.path().join(format!(
            "broker-{}.toml",
            token_broker_doubles::random_hex(4)
        ));
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Port 0: the broker binds any free port and reports it in its "listening" line.
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", "0")
            .env("TOKEN_BROKER_CONFIG", &path)
            .env("IDENTITY_ENDPOINT", self.azure.identity.endpoint())
            .env("IDENTITY_HEADER", self.azure.identity.header())
            .env("KEY_VAULT_URI", self.azure.vault.uri())
            .env("SSL_CERT_FILE", self.azure.vault.ca_file())
            .env("CACHE_KEY", CACHE_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
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
        let port = wait_for_listening_port(&mut child, &logs);
        let broker = Broker {
            child,
            address: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            logs,
        };
        for _ in 0..1200 {
            if broker.http.get(&broker.address).send().await.is_ok() {
                return broker;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("broker never became ready:\n{}", broker.logs().join("\n"));
    }

    /// `count` brokers sharing `redis`, each connected to it.
    pub async fn shared_brokers(&self, redis: &RedisServer, count: usize) -> Vec<Broker> {
        let config = self.config("fleet-a", Some(&Self::shared_block(redis)));
        let mut brokers = Vec::new();
        for _ in 0..count {
            let broker = self.broker(&config, &[]).await;
            broker.wait_for_log("shared cache connected", 1).await;
            brokers.push(broker);
        }
        brokers
    }

    pub async fn token_requests(&self) -> u64 {
        self.idp.stats().await.token_requests
    }
}

/// One broker process of a fleet.
pub struct Broker {
    child: Child,
    pub address: String,
    pub http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Broker {
    /// `GET /api/token/{path}` as the host forwards it.
    pub async fn token(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/token/{path}", self.address))
            .header("x-functions-key", FUNCTION_KEY)
            .send()
            .await
            .unwrap()
    }

    /// The access token of a `200` answer.
    pub async fn access_token(&self, path: &str) -> String {
        let response = self.token(path).await;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Kills the process at once (SIGKILL), as a scale-in or a crash would: nothing it holds
    /// is released.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most 10 s) until `text` appears in `count` log lines.
    pub async fn wait_for_log(&self, text: &str, count: usize) {
        for _ in 0..1000 {
            if self.log_count(text) >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "'{text}' not logged {count} time(s) within 10 s:\n{}",
            self.logs().join("\n")
        );
    }

    pub fn log_count(&self, text: &str) -> usize {
        self.logs()
            .iter()
            .filter(|line| line.contains(text))
            .count()
    }

    /// Invokes `function-rotation` with a Key Vault event for `secret`; it must succeed.
    pub async fn deliver_rotation(&self, secret: &str, version: &str) -> serde_json::Value {
        let response = self.invoke_rotation(secret, version).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Invokes `function-rotation` with a `SecretNewVersionCreated` for `secret`, as the
    /// Functions host does; the answer as it came.
    pub async fn invoke_rotation(&self, secret: &str, version: &str) -> reqwest::Response {
        let event = serde_json::json!({
            "eventType": "Microsoft.KeyVault.SecretNewVersionCreated",
            "subject": secret,
            "data": { "ObjectName": secret, "ObjectType": "Secret", "Version": version }
        });
        self.http
            .post(format!("{}/function-rotation", self.address))
            .json(&serde_json::json!({ "Data": { "event": event }, "Metadata": {} }))
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        let leaks: Vec<String> = self
            .logs()
            .into_iter()
            .filter(|line| {
                contains_jwt(line)
                    || [FLEET_SECRET, FLEET_SECRET_V2, CACHE_KEY, REDIS_PASSWORD]
                        .iter()
                        .any(|secret| line.contains(secret))
            })
            .collect();
        assert!(
            leaks.is_empty(),
            "secrets in a broker's log:\n{}",
            leaks.join("\n")
        );
    }
}

/// The directory of the Key Vault double's CA, server certificate and key.
pub fn tls_dir(fleet: &Fleet) -> PathBuf {
    fleet
        .azure
        .vault
        .ca_file()
        .parent()
        .map(Path::to_path_buf)
        .unwrap()
}
