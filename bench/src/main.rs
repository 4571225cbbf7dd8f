//! `bare-server`: the physical limit the broker is measured against. It answers every request,
//! whatever its path, with the broker's token answer reduced to constants: the same headers
//! (`Content-Type`, `Cache-Control: no-store`, `Pragma: no-cache`) and a JSON body of
//! `BARE_BODY_BYTES` bytes (the size of a broker token answer), so that it sends the same bytes
//! as the broker, on `127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT` (0 for any free port; the bound port is
//! printed as `{"port":N}` on stdout either way), on the same runtime, HTTP stack and build
//! profile as the broker, and does nothing else: no routing logic, no cache, no logging.
//!
//! `BARE_STACK` picks how the body is served: `router` (the default: an axum `Router` whose
//! fallback answers, the limit the issue set the target against) or `service` (one hand-made
//! service with no router, as the broker itself is served: the stricter limit, reported beside
//! the first so that a broker without a router is not flattered by the comparison).

use std::convert::Infallible;

use axum::ServiceExt as _;
use axum::body::Body;
use axum::http::{Request, header};
use axum::response::IntoResponse;

/// The broker's allocator, so that the comparison is of the work done, not of the allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8081);
    let size: usize = std::env::var("BARE_BODY_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(800);
    // {"access_token":"xxxx..."} padded to the requested size.
    let overhead = r#"{"access_token":""}"#.len();
    let body: &'static str = Box::leak(
        format!(
            r#"{{"access_token":"{}"}}"#,
            "x".repeat(size.saturating_sub(overhead))
        )
        .into_boxed_str(),
    );
    let answer = move || {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            body,
        )
            .into_response()
    };
    let app = axum::Router::new().fallback(move || async move { answer() });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let bound = listener.local_addr().expect("bound address").port();
    println!("{{\"port\":{bound}}}");
    if std::env::var("BARE_STACK").as_deref() == Ok("service") {
        let service =
            tower::service_fn(move |_: Request<Body>| async move { Ok::<_, Infallible>(answer()) });
        axum::serve(listener, service.into_make_service())
            .await
            .expect("serve");
    } else {
        axum::serve(listener, app).await.expect("serve");
    }
}
