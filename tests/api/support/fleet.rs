//! Several broker processes against one identity provider, one set of Azure doubles and
//! one `redis-server`: the shared tier's tests need a fleet, not one `TestApp`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use token_broker_doubles::AzureDoubles;
use token_broker_doubles::managed_identity::Issued;

use super::*;

/// The encryption key every fleet broker is given unless a test says otherwise (base64 of 32
/// bytes), and the Key Vault secret the brokers read their client secret from.
pub const CACHE_KEY: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
pub const OTHER_CACHE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const FLEET_SECRET: &str = "fleet client secret /+= v1";
pub const FLEET_SECRET_V2: &str = "fleet client secret :%& v2";
/// The Redis password of `RedisOptions::password`.
pub const REDIS_PASSWORD: &str = "redis-password-9f3b2c";

/// The identity provider, the Azure doubles and the configuration the brokers share.
pub struct Fleet {
    pub idp: Idp,
    pub azure: AzureDoubles,
    pub dir: tempfile::TempDir,
    /// Every value each Key Vault secret has had in this test, by secret name.
    vault_values: Arc<Mutex<HashMap<String, Vec<String>>>>,
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
        let idp = Idp::start(dir.path(), &fleet_clients(ttl_seconds)).await;
        let azure = AzureDoubles::start(dir.path(), None).await.unwrap();
        let fleet = Fleet {
            idp,
            azure,
            dir,
            vault_values: Arc::default(),
        };
        fleet.set_secret("fleet-secret", FLEET_SECRET);
        fleet.set_secret("cache-key", CACHE_KEY);
        fleet.set_secret("redis-password", REDIS_PASSWORD);
        fleet
    }

    /// A new version of the Key Vault secret `name`; returns its version. Fleet tests set
    /// secrets only through this, so that the leak scan knows every value a broker may hold.
    pub fn set_secret(&self, name: &str, value: &str) -> String {
        self.vault_values
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .push(value.to_string());
        self.azure.vault.set_secret(name, value)
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
        Self::shared_block_at(&redis.url())
    }

    /// The usual `[shared_cache]` block for Redis at `url`.
    pub fn shared_block_at(url: &str) -> String {
        format!(
            "redis_url = \"{url}\"\nencryption_key = {{ app_setting = \"CACHE_KEY\" }}\ntimeout_ms = 100\n"
        )
    }

    /// Starts a broker with `config`; returns once it answers `/`.
    pub async fn broker(&self, config: &str, env: &[(&str, &str)]) -> Broker {
        let path = self.dir.path().join(format!(
            "broker-{}.toml",
            token_broker_doubles::random_hex(4)
        ));
        std::fs::write(&path, config).unwrap();
        let mut settings: HashMap<String, String> =
            HashMap::from([("CACHE_KEY".to_string(), CACHE_KEY.to_string())]);
        settings.extend(
            env.iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        let mut launch_env: Vec<(String, String)> = vec![
            ("IDENTITY_ENDPOINT".into(), self.azure.identity.endpoint()),
            (
                "IDENTITY_HEADER".into(),
                self.azure.identity.header().into(),
            ),
            ("KEY_VAULT_URI".into(), self.azure.vault.uri()),
            (
                "SSL_CERT_FILE".into(),
                self.azure.vault.ca_file().display().to_string(),
            ),
        ];
        launch_env.extend(settings.clone());
        let started = Launch {
            config: &path,
            env: launch_env,
            log_level: "info",
        }
        .start()
        .await;
        Broker {
            child: Some(started.child),
            readers: started.readers,
            address: started.address,
            http: reqwest::Client::new(),
            logs: started.logs,
            held: HeldCredentials::of(config, settings, self),
        }
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

/// Where the credentials a broker holds come from: what its configuration names (Key Vault
/// secrets, app settings, client ids), what the identity endpoint issued, and the function
/// key every request carries.
pub(crate) struct HeldCredentials {
    client_ids: Vec<String>,
    vault_secrets: Vec<String>,
    settings: Vec<String>,
    vault_values: Arc<Mutex<HashMap<String, Vec<String>>>>,
    identity_tokens: Issued,
}

impl HeldCredentials {
    fn of(config: &str, settings: HashMap<String, String>, fleet: &Fleet) -> Self {
        let config: toml::Value = toml::from_str(config).expect("a TOML configuration");
        let mut found = HashMap::<&str, Vec<String>>::new();
        collect_strings(&config, &mut found);
        let mut take = |field| found.remove(field).unwrap_or_default();
        let (client_ids, vault_secrets, app_settings) = (
            take("client_id"),
            take("key_vault_secret"),
            take("app_setting"),
        );
        HeldCredentials {
            client_ids,
            vault_secrets,
            settings: app_settings
                .iter()
                .filter_map(|name| settings.get(name).cloned())
                .collect(),
            vault_values: fleet.vault_values.clone(),
            identity_tokens: fleet.azure.identity.issued(),
        }
    }
}

/// Every string value of `client_id`, `key_vault_secret` and `app_setting` fields in `value`.
pub(crate) fn collect_strings(value: &toml::Value, found: &mut HashMap<&'static str, Vec<String>>) {
    match value {
        toml::Value::Table(table) => {
            for (name, value) in table {
                for field in ["client_id", "key_vault_secret", "app_setting"] {
                    if name == field
                        && let Some(text) = value.as_str()
                    {
                        found.entry(field).or_default().push(text.to_string());
                    }
                }
                collect_strings(value, found);
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|item| collect_strings(item, found)),
        _ => {}
    }
}

/// One broker process of a fleet.
pub struct Broker {
    /// `None` once it stopped.
    child: Option<Child>,
    readers: Vec<std::thread::JoinHandle<()>>,
    pub address: String,
    pub http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
    held: HeldCredentials,
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
    /// is released, and what it had not written yet is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }

    /// Stops the process as the host does (SIGTERM), waiting (at most 10 s, without blocking
    /// the runtime) for it to exit and for its last lines, the final `stats` line among them,
    /// to be read. Fails when it does not stop in time or exits with a failure.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        sigterm(&child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if tokio::time::Instant::now() >= deadline {
                stop(&mut child);
                panic!(
                    "the broker did not stop within 10 s of SIGTERM:\n{}",
                    self.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.finish(status);
    }

    /// After the process exited: reads what is left in the pipes; the exit must be a success.
    fn finish(&mut self, status: ExitStatus) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        assert!(
            status.success(),
            "the broker exited with {status} on SIGTERM:\n{}",
            self.logs().join("\n")
        );
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

    /// Every credential this broker held, in the forms a careless log line would show: the
    /// values of the Key Vault secrets and app settings its configuration names (client
    /// secrets, the cache key, the Redis password when it authenticates with one), plain and
    /// form-encoded; the Basic credential of each of its client ids with each of them (RFC
    /// 6749 §2.3.1: base64 of the form-encoded `id:secret`, and of the unencoded pair); the
    /// function key; and every token the managed identity endpoint issued to the fleet.
    /// Access tokens are JWTs, found by their shape.
    pub fn credentials(&self) -> Vec<String> {
        let held = &self.held;
        let values = held.vault_values.lock().unwrap();
        let mut secrets: Vec<String> = held
            .vault_secrets
            .iter()
            .flat_map(|name| values.get(name).cloned().unwrap_or_default())
            .chain(held.settings.iter().cloned())
            .collect();
        secrets.sort();
        secrets.dedup();
        let form =
            |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
        let mut needles = Vec::new();
        for id in &held.client_ids {
            for secret in &secrets {
                for pair in [
                    format!("{}:{}", form(id), form(secret)),
                    format!("{id}:{secret}"),
                ] {
                    needles.push(base64::engine::general_purpose::STANDARD.encode(pair));
                }
            }
        }
        needles.extend(secrets.iter().map(|secret| form(secret)));
        needles.extend(secrets);
        needles.push(FUNCTION_KEY.to_string());
        needles.extend(held.identity_tokens.lock().unwrap().keys().cloned());
        needles
    }

    /// Log lines that carry one of `credentials()` or a JWT.
    pub fn leaks(&self) -> Vec<String> {
        let needles = self.credentials();
        self.logs()
            .into_iter()
            .filter(|line| contains_jwt(line) || needles.iter().any(|n| line.contains(n.as_str())))
            .collect()
    }

    /// Adds a line to what the test read from the broker, as if the broker had written it:
    /// to show that the scan finds what it looks for.
    pub fn pretend_logged(&self, line: &str) {
        self.logs.lock().unwrap().push(line.to_string());
    }

    /// Takes back the lines `pretend_logged` added.
    pub fn forget_pretended(&self, lines: &[String]) {
        self.logs
            .lock()
            .unwrap()
            .retain(|line| !lines.contains(line));
    }
}

/// Sends SIGTERM to `child`, by PID.
pub(crate) fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the broker writes its log from a background thread and
        // flushes it on the way out, so the scan below sees every line. A drop cannot await:
        // the exit is waited for on a thread of its own, at most 10 s.
        if let Some(mut child) = self.child.take() {
            sigterm(&child);
            let pid = child.id().to_string();
            let (sender, exited) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = sender.send(child.wait());
            });
            let status = match exited.recv_timeout(Duration::from_secs(10)) {
                Ok(status) => status.ok(),
                Err(_) => {
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                    let _ = exited.recv();
                    None
                }
            };
            if std::thread::panicking() {
                return;
            }
            match status {
                Some(status) => self.finish(status),
                None => panic!(
                    "the broker did not stop within 10 s of SIGTERM:\n{}",
                    self.logs().join("\n")
                ),
            }
        }
        if std::thread::panicking() {
            return;
        }
        let leaks = self.leaks();
        assert!(
            leaks.is_empty(),
            "credentials in a broker's log:\n{}",
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

/// The shared tier's on-Redis format, written again from its description (docs/fleet.md, "Fleet:
/// the shared cache", `src/cache/seal.rs`) rather than taken from the code under test, so a
/// test can open what Redis holds with nothing but the configured key: HKDF-SHA256 (no
/// salt) of the key gives an AES-256-GCM key, an HMAC-SHA256 key and an 8-byte key id; a
/// value is format byte 2, key id, 12-byte nonce, then ciphertext and tag, with the entry's
/// name as associated data; a signed announcement is `message|tag[,tag]`, each tag the hex
/// of an HMAC's first 16 bytes. A rolling upgrade needs old and new instances to read each
/// other, so a change to any of this must be deliberate, and fails these tests.
pub mod sealed {
    use aws_lc_rs::{aead, hkdf, hmac};
    use base64::Engine as _;

    const SEALING_INFO: &[u8] = b"token-broker shared cache: sealed values v2";
    const TAGGING_INFO: &[u8] = b"token-broker shared cache: announcements v1";
    const KEY_ID_INFO: &[u8] = b"token-broker shared cache: key id v1";
    const AAD_PREFIX: &[u8] = b"token-broker shared cache v2\0";

    struct Length(usize);

    impl hkdf::KeyType for Length {
        fn len(&self) -> usize {
            self.0
        }
    }

    fn prk(key: &str) -> hkdf::Prk {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap();
        assert_eq!(bytes.len(), 32);
        hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&bytes)
    }

    /// The id every value sealed under `key` (base64) carries.
    pub fn key_id(key: &str) -> [u8; 8] {
        let mut id = [0u8; 8];
        prk(key)
            .expand(&[KEY_ID_INFO], Length(8))
            .unwrap()
            .fill(&mut id)
            .unwrap();
        id
    }

    /// The plaintext of `value` stored at `name`, when it opens under `key`.
    pub fn open(key: &str, name: &str, value: &[u8]) -> Option<Vec<u8>> {
        let (&format, rest) = value.split_first()?;
        if format != 2 || rest.len() < 8 + aead::NONCE_LEN {
            return None;
        }
        let (id, rest) = rest.split_at(8);
        if id != key_id(key) {
            return None;
        }
        let (nonce, body) = rest.split_at(aead::NONCE_LEN);
        let unbound: aead::UnboundKey = prk(key)
            .expand(&[SEALING_INFO], &aead::AES_256_GCM)
            .unwrap()
            .into();
        let mut body = body.to_vec();
        let plain = aead::LessSafeKey::new(unbound)
            .open_in_place(
                aead::Nonce::try_assume_unique_for_key(nonce).ok()?,
                aead::Aad::from([AAD_PREFIX, name.as_bytes()].concat()),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }

    /// The tag a holder of `key` puts on `message`.
    pub fn tag(key: &str, message: &str) -> String {
        let tagging: hmac::Key = prk(key)
            .expand(&[TAGGING_INFO], hmac::HMAC_SHA256)
            .unwrap()
            .into();
        hmac::sign(&tagging, message.as_bytes()).as_ref()[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }
}
