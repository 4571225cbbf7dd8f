//! An HTTP CONNECT proxy (RFC 9110 §9.3.6), as a corporate or platform egress proxy is, that
//! routes the host names it knows to loopback addresses. With `HTTPS_PROXY` pointing at it,
//! the broker reaches `https://tests.vault.azure.net` as it would a real vault: its client
//! resolves nothing itself, asks the proxy for a tunnel to `tests.vault.azure.net:443`, and
//! checks the vault's certificate for that name. Targets it does not know get 403, so a
//! request that should not have come through the proxy shows up as a refusal and a count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Longest request head read before the tunnel is refused.
const MAX_HEAD_BYTES: usize = 8 * 1024;

#[derive(Default)]
struct Shared {
    /// `host:port` as the client names it, to the loopback address that serves it.
    routes: HashMap<String, SocketAddr>,
    /// Tunnels opened, by `host:port`.
    tunnels: Mutex<HashMap<String, usize>>,
    refused: AtomicUsize,
}

/// A running CONNECT proxy; dropping it stops it.
pub struct ConnectProxy {
    shared: Arc<Shared>,
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConnectProxy {
    /// Starts on any free loopback port, tunnelling each `(host:port, address)` route.
    pub async fn start(
        routes: impl IntoIterator<Item = (String, SocketAddr)>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            routes: routes
                .into_iter()
                .map(|(target, address)| (target.to_ascii_lowercase(), address))
                .collect(),
            ..Default::default()
        });
        let state = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(tunnel(state.clone(), stream));
            }
        });
        Ok(Self {
            shared,
            address,
            task,
        })
    }

    /// The proxy URL (`HTTPS_PROXY` value).
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Tunnels opened to `target` (`host:port`).
    pub fn tunnels(&self, target: &str) -> usize {
        self.shared
            .tunnels
            .lock()
            .unwrap()
            .get(&target.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Requests refused: not CONNECT, or to a target without a route.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

async fn tunnel(shared: Arc<Shared>, mut client: TcpStream) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > MAX_HEAD_BYTES {
            return refuse(&shared, client, "431 Request Header Fields Too Large").await;
        }
        match client.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    };
    let request_line = String::from_utf8_lossy(&head[..end])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let mut parts = request_line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        return refuse(&shared, client, "405 Method Not Allowed").await;
    };
    let target = target.to_ascii_lowercase();
    let Some(address) = shared.routes.get(&target).copied() else {
        return refuse(&shared, client, "403 Forbidden").await;
    };
    let Ok(mut upstream) = TcpStream::connect(address).await else {
        return refuse(&shared, client, "502 Bad Gateway").await;
    };
    *shared.tunnels.lock().unwrap().entry(target).or_default() += 1;
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // Bytes the client sent after the head already belong to the tunnel.
    if upstream.write_all(&head[end..]).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn refuse(shared: &Shared, mut client: TcpStream, status: &str) {
    shared.refused.fetch_add(1, Ordering::SeqCst);
    let _ = client
        .write_all(
            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
}
