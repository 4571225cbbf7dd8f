//! The App Service managed identity endpoint (`IDENTITY_ENDPOINT` / `IDENTITY_HEADER`), as
//! azure_identity 1.x calls it: `GET ?api-version=2019-08-01&resource=...` with headers
//! `x-identity-header` and `metadata: true`; 200 answers carry `expires_on` as a JSON string.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::random_hex;
use crate::serve::{self, Server};

/// Path of the endpoint; App Service uses a similar local URL.
pub const PATH: &str = "/msi/token";

/// What the vault double needs to know about a token this endpoint issued.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub resource: String,
    pub expires_on: u64,
    /// The user-assigned identity it was issued to (`None`: system-assigned).
    pub client_id: Option<String>,
}

/// Tokens issued so far, by value: the "directory" the Key Vault double checks bearers against.
pub type Issued = Arc<Mutex<HashMap<String, IssuedToken>>>;

#[derive(Default)]
struct Shared {
    header: String,
    client_id: Option<String>,
    issued: Issued,
    requests: AtomicUsize,
    /// The `client_id` of each request (`None` when absent), in order.
    client_ids: Mutex<Vec<Option<String>>>,
    /// When set, every request fails with this status (400 = identity not assigned,
    /// 502/504 = gateway), as App Service answers.
    failure: Mutex<Option<u16>>,
    lifetime: Mutex<Duration>,
}

/// A running managed identity endpoint.
pub struct ManagedIdentityDouble {
    shared: Arc<Shared>,
    server: Server,
}

impl ManagedIdentityDouble {
    /// Starts the endpoint on `port` (0 for any). `client_id`, when given, is the only
    /// identity the app "has", a user-assigned one: other client ids, and requests naming
    /// none (which ask for a system-assigned identity the app does not have), get App
    /// Service's 400. Without it, the app has only a system-assigned identity.
    pub async fn start(port: u16, client_id: Option<String>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            header: random_hex(16),
            client_id,
            lifetime: Mutex::new(Duration::from_secs(24 * 3600)),
            ..Default::default()
        });
        let router = axum::Router::new()
            .route(PATH, get(token))
            .with_state(shared.clone());
        let server = serve::spawn(router, port, None).await?;
        Ok(Self { shared, server })
    }

    /// The `IDENTITY_ENDPOINT` value.
    pub fn endpoint(&self) -> String {
        format!("http://{}{PATH}", self.server.address)
    }

    /// The `IDENTITY_HEADER` value.
    pub fn header(&self) -> &str {
        &self.shared.header
    }

    /// The registry of issued tokens, for the vault double.
    pub fn issued(&self) -> Issued {
        self.shared.issued.clone()
    }

    /// Requests received, whatever their outcome.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The `client_id` each request carried (`None` when it had none), in order.
    pub fn requested_client_ids(&self) -> Vec<Option<String>> {
        self.shared.client_ids.lock().unwrap().clone()
    }

    /// Makes every request fail with `status` (or succeed again with `None`).
    pub fn set_failure(&self, status: Option<u16>) {
        *self.shared.failure.lock().unwrap() = status;
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *self.shared.lifetime.lock().unwrap() = lifetime;
    }
}

async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let error = |status: StatusCode, message: &str| {
        (
            status,
            Json(json!({ "statusCode": status.as_u16(), "message": message, "correlationId": random_hex(16) })),
        )
            .into_response()
    };
    if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(shared.header.as_str())
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "The request is missing a valid X-IDENTITY-HEADER.",
        );
    }
    if query.get("api-version").map(String::as_str) != Some("2019-08-01") {
        return error(
            StatusCode::BAD_REQUEST,
            "Unsupported or missing api-version.",
        );
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Required query variable 'resource' is missing.",
        );
    };
    if let Some(status) = *shared.failure.lock().unwrap() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        return error(
            status,
            "Identity endpoint failure (injected by the double).",
        );
    }
    let requested_client = query.get("client_id");
    shared
        .client_ids
        .lock()
        .unwrap()
        .push(requested_client.cloned());
    match (requested_client, shared.client_id.as_ref()) {
        (Some(requested), Some(assigned)) if requested == assigned => {}
        (None, None) => {}
        (Some(_), _) => {
            return error(
                StatusCode::BAD_REQUEST,
                "No User Assigned or Delegated Managed Identity found for specified ClientId/ResourceId/PrincipalId.",
            );
        }
        (None, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "No MSI found for specified ClientId/ResourceId/PrincipalId (the app has no system-assigned identity).",
            );
        }
    }
    let lifetime = *shared.lifetime.lock().unwrap();
    let expires_on = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + lifetime.as_secs();
    let access_token = format!("mi-{}", random_hex(24));
    shared.issued.lock().unwrap().insert(
        access_token.clone(),
        IssuedToken {
            resource: resource.clone(),
            expires_on,
            client_id: requested_client.cloned(),
        },
    );
    Json(json!({
        "access_token": access_token,
        // A string, as App Service sends it; a number fails to parse in azure_identity 1.0.
        "expires_on": expires_on.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": shared.client_id.clone().unwrap_or_else(|| "00000000-0000-0000-0000-00000000beef".to_string()),
    }))
    .into_response()
}
