//! The App Service managed identity endpoint (`IDENTITY_ENDPOINT` / `IDENTITY_HEADER`), as
//! azure_identity 1.x calls it: `GET ?api-version=2019-08-01&resource=...` with headers
//! `x-identity-header` and `metadata: true`; 200 answers carry `expires_on` as a JSON string.
//!
//! A user-assigned identity is selected as App Service lets a caller select it: by
//! `client_id`, by `principal_id` (or its alias `object_id`, which azure_identity sends), or by
//! `mi_res_id` (its ARM resource id, compared case-insensitively as ARM ids are). Tokens are
//! shaped like Entra's: a JWT whose `sub` and `oid` are the identity's object (principal) id,
//! `appid` its client id, `aud` the resource; what a federated credential is matched on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use crate::random_hex;
use crate::serve::{self, Server};

/// Path of the endpoint; App Service uses a similar local URL.
pub const PATH: &str = "/msi/token";

pub use crate::directory::{Issued, IssuedToken, TENANT};

/// One managed identity: its client id, object (principal) id and ARM resource id.
#[derive(Clone, Debug)]
pub struct Identity {
    pub client_id: String,
    pub object_id: String,
    pub resource_id: String,
}

impl Identity {
    /// A user-assigned identity with `client_id`, and an object id of its own (a different
    /// GUID, as in Entra).
    fn user_assigned(client_id: String) -> Self {
        Self {
            client_id,
            object_id: guid(),
            resource_id: "/subscriptions/00000000-0000-4000-8000-0000000000a1/resourceGroups/rg-token-broker/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-token-broker".to_string(),
        }
    }
}

/// A random GUID-shaped id.
fn guid() -> String {
    let hex = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[derive(Default)]
struct Shared {
    header: String,
    /// The only user-assigned identity the app has; `None`: only a system-assigned one.
    user_assigned: Option<Identity>,
    /// The system-assigned identity's object id (used when `user_assigned` is `None`).
    system_object_id: String,
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
    /// identity the app "has", a user-assigned one: requests selecting another identity, and
    /// requests selecting none (which ask for a system-assigned identity the app does not
    /// have), get App Service's 400. Without it, the app has only a system-assigned identity.
    pub async fn start(port: u16, client_id: Option<String>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            header: random_hex(16),
            user_assigned: client_id.map(Identity::user_assigned),
            system_object_id: guid(),
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

    /// The user-assigned identity, when the app has one.
    pub fn user_assigned(&self) -> Option<&Identity> {
        self.shared.user_assigned.as_ref()
    }

    /// The object (principal) id of the identity tokens are issued to: the user-assigned
    /// one's when the app has one, else the system-assigned one's.
    pub fn object_id(&self) -> &str {
        self.shared
            .user_assigned
            .as_ref()
            .map_or(&self.shared.system_object_id, |identity| {
                &identity.object_id
            })
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

    /// Ends every token issued so far, as the services that check them see it: the Key Vault
    /// and Entra doubles refuse them from now on, while their holder, told a lifetime of a
    /// day, still takes them for valid (a token revoked, or a clock that drifted). Returns
    /// how many tokens were ended.
    pub fn expire_issued(&self) -> usize {
        let mut issued = self.shared.issued.lock().unwrap();
        let ended = now().saturating_sub(1);
        for token in issued.values_mut() {
            token.expires_on = token.expires_on.min(ended);
        }
        issued.len()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The selectors App Service's identity endpoint takes for a user-assigned identity, with
/// what each names.
const SELECTORS: [&str; 4] = ["client_id", "principal_id", "object_id", "mi_res_id"];

/// Whether `value`, given for `selector`, names `identity`.
fn names(identity: &Identity, selector: &str, value: &str) -> bool {
    match selector {
        "client_id" => value.eq_ignore_ascii_case(&identity.client_id),
        "principal_id" | "object_id" => value.eq_ignore_ascii_case(&identity.object_id),
        "mi_res_id" => value.eq_ignore_ascii_case(&identity.resource_id),
        _ => false,
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
    shared
        .client_ids
        .lock()
        .unwrap()
        .push(query.get("client_id").cloned());
    let selected: Vec<(&str, &String)> = SELECTORS
        .iter()
        .filter_map(|selector| query.get(*selector).map(|value| (*selector, value)))
        .collect();
    let (client_id, object_id, resource_id) = match (&shared.user_assigned, selected.is_empty()) {
        (Some(identity), false)
            if selected
                .iter()
                .all(|(selector, value)| names(identity, selector, value)) =>
        {
            (
                Some(identity.client_id.clone()),
                identity.object_id.clone(),
                Some(identity.resource_id.clone()),
            )
        }
        (None, true) => (None, shared.system_object_id.clone(), None),
        (_, false) => {
            return error(
                StatusCode::BAD_REQUEST,
                "No User Assigned or Delegated Managed Identity found for specified ClientId/ResourceId/PrincipalId.",
            );
        }
        (Some(_), true) => {
            return error(
                StatusCode::BAD_REQUEST,
                "No MSI found for specified ClientId/ResourceId/PrincipalId (the app has no system-assigned identity).",
            );
        }
    };
    let lifetime = *shared.lifetime.lock().unwrap();
    let issued_at = now();
    let expires_on = issued_at + lifetime.as_secs();
    let app_id = client_id
        .clone()
        .unwrap_or_else(|| "00000000-0000-0000-0000-00000000beef".to_string());
    // Entra's shape: v2 tokens for the federation audience (the exchange app accepts v2), v1
    // tokens for Azure resources such as Key Vault.
    let issuer = if resource.starts_with("api://AzureADTokenExchange") {
        format!("https://login.microsoftonline.com/{TENANT}/v2.0")
    } else {
        format!("https://sts.windows.net/{TENANT}/")
    };
    let mut claims = json!({
        "aud": resource, "iss": issuer, "iat": issued_at, "nbf": issued_at, "exp": expires_on,
        "sub": object_id, "oid": object_id, "appid": app_id, "appidacr": "2", "idtyp": "app",
        "tid": TENANT, "uti": random_hex(8),
    });
    if let Some(resource_id) = &resource_id {
        claims["xms_mirid"] = resource_id.clone().into();
    }
    let access_token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"RS256","kid":"managed-identity-double"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(random_hex(64)),
    );
    shared.issued.lock().unwrap().insert(
        access_token.clone(),
        IssuedToken {
            resource: resource.clone(),
            expires_on,
            client_id: client_id.clone(),
            object_id,
        },
    );
    Json(json!({
        "access_token": access_token,
        // A string, as App Service sends it; a number fails to parse in azure_identity 1.0.
        "expires_on": expires_on.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": app_id,
    }))
    .into_response()
}
