//! Secrets at rest (docs/administration.md, "Secrets"): tokens are kept as their SHA-256, BCE
//! secret keys sealed with AES-256-GCM under the service's key, and new credentials are drawn
//! from a CSPRNG.
//!
//! A fast unsalted hash suffices for tokens because every token the server issues carries 256
//! random bits: guessing one from its hash is as hard as guessing the token, and a slow password
//! hash (made for short human passwords) would only cost CPU on every request. Lookups go by the
//! hash, so no comparison ever runs over a secret itself; the admin tokens, few, are compared
//! in constant time.

use crate::auth::Secret;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::path::Path;

/// The SHA-256 of a token.
pub type TokenHash = [u8; 32];

/// The SHA-256 of `token`.
#[must_use]
pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// `n` random bytes from the thread's CSPRNG (ChaCha, seeded and reseeded from the operating
/// system).
fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A new token: `cct_` and 256 random bits, URL-safe base64.
#[must_use]
pub fn new_token() -> String {
    format!("cct_{}", URL_SAFE_NO_PAD.encode(random::<32>()))
}

/// A new token id (public, names the token in lists and the audit log): `tok_` and 64 random bits.
#[must_use]
pub fn new_token_id() -> String {
    format!("tok_{}", hex::encode(random::<8>()))
}

/// A new BCE access key pair: a 32-hex-digit key id and a 64-hex-digit secret key.
#[must_use]
pub fn new_access_key() -> (String, String) {
    (hex::encode(random::<16>()), hex::encode(random::<32>()))
}

/// The service's key for sealing BCE secret keys: 32 bytes read from `[admin] key_file`.
#[derive(Clone)]
pub struct SealKey(Aes256Gcm);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

/// Why a key file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// It cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// It does not hold 32 bytes in base64.
    #[error("{0} must hold 32 random bytes in base64 (head -c32 /dev/urandom | base64)")]
    Format(String),
}

impl SealKey {
    /// Reads the key from `path`: 32 bytes, base64-encoded (white space around it ignored).
    ///
    /// # Errors
    /// The file cannot be read or does not hold a base64 32-byte key.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read(shown.clone(), e))?;
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Format(shown.clone()))?;
        Self::from_bytes(&bytes).ok_or(KeyError::Format(shown))
    }

    /// The key of these 32 bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == 32).then(|| Self(Aes256Gcm::new_from_slice(bytes).expect("32 bytes is an AES-256 key")))
    }

    /// `secret` sealed for access key `ak`: base64 of a random 96-bit nonce and the ciphertext
    /// with its tag. The key id is authenticated with it, so a sealed secret copied onto another
    /// key id does not open.
    #[must_use]
    pub fn seal(&self, ak: &str, secret: &str) -> String {
        let nonce = random::<12>();
        let sealed = self
            .0
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret.as_bytes(), aad: ak.as_bytes() })
            .expect("AES-GCM encrypts any message shorter than 64 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    /// The secret sealed for `ak`, or `None` if `sealed` was not sealed for it under this key.
    #[must_use]
    pub fn open(&self, ak: &str, sealed: &str) -> Option<Secret> {
        let bytes = STANDARD.decode(sealed).ok()?;
        if bytes.len() < 12 + 16 {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let plain = self.0.decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: ak.as_bytes() }).ok()?;
        String::from_utf8(plain).ok().map(|s| Secret::from(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_key_id_and_key() {
        let key = SealKey::from_bytes(&[7; 32]).unwrap();
        let sealed = key.seal("ak1", "the secret");
        assert!(!sealed.contains("the secret"));
        assert_eq!(key.open("ak1", &sealed).unwrap().expose(), "the secret");
        assert!(key.open("ak2", &sealed).is_none(), "bound to its key id");
        assert!(SealKey::from_bytes(&[8; 32]).unwrap().open("ak1", &sealed).is_none(), "another key");
        assert!(key.open("ak1", "bm90IHNlYWxlZA==").is_none());
        assert_ne!(key.seal("ak1", "the secret"), sealed, "a fresh nonce each time");
    }

    #[test]
    fn new_credentials_are_random_and_well_formed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("cct_") && a.len() == 4 + 43, "{a}");
        let (ak, sk) = new_access_key();
        assert!(ak.len() == 32 && sk.len() == 64 && ak.chars().chain(sk.chars()).all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hash_token("x"), hash_token("x"));
    }

    #[test]
    fn a_key_file_holds_base64_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", STANDARD.encode([1u8; 32]))).unwrap();
        assert!(SealKey::from_file(&good).is_ok());
        let short = dir.path().join("short");
        std::fs::write(&short, STANDARD.encode([1u8; 16])).unwrap();
        assert!(matches!(SealKey::from_file(&short), Err(KeyError::Format(_))));
        assert!(matches!(SealKey::from_file(&dir.path().join("none")), Err(KeyError::Read(..))));
    }
}
