//! Key Vault's keys, as azure_security_keyvault_keys 1.x calls them: `GET /keys/{name}[/{version}]`
//! returns the public JWK (whose `kid` is the full key id) and `POST /keys/{name}/{version}/sign`
//! signs a digest the way Key Vault does (ES signatures raw `R || S`). The keys are real RSA 2048,
//! EC P-256 and EC P-384 keys, so a signature the double makes verifies anywhere. A certificate's
//! key is one of them too (`key_vault_certificates` adds it under the certificate's name and
//! version, as Key Vault does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaEncoding, RsaKeyPair};
use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::directory::now;
use crate::random_hex;
use crate::vault_error::error;

/// What the keys (and certificates) API needs from the vault it is part of: its request checks
/// (API version, bearer token, faults), the vault URL a request reached, its access policy and
/// its keys. The vault implements it, so this module does not import the vault.
pub(crate) trait Vault: Send + Sync + 'static {
    /// `Some` is the refusal to send instead of an answer.
    fn refusal(&self, headers: &HeaderMap, query: &HashMap<String, String>) -> Option<Response>;
    /// The vault URL the request reached (its `Host`), which key ids are built under.
    fn base(&self, headers: &HeaderMap) -> String;
    /// Whether the identity has no role on object `name` (403 ForbiddenByRbac).
    fn denied(&self, name: &str) -> bool;
    /// Whether the identity may read key `name` but not sign with it (Key Vault Certificate
    /// User without Key Vault Crypto User): 403 ForbiddenByRbac on sign only.
    fn sign_denied(&self, _name: &str) -> bool {
        false
    }
    fn keys(&self) -> &Keys;
}

/// The kind of key a vault key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048: signs RS256/384/512 and PS256/384/512.
    Rsa,
    /// EC P-256: signs ES256.
    EcP256,
    /// EC P-384: signs ES384.
    EcP384,
}

enum Private {
    Rsa(RsaKeyPair),
    /// An EC key and the one JWS algorithm its curve signs (`ES256` for P-256, `ES384` for
    /// P-384): Key Vault refuses any other with the key.
    Ec(EcdsaKeyPair, &'static str),
}

/// A key just made, before it is a version of a vault key: what signs, and what verifiers see.
pub(crate) struct KeyMaterial {
    private: Private,
    /// The public JWK without `kid`.
    public: Value,
    spki: Vec<u8>,
}

struct KeyVersion {
    version: String,
    private: Private,
    /// The public JWK without `kid` (added per answer, under the host the request named).
    public: Value,
    /// Public key as X.509 SubjectPublicKeyInfo DER, for verifiers.
    spki: Vec<u8>,
    created: u64,
    /// Set for a certificate's key: the certificate's DER (the leaf).
    certificate: Option<Vec<u8>>,
}

/// Keys of the vault double (certificates' keys among them), and what was done with them.
#[derive(Default)]
pub struct Keys {
    keys: Mutex<HashMap<String, Vec<Arc<KeyVersion>>>>,
    signs: AtomicUsize,
    signs_by_key: Mutex<HashMap<String, usize>>,
    /// Every signature returned, base64url: credentials for the leak scans.
    signatures: Mutex<Vec<String>>,
}

/// What a verifier needs of one key version.
#[derive(Clone, Debug)]
pub struct PublicKey {
    /// The full key id, `https://{vault}/keys/{name}/{version}`.
    pub kid: String,
    pub version: String,
    /// The public JWK, `kid` included, as `GET /keys/{name}` returns it.
    pub jwk: Value,
    /// X.509 SubjectPublicKeyInfo DER.
    pub spki: Vec<u8>,
    /// The certificate's DER, for a certificate's key.
    pub certificate: Option<Vec<u8>>,
}

impl Keys {
    /// The latest version of key (or certificate) `name` as a verifier sees it, its key id
    /// under the vault URL `base`.
    pub(crate) fn public_key(&self, base: &str, name: &str) -> Option<PublicKey> {
        let found = self.find(name, None)?;
        let kid = kid(base, name, &found.version);
        let mut jwk = found.public.clone();
        jwk["kid"] = kid.clone().into();
        Some(PublicKey {
            kid,
            version: found.version.clone(),
            jwk,
            spki: found.spki.clone(),
            certificate: found.certificate.clone(),
        })
    }

    /// Sign operations answered with a signature, all keys together.
    pub(crate) fn signs(&self) -> usize {
        self.signs.load(Ordering::SeqCst)
    }

    /// Sign operations answered with a signature by key `name`.
    pub(crate) fn signs_by(&self, name: &str) -> usize {
        self.signs_by_key
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Every signature returned so far, base64url.
    pub(crate) fn signatures(&self) -> Vec<String> {
        self.signatures.lock().unwrap().clone()
    }

    /// Adds a new version of signing key `name` and returns its version id.
    pub(crate) fn create(&self, name: &str, kind: KeyKind) -> String {
        let (_, material) = generate(kind);
        let version = random_hex(16);
        self.add(name, &version, material, None, now());
        version
    }

    /// Adds `material` as version `version` of key `name`; `certificate` (its DER) makes it a
    /// certificate's key.
    pub(crate) fn add(
        &self,
        name: &str,
        version: &str,
        material: KeyMaterial,
        certificate: Option<Vec<u8>>,
        created: u64,
    ) {
        self.keys
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .push(Arc::new(KeyVersion {
                version: version.to_string(),
                private: material.private,
                public: material.public,
                spki: material.spki,
                created,
                certificate,
            }));
    }

    fn find(&self, name: &str, version: Option<&str>) -> Option<Arc<KeyVersion>> {
        let keys = self.keys.lock().unwrap();
        let versions = keys.get(name)?;
        match version {
            None | Some("") => versions.last().cloned(),
            Some(id) => versions.iter().find(|v| v.version == id).cloned(),
        }
    }
}

/// A new key of `kind`: rcgen's handle on it (to issue a certificate for it, or to export its
/// PKCS #8) and the vault's (to sign).
pub(crate) fn generate(kind: KeyKind) -> (rcgen::KeyPair, KeyMaterial) {
    let algorithm = match kind {
        KeyKind::Rsa => &rcgen::PKCS_RSA_SHA256,
        KeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let key_pair = rcgen::KeyPair::generate_for(algorithm).expect("key generation");
    let pkcs8 = key_pair.serialize_der();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key_pair);
    let (private, public) = match kind {
        KeyKind::Rsa => {
            let private = RsaKeyPair::from_pkcs8(&pkcs8).expect("RSA key");
            let public = private.public_key();
            let jwk = json!({
                "kty": "RSA",
                "key_ops": ["sign", "verify"],
                "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
            });
            (Private::Rsa(private), jwk)
        }
        KeyKind::EcP256 | KeyKind::EcP384 => {
            let (signing, curve, algorithm) = if kind == KeyKind::EcP256 {
                (
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    "P-256",
                    "ES256",
                )
            } else {
                (
                    &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                    "P-384",
                    "ES384",
                )
            };
            let private = EcdsaKeyPair::from_pkcs8(signing, &pkcs8).expect("EC key");
            // The uncompressed point: 0x04, then x and y of equal length.
            let point = private.public_key().as_ref().to_vec();
            let half = (point.len() - 1) / 2;
            let jwk = json!({
                "kty": "EC",
                "key_ops": ["sign", "verify"],
                "crv": curve,
                "x": URL_SAFE_NO_PAD.encode(&point[1..1 + half]),
                "y": URL_SAFE_NO_PAD.encode(&point[1 + half..]),
            });
            (Private::Ec(private, algorithm), jwk)
        }
    };
    (
        key_pair,
        KeyMaterial {
            private,
            public,
            spki,
        },
    )
}

/// The full key id under the vault URL `base`.
pub(crate) fn kid(base: &str, name: &str, version: &str) -> String {
    format!("{base}/keys/{name}/{version}")
}

/// The keys routes, to merge into the vault's router.
pub(crate) fn routes<V: Vault>() -> axum::Router<Arc<V>> {
    axum::Router::new()
        .route("/keys/{name}", get(key_latest::<V>))
        .route("/keys/{name}/", get(key_latest::<V>))
        .route("/keys/{name}/{version}", get(key_versioned::<V>))
        .route("/keys/{name}/{version}/sign", post(sign::<V>))
}

pub(crate) type Q = Query<HashMap<String, String>>;

async fn key_latest<V: Vault>(
    State(shared): State<Arc<V>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    Query(query): Q,
) -> Response {
    get_key(shared.as_ref(), &name, None, &headers, &query)
}

async fn key_versioned<V: Vault>(
    State(shared): State<Arc<V>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Query(query): Q,
) -> Response {
    get_key(shared.as_ref(), &name, Some(&version), &headers, &query)
}

/// The 403 Key Vault answers an identity without a role on object `name`, for `action`.
pub(crate) fn denied<V: Vault>(shared: &V, name: &str, action: &str) -> Option<Response> {
    shared.denied(name).then(|| {
        error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/{action}'"),
            Some("ForbiddenByRbac"),
        )
    })
}

fn key_not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        &format!("A key with (name/id) {name} was not found in this key vault."),
        None,
    )
}

/// An object's `attributes`, as Key Vault answers them for an object created at `created`.
pub(crate) fn attributes(created: u64) -> Value {
    json!({
        "enabled": true,
        "created": created,
        "updated": created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90
    })
}

fn get_key<V: Vault>(
    shared: &V,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response {
    if let Some(response) = shared.refusal(headers, query) {
        return response;
    }
    if let Some(response) = denied(shared, name, "keys/read") {
        return response;
    }
    let Some(found) = shared.keys().find(name, version) else {
        return key_not_found(name);
    };
    let mut jwk = found.public.clone();
    jwk["kid"] = kid(&shared.base(headers), name, &found.version).into();
    let mut body = json!({ "key": jwk, "attributes": attributes(found.created), "tags": {} });
    if found.certificate.is_some() {
        body["managed"] = true.into();
    }
    Json(body).into_response()
}

async fn sign<V: Vault>(
    State(shared): State<Arc<V>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Query(query): Q,
    body: Option<Json<Value>>,
) -> Response {
    if let Some(response) = shared.refusal(&headers, &query) {
        return response;
    }
    if shared.sign_denied(&name) {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/keys/sign/action'",
            Some("ForbiddenByRbac"),
        );
    }
    if let Some(response) = denied(shared.as_ref(), &name, "keys/sign/action") {
        return response;
    }
    let Some(found) = shared.keys().find(&name, Some(&version)) else {
        return key_not_found(&name);
    };
    let bad = |message: &str| error(StatusCode::BAD_REQUEST, "BadParameter", message, None);
    let Some(Json(body)) = body else {
        return bad("The request body is not JSON.");
    };
    let algorithm = body["alg"].as_str().unwrap_or_default();
    let Some(value) = body["value"]
        .as_str()
        .and_then(|value| URL_SAFE_NO_PAD.decode(value.trim_end_matches('=')).ok())
    else {
        return bad("The digest value is missing or not base64url.");
    };
    let signature = sign_digest(&found.private, algorithm, &value);
    let signature = match signature {
        Ok(signature) => signature,
        Err(message) => return bad(message),
    };
    let encoded = URL_SAFE_NO_PAD.encode(&signature);
    shared.keys().signs.fetch_add(1, Ordering::SeqCst);
    *shared
        .keys()
        .signs_by_key
        .lock()
        .unwrap()
        .entry(name.clone())
        .or_default() += 1;
    shared
        .keys()
        .signatures
        .lock()
        .unwrap()
        .push(encoded.clone());
    let kid = kid(&shared.base(&headers), &name, &version);
    Json(json!({ "kid": kid, "value": encoded })).into_response()
}

/// Signs `digest` as Key Vault does for `algorithm`: PKCS #1 v1.5 or PSS (salt as long as the
/// hash) for RSA, raw `R || S` for ECDSA (an EC key signs only its curve's algorithm).
fn sign_digest(private: &Private, algorithm: &str, value: &[u8]) -> Result<Vec<u8>, &'static str> {
    let rsa = |encoding: &'static dyn RsaEncoding, hash: &'static digest::Algorithm| {
        let Private::Rsa(key) = private else {
            return Err("Key and signing algorithm are incompatible.");
        };
        let digest = Digest::import_less_safe(value, hash).map_err(|_| "Invalid digest length.")?;
        let mut signature = vec![0; key.public_modulus_len()];
        key.sign_digest(encoding, &digest, &mut signature)
            .map_err(|_| "Signing failed.")?;
        Ok(signature)
    };
    match algorithm {
        "RS256" => rsa(&signature::RSA_PKCS1_SHA256, &digest::SHA256),
        "RS384" => rsa(&signature::RSA_PKCS1_SHA384, &digest::SHA384),
        "RS512" => rsa(&signature::RSA_PKCS1_SHA512, &digest::SHA512),
        "PS256" => rsa(&signature::RSA_PSS_SHA256, &digest::SHA256),
        "PS384" => rsa(&signature::RSA_PSS_SHA384, &digest::SHA384),
        "PS512" => rsa(&signature::RSA_PSS_SHA512, &digest::SHA512),
        "ES256" | "ES384" => match private {
            Private::Ec(key, signs) if *signs == algorithm => {
                let hash = if algorithm == "ES256" {
                    &digest::SHA256
                } else {
                    &digest::SHA384
                };
                let digest =
                    Digest::import_less_safe(value, hash).map_err(|_| "Invalid digest length.")?;
                key.sign_digest(&digest)
                    .map(|signature| signature.as_ref().to_vec())
                    .map_err(|_| "Signing failed.")
            }
            _ => Err("Key and signing algorithm are incompatible."),
        },
        _ => Err("Unsupported signing algorithm."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::UnparsedPublicKey;

    #[test]
    fn signatures_over_a_digest_verify_over_the_message_with_the_public_key() {
        let keys = Keys::default();
        keys.create("rsa", KeyKind::Rsa);
        keys.create("ec", KeyKind::EcP256);
        keys.create("ec384", KeyKind::EcP384);
        let message = b"header.claims";
        let sha256 = digest::digest(&digest::SHA256, message);
        let sha384 = digest::digest(&digest::SHA384, message);
        for (name, alg, digest, verifier, length) in [
            (
                "rsa",
                "RS256",
                &sha256,
                &signature::RSA_PKCS1_2048_8192_SHA256 as &dyn signature::VerificationAlgorithm,
                256,
            ),
            (
                "rsa",
                "PS256",
                &sha256,
                &signature::RSA_PSS_2048_8192_SHA256,
                256,
            ),
            (
                "ec",
                "ES256",
                &sha256,
                &signature::ECDSA_P256_SHA256_FIXED,
                64,
            ),
            (
                "ec384",
                "ES384",
                &sha384,
                &signature::ECDSA_P384_SHA384_FIXED,
                96,
            ),
        ] {
            let key = keys.find(name, None).unwrap();
            let signature = sign_digest(&key.private, alg, digest.as_ref()).unwrap();
            assert_eq!(signature.len(), length, "{alg} is raw, R || S for ECDSA");
            UnparsedPublicKey::new(verifier, &key.spki)
                .verify(message, &signature)
                .unwrap_or_else(|_| panic!("{alg} verifies"));
        }
        let p384 = keys.find("ec384", None).unwrap();
        assert_eq!(p384.public["crv"], "P-384");
        assert_eq!(
            sign_digest(&p384.private, "ES256", sha256.as_ref()),
            Err("Key and signing algorithm are incompatible."),
            "a key signs only its curve's algorithm"
        );
        let p256 = keys.find("ec", None).unwrap();
        assert!(sign_digest(&p256.private, "ES384", sha384.as_ref()).is_err());
    }
}
