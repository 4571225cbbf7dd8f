//! Azure Key Vault's secrets API, as azure_security_keyvault_secrets 1.x calls it.
//!
//! It behaves the way PROTOCOLS.md describes the real service: TLS only; a first request
//! without `Authorization` gets the 401 challenge naming the tenant and resource; bearer tokens
//! must be ones the managed identity double issued for `https://vault.azure.net` and still
//! valid; `GET /secrets/{name}/{version}?api-version=...` answers the documented body, and
//! errors use the documented `{"error":{"code","message","innererror"}}` shape. A request
//! without an `api-version`, or with one Key Vault does not know, is refused with 400
//! `BadParameter` before anything else, as Key Vault refuses it. Object ids (`id`, `kid`) are
//! URLs under the host the request was sent to (its `Host` header), as a real vault's are
//! under its own name: a caller that reached the vault as `tests.vault.azure.net` through the
//! CONNECT proxy sees ids under that name, not under the double's loopback address.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::directory::{Issued, now};
use crate::key_vault_certificates::{self, CertificateSpec, Certificates};
use crate::key_vault_keys::{self, KeyKind, PublicKey};
use crate::serve::{self, Server};
use crate::vault_error::error;
use crate::{random_hex, tls};

/// The resource Key Vault names in its challenge.
pub const RESOURCE: &str = "https://vault.azure.net";
/// A made-up tenant for the challenge's `authorization` URL.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The name the vault also answers for, as a real vault's would be: under the challenge's
/// resource host, so that the SDK's challenge verification (on by default) accepts it. Its
/// certificate is signed by the test CA; callers reach it through the CONNECT proxy double.
pub const PUBLIC_HOST: &str = "tests.vault.azure.net";
/// A name outside `vault.azure.net` the vault also has a certificate for: with challenge
/// verification on, the SDK must refuse to send a token there.
pub const FOREIGN_HOST: &str = "tests.vault.example";

/// How the 401 challenge names what to get a token for; Key Vault sends both forms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChallengeForm {
    /// `authorization="<authority>", resource="https://vault.azure.net"`.
    #[default]
    Resource,
    /// `authorization_uri="<authority>", scope="https://vault.azure.net/.default"`.
    Scope,
}

/// The `api-version`s the double answers, as Key Vault's data plane does: every released
/// version the SDKs have used, the pinned SDK's `2025-07-01` among them.
pub const API_VERSIONS: &[&str] = &[
    "2016-10-01",
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "2025-07-01",
];

/// A fault the vault answers every secret read with (after the bearer check), until cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 `Throttled` with `Retry-After: 1`.
    Throttled,
    /// 503 `ServiceUnavailable`.
    Unavailable,
    /// Wait, then answer normally: a slow vault.
    Delay(Duration),
    /// Hold the read until [`KeyVaultDouble::release_held`], then answer normally: a vault
    /// that hangs for exactly as long as the test needs, with no clock involved.
    Hold,
}

struct Version {
    id: String,
    value: String,
    enabled: bool,
    created: u64,
}

#[derive(Default)]
pub(crate) struct Shared {
    /// The vault URI under its loopback address, known once the port is bound: object ids of
    /// requests without a `Host` header are built from it.
    pub(crate) base: std::sync::OnceLock<String>,
    issued: Issued,
    secrets: Mutex<HashMap<String, Vec<Version>>>,
    /// Secrets the identity has no role on (403 ForbiddenByRbac).
    pub(crate) denied: Mutex<HashSet<String>>,
    /// Keys the identity may read but not sign with (403 ForbiddenByRbac on sign).
    sign_denied: Mutex<HashSet<String>>,
    fault: Mutex<Option<Fault>>,
    challenge_form: Mutex<ChallengeForm>,
    /// The bearer tokens of the requests that got past the token check, in order.
    accepted: Mutex<Vec<String>>,
    requests: AtomicUsize,
    /// The request count, for tests that wait until the vault has seen a request.
    seen: tokio::sync::watch::Sender<usize>,
    /// Bumped by `release_held`: the reads held before it go on.
    released: tokio::sync::watch::Sender<u64>,
    /// Reads being held by [`Fault::Hold`] right now.
    held: AtomicUsize,
    challenges: AtomicUsize,
    reads: AtomicUsize,
    /// Signing keys, certificates' keys among them (`key_vault_keys`).
    pub(crate) keys: key_vault_keys::Keys,
    /// Certificates and their secrets (`key_vault_certificates`).
    pub(crate) certificates: Certificates,
}

/// A running Key Vault double.
pub struct KeyVaultDouble {
    shared: Arc<Shared>,
    server: Server,
    ca_file: PathBuf,
    client_ca_file: PathBuf,
}

impl KeyVaultDouble {
    /// Starts the vault on `port` (0 for any), writing its CA to `dir/ca.pem` and the CA of
    /// its client certificates to `dir/client-ca.pem`. Bearer tokens are checked against
    /// `issued`, the managed identity double's registry.
    pub async fn start(
        port: u16,
        dir: &Path,
        issued: Issued,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let tls = tls::create(dir, &[PUBLIC_HOST, FOREIGN_HOST])?;
        let shared = Arc::new(Shared {
            issued,
            ..Default::default()
        });
        let router = axum::Router::new()
            .route("/secrets/{name}/", get(latest))
            .route("/secrets/{name}", get(latest))
            .route("/secrets/{name}/{version}", get(versioned))
            .merge(key_vault_keys::routes())
            .merge(key_vault_certificates::routes())
            .fallback(not_found)
            .with_state(shared.clone());
        let client_ca_file = dir.join("client-ca.pem");
        std::fs::write(&client_ca_file, shared.certificates.client_ca_pem())?;
        let server = serve::spawn(router, port, Some(tls.acceptor)).await?;
        let _ = shared
            .base
            .set(format!("https://localhost:{}", server.address.port()));
        Ok(Self {
            shared,
            server,
            ca_file: tls.ca_file,
            client_ca_file,
        })
    }

    /// The vault URI (`https://localhost:<port>`): use with `verify_challenge_resource = false`,
    /// since `localhost` does not end with the challenge's `vault.azure.net`.
    pub fn uri(&self) -> String {
        format!("https://localhost:{}", self.server.address.port())
    }

    /// The vault URI under `vault.azure.net` (`https://tests.vault.azure.net`), for use with
    /// challenge verification on: reach it through a [`crate::ConnectProxy`] that routes
    /// `PUBLIC_HOST:443` to [`Self::address`].
    pub fn public_uri(&self) -> String {
        format!("https://{PUBLIC_HOST}")
    }

    /// The loopback address the vault listens on.
    pub fn address(&self) -> std::net::SocketAddr {
        self.server.address
    }

    /// The form of the 401 challenge from now on.
    pub fn set_challenge_form(&self, form: ChallengeForm) {
        *self.shared.challenge_form.lock().unwrap() = form;
    }

    /// The bearer tokens requests were accepted with, in order.
    pub fn accepted_tokens(&self) -> Vec<String> {
        self.shared.accepted.lock().unwrap().clone()
    }

    /// The CA certificate to trust (`SSL_CERT_FILE`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Adds a new version of `name` holding `value`, and returns the version id.
    pub fn set_secret(&self, name: &str, value: &str) -> String {
        let id = random_hex(16);
        self.shared
            .secrets
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .push(Version {
                id: id.clone(),
                value: value.to_string(),
                enabled: true,
                created: now(),
            });
        id
    }

    /// Enables or disables the latest version of `name`.
    pub fn set_enabled(&self, name: &str, enabled: bool) {
        if let Some(version) = self
            .shared
            .secrets
            .lock()
            .unwrap()
            .get_mut(name)
            .and_then(|versions| versions.last_mut())
        {
            version.enabled = enabled;
        }
    }

    /// Takes the identity's role on `name` away (or gives it back).
    pub fn set_denied(&self, name: &str, denied: bool) {
        let mut set = self.shared.denied.lock().unwrap();
        if denied {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
    }

    /// Refuses (or allows again) signing with key `name` while its reads still succeed: an
    /// identity with Key Vault Certificate User on a certificate but no Key Vault Crypto User
    /// on its key.
    pub fn set_sign_denied(&self, name: &str, denied: bool) {
        let mut set = self.shared.sign_denied.lock().unwrap();
        if denied {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
    }

    /// Makes every secret read meet `fault`, or clears it. Clearing does not release reads
    /// already held: [`Self::release_held`] does.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Lets every read held by [`Fault::Hold`] so far go on (reads held later wait for the
    /// next release).
    pub fn release_held(&self) {
        self.shared
            .released
            .send_modify(|generation| *generation += 1);
    }

    /// Waits (at most `within`) until `count` reads are held by [`Fault::Hold`]: a request is
    /// counted as it arrives and as held a moment later, so a test that saw it arrive waits
    /// here before it counts on the hold.
    pub async fn wait_for_held(&self, count: usize, within: std::time::Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while self.held() < count {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Reads being held by [`Fault::Hold`] right now.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Waits until the vault has received at least `count` requests (challenges included),
    /// for at most `within`; returns whether it did. Woken by each request, so it neither
    /// spins nor sleeps.
    pub async fn wait_for_requests(&self, count: usize, within: Duration) -> bool {
        let mut seen = self.shared.seen.subscribe();
        tokio::time::timeout(within, seen.wait_for(|seen| *seen >= count))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Requests received, challenges included.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// 401 challenges sent to requests without a bearer token.
    pub fn challenges(&self) -> usize {
        self.shared.challenges.load(Ordering::SeqCst)
    }

    /// Secret values returned (200 answers), certificates' secrets included.
    pub fn reads(&self) -> usize {
        self.shared.reads.load(Ordering::SeqCst)
    }
}

fn challenge(form: ChallengeForm, message: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "Unauthorized", message, None);
    let value = match form {
        ChallengeForm::Resource => format!(
            "Bearer authorization=\"https://login.windows.net/{TENANT}\", resource=\"{RESOURCE}\""
        ),
        ChallengeForm::Scope => format!(
            "Bearer authorization_uri=\"https://login.microsoftonline.com/{TENANT}\", scope=\"{RESOURCE}/.default\""
        ),
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&value).expect("static header"),
    );
    response
}

/// The vault's URL as the request addressed it (`https://` and its `Host` header), under
/// which the object ids of the answer are: a real vault's ids are under its own name.
pub(crate) fn base(shared: &Shared, headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .filter(|host| !host.is_empty())
        .map_or_else(
            || shared.base.get().cloned().unwrap_or_default(),
            |host| format!("https://{host}"),
        )
}

impl KeyVaultDouble {
    /// Adds a new version of signing key `name` and returns its version id.
    pub fn create_key(&self, name: &str, kind: KeyKind) -> String {
        self.shared().keys.create(name, kind)
    }

    /// Adds a new version of certificate `name` (a self-signed certificate for a new RSA key
    /// of the same name and version, as Key Vault makes them, the key not exportable) and
    /// returns its version id.
    pub fn create_certificate(&self, name: &str) -> String {
        self.create_client_certificate(name, CertificateSpec::SIGNING)
    }

    /// Adds a new version of certificate `name` made under `spec`: a new key, a certificate
    /// for `CN=<name>` with extended key usage clientAuth, and its secret, all of the same name
    /// and version, as a Key Vault renewal without `reuse_key` makes them. Returns the
    /// version id.
    pub fn create_client_certificate(&self, name: &str, spec: CertificateSpec) -> String {
        let shared = self.shared();
        shared.certificates.create(&shared.keys, name, spec)
    }

    /// The CA that issues [`crate::CertificateIssuer::TestCa`] certificates (PEM), for the
    /// identity provider to trust as a company's client CA.
    pub fn client_ca_file(&self) -> &Path {
        &self.client_ca_file
    }

    /// The latest version of certificate `name`: the leaf certificate's DER.
    pub fn certificate_der(&self, name: &str) -> Option<Vec<u8>> {
        let found = self.shared().certificates.find(name, None)?;
        Some(found.der().to_vec())
    }

    /// The latest version of certificate `name`: its secret's value, a credential the leak
    /// scans look for.
    pub fn certificate_secret(&self, name: &str) -> Option<String> {
        let found = self.shared().certificates.find(name, None)?;
        Some(found.secret().to_string())
    }

    /// The latest version of certificate `name`: its private key (PKCS #8 PEM), a credential
    /// the leak scans look for, whether or not the key is exportable.
    pub fn certificate_private_key_pem(&self, name: &str) -> Option<String> {
        let found = self.shared().certificates.find(name, None)?;
        Some(found.private_key_pem().to_string())
    }

    /// Certificates' secrets returned (200 answers); [`Self::reads`] counts them too.
    pub fn certificate_secret_reads(&self) -> usize {
        self.shared().certificates.secret_reads()
    }

    /// The latest version of key (or certificate) `name`, as a verifier sees it, with the
    /// key id a caller gets that reaches the vault under its `vault.azure.net` name
    /// ([`PUBLIC_HOST`]), as the tests' brokers do.
    pub fn public_key(&self, name: &str) -> Option<PublicKey> {
        self.shared()
            .keys
            .public_key(&format!("https://{PUBLIC_HOST}"), name)
    }

    /// Sign operations answered with a signature, all keys together.
    pub fn signs(&self) -> usize {
        self.shared().keys.signs()
    }

    /// Sign operations answered with a signature by key `name`.
    pub fn signs_by(&self, name: &str) -> usize {
        self.shared().keys.signs_by(name)
    }

    /// Every signature returned so far, base64url.
    pub fn signatures(&self) -> Vec<String> {
        self.shared().keys.signatures()
    }
}

/// The keys and certificates API, served from this vault's state.
impl key_vault_keys::Vault for Shared {
    fn refusal(&self, headers: &HeaderMap, query: &HashMap<String, String>) -> Option<Response> {
        refusal(self, headers, query)
    }

    fn base(&self, headers: &HeaderMap) -> String {
        base(self, headers)
    }

    fn denied(&self, name: &str) -> bool {
        self.denied.lock().unwrap().contains(name)
    }

    fn sign_denied(&self, name: &str) -> bool {
        self.sign_denied.lock().unwrap().contains(name)
    }

    fn keys(&self) -> &key_vault_keys::Keys {
        &self.keys
    }
}

impl key_vault_certificates::CertificateVault for Shared {
    fn certificates(&self) -> &Certificates {
        &self.certificates
    }
}

/// Checks API version and bearer token; `Some` is the refusal to send.
pub(crate) fn refusal(
    shared: &Shared,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Option<Response> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    shared.seen.send_modify(|seen| *seen += 1);
    match query.get("api-version").filter(|v| !v.is_empty()) {
        None => {
            return Some(error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The request URI contains an invalid or missing api-version query parameter.",
                None,
            ));
        }
        Some(version) if !API_VERSIONS.contains(&version.as_str()) => {
            let latest = API_VERSIONS.last().copied().unwrap_or_default();
            return Some(error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!(
                    "The specified version ({version}) is not recognized. Consider using the latest supported version ({latest})."
                ),
                None,
            ));
        }
        Some(_) => {}
    }
    let form = *shared.challenge_form.lock().unwrap();
    let Some(authorization) = headers.get(header::AUTHORIZATION) else {
        shared.challenges.fetch_add(1, Ordering::SeqCst);
        return Some(challenge(
            form,
            "AKV10000: Request is missing a Bearer or PoP token.",
        ));
    };
    let token = authorization
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let issued = shared.issued.lock().unwrap().get(token).cloned();
    match issued {
        None => Some(challenge(form, "AKV10022: Invalid audience or token.")),
        Some(issued) if issued.resource.trim_end_matches('/') != RESOURCE => {
            Some(challenge(form, "AKV10022: Invalid audience."))
        }
        Some(issued) if issued.expires_on <= now() => Some(challenge(
            form,
            "[TokenExpired] Error validating token: 'S2S12086'.",
        )),
        Some(_) => {
            shared.accepted.lock().unwrap().push(token.to_string());
            None
        }
    }
}

async fn latest(
    State(shared): State<Arc<Shared>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    read(&shared, &name, None, &headers, &query).await
}

async fn versioned(
    State(shared): State<Arc<Shared>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    read(&shared, &name, Some(&version), &headers, &query).await
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NotFound",
        "The requested resource was not found.",
        None,
    )
}

async fn read(
    shared: &Shared,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response {
    if let Some(response) = refusal(shared, headers, query) {
        return response;
    }
    let fault = *shared.fault.lock().unwrap();
    match fault {
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Hold) => {
            let mut released = shared.released.subscribe();
            let generation = *released.borrow_and_update();
            shared.held.fetch_add(1, Ordering::SeqCst);
            // Counted out on every way out, a caller that gave up (the future dropped) too.
            let _held = Held(&shared.held);
            let _ = released.wait_for(|now| *now != generation).await;
        }
        _ => {}
    }
    match fault {
        Some(Fault::Throttled) => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Throttled",
                "Operations per second exceeded the limit for this vault (injected by the double).",
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Some(Fault::Unavailable) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The service is unavailable (injected by the double).",
                None,
            );
        }
        Some(Fault::Delay(_) | Fault::Hold) | None => {}
    }
    if shared.denied.lock().unwrap().contains(name) {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'",
            Some("ForbiddenByRbac"),
        );
    }
    let secrets = shared.secrets.lock().unwrap();
    let found = secrets.get(name).and_then(|versions| match version {
        None | Some("") => versions.last(),
        Some(id) => versions.iter().find(|v| v.id == id),
    });
    let Some(found) = found else {
        drop(secrets);
        // A certificate's secret has the certificate's name and versions, as in Key Vault.
        let out_content_type = query.get("outContentType").map(String::as_str);
        let certificate = shared.certificates.read_secret(
            &base(shared, headers),
            name,
            version,
            out_content_type,
        );
        match certificate {
            Some(Ok(body)) => {
                shared.reads.fetch_add(1, Ordering::SeqCst);
                return Json(body).into_response();
            }
            Some(Err(message)) => {
                return error(StatusCode::BAD_REQUEST, "BadParameter", message, None);
            }
            None => {}
        }
        return error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name} was not found in this key vault."),
            None,
        );
    };
    if !found.enabled {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            Some("SecretDisabled"),
        );
    }
    shared.reads.fetch_add(1, Ordering::SeqCst);
    let body: Value = json!({
        "value": found.value,
        "id": format!("{}/secrets/{name}/{}", base(shared, headers), found.id),
        "attributes": {
            "enabled": true,
            "created": found.created,
            "updated": found.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90
        },
        "tags": {}
    });
    Json(body).into_response()
}

/// Counts a held read out when dropped.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
