//! Key Vault's certificates, as azure_security_keyvault_certificates 1.x reads them, and the
//! secret beside each certificate version (same name and version, its `sid`), as
//! azure_security_keyvault_secrets reads it. `GET /certificates/{name}[/{version}]` returns
//! `cer`, `x5t`, the `kid` of the key that signs for it, the `sid` and the `policy` under the
//! JSON names Key Vault sends (`key_props`, `secret_props`, `x509_props`, `issuer`). The secret
//! holds what the policy says: PEM or PKCS #12, with the private key only when the key is
//! exportable. Every version has a new key (a renewal with `reuse_key` false), so a client
//! that kept an old certificate is found out.
//!
//! Client certificates (RFC 8705) are self-signed (`self_signed_tls_client_auth`) or issued by
//! a CA the double owns (`tls_client_auth`), whose PEM a test hands the identity provider as
//! the CA it trusts: a company CA whose certificate was merged into the vault.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p12_keystore::{
    EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKey, PrivateKeyChain,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose,
};
use serde_json::{Value, json};

use crate::directory::now;
use crate::key_vault_keys::{KeyKind, Keys, Q, Vault, attributes, denied, generate, kid};
use crate::random_hex;
use crate::vault_error::error;

/// How a certificate's secret holds it (`policy.secret_props.contentType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretContentType {
    /// `application/x-pem-file`: a PKCS #8 `PRIVATE KEY` block, then `CERTIFICATE` blocks,
    /// leaf first.
    Pem,
    /// `application/x-pkcs12`: standard base64 of a PFX with an empty password.
    Pkcs12,
}

impl SecretContentType {
    /// The content type Key Vault names it by, in the policy and on the secret.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Pem => "application/x-pem-file",
            Self::Pkcs12 => "application/x-pkcs12",
        }
    }
}

/// Who issues a certificate (`policy.issuer.name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateIssuer {
    /// `Self`: signed by the certificate's own key, what `self_signed_tls_client_auth` wants.
    SelfSigned,
    /// `Unknown` (a CA outside Key Vault, its signed certificate merged in): the double's test
    /// client CA ([`crate::KeyVaultDouble::client_ca_file`]), what `tls_client_auth` wants.
    TestCa,
}

/// The policy a certificate version is made under: its key, whether the key may leave the
/// vault (in the secret), how the secret holds it, and who issues the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertificateSpec {
    pub key: KeyKind,
    pub exportable: bool,
    pub content_type: SecretContentType,
    pub issuer: CertificateIssuer,
}

impl CertificateSpec {
    /// A certificate for signing client assertions in the vault: RSA, self-signed, the key
    /// never leaves the vault, the secret in Key Vault's default content type.
    pub const SIGNING: CertificateSpec = CertificateSpec {
        key: KeyKind::Rsa,
        exportable: false,
        content_type: SecretContentType::Pkcs12,
        issuer: CertificateIssuer::SelfSigned,
    };
}

/// Key Vault's validity for a policy's `validity_months` of 12, and the ten minutes it
/// backdates `nbf` by.
const VALIDITY_SECONDS: u64 = 365 * 24 * 60 * 60;
const BACKDATE_SECONDS: u64 = 10 * 60;
/// The extended key usage of a TLS client certificate.
const CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";
/// The subject of the CA that issues [`CertificateIssuer::TestCa`] certificates.
pub const CLIENT_CA_SUBJECT: &str = "token-broker test client CA";

/// One version of a certificate: what Key Vault keeps of it and serves.
pub(crate) struct CertificateVersion {
    version: String,
    spec: CertificateSpec,
    /// DER, leaf first, then the CA that issued it for [`CertificateIssuer::TestCa`].
    chain: Vec<Vec<u8>>,
    /// The key, PKCS #8 PEM, whether or not the secret holds it.
    private_key_pem: String,
    /// The secret's value.
    secret: String,
    created: u64,
    not_before: u64,
    not_after: u64,
    /// The version before this one, which Key Vault names in the secret (`previousVersion`).
    previous: Option<String>,
}

impl CertificateVersion {
    /// The leaf certificate's DER.
    pub(crate) fn der(&self) -> &[u8] {
        &self.chain[0]
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    pub(crate) fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    fn attributes(&self) -> Value {
        let mut attributes = attributes(self.created);
        attributes["nbf"] = self.not_before.into();
        attributes["exp"] = self.not_after.into();
        attributes
    }
}

/// The vault double's certificates, the CA that issues its client certificates, and how
/// often a certificate's secret was read.
pub(crate) struct Certificates {
    versions: Mutex<HashMap<String, Vec<Arc<CertificateVersion>>>>,
    client_ca: CertifiedIssuer<'static, rcgen::KeyPair>,
    secret_reads: AtomicUsize,
}

impl Default for Certificates {
    fn default() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, CLIENT_CA_SUBJECT);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Self {
            versions: Mutex::default(),
            client_ca: CertifiedIssuer::self_signed(params, key).expect("client CA"),
            secret_reads: AtomicUsize::new(0),
        }
    }
}

impl Certificates {
    /// The client CA's certificate, PEM, for the identity provider to trust.
    pub(crate) fn client_ca_pem(&self) -> String {
        pem("CERTIFICATE", self.client_ca.der())
    }

    /// Adds a new version of certificate `name` made under `spec`, with a new key that `keys`
    /// gets under the same name and version, and returns the version id.
    pub(crate) fn create(&self, keys: &Keys, name: &str, spec: CertificateSpec) -> String {
        let (key_pair, material) = generate(spec.key);
        let created = now();
        let not_before = created - BACKDATE_SECONDS;
        let not_after = created + VALIDITY_SECONDS;
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = epoch + Duration::from_secs(not_before);
        params.not_after = epoch + Duration::from_secs(not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = key_usages(spec.key)
            .iter()
            .map(|(purpose, _)| *purpose)
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let chain = match spec.issuer {
            CertificateIssuer::SelfSigned => {
                vec![
                    params
                        .self_signed(&key_pair)
                        .expect("certificate")
                        .der()
                        .to_vec(),
                ]
            }
            CertificateIssuer::TestCa => {
                params.use_authority_key_identifier_extension = true;
                let leaf = params
                    .signed_by(&key_pair, &self.client_ca)
                    .expect("certificate");
                vec![leaf.der().to_vec(), self.client_ca.der().to_vec()]
            }
        };
        let pkcs8 = key_pair.serialize_der();
        let secret = secret_value(name, &spec, &pkcs8, &chain);
        let version = random_hex(16);
        // The key first: whoever finds the certificate finds the key that signs for it.
        keys.add(name, &version, material, Some(chain[0].clone()), created);
        let mut versions = self.versions.lock().unwrap();
        let versions = versions.entry(name.to_string()).or_default();
        let previous = versions.last().map(|last| last.version.clone());
        versions.push(Arc::new(CertificateVersion {
            version: version.clone(),
            spec,
            chain,
            private_key_pem: pem("PRIVATE KEY", &pkcs8),
            secret,
            created,
            not_before,
            not_after,
            previous,
        }));
        version
    }

    /// Version `version` of certificate `name` (the latest for `None` or an empty version).
    pub(crate) fn find(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Option<Arc<CertificateVersion>> {
        let versions = self.versions.lock().unwrap();
        let versions = versions.get(name)?;
        match version {
            None | Some("") => versions.last().cloned(),
            Some(id) => versions.iter().find(|v| v.version == id).cloned(),
        }
    }

    /// The secret of certificate `name` (version `version`, the latest for `None`) as
    /// `GET /secrets/{name}[/{version}]` answers it under the vault URL `base`, counted as
    /// read; `None` when there is no such certificate. `out_content_type` is the request's
    /// `outContentType`: Key Vault converts a PKCS #12 secret to PEM when asked for
    /// `application/x-pem-file` (the only conversion it offers: asking for anything else is
    /// refused, `Err` with its message).
    pub(crate) fn read_secret(
        &self,
        base: &str,
        name: &str,
        version: Option<&str>,
        out_content_type: Option<&str>,
    ) -> Option<Result<Value, &'static str>> {
        let found = self.find(name, version)?;
        let (value, content_type) = match out_content_type {
            None => (found.secret.clone(), found.spec.content_type.media_type()),
            Some(pem) if pem == SecretContentType::Pem.media_type() => {
                let key = found.spec.exportable.then(|| found.private_key_pem.clone());
                let value = key
                    .into_iter()
                    .chain(found.chain.iter().map(|der| self::pem("CERTIFICATE", der)))
                    .collect::<String>();
                (value, pem)
            }
            Some(_) => {
                return Some(Err(
                    "The requested content type conversion is not supported. Only PFX to PEM is.",
                ));
            }
        };
        self.secret_reads.fetch_add(1, Ordering::SeqCst);
        let mut body = json!({
            "value": value,
            "contentType": content_type,
            "id": format!("{base}/secrets/{name}/{}", found.version),
            "managed": true,
            "attributes": found.attributes(),
            "kid": kid(base, name, &found.version),
        });
        if let Some(previous) = &found.previous {
            body["previousVersion"] = previous.clone().into();
        }
        Some(Ok(body))
    }

    /// Certificate secrets answered (200), all certificates together.
    pub(crate) fn secret_reads(&self) -> usize {
        self.secret_reads.load(Ordering::SeqCst)
    }

    /// The policy of certificate `name` as its version `found` was made under.
    fn policy(&self, base: &str, name: &str, found: &CertificateVersion) -> Value {
        let spec = &found.spec;
        let first = self
            .versions
            .lock()
            .unwrap()
            .get(name)
            .and_then(|versions| versions.first())
            .map_or(found.created, |first| first.created);
        let mut key_props = json!({ "exportable": spec.exportable, "reuse_key": false });
        match spec.key {
            KeyKind::Rsa => {
                key_props["kty"] = "RSA".into();
                key_props["key_size"] = 2048.into();
            }
            KeyKind::EcP256 | KeyKind::EcP384 => {
                key_props["kty"] = "EC".into();
                key_props["crv"] = if spec.key == KeyKind::EcP256 {
                    "P-256"
                } else {
                    "P-384"
                }
                .into();
            }
        }
        let (issuer, renewal) = match spec.issuer {
            CertificateIssuer::SelfSigned => ("Self", "AutoRenew"),
            // Key Vault cannot renew with a CA it does not know: it only tells the contacts.
            CertificateIssuer::TestCa => ("Unknown", "EmailContacts"),
        };
        json!({
            "id": format!("{base}/certificates/{name}/policy"),
            "key_props": key_props,
            "secret_props": { "contentType": spec.content_type.media_type() },
            "x509_props": {
                "subject": format!("CN={name}"),
                "sans": {},
                "ekus": [CLIENT_AUTH],
                "key_usage": key_usages(spec.key).iter().map(|(_, name)| *name).collect::<Vec<_>>(),
                "validity_months": 12,
                "basic_constraints": { "ca": false }
            },
            "lifetime_actions": [{
                "trigger": { "lifetime_percentage": 80 },
                "action": { "action_type": renewal }
            }],
            "issuer": { "name": issuer },
            "attributes": { "enabled": true, "created": first, "updated": found.created }
        })
    }
}

/// The key usages of a certificate for a key of `kind`, and Key Vault's names for them.
fn key_usages(kind: KeyKind) -> &'static [(KeyUsagePurpose, &'static str)] {
    match kind {
        KeyKind::Rsa => &[
            (KeyUsagePurpose::DigitalSignature, "digitalSignature"),
            (KeyUsagePurpose::KeyEncipherment, "keyEncipherment"),
        ],
        KeyKind::EcP256 | KeyKind::EcP384 => {
            &[(KeyUsagePurpose::DigitalSignature, "digitalSignature")]
        }
    }
}

/// The value of a certificate's secret: the key (PKCS #8 DER `pkcs8`, only when exportable)
/// and the certificates `chain`, leaf first, as `spec.content_type` holds them.
fn secret_value(name: &str, spec: &CertificateSpec, pkcs8: &[u8], chain: &[Vec<u8>]) -> String {
    let key = spec.exportable.then_some(pkcs8);
    match spec.content_type {
        SecretContentType::Pem => key
            .map(|key| pem("PRIVATE KEY", key))
            .into_iter()
            .chain(chain.iter().map(|der| pem("CERTIFICATE", der)))
            .collect(),
        SecretContentType::Pkcs12 => STANDARD.encode(pfx(name, key, chain)),
    }
}

/// A PFX with an empty password, as Key Vault exports one: the key (when given) with its
/// chain, or the certificates alone. Encrypted the way Windows, and so Key Vault, writes PFX
/// files (PBES1 with SHA-1 and 3-key triple DES, an HMAC-SHA-1 MAC, 2,000 iterations), which
/// every PKCS #12 reader takes.
fn pfx(name: &str, key: Option<&[u8]>, chain: &[Vec<u8>]) -> Vec<u8> {
    let certificates = chain
        .iter()
        .map(|der| p12_keystore::Certificate::from_der(der).expect("certificate"));
    let mut store = KeyStore::new();
    match key {
        Some(key) => {
            let key = PrivateKey::from_der(key).expect("PKCS #8 key");
            // The local key id ties the key to its certificate: the certificate's SHA-1
            // thumbprint, as OpenSSL writes it.
            let local_key_id = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &chain[0])
                .as_ref()
                .to_vec();
            let chain = PrivateKeyChain::new(local_key_id, key, certificates);
            store.add_entry(name, KeyStoreEntry::PrivateKeyChain(chain));
        }
        None => {
            for (index, certificate) in certificates.enumerate() {
                let alias = format!("{name}-{index}");
                store.add_entry(&alias, KeyStoreEntry::Certificate(certificate));
            }
        }
    }
    store
        .writer("")
        .encryption_algorithm(EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
        .encryption_iterations(2000)
        .mac_algorithm(MacAlgorithm::HmacSha1)
        .mac_iterations(2000)
        .write()
        .expect("PKCS #12")
}

/// `der` as one PEM block, lines of 64 and `\n` endings, as Key Vault writes them.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let encoded = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// What the certificates API needs beyond the keys API: the vault's certificates.
pub(crate) trait CertificateVault: Vault {
    fn certificates(&self) -> &Certificates;
}

/// The certificates routes, to merge into the vault's router. (A certificate's secret is
/// served by the vault's secrets routes, which ask [`Certificates::read_secret`].)
pub(crate) fn routes<V: CertificateVault>() -> axum::Router<Arc<V>> {
    axum::Router::new()
        .route("/certificates/{name}", get(certificate_latest::<V>))
        .route("/certificates/{name}/", get(certificate_latest::<V>))
        .route(
            "/certificates/{name}/{version}",
            get(certificate_versioned::<V>),
        )
}

async fn certificate_latest<V: CertificateVault>(
    State(shared): State<Arc<V>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    Query(query): Q,
) -> Response {
    get_certificate(shared.as_ref(), &name, None, &headers, &query)
}

async fn certificate_versioned<V: CertificateVault>(
    State(shared): State<Arc<V>>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Query(query): Q,
) -> Response {
    get_certificate(shared.as_ref(), &name, Some(&version), &headers, &query)
}

fn get_certificate<V: CertificateVault>(
    shared: &V,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response {
    if let Some(response) = shared.refusal(headers, query) {
        return response;
    }
    if let Some(response) = denied(shared, name, "certificates/read") {
        return response;
    }
    let certificates = shared.certificates();
    let Some(found) = certificates.find(name, version) else {
        return error(
            StatusCode::NOT_FOUND,
            "CertificateNotFound",
            &format!("A certificate with (name/id) {name} was not found in this key vault."),
            None,
        );
    };
    let base = shared.base(headers);
    let version = &found.version;
    let der = found.der();
    Json(json!({
        "id": format!("{base}/certificates/{name}/{version}"),
        "kid": kid(&base, name, version),
        "sid": format!("{base}/secrets/{name}/{version}"),
        "x5t": URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der)),
        "cer": STANDARD.encode(der),
        "attributes": found.attributes(),
        "policy": certificates.policy(&base, name, &found),
        "tags": {}
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_security_keyvault_certificates::models::Certificate;
    use azure_security_keyvault_secrets::models::Secret;
    use http_body_util::BodyExt as _;
    use p12_keystore::Pkcs12ImportPolicy;

    /// A vault that lets every request through, under `https://v.vault.azure.net`.
    #[derive(Default)]
    struct OpenVault {
        keys: Keys,
        certificates: Certificates,
    }

    impl Vault for OpenVault {
        fn refusal(&self, _: &HeaderMap, _: &HashMap<String, String>) -> Option<Response> {
            None
        }
        fn base(&self, _: &HeaderMap) -> String {
            "https://v.vault.azure.net".to_string()
        }
        fn denied(&self, _: &str) -> bool {
            false
        }
        fn keys(&self) -> &Keys {
            &self.keys
        }
    }

    impl CertificateVault for OpenVault {
        fn certificates(&self) -> &Certificates {
            &self.certificates
        }
    }

    impl OpenVault {
        fn create(&self, name: &str, spec: CertificateSpec) -> Arc<CertificateVersion> {
            self.certificates.create(&self.keys, name, spec);
            self.certificates.find(name, None).unwrap()
        }

        async fn get(&self, name: &str) -> Value {
            let response = get_certificate(self, name, None, &HeaderMap::new(), &HashMap::new());
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice(&body).unwrap()
        }
    }

    /// The blocks of a PEM text: label and DER.
    fn pem_blocks(text: &str) -> Vec<(String, Vec<u8>)> {
        let mut blocks = Vec::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(label) = line.strip_prefix("-----BEGIN ") {
                current = Some((label.trim_end_matches('-').to_string(), String::new()));
            } else if line.starts_with("-----END ") {
                let (label, body) = current.take().expect("BEGIN before END");
                blocks.push((label, STANDARD.decode(body).unwrap()));
            } else if let Some((_, body)) = current.as_mut() {
                body.push_str(line);
            }
        }
        blocks
    }

    /// The SubjectPublicKeyInfo of a PKCS #8 key.
    fn spki_of(pkcs8: &[u8]) -> Vec<u8> {
        let key = rcgen::KeyPair::try_from(pkcs8).unwrap();
        rcgen::PublicKeyData::subject_public_key_info(&key)
    }

    fn spec(
        key: KeyKind,
        exportable: bool,
        content_type: SecretContentType,
        issuer: CertificateIssuer,
    ) -> CertificateSpec {
        CertificateSpec {
            key,
            exportable,
            content_type,
            issuer,
        }
    }

    #[test]
    fn an_exportable_pkcs12_secret_holds_the_vault_key_and_the_chain_under_an_empty_password() {
        let vault = OpenVault::default();
        let found = vault.create(
            "client",
            spec(
                KeyKind::EcP384,
                true,
                SecretContentType::Pkcs12,
                CertificateIssuer::TestCa,
            ),
        );
        let pfx = STANDARD.decode(found.secret()).unwrap();
        let store = KeyStore::from_pkcs12(&pfx, "", Pkcs12ImportPolicy::Strict).unwrap();
        let (_, chain) = store.private_key_chain().expect("the key with its chain");
        let certificates: Vec<&[u8]> = chain.certs().iter().map(|c| c.as_der()).collect();
        assert_eq!(
            certificates,
            [found.der(), vault.certificates.client_ca.der()]
        );
        assert_eq!(chain.certs()[0].subject(), "CN=client");
        assert_eq!(chain.certs()[0].issuer(), format!("CN={CLIENT_CA_SUBJECT}"));
        assert_eq!(
            pem("PRIVATE KEY", chain.key().as_der()),
            found.private_key_pem()
        );
        let signing = vault.keys.public_key("https://v", "client").unwrap();
        assert_eq!(signing.version, found.version, "one name and version");
        assert_eq!(
            spki_of(chain.key().as_der()),
            signing.spki,
            "the key that signs"
        );
        assert_eq!(signing.certificate.as_deref(), Some(found.der()));
    }

    #[test]
    fn a_pkcs12_secret_asked_for_as_pem_is_converted_and_other_conversions_are_refused() {
        let vault = OpenVault::default();
        for exportable in [true, false] {
            let found = vault.create(
                "client",
                spec(
                    KeyKind::Rsa,
                    exportable,
                    SecretContentType::Pkcs12,
                    CertificateIssuer::TestCa,
                ),
            );
            let base = "https://v";
            let body = vault
                .certificates
                .read_secret(base, "client", None, Some("application/x-pem-file"))
                .unwrap()
                .unwrap();
            assert_eq!(body["contentType"], "application/x-pem-file");
            let blocks = pem_blocks(body["value"].as_str().unwrap());
            let labels: Vec<&str> = blocks.iter().map(|(label, _)| label.as_str()).collect();
            let expected: &[&str] = if exportable {
                &["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
            } else {
                &["CERTIFICATE", "CERTIFICATE"]
            };
            assert_eq!(labels, expected);
            assert_eq!(
                blocks[labels.len() - 2].1,
                found.der(),
                "the leaf, then its CA"
            );
            assert_eq!(
                vault
                    .certificates
                    .read_secret(base, "client", None, Some("application/x-pkcs12")),
                Some(Err(
                    "The requested content type conversion is not supported. Only PFX to PEM is."
                ))
            );
        }
    }

    #[test]
    fn an_exportable_pem_secret_is_the_pkcs8_key_then_the_certificates_leaf_first() {
        let vault = OpenVault::default();
        let self_signed = vault.create(
            "self",
            spec(
                KeyKind::Rsa,
                true,
                SecretContentType::Pem,
                CertificateIssuer::SelfSigned,
            ),
        );
        let blocks = pem_blocks(self_signed.secret());
        let labels: Vec<&str> = blocks.iter().map(|(label, _)| label.as_str()).collect();
        assert_eq!(labels, ["PRIVATE KEY", "CERTIFICATE"]);
        assert_eq!(
            spki_of(&blocks[0].1),
            vault.keys.public_key("https://v", "self").unwrap().spki
        );
        assert_eq!(blocks[1].1, self_signed.der());
        let leaf = p12_keystore::Certificate::from_der(self_signed.der()).unwrap();
        assert_eq!(leaf.issuer(), leaf.subject(), "self-signed");
        assert_eq!(
            self_signed.private_key_pem(),
            pem("PRIVATE KEY", &blocks[0].1)
        );

        let issued = vault.create(
            "issued",
            spec(
                KeyKind::EcP256,
                true,
                SecretContentType::Pem,
                CertificateIssuer::TestCa,
            ),
        );
        let blocks = pem_blocks(issued.secret());
        let certificates: Vec<&[u8]> = blocks[1..].iter().map(|(_, der)| der.as_slice()).collect();
        assert_eq!(
            certificates,
            [issued.der(), vault.certificates.client_ca.der()]
        );
        assert_eq!(
            pem_blocks(&vault.certificates.client_ca_pem())[0].1,
            vault.certificates.client_ca.der().as_ref()
        );
    }

    #[test]
    fn the_secret_of_a_non_exportable_certificate_holds_the_certificates_only() {
        let vault = OpenVault::default();
        let pem_only = vault.create(
            "pem",
            spec(
                KeyKind::Rsa,
                false,
                SecretContentType::Pem,
                CertificateIssuer::TestCa,
            ),
        );
        let labels: Vec<String> = pem_blocks(pem_only.secret())
            .into_iter()
            .map(|(label, _)| label)
            .collect();
        assert_eq!(labels, ["CERTIFICATE", "CERTIFICATE"]);

        let pfx_only = vault.create("pfx", CertificateSpec::SIGNING);
        let pfx = STANDARD.decode(pfx_only.secret()).unwrap();
        let store = KeyStore::from_pkcs12(&pfx, "", Pkcs12ImportPolicy::Relaxed).unwrap();
        assert!(store.private_key_chain().is_none(), "no key");
        let certificates: Vec<&[u8]> = store
            .entries()
            .filter_map(|(_, entry)| match entry {
                KeyStoreEntry::Certificate(certificate) => Some(certificate.as_der()),
                _ => None,
            })
            .collect();
        assert_eq!(certificates, [pfx_only.der()]);
        assert!(
            !pfx_only.private_key_pem().is_empty(),
            "the vault has the key"
        );
    }

    #[tokio::test]
    async fn a_certificate_and_its_secret_read_as_the_sdk_models_with_the_policy() {
        let vault = OpenVault::default();
        let first = vault.create(
            "client",
            spec(
                KeyKind::EcP256,
                true,
                SecretContentType::Pem,
                CertificateIssuer::TestCa,
            ),
        );
        let latest = vault.create(
            "client",
            spec(
                KeyKind::Rsa,
                false,
                SecretContentType::Pkcs12,
                CertificateIssuer::SelfSigned,
            ),
        );
        assert_ne!(
            first.der(),
            latest.der(),
            "a renewal makes a new certificate"
        );
        assert_ne!(
            spki_of(pem_blocks(first.private_key_pem())[0].1.as_slice()),
            spki_of(pem_blocks(latest.private_key_pem())[0].1.as_slice()),
            "and a new key"
        );

        let body = vault.get("client").await;
        let certificate: Certificate = serde_json::from_value(body.clone()).unwrap();
        let base = "https://v.vault.azure.net";
        let version = &latest.version;
        assert_eq!(
            certificate.sid.as_deref(),
            Some(format!("{base}/secrets/client/{version}").as_str())
        );
        assert_eq!(certificate.cer.as_deref(), Some(latest.der()));
        let policy = certificate.policy.expect("policy");
        let key = policy.key_properties.expect("key_props");
        assert_eq!(key.exportable, Some(false));
        assert_eq!(key.reuse_key, Some(false));
        assert_eq!(key.key_size, Some(2048));
        assert_eq!(
            policy.secret_properties.unwrap().content_type.as_deref(),
            Some("application/x-pkcs12")
        );
        let x509 = policy.x509_certificate_properties.unwrap();
        assert_eq!(x509.subject.as_deref(), Some("CN=client"));
        assert_eq!(x509.enhanced_key_usage, Some(vec![CLIENT_AUTH.to_string()]));
        assert_eq!(x509.validity_in_months, Some(12));
        assert_eq!(
            policy.issuer_parameters.unwrap().name.as_deref(),
            Some("Self")
        );
        assert_eq!(body["policy"]["key_props"]["kty"], "RSA");

        let secret = vault
            .certificates
            .read_secret(base, "client", Some(&first.version), None)
            .unwrap()
            .unwrap();
        let secret: Secret = serde_json::from_value(secret).unwrap();
        assert_eq!(secret.value.as_deref(), Some(first.secret()));
        assert_eq!(
            secret.content_type.as_deref(),
            Some("application/x-pem-file")
        );
        assert_eq!(secret.managed, Some(true));
        assert_eq!(
            secret.kid.as_deref(),
            Some(format!("{base}/keys/client/{}", first.version).as_str())
        );
        let secret: Secret = serde_json::from_value(
            vault
                .certificates
                .read_secret(base, "client", None, None)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            secret.previous_version.as_deref(),
            Some(first.version.as_str())
        );
        assert_eq!(vault.certificates.secret_reads(), 2);
    }
}
