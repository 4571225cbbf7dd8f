//! A test's own `redis-server` (a Unix socket in a directory of its own, or TLS on a port it
//! checks is its own) and a proxy in front of it that can hold or cut the traffic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::*;

/// How a test's `redis-server` is started.
#[derive(Default, Clone)]
pub struct RedisOptions {
    pub password: bool,
    /// TLS only, with a certificate from the Key Vault double's test CA.
    pub tls_dir: Option<PathBuf>,
}

/// A `redis-server` process of this test; killed by PID on drop. It always listens on a Unix
/// socket in a directory of its own (which no other test can take); with TLS also on a TCP
/// port, checked to be this server's (see `start`).
pub struct RedisServer {
    child: Option<Child>,
    /// Holds the socket.
    dir: tempfile::TempDir,
    /// TLS only: the port of its TLS listener.
    tls_port: Option<u16>,
    options: RedisOptions,
}

/// A loopback port that was free a moment ago: only for a TLS `redis-server`, which cannot
/// report a port it chose itself. Another process may take it first; `RedisServer::launch`
/// then finds that the server it reaches there is not its own and tries another.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

impl RedisServer {
    pub async fn start(options: RedisOptions) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer {
            child: None,
            dir,
            tls_port: None,
            options,
        };
        for _ in 0..5 {
            let port = server.options.tls_dir.is_some().then(free_port);
            if let Some(child) = server.launch(port).await {
                server.child = Some(child);
                server.tls_port = port;
                return server;
            }
        }
        panic!("redis-server did not start (scripts/test installs it)");
    }

    /// The socket this server listens on.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// Starts the process and waits until it answers on its socket (and, with TLS, until the
    /// port is shown to be its own); `None` when it exited (a port taken) or is not its own.
    async fn launch(&self, tls_port: Option<u16>) -> Option<Child> {
        let socket = self.socket();
        let mut command = Command::new("redis-server");
        command.args(["--port", "0", "--bind", "127.0.0.1"]);
        command.arg("--unixsocket").arg(&socket);
        command.args(["--unixsocketperm", "700"]);
        command.args(["--save", "", "--appendonly", "no"]);
        command.args(["--protected-mode", "no", "--loglevel", "warning"]);
        if let (Some(dir), Some(port)) = (&self.options.tls_dir, tls_port) {
            let file = |name: &str| dir.join(name).display().to_string();
            command.args(["--tls-port", &port.to_string()]);
            command.args(["--tls-cert-file", &file("server-cert.pem")]);
            command.args(["--tls-key-file", &file("server-key.pem")]);
            command.args(["--tls-ca-cert-file", &file("ca.pem")]);
            command.args(["--tls-auth-clients", "no"]);
        }
        if self.options.password {
            command.args(["--requirepass", REDIS_PASSWORD]);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            // Only this server creates a socket in this directory; a stale one (the process
            // before a restart) refuses connections.
            if answers_ping(&socket).await {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                stop(&mut child);
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(port) = tls_port
            && !self.owns_tls_port(port).await
        {
            stop(&mut child);
            return None;
        }
        Some(child)
    }

    /// Whether the server reached over TLS at `port` is this one: a random value written
    /// through the socket must be read back there.
    async fn owns_tls_port(&self, port: u16) -> bool {
        let marker = token_broker_doubles::random_hex(16);
        let mut local = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg("fleet-test:owner")
            .arg(&marker)
            .query_async(&mut local)
            .await
            .unwrap();
        let dir = self.options.tls_dir.as_ref().unwrap();
        let password = if self.options.password {
            format!(":{REDIS_PASSWORD}@")
        } else {
            String::new()
        };
        let client = redis::Client::build_with_tls(
            format!("rediss://{password}localhost:{port}"),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(dir.join("ca.pem")).unwrap()),
            },
        )
        .unwrap();
        let read = async {
            let mut remote = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("GET")
                .arg("fleet-test:owner")
                .query_async::<Option<String>>(&mut remote)
                .await
                .ok()
                .flatten()
        };
        let seen = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()
            .flatten();
        let _: () = redis::cmd("DEL")
            .arg("fleet-test:owner")
            .query_async(&mut local)
            .await
            .unwrap();
        seen.as_deref() == Some(marker.as_str())
    }

    /// The URL brokers are configured with: the socket, or with TLS its port.
    pub fn url(&self) -> String {
        match self.tls_port {
            Some(port) => format!("rediss://localhost:{port}"),
            None => format!("redis+unix://{}", self.socket().display()),
        }
    }

    /// Kills the server (SIGKILL, by PID): what a crash looks like to the brokers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }

    /// Starts it again, empty, on the same socket (and TLS port: another process may hold it
    /// for a moment, so that is tried for up to 20 s).
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = self.launch(self.tls_port).await {
                self.child = Some(child);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not restart at {}", self.url());
    }

    /// A client of this server over its socket (with the password when there is one).
    pub fn client(&self) -> redis::Client {
        let password = if self.options.password {
            format!("?pass={REDIS_PASSWORD}")
        } else {
            String::new()
        };
        redis::Client::open(format!(
            "redis+unix://{}{password}",
            self.socket().display()
        ))
        .unwrap()
    }

    /// A plain connection for the test to look inside.
    pub fn inspect(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// Every message published on `channel` from now on, collected in the background.
    pub async fn listen(&self, channel: &str) -> Listener {
        let mut pubsub = self.client().get_async_pubsub().await.unwrap();
        pubsub.subscribe(channel).await.unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let messages = messages.clone();
            async move {
                use futures_util::StreamExt as _;
                let mut stream = pubsub.into_on_message();
                while let Some(message) = stream.next().await {
                    if let Ok(text) = message.get_payload::<String>() {
                        messages.lock().unwrap().push(text);
                    }
                }
            }
        });
        Listener { messages, task }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a child process (SIGKILL, by PID) and reaps it.
pub(crate) fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether something answers a `PING` on the socket at `path` (an error reply counts: a
/// server that wants a password is up).
pub(crate) async fn answers_ping(path: &Path) -> bool {
    let Ok(mut stream) = tokio::net::UnixStream::connect(path).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut answer = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut answer)).await,
        Ok(Ok(read)) if read > 0
    )
}

/// Messages published on a channel, as a subscriber of the test received them.
pub struct Listener {
    messages: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// The messages once `count` of them satisfy `predicate` (at most 10 s).
    pub async fn when(&self, count: usize, predicate: impl Fn(&str) -> bool) -> Vec<String> {
        for _ in 0..1000 {
            let messages = self.messages();
            if messages.iter().filter(|message| predicate(message)).count() >= count {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "fewer than {count} matching messages: {:?}",
            self.messages()
        );
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of a test's `redis-server` (its socket), on a port it bound itself:
/// it can stop forwarding (a black hole: connections stay open, nothing is answered, and
/// what was sent is delivered once it forwards again, as TCP would after a partition), and
/// it can hold every chunk a client sends that carries an `AUTH` until the test releases it.
pub struct RedisProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    held: tokio::sync::Mutex<mpsc::UnboundedReceiver<HeldAuth>>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) struct ProxyShared {
    forwarding: watch::Sender<bool>,
    gate_auth: AtomicBool,
    connections: AtomicUsize,
    held: mpsc::UnboundedSender<HeldAuth>,
}

/// A chunk a client sent with an `AUTH` in it, held until released.
pub struct HeldAuth {
    /// Which connection sent it (1 for the proxy's first).
    pub connection: usize,
    pub bytes: Vec<u8>,
    release: oneshot::Sender<()>,
}

impl HeldAuth {
    /// Forwards the chunk to Redis.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

impl RedisProxy {
    pub async fn start(redis: &RedisServer) -> RedisProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held_sender, held) = mpsc::unbounded_channel();
        let shared = Arc::new(ProxyShared {
            forwarding: watch::Sender::new(true),
            gate_auth: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            held: held_sender,
        });
        let socket = redis.socket();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                // Dropped with the accept loop: every connection ends with the proxy.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let shared = shared.clone();
                    let socket = socket.clone();
                    connections.spawn(async move {
                        let Ok(upstream) = tokio::net::UnixStream::connect(&socket).await else {
                            return;
                        };
                        let (from_client, to_client) = client.into_split();
                        let (from_redis, to_redis) = upstream.into_split();
                        tokio::select! {
                            () = pump(from_client, to_redis, &shared, Some(number)) => {}
                            () = pump(from_redis, to_client, &shared, None) => {}
                        }
                    });
                }
            }
        });
        RedisProxy {
            port,
            shared,
            held: tokio::sync::Mutex::new(held),
            task,
        }
    }

    /// The URL brokers use to reach Redis through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding in both directions (`true`), or forwards again what was held.
    pub fn black_hole(&self, on: bool) {
        self.shared.forwarding.send_replace(!on);
    }

    /// Holds (`true`) every chunk a client sends with an `AUTH` in it until released.
    pub fn hold_auth(&self, on: bool) {
        self.shared.gate_auth.store(on, Ordering::SeqCst);
    }

    /// The next held `AUTH`, waited for at most `within`.
    pub async fn next_auth(&self, within: Duration) -> HeldAuth {
        tokio::time::timeout(within, self.held.lock().await.recv())
            .await
            .unwrap_or_else(|_| panic!("no AUTH within {within:?}"))
            .unwrap()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while the proxy forwards; a chunk from a client (`connection` set)
/// with an `AUTH` in it waits for the test when the proxy holds them.
pub(crate) async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    shared: &ProxyShared,
    connection: Option<usize>,
) {
    let mut forwarding = shared.forwarding.subscribe();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if forwarding.wait_for(|on| *on).await.is_err() {
            return;
        }
        let chunk = &buffer[..read];
        if let Some(connection) = connection
            && shared.gate_auth.load(Ordering::SeqCst)
            && carries_auth(chunk)
        {
            let (release, released) = oneshot::channel();
            let _ = shared.held.send(HeldAuth {
                connection,
                bytes: chunk.to_vec(),
                release,
            });
            if released.await.is_err() {
                return;
            }
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

/// Whether a RESP chunk carries `AUTH` as a bulk string (the command, or `HELLO`'s option).
pub(crate) fn carries_auth(chunk: &[u8]) -> bool {
    chunk
        .windows(8)
        .any(|window| window.eq_ignore_ascii_case(b"\r\nAUTH\r\n"))
}
