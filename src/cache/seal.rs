//! Sealing for the shared tier: what Redis holds is useless to anyone who can read Redis.
//!
//! One configured 32-byte key yields two keys through HKDF-SHA256, so that neither use can
//! weaken the other: an HMAC-SHA256 key that names entries (a keyed hash of everything that
//! makes a token differ, so a key name reveals no connection, client or scope, and two
//! deployments with different keys or different clients never share a name), and an
//! AES-256-GCM key that seals values. Every seal takes a fresh random nonce, and the entry's
//! name is the associated data: a value copied under another name does not open. Both come
//! from aws-lc-rs, which rustls and jsonwebtoken already bring into the binary.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{hkdf, hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretBox, SecretString};

use crate::config::ENCRYPTION_KEY_BYTES;

/// First byte of every sealed value; a value of another format is not opened, only refetched.
const FORMAT: u8 = 1;
/// HKDF labels: changing one changes every name or every seal, on purpose.
const NAMING_INFO: &[u8] = b"token-broker shared cache: key names v1";
const SEALING_INFO: &[u8] = b"token-broker shared cache: sealed values v1";
const AAD_PREFIX: &[u8] = b"token-broker shared cache v1\0";

/// The configured key as bytes: base64 (standard alphabet, padded or not) of exactly 32 bytes.
pub fn decode_encryption_key(text: &SecretString) -> Option<SecretBox<[u8; ENCRYPTION_KEY_BYTES]>> {
    let text = text.expose_secret().trim();
    let decoded = STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .ok()?;
    let bytes: [u8; ENCRYPTION_KEY_BYTES] = decoded.as_slice().try_into().ok()?;
    Some(SecretBox::new(Box::new(bytes)))
}

/// The naming and sealing keys derived from one configured key.
pub struct Sealer {
    naming: hmac::Key,
    sealing: LessSafeKey,
}

impl Sealer {
    pub fn new(key: &SecretBox<[u8; ENCRYPTION_KEY_BYTES]>) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(key.expose_secret());
        let naming: hmac::Key = prk
            .expand(&[NAMING_INFO], hmac::HMAC_SHA256)
            .expect("HKDF can produce an HMAC-SHA256 key")
            .into();
        let sealing: UnboundKey = prk
            .expand(&[SEALING_INFO], &AES_256_GCM)
            .expect("HKDF can produce an AES-256 key")
            .into();
        Self {
            naming,
            sealing: LessSafeKey::new(sealing),
        }
    }

    /// A keyed hash of `parts` as lower-case hex. Each part is length-prefixed, so that no
    /// two different lists of parts hash the same input.
    pub fn name(&self, parts: &[&[u8]]) -> String {
        let mut context = hmac::Context::with_key(&self.naming);
        for part in parts {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        hex(context.sign().as_ref())
    }

    /// `plaintext` sealed for the entry called `name`: format byte, nonce, ciphertext and tag.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        sealed.push(FORMAT);
        sealed.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(name)),
                &mut body,
            )
            .ok()?;
        sealed.extend_from_slice(&body);
        Some(sealed)
    }

    /// The plaintext of a value sealed for `name`, or `None` for anything else: another
    /// format, another key, another name, or a single changed bit.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let (&format, rest) = sealed.split_first()?;
        if format != FORMAT || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plaintext = self
            .sealing
            .open_in_place(nonce, Aad::from(aad(name)), &mut body)
            .ok()?;
        Some(plaintext.to_vec())
    }
}

fn aad(name: &str) -> Vec<u8> {
    [AAD_PREFIX, name.as_bytes()].concat()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer_of(byte: u8) -> Sealer {
        Sealer::new(&SecretBox::new(Box::new([byte; ENCRYPTION_KEY_BYTES])))
    }

    #[test]
    fn a_sealed_value_opens_only_under_its_own_name_and_key() {
        let sealer = sealer_of(7);
        let sealed = sealer.seal("a", b"token").unwrap();
        assert_eq!(sealer.open("a", &sealed).unwrap(), b"token");
        assert!(sealer.open("b", &sealed).is_none(), "bound to its name");
        assert!(
            sealer_of(8).open("a", &sealed).is_none(),
            "bound to its key"
        );
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 1;
            assert!(sealer.open("a", &tampered).is_none(), "bit flip at {index}");
        }
        assert!(sealer.open("a", &sealed[..sealed.len() - 1]).is_none());
        assert!(sealer.open("a", b"").is_none());
    }

    #[test]
    fn every_seal_has_a_fresh_nonce_and_holds_no_plaintext() {
        let sealer = sealer_of(7);
        let first = sealer.seal("a", b"plain token text").unwrap();
        let second = sealer.seal("a", b"plain token text").unwrap();
        assert_ne!(first[1..1 + NONCE_LEN], second[1..1 + NONCE_LEN]);
        assert!(!first.windows(5).any(|w| w == b"plain"));
    }

    #[test]
    fn names_depend_on_the_key_and_on_part_boundaries() {
        let one = sealer_of(1);
        assert_eq!(one.name(&[b"ab", b"c"]), one.name(&[b"ab", b"c"]));
        assert_ne!(one.name(&[b"ab", b"c"]), one.name(&[b"a", b"bc"]));
        assert_ne!(one.name(&[b"ab"]), sealer_of(2).name(&[b"ab"]));
        assert_eq!(one.name(&[]).len(), 64);
    }

    #[test]
    fn only_base64_of_32_bytes_is_a_key() {
        let good = STANDARD.encode([9u8; 32]);
        assert!(decode_encryption_key(&SecretString::from(good.clone())).is_some());
        assert!(
            decode_encryption_key(&SecretString::from(good.trim_end_matches('=').to_string()))
                .is_some()
        );
        assert!(decode_encryption_key(&SecretString::from(STANDARD.encode([9u8; 16]))).is_none());
        assert!(decode_encryption_key(&SecretString::from("not base64!".to_string())).is_none());
    }
}
