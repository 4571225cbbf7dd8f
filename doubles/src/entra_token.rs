//! Microsoft Entra's v2.0 token endpoint as it judges client assertions, for the two
//! secretless credentials Entra supports (PROTOCOLS.md §9):
//!
//! - certificate credentials: a JWS with header `alg` PS256 or RS256, `typ` JWT and
//!   `x5t#S256` (SHA-256 of the registered certificate's DER), signed by the certificate's key,
//!   with `aud` = this endpoint's URL, `iss` = `sub` = the client id, a lifetime within ten
//!   minutes and a `jti` never seen before;
//! - federated identity credentials: a token the managed identity double issued (its registry
//!   stands in for Entra's signature check) and still valid, whose `iss`, `aud` and `sub`
//!   match the credential's issuer, audience and subject exactly; the subject is the
//!   identity's object (principal) id, as the README has users register it.
//!
//! Client credentials requests must name exactly one scope, `<resource>/.default`, as Entra
//! requires (AADSTS1002012 for another scope, AADSTS70011 for several, AADSTS900144 for none).
//! Answers use Entra's shapes: `invalid_client` with `AADSTS` codes in `error_codes`, and a
//! JWT-shaped access token (so that the broker's log scans find one if it leaks). Every
//! request's form is recorded, for tests to check what the broker sent.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use axum::Json;
use axum::extract::{Form, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::directory::{Issued, now};
use crate::random_hex;
use crate::serve::{self, Server};

/// RFC 7523's assertion type.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub use crate::directory::TENANT;
/// The longest assertion lifetime accepted (`exp - nbf`).
const MAX_LIFETIME: u64 = 600;
/// Clock skew allowed on `nbf` and `exp`.
const SKEW: u64 = 300;

/// How an app registration accepts assertions.
#[derive(Clone)]
enum Credential {
    /// A certificate (DER) and its public key (SubjectPublicKeyInfo DER).
    Certificate { der: Vec<u8>, spki: Vec<u8> },
    /// A federated identity credential trusting tokens with `iss` = `issuer`, `sub` =
    /// `subject` (a managed identity's object id) and `aud` = `audience`.
    Federated {
        issuer: String,
        subject: String,
        audience: String,
    },
}

#[derive(Default)]
struct Shared {
    url: OnceLock<String>,
    /// The managed identity double's registry, once trusted.
    issued: Mutex<Option<Issued>>,
    apps: Mutex<HashMap<String, Vec<Credential>>>,
    jtis: Mutex<HashSet<String>>,
    requests: AtomicUsize,
    issued_tokens: AtomicUsize,
    /// Every refusal's AADSTS code, in order.
    refusals: Mutex<Vec<u64>>,
    /// Header and claims of every assertion accepted, in order.
    accepted: Mutex<Vec<(Value, Value)>>,
    /// The form of every request, in order.
    forms: Mutex<Vec<HashMap<String, String>>>,
}

/// A running Entra token endpoint.
pub struct EntraTokenDouble {
    shared: Arc<Shared>,
    _server: Server,
}

impl EntraTokenDouble {
    /// Starts on any free port.
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let router = axum::Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .with_state(shared.clone());
        let server = serve::spawn(router, 0, None).await?;
        let _ = shared.url.set(format!(
            "http://{}/{TENANT}/oauth2/v2.0/token",
            server.address
        ));
        Ok(Self {
            shared,
            _server: server,
        })
    }

    /// The token endpoint, which is also the `aud` assertions must carry.
    pub fn token_url(&self) -> String {
        self.shared.url.get().cloned().unwrap_or_default()
    }

    /// Registers (or replaces) app `client_id`'s only certificate credential.
    pub fn set_certificate(&self, client_id: &str, der: Vec<u8>, spki: Vec<u8>) {
        self.shared.apps.lock().unwrap().insert(
            client_id.to_string(),
            vec![Credential::Certificate { der, spki }],
        );
    }

    /// Trusts the managed identity double whose registry `issued` is: federated credentials
    /// are checked against the tokens it issued.
    pub fn trust_identity(&self, issued: Issued) {
        *self.shared.issued.lock().unwrap() = Some(issued);
    }

    /// Registers app `client_id` with a federated credential as the README has users create
    /// it: issuer this tenant's v2.0 issuer, `subject` (a managed identity's object id, not
    /// its client id), `audience`.
    pub fn set_federated(&self, client_id: &str, subject: &str, audience: &str) {
        self.shared.apps.lock().unwrap().insert(
            client_id.to_string(),
            vec![Credential::Federated {
                issuer: format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
                subject: subject.to_string(),
                audience: audience.to_string(),
            }],
        );
    }

    /// The form of every token request received, in order.
    pub fn forms(&self) -> Vec<HashMap<String, String>> {
        self.shared.forms.lock().unwrap().clone()
    }

    /// Token requests received.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Access tokens issued.
    pub fn issued(&self) -> usize {
        self.shared.issued_tokens.load(Ordering::SeqCst)
    }

    /// The AADSTS code of every refusal, in order.
    pub fn refusals(&self) -> Vec<u64> {
        self.shared.refusals.lock().unwrap().clone()
    }

    /// Header and claims of every certificate assertion accepted, in order.
    pub fn accepted(&self) -> Vec<(Value, Value)> {
        self.shared.accepted.lock().unwrap().clone()
    }
}

fn refuse(shared: &Shared, status: StatusCode, error: &str, code: u64, message: &str) -> Response {
    shared.refusals.lock().unwrap().push(code);
    (
        status,
        Json(json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {message} Trace ID: {}", random_hex(8)),
            "error_codes": [code],
            "trace_id": random_hex(16),
            "correlation_id": random_hex(16),
        })),
    )
        .into_response()
}

async fn token(
    State(shared): State<Arc<Shared>>,
    UrlPath(tenant): UrlPath<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    shared.forms.lock().unwrap().push(form.clone());
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if tenant != TENANT {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            "Tenant not found.",
        );
    }
    if field("grant_type") != "client_credentials" {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if let Some((code, error, message)) = scope_refusal(field("scope")) {
        return refuse(&shared, StatusCode::BAD_REQUEST, error, code, &message);
    }
    if form.contains_key("client_secret") {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90027,
            "A client secret must not be sent with a client assertion.",
        );
    }
    if field("client_assertion_type") != JWT_BEARER {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50012,
            "client_assertion_type must be jwt-bearer.",
        );
    }
    let client_id = field("client_id");
    let Some(credentials) = shared.apps.lock().unwrap().get(client_id).cloned() else {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application not found in the directory.",
        );
    };
    let assertion = field("client_assertion");
    let mut outcome = Err((
        7000215u64,
        "No credential of the application matches the assertion.".to_string(),
    ));
    for credential in &credentials {
        outcome = match credential {
            Credential::Certificate { der, spki } => {
                check_certificate(&shared, client_id, assertion, der, spki)
            }
            Credential::Federated {
                issuer,
                subject,
                audience,
            } => check_federated(&shared, assertion, issuer, subject, audience),
        };
        if outcome.is_ok() {
            break;
        }
    }
    if let Err((code, message)) = outcome {
        return refuse(
            &shared,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            &message,
        );
    }
    shared.issued_tokens.fetch_add(1, Ordering::SeqCst);
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"RS256"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        json!({ "aud": field("scope"), "appid": client_id, "tid": TENANT, "exp": now() + 3600 })
            .to_string(),
    );
    Json(json!({
        "token_type": "Bearer",
        "expires_in": 3599,
        "ext_expires_in": 3599,
        "access_token": format!("{header}.{claims}.{}", random_hex(32)),
    }))
    .into_response()
}

type Check = Result<(), (u64, String)>;

/// Entra's refusal of a client credentials `scope`: exactly one scope, `<resource>/.default`.
fn scope_refusal(scope: &str) -> Option<(u64, &'static str, String)> {
    let scopes: Vec<&str> = scope.split(' ').filter(|s| !s.is_empty()).collect();
    match scopes.as_slice() {
        [] => Some((
            900144,
            "invalid_request",
            "The request body must contain the following parameter: 'scope'.".to_string(),
        )),
        [one] if !one.ends_with("/.default") => Some((
            1002012,
            "invalid_scope",
            format!(
                "The provided value for scope {one} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        )),
        [_] => None,
        _ => Some((
            70011,
            "invalid_scope",
            format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        )),
    }
}

fn decode(part: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

fn check_certificate(
    shared: &Shared,
    client_id: &str,
    assertion: &str,
    der: &[u8],
    spki: &[u8],
) -> Check {
    certificate_check(shared, client_id, assertion, der, spki)
        .map_err(|(code, message)| (code, message.to_string()))
}

fn certificate_check(
    shared: &Shared,
    client_id: &str,
    assertion: &str,
    der: &[u8],
    spki: &[u8],
) -> Result<(), (u64, &'static str)> {
    let malformed = (50027u64, "The client assertion is not a valid JWT.");
    let mut parts = assertion.split('.');
    let (Some(header_part), Some(claims_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    let (Some(header), Some(claims)) = (decode(header_part), decode(claims_part)) else {
        return Err(malformed);
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature_part)
        .map_err(|_| malformed)?;
    if header["typ"] != "JWT" {
        return Err((50027, "The client assertion's typ is not JWT."));
    }
    let thumbprint = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der));
    if header["x5t#S256"].as_str() != Some(thumbprint.as_str()) {
        return Err((
            700027,
            "The certificate with the assertion's x5t#S256 is not registered for the application.",
        ));
    }
    let algorithm: &'static dyn signature::VerificationAlgorithm = match header["alg"].as_str() {
        Some("PS256") => &signature::RSA_PSS_2048_8192_SHA256,
        Some("RS256") => &signature::RSA_PKCS1_2048_8192_SHA256,
        _ => {
            return Err((
                5002738,
                "The assertion's signing algorithm is not supported.",
            ));
        }
    };
    let signed = &assertion[..header_part.len() + 1 + claims_part.len()];
    UnparsedPublicKey::new(algorithm, spki)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| (700027u64, "Client assertion failed signature validation."))?;
    let url = shared.url.get().map(String::as_str).unwrap_or_default();
    if claims["aud"].as_str() != Some(url) {
        return Err((
            700212,
            "The assertion's audience is not this token endpoint.",
        ));
    }
    if claims["iss"].as_str() != Some(client_id) || claims["sub"].as_str() != Some(client_id) {
        return Err((700021, "The assertion's iss and sub must be the client id."));
    }
    let (Some(nbf), Some(exp)) = (claims["nbf"].as_u64(), claims["exp"].as_u64()) else {
        return Err((700024, "The assertion has no nbf or exp."));
    };
    let now = now();
    if exp + SKEW < now || nbf > now + SKEW || exp <= nbf || exp - nbf > MAX_LIFETIME {
        return Err((
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    let Some(jti) = claims["jti"].as_str().filter(|jti| !jti.is_empty()) else {
        return Err((700023, "The assertion has no jti."));
    };
    if !shared.jtis.lock().unwrap().insert(jti.to_string()) {
        return Err((7000272, "The assertion's jti was already used (replay)."));
    }
    shared.accepted.lock().unwrap().push((header, claims));
    Ok(())
}

fn check_federated(
    shared: &Shared,
    assertion: &str,
    issuer: &str,
    subject: &str,
    audience: &str,
) -> Check {
    let malformed = || {
        (
            50027u64,
            "The client assertion is not a valid JWT.".to_string(),
        )
    };
    let mut parts = assertion.split('.');
    let (Some(_), Some(claims_part), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let claims = decode(claims_part).ok_or_else(malformed)?;
    // The managed identity double's registry stands in for the signature check.
    let registry = shared.issued.lock().unwrap().clone();
    let issued = registry.and_then(|issued| issued.lock().unwrap().get(assertion).cloned());
    let Some(issued) = issued else {
        return Err((
            50027,
            "The client assertion's signature could not be validated.".to_string(),
        ));
    };
    if issued.expires_on <= now() {
        return Err((
            700024,
            "Client assertion is not within its valid time range.".to_string(),
        ));
    }
    let claim = |name: &str| claims[name].as_str().unwrap_or_default().to_string();
    let presented = format!(
        "Assertion Issuer: '{}'. Assertion Subject: '{}'. Assertion Audience: '{}'.",
        claim("iss"),
        claim("sub"),
        claim("aud")
    );
    if claim("iss") != issuer {
        return Err((
            700211,
            format!(
                "No matching federated identity record found for presented assertion issuer. {presented}"
            ),
        ));
    }
    if claim("aud").trim_end_matches('/') != audience.trim_end_matches('/') {
        return Err((
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience. {presented}"
            ),
        ));
    }
    let sub = claim("sub");
    if sub != subject {
        // Matching is case-sensitive; Entra says so when only the case differs.
        let code = if sub.eq_ignore_ascii_case(subject) {
            7002138
        } else {
            700213
        };
        return Err((
            code,
            format!(
                "No matching federated identity record found for presented assertion subject '{sub}'. Check your federated identity credential Subject, Audience and Issuer against the presented assertion."
            ),
        ));
    }
    Ok(())
}
