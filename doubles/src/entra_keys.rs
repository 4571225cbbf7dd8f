//! Microsoft Entra's signing keys as a caller-token validator sees them: the tenant's JWKS
//! (`/discovery/v2.0/keys`) and an OpenID discovery document pointing at it, with a key pair
//! whose private half the tests hold, so they can mint v1- and v2-shaped Entra access tokens
//! (`iss`, `aud`, `appid`/`azp`, `oid`, `tid`, `ver`) that no running Entra would give them.
//!
//! The key is P-256 (ES256) rather than Entra's RSA: the broker verifies both, the claims are
//! what this double stands in for, and rcgen generates it without a second crypto stack.
//! Every download is counted, and faults (an error status, an oversized body, a discovery
//! document naming a plain-http key URL) can be switched on mid-test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::random_hex;
use crate::serve::{self, Server};

/// Path of the key set, as Entra serves it under `login.microsoftonline.com/{tenant}`.
pub const JWKS_PATH: &str = "/discovery/v2.0/keys";
/// Path of the discovery document relative to the double's base URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// What the key endpoint does instead of answering normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeysFault {
    /// Answers with this HTTP status and an empty body.
    Status(u16),
    /// Answers 200 with a JSON body of this many bytes (a valid key set padded with spaces).
    Oversized(usize),
}

struct Shared {
    jwks: Value,
    /// Set once the server is bound; requests cannot arrive before.
    base: OnceLock<String>,
    downloads: AtomicUsize,
    discovery_requests: AtomicUsize,
    fault: Mutex<Option<KeysFault>>,
    discovered_jwks_uri: Mutex<Option<String>>,
}

/// An ES256 signing key with its id and its public half as a JWKS; usable without a server
/// (unit tests) or served by [`EntraKeysDouble`].
pub struct SigningKey {
    pair: rcgen::KeyPair,
    kid: String,
    jwks: Value,
}

impl SigningKey {
    pub fn generate() -> Result<Self, rcgen::Error> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // An uncompressed P-256 point: 0x04, then X and Y of 32 bytes each.
        let point = pair.public_key_raw();
        let (x, y) = (&point[1..33], &point[33..65]);
        let kid = random_hex(10);
        let jwks = json!({"keys": [{
            "kty": "EC",
            "use": "sig",
            "crv": "P-256",
            "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
            "alg": "ES256",
        }]});
        Ok(Self { pair, kid, jwks })
    }

    /// The key's id (`kid` in tokens and in the key set).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key set that publishes this key.
    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    /// The private key, PKCS#8 DER, for signing ES256 tokens.
    pub fn private_key_pkcs8_der(&self) -> &[u8] {
        self.pair.serialized_der()
    }

    /// The public key as PEM (SubjectPublicKeyInfo): what an algorithm-confusion attacker
    /// would use as an HMAC secret.
    pub fn public_key_pem(&self) -> String {
        self.pair.public_key_pem()
    }

    /// The public key's raw point bytes.
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }
}

/// A running key endpoint with one signing key.
pub struct EntraKeysDouble {
    shared: Arc<Shared>,
    key: SigningKey,
    _server: Server,
}

impl EntraKeysDouble {
    /// Generates a key and serves it on any free loopback port.
    pub async fn start() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let key = SigningKey::generate()?;
        let shared = Arc::new(Shared {
            jwks: key.jwks().clone(),
            base: OnceLock::new(),
            downloads: AtomicUsize::new(0),
            discovery_requests: AtomicUsize::new(0),
            fault: Mutex::new(None),
            discovered_jwks_uri: Mutex::new(None),
        });
        let router = axum::Router::new()
            .route(JWKS_PATH, get(keys))
            .route(DISCOVERY_PATH, get(discovery))
            .with_state(shared.clone());
        // Port 0, then the bound address: no window in which another process takes the port.
        let server = serve::spawn(router, 0, None).await?;
        let _ = shared.base.set(format!("http://{}", server.address));
        Ok(Self {
            shared,
            key,
            _server: server,
        })
    }

    /// The key the served set publishes.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Base URL; as an issuer, its discovery document is at `{base}/.well-known/...`.
    pub fn base_url(&self) -> &str {
        self.shared.base()
    }

    /// The key set's URL.
    pub fn jwks_uri(&self) -> String {
        format!("{}{JWKS_PATH}", self.shared.base())
    }

    /// Key set downloads so far (faulty answers included).
    pub fn downloads(&self) -> usize {
        self.shared.downloads.load(Ordering::SeqCst)
    }

    /// Discovery document requests so far.
    pub fn discovery_requests(&self) -> usize {
        self.shared.discovery_requests.load(Ordering::SeqCst)
    }

    /// Makes the key endpoint misbehave, or (with `None`) answer normally again.
    pub fn set_fault(&self, fault: Option<KeysFault>) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Makes the discovery document name another `jwks_uri` than the double's own.
    pub fn set_discovered_jwks_uri(&self, uri: Option<String>) {
        *self.shared.discovered_jwks_uri.lock().unwrap() = uri;
    }
}

impl Shared {
    fn base(&self) -> &str {
        self.base.get().map(String::as_str).unwrap_or_default()
    }
}

async fn keys(State(shared): State<Arc<Shared>>) -> Response {
    shared.downloads.fetch_add(1, Ordering::SeqCst);
    let fault = shared.fault.lock().unwrap().clone();
    match fault {
        None => Json(shared.jwks.clone()).into_response(),
        Some(KeysFault::Status(status)) => StatusCode::from_u16(status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        Some(KeysFault::Oversized(size)) => {
            let mut body = shared.jwks.to_string();
            let padding = size.saturating_sub(body.len());
            body.extend(std::iter::repeat_n(' ', padding));
            ([("content-type", "application/json")], body).into_response()
        }
    }
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.discovery_requests.fetch_add(1, Ordering::SeqCst);
    let jwks_uri = shared
        .discovered_jwks_uri
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| format!("{}{JWKS_PATH}", shared.base()));
    Json(json!({
        "issuer": shared.base(),
        "jwks_uri": jwks_uri,
        "token_endpoint": format!("{}/oauth2/v2.0/token", shared.base()),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
}
