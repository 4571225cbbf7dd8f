//! A fault-injecting HTTP proxy to put in front of the real oidc-provider: it forwards each
//! request unchanged, or answers it with the fault a test asked for (a status with
//! `Retry-After`, a delay, a dropped connection), and counts what it saw and forwarded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the proxy does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward to the upstream.
    Pass,
    /// Answer with this status (and `Retry-After` seconds when given), without forwarding.
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Wait, then forward.
    Delay(Duration),
    /// Close the connection without answering (a reset, as the client sees it).
    Reset,
    /// Hold the request until [`FaultProxy::release_held`], then forward it: an upstream
    /// that hangs for exactly as long as the test needs, with no clock involved.
    Hold,
    /// Forward, then answer with this status instead of the upstream's answer: the upstream
    /// acted on the request (saw its `jti`, issued a token) but its answer was lost, as when
    /// a gateway in between times out.
    LostAnswer(u16),
}

struct State {
    upstream: String,
    default: Mutex<Fault>,
    queue: Mutex<VecDeque<Fault>>,
    requests: AtomicUsize,
    /// The request count, for tests that wait until the proxy has seen a request.
    seen: tokio::sync::watch::Sender<usize>,
    /// Set once by `release_held`: held requests go on.
    released: tokio::sync::watch::Sender<bool>,
    forwarded: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running proxy; dropping it stops it.
pub struct FaultProxy {
    state: Arc<State>,
    port: u16,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://host:port`, no path).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            default: Mutex::new(Fault::Pass),
            queue: Mutex::default(),
            requests: AtomicUsize::new(0),
            seen: tokio::sync::watch::Sender::new(0),
            released: tokio::sync::watch::Sender::new(false),
            forwarded: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { handle(&state, request).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { state, port, task })
    }

    /// The proxy's base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What to do with requests when no queued fault is left.
    pub fn set_default(&self, fault: Fault) {
        *self.state.default.lock().unwrap() = fault;
    }

    /// Applies `fault` to the next `times` requests, before the default.
    pub fn push(&self, fault: Fault, times: usize) {
        let mut queue = self.state.queue.lock().unwrap();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Requests received.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Waits until the proxy has received at least `count` requests, for at most `within`;
    /// returns whether it did. Woken by each request, so it neither spins nor sleeps.
    pub async fn wait_for_requests(&self, count: usize, within: Duration) -> bool {
        let mut seen = self.state.seen.subscribe();
        tokio::time::timeout(within, seen.wait_for(|seen| *seen >= count))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// Lets every request held by [`Fault::Hold`] (and any held later) go on.
    pub fn release_held(&self) {
        self.state.released.send_replace(true);
    }

    /// Requests forwarded to the upstream.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

async fn handle(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    state.seen.send_modify(|seen| *seen += 1);
    let fault = state
        .queue
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(*state.default.lock().unwrap());
    match fault {
        Fault::Reset => return Err(Dropped),
        Fault::Status {
            status,
            retry_after,
        } => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"<html><body>injected fault</body></html>",
            )));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            response
                .headers_mut()
                .insert("content-type", "text/html".parse().unwrap());
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            return Ok(response);
        }
        Fault::Delay(delay) => tokio::time::sleep(delay).await,
        Fault::LostAnswer(status) => {
            forward(state, request).await?;
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"<html><body>gateway timeout</body></html>",
            )));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::GATEWAY_TIMEOUT);
            return Ok(response);
        }
        Fault::Hold => {
            let mut released = state.released.subscribe();
            let _ = released.wait_for(|released| *released).await;
        }
        Fault::Pass => {}
    }
    forward(state, request).await
}

async fn forward(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut upstream = Request::builder()
        .method(parts.method)
        .uri(format!("{}{path}", state.upstream));
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream.body(Full::new(body)).map_err(|_| Dropped)?;
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let response = state.client.request(upstream).await.map_err(|_| Dropped)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
