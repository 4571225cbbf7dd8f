//! Starting a broker process the way the Functions host does (port 0, reported in its
//! "listening" line) and reading its log lines, for every test that starts one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

/// How a test starts a broker: its configuration file, what its environment holds besides
/// `PATH`, the port (0: any free one, reported in its "listening" line, so that no port is
/// picked here and bound later) and the configuration's path, and its log level.
pub struct Launch<'a> {
    pub config: &'a Path,
    pub env: Vec<(String, String)>,
    /// `RUST_LOG`; the "listening" line stays visible whatever it says.
    pub log_level: &'a str,
}

/// A broker process that reported its port and answers `/`.
pub struct Started {
    pub child: Child,
    pub address: String,
    /// Its stdout and stderr lines, as read so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The threads reading them; they end at the end of the pipes.
    pub readers: Vec<JoinHandle<()>>,
    /// While set, its stdout is not read, so the pipe fills as a stalled log pipeline would.
    pub stdout_paused: Arc<(Mutex<bool>, Condvar)>,
}

impl Launch<'_> {
    /// Starts the broker and waits, without blocking the runtime that serves the doubles,
    /// until it reports its port (at most 30 s) and answers `GET /` as the Functions host
    /// polls it (every 25 ms, at most 30 s). Fails with the broker's log otherwise.
    pub async fn start(self) -> Started {
        let mut child = Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", "0")
            .env("TOKEN_BROKER_CONFIG", self.config)
            .env("RUST_LOG", rust_log(self.log_level))
            .envs(self.env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout_paused = Arc::new((Mutex::new(false), Condvar::new()));
        let mut readers = Vec::new();
        for (stream, pausable) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                true,
            ),
            (Box::new(child.stderr.take().unwrap()), false),
        ] {
            let logs = logs.clone();
            let paused = stdout_paused.clone();
            readers.push(std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    if pausable {
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
        let mut started = Started {
            child,
            address: String::new(),
            logs,
            readers,
            stdout_paused,
        };
        match try_listening_port(&mut started.child, &started.logs).await {
            Ok(port) => started.address = format!("http://127.0.0.1:{port}"),
            Err(reason) => {
                started
                    .fail(&format!(
                        "{reason} without a \"token-broker listening\" line with its port"
                    ))
                    .await
            }
        }
        let http = reqwest::Client::new();
        for _ in 0..1200 {
            if http
                .get(format!("{}/", started.address))
                .send()
                .await
                .is_ok()
            {
                return started;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        started.fail("never answered GET / within 30 s").await
    }
}

impl Started {
    /// Stops the process and fails with everything it wrote.
    async fn fail(self, what: &str) -> ! {
        let Started {
            child,
            logs,
            readers,
            ..
        } = self;
        reap(child).await;
        // The readers end at the end of the pipes: the log is then complete.
        tokio::task::spawn_blocking(move || {
            for reader in readers {
                let _ = reader.join();
            }
        })
        .await
        .unwrap();
        panic!(
            "the broker {what}; logs:\n{}",
            logs.lock().unwrap().join("\n")
        );
    }
}

/// Kills `child` and waits for it to end without blocking the runtime.
pub(crate) async fn reap(mut child: Child) {
    let _ = child.kill();
    while matches!(child.try_wait(), Ok(None)) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
