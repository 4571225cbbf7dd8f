//! Sealing for the shared tier: what Redis holds is useless to anyone who can read Redis.
//!
//! One configured 32-byte key yields, through HKDF-SHA256, an AES-256-GCM key that seals
//! values, an HMAC-SHA256 key that tags announcements, and a short key id. Every seal takes a
//! fresh random nonce and carries the key id, and the entry's name is the associated data: a
//! value copied under another name does not open. All of it (and the names' SHA-256) comes
//! from aws-lc-rs, which rustls and jsonwebtoken already bring into the binary.
//!
//! The key rotates ([`KeyRing`]): values are sealed with the newest key and open with it or
//! with the previous one for [`PREVIOUS_KEY_WINDOW`], and a value sealed under a key this
//! instance does not hold is told apart from a damaged one, so that the caller can read the
//! key again ("the fleet moved on"). Names are therefore *not* keyed: an instance on either
//! key must find the same entry, lock and announcement, or a rotation would split the fleet
//! into groups that cannot see each other's work. A name is a SHA-256 of everything that makes
//! a token differ (token endpoint, client, method, audience, resource, parameters, scopes):
//! it shows no connection, client or scope in clear, but someone who can read Redis and
//! guesses all of them can confirm the guess. Values, not names, are the secret.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hkdf, hmac, rand};
use secrecy::{ExposeSecret, SecretBox};
use tokio::time::Instant;

use crate::config::ENCRYPTION_KEY_BYTES;

/// First byte of every sealed value; a value of another format is not opened, only refetched.
const FORMAT: u8 = 2;
/// Bytes of the key id every sealed value carries after its format byte.
const KEY_ID_LEN: usize = 8;
/// HKDF labels: changing one changes every seal, tag or key id, on purpose.
const SEALING_INFO: &[u8] = b"token-broker shared cache: sealed values v2";
const TAGGING_INFO: &[u8] = b"token-broker shared cache: announcements v1";
const KEY_ID_INFO: &[u8] = b"token-broker shared cache: key id v1";
const NAMING_LABEL: &[u8] = b"token-broker shared cache: names v2";
const AAD_PREFIX: &[u8] = b"token-broker shared cache v2\0";
/// Bytes of an announcement's tag (hex-encoded twice as long).
const TAG_LEN: usize = 16;
/// How long the previous key still opens entries after a rotation: the longest life an entry
/// can have (a token's, at most a day), so that no entry written before the rotation is lost.
pub(crate) const PREVIOUS_KEY_WINDOW: Duration = crate::token::MAX_LIFETIME;

/// A SHA-256 of `parts` as lower-case hex: the name of an entry, lock or announcement. Each
/// part is length-prefixed, so that no two different lists of parts hash the same input.
pub(crate) fn name(parts: &[&[u8]]) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(NAMING_LABEL);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    hex::encode(context.finish().as_ref())
}

/// Why a value did not open.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unopened {
    /// Sealed (well-formed) under a key this instance does not hold: the fleet may have a
    /// newer key.
    ForeignKey,
    /// Another format, another name, or a single changed bit.
    Invalid,
}

/// The keys derived from one configured key.
pub(crate) struct Sealer {
    id: [u8; KEY_ID_LEN],
    tagging: hmac::Key,
    sealing: LessSafeKey,
}

impl Sealer {
    pub(crate) fn new(key: &SecretBox<[u8; ENCRYPTION_KEY_BYTES]>) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(key.expose_secret());
        let tagging: hmac::Key = prk
            .expand(&[TAGGING_INFO], hmac::HMAC_SHA256)
            .expect("HKDF can produce an HMAC-SHA256 key")
            .into();
        let sealing: UnboundKey = prk
            .expand(&[SEALING_INFO], &AES_256_GCM)
            .expect("HKDF can produce an AES-256 key")
            .into();
        let mut id = [0u8; KEY_ID_LEN];
        prk.expand(&[KEY_ID_INFO], KeyIdLength)
            .and_then(|okm| okm.fill(&mut id))
            .expect("HKDF can produce 8 bytes");
        Self {
            id,
            tagging,
            sealing: LessSafeKey::new(sealing),
        }
    }

    /// `plaintext` sealed for the entry called `name`: format byte, key id, nonce,
    /// ciphertext and tag.
    pub(crate) fn seal(&self, name: &str, plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + plaintext.len() + 16);
        sealed.push(FORMAT);
        sealed.extend_from_slice(&self.id);
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

    /// The plaintext of a value sealed for `name` with this key.
    pub(crate) fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, Unopened> {
        let (id, nonce, body) = split(sealed).ok_or(Unopened::Invalid)?;
        if id != self.id {
            return Err(Unopened::ForeignKey);
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unopened::Invalid)?;
        let mut body = body.to_vec();
        let plaintext = self
            .sealing
            .open_in_place(nonce, Aad::from(aad(name)), &mut body)
            .map_err(|_| Unopened::Invalid)?;
        Ok(plaintext.to_vec())
    }

    /// A tag that proves `message` comes from a holder of this key.
    fn tag(&self, message: &str) -> String {
        hex::encode(&hmac::sign(&self.tagging, message.as_bytes()).as_ref()[..TAG_LEN])
    }

    fn verify(&self, message: &str, tag: &str) -> bool {
        let expected = self.tag(message);
        // Both are hex of the same length; compare without an early exit.
        expected.len() == tag.len()
            && expected
                .bytes()
                .zip(tag.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// The format byte, key id, nonce and the rest of a sealed value.
fn split(sealed: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (&format, rest) = sealed.split_first()?;
    if format != FORMAT || rest.len() < KEY_ID_LEN + NONCE_LEN {
        return None;
    }
    let (id, rest) = rest.split_at(KEY_ID_LEN);
    let (nonce, body) = rest.split_at(NONCE_LEN);
    Some((id, nonce, body))
}

/// HKDF output length for the key id.
struct KeyIdLength;

impl hkdf::KeyType for KeyIdLength {
    fn len(&self) -> usize {
        KEY_ID_LEN
    }
}

/// The keys an instance holds: the newest, which seals, and for a window after a rotation the
/// one before it, which still opens what was sealed before.
pub(crate) struct KeyRing {
    current: Arc<Sealer>,
    previous: Option<(Arc<Sealer>, Instant)>,
}

impl KeyRing {
    pub(crate) fn new(current: Sealer) -> Self {
        Self {
            current: Arc::new(current),
            previous: None,
        }
    }

    /// This ring after `newer` became the key: the current key turns previous for
    /// [`PREVIOUS_KEY_WINDOW`]. `None` when `newer` is the current key already.
    pub(crate) fn rotated(&self, newer: Sealer) -> Option<Self> {
        if newer.id == self.current.id {
            return None;
        }
        Some(Self {
            current: Arc::new(newer),
            previous: Some((self.current.clone(), Instant::now() + PREVIOUS_KEY_WINDOW)),
        })
    }

    /// The keys that open values now, newest first.
    fn keys(&self) -> impl Iterator<Item = &Sealer> {
        let now = Instant::now();
        std::iter::once(self.current.as_ref()).chain(
            self.previous
                .as_ref()
                .filter(|(_, until)| now < *until)
                .map(|(sealer, _)| sealer.as_ref()),
        )
    }

    /// The id of the key that seals now, as hex: what a key rotation announcement names.
    pub(crate) fn current_id(&self) -> String {
        hex::encode(&self.current.id)
    }

    pub(crate) fn seal(&self, name: &str, plaintext: &[u8]) -> Option<Vec<u8>> {
        self.current.seal(name, plaintext)
    }

    /// Opens with whichever held key sealed the value.
    pub(crate) fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, Unopened> {
        let (id, _, _) = split(sealed).ok_or(Unopened::Invalid)?;
        self.keys()
            .find(|sealer| sealer.id == id)
            .ok_or(Unopened::ForeignKey)?
            .open(name, sealed)
    }

    /// `message` with a tag by every key held, `message|tag[,tag]`: an instance on either
    /// key of a rotation can check it.
    pub(crate) fn sign(&self, message: &str) -> String {
        let tags: Vec<String> = self.keys().map(|sealer| sealer.tag(message)).collect();
        format!("{message}|{}", tags.join(","))
    }

    /// The message of `signed` when one of its tags is by a key held here.
    pub(crate) fn verify<'a>(&self, signed: &'a str) -> Option<&'a str> {
        let (message, tags) = signed.rsplit_once('|')?;
        tags.split(',')
            .take(2)
            .any(|tag| self.keys().any(|sealer| sealer.verify(message, tag)))
            .then_some(message)
    }
}

fn aad(name: &str) -> Vec<u8> {
    [AAD_PREFIX, name.as_bytes()].concat()
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
        assert_eq!(
            sealer.open("b", &sealed),
            Err(Unopened::Invalid),
            "bound to its name"
        );
        assert_eq!(
            sealer_of(8).open("a", &sealed),
            Err(Unopened::ForeignKey),
            "bound to its key"
        );
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 1;
            assert!(sealer.open("a", &tampered).is_err(), "bit flip at {index}");
        }
        assert!(sealer.open("a", &sealed[..sealed.len() - 1]).is_err());
        assert_eq!(sealer.open("a", b""), Err(Unopened::Invalid));
    }

    #[test]
    fn every_seal_has_a_fresh_nonce_and_holds_no_plaintext() {
        let sealer = sealer_of(7);
        let first = sealer.seal("a", b"plain token text").unwrap();
        let second = sealer.seal("a", b"plain token text").unwrap();
        let nonce = 1 + KEY_ID_LEN..1 + KEY_ID_LEN + NONCE_LEN;
        assert_ne!(first[nonce.clone()], second[nonce]);
        assert!(!first.windows(5).any(|w| w == b"plain"));
    }

    #[test]
    fn names_depend_on_part_boundaries_and_not_on_the_key() {
        assert_eq!(name(&[b"ab", b"c"]), name(&[b"ab", b"c"]));
        assert_ne!(name(&[b"ab", b"c"]), name(&[b"a", b"bc"]));
        assert_eq!(name(&[]).len(), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_rotation_both_keys_open_for_the_window_and_only_the_new_one_seals() {
        let old = KeyRing::new(sealer_of(1));
        let before = old.seal("a", b"old").unwrap();
        let ring = old.rotated(sealer_of(2)).expect("a new key");
        assert!(
            ring.rotated(sealer_of(2)).is_none(),
            "the same key is no rotation"
        );
        assert_eq!(ring.open("a", &before).unwrap(), b"old");
        let after = ring.seal("a", b"new").unwrap();
        assert_eq!(old.open("a", &after), Err(Unopened::ForeignKey));
        assert_eq!(sealer_of(2).open("a", &after).unwrap(), b"new");
        // Announcements made after the rotation are checked by instances on either key.
        let signed = ring.sign("k:instance");
        assert_eq!(old.verify(&signed), Some("k:instance"));
        assert_eq!(
            KeyRing::new(sealer_of(2)).verify(&signed),
            Some("k:instance")
        );
        assert_eq!(KeyRing::new(sealer_of(3)).verify(&signed), None);
        assert_eq!(old.verify("k:instance|00"), None);
        tokio::time::advance(PREVIOUS_KEY_WINDOW).await;
        assert_eq!(
            ring.open("a", &before),
            Err(Unopened::ForeignKey),
            "the window closed"
        );
    }
}
