//! Sealing data to one node: HPKE (RFC 9180) in base mode with
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305.
//!
//! Each node makes an X25519 key pair at first start and enrols its public
//! half with the hub (inside its signed join). The hub seals what only that
//! node may read (its MQTT credential, secret values) to that key: the
//! broker, other nodes and anyone reading the retained messages see only
//! ciphertext. `info` binds a sealed box to its purpose and context, so a box
//! sealed for one use cannot be opened as another.

use std::fmt;

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use ring::rand::SecureRandom;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the system random source failed")]
    Random,
    #[error("{0:?} is not an X25519 public key (expected 64 hex digits)")]
    PublicKey(String),
    #[error("the stored X25519 private key is malformed")]
    PrivateKey,
    #[error("cannot seal to this key (a low-order point?)")]
    Seal,
    #[error("the sealed box does not open with this node's key (wrong node, wrong purpose, or tampered)")]
    Open,
    #[error("the sealed box is malformed: {0}")]
    Malformed(&'static str),
}

/// A node's public X25519 key, as hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KemPublicKey(pub [u8; 32]);

impl KemPublicKey {
    pub fn from_hex(s: &str) -> Result<Self, SealError> {
        match crate::hex::decode(s) {
            Some(b) if b.len() == 32 => {
                let mut out = [0u8; 32];
                out.copy_from_slice(&b);
                Ok(KemPublicKey(out))
            }
            _ => Err(SealError::PublicKey(s.chars().take(80).collect())),
        }
    }

    pub fn hex(&self) -> String {
        crate::hex::encode(&self.0)
    }
}

impl fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KemPublicKey({})", self.hex())
    }
}

impl Serialize for KemPublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for KemPublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KemPublicKey::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A node's X25519 key pair. The private half is the 32-byte seed it was
/// derived from (RFC 9180 DeriveKeyPair), which is what the node stores.
pub struct KemKeyPair {
    seed: [u8; 32],
    private: <X25519HkdfSha256 as Kem>::PrivateKey,
    public: KemPublicKey,
}

impl KemKeyPair {
    pub fn generate() -> Result<Self, SealError> {
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| SealError::Random)?;
        Ok(Self::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let (private, public) = X25519HkdfSha256::derive_keypair(&seed);
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&public.to_bytes());
        KemKeyPair { seed, private, public: KemPublicKey(pk) }
    }

    /// From the bytes [`KemKeyPair::seed`] gave.
    pub fn from_bytes(b: &[u8]) -> Result<Self, SealError> {
        let seed: [u8; 32] = b.try_into().map_err(|_| SealError::PrivateKey)?;
        Ok(Self::from_seed(seed))
    }

    /// What to store to make this key pair again.
    pub fn seed(&self) -> &[u8; 32] {
        &self.seed
    }

    pub fn public(&self) -> KemPublicKey {
        self.public
    }

    /// Opens a box sealed to this key for `info`.
    pub fn open(&self, info: &[u8], sealed: &Sealed) -> Result<Vec<u8>, SealError> {
        let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&sealed.enc)
            .map_err(|_| SealError::Malformed("bad encapsulated key"))?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.private,
            &enc,
            info,
            &sealed.ct,
            b"",
        )
        .map_err(|_| SealError::Open)
    }
}

impl fmt::Debug for KemKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KemKeyPair({})", self.public.hex())
    }
}

/// A sealed box: the encapsulated key and the ciphertext (with its tag).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sealed {
    #[serde(with = "hex_bytes")]
    pub enc: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub ct: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.ct.len())
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        crate::hex::decode(&s).ok_or_else(|| serde::de::Error::custom("not hex"))
    }
}

/// A deterministic generator: HMAC-SHA256(seed, counter) blocks. Used with
/// a fresh OS-random seed for ordinary sealing, and with a seed derived from
/// a secret and the box's context where the same input must give the same
/// box (so that unchanged desired state stays byte-identical).
struct SeededRng {
    key: ring::hmac::Key,
    counter: u64,
    buf: Vec<u8>,
}

impl SeededRng {
    fn new(seed: &[u8; 32]) -> Self {
        SeededRng { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed), counter: 0, buf: Vec::new() }
    }
}

impl rand_core::TryRng for SeededRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for d in dst.iter_mut() {
            if self.buf.is_empty() {
                let tag = ring::hmac::sign(&self.key, &self.counter.to_be_bytes());
                self.counter += 1;
                self.buf = tag.as_ref().iter().rev().copied().collect();
            }
            // `buf` was refilled just above when empty.
            *d = self.buf.pop().unwrap_or_default();
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for SeededRng {}

fn seal_with(to: &KemPublicKey, info: &[u8], plaintext: &[u8], seed: &[u8; 32]) -> Result<Sealed, SealError> {
    let pk = <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&to.0).map_err(|_| SealError::Seal)?;
    let mut rng = SeededRng::new(seed);
    let (enc, ct) = hpke::single_shot_seal_with_rng::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        b"",
        &mut rng,
    )
    .map_err(|_| SealError::Seal)?;
    Ok(Sealed { enc: enc.to_bytes().to_vec(), ct })
}

/// Seals `plaintext` to `to` for `info`, with fresh randomness.
pub fn seal(to: &KemPublicKey, info: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError> {
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| SealError::Random)?;
    seal_with(to, info, plaintext, &seed)
}

/// Seals deterministically: the same `(derivation key, to, info, plaintext)`
/// always gives the same box, and nobody without `derivation_key` can tell
/// two boxes of the same plaintext apart from two of different ones. The
/// ephemeral key is derived from all four, so it is never reused across
/// different plaintexts.
pub fn seal_deterministic(
    derivation_key: &[u8],
    to: &KemPublicKey,
    info: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, SealError> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derivation_key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    for part in [b"edge-seal-v1".as_slice(), &to.0, info, plaintext] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(ctx.sign().as_ref());
    seal_with(to, info, plaintext, &seed)
}

/// The `info` for a node's MQTT credential.
pub fn credential_info(node: &str) -> Vec<u8> {
    let mut v = b"edge-credential-v1\0".to_vec();
    v.extend_from_slice(node.as_bytes());
    v
}

/// The `info` for the values of a secret sealed to a node.
pub fn secret_info(node: &str, secret: &str, version: u64) -> Vec<u8> {
    let mut v = b"edge-secret-v1\0".to_vec();
    v.extend_from_slice(node.as_bytes());
    v.push(0);
    v.extend_from_slice(secret.as_bytes());
    v.push(0);
    v.extend_from_slice(version.to_string().as_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_open_only_with_their_key_and_info() {
        let node = KemKeyPair::generate().unwrap();
        let other = KemKeyPair::generate().unwrap();
        let info = credential_info("pi-1");
        let b = seal(&node.public(), &info, b"s3cret").unwrap();
        assert_eq!(node.open(&info, &b).unwrap(), b"s3cret");
        assert_eq!(other.open(&info, &b), Err(SealError::Open), "another node's key");
        assert_eq!(node.open(&credential_info("pi-2"), &b), Err(SealError::Open), "another purpose");
        let mut tampered = b.clone();
        tampered.ct[0] ^= 1;
        assert_eq!(node.open(&info, &tampered), Err(SealError::Open));
        let mut short = b.clone();
        short.enc.truncate(5);
        assert!(matches!(node.open(&info, &short), Err(SealError::Malformed(_))));
        assert_ne!(seal(&node.public(), &info, b"s3cret").unwrap(), b, "fresh randomness each time");
    }

    #[test]
    fn deterministic_boxes_repeat_only_for_the_same_input() {
        let node = KemKeyPair::generate().unwrap();
        let info = secret_info("pi-1", "db", 3);
        let a = seal_deterministic(b"k", &node.public(), &info, b"v1").unwrap();
        assert_eq!(a, seal_deterministic(b"k", &node.public(), &info, b"v1").unwrap());
        assert_ne!(a, seal_deterministic(b"k", &node.public(), &info, b"v2").unwrap());
        assert_ne!(a, seal_deterministic(b"other", &node.public(), &info, b"v1").unwrap());
        assert_ne!(a.enc, seal_deterministic(b"k", &node.public(), &info, b"v2").unwrap().enc, "no key reuse");
        assert_eq!(node.open(&info, &a).unwrap(), b"v1");
    }

    #[test]
    fn key_pairs_survive_their_seed_and_serde() {
        let a = KemKeyPair::generate().unwrap();
        let b = KemKeyPair::from_bytes(a.seed()).unwrap();
        assert_eq!(a.public(), b.public());
        assert!(KemKeyPair::from_bytes(b"short").is_err());
        let json = serde_json::to_string(&a.public()).unwrap();
        assert_eq!(serde_json::from_str::<KemPublicKey>(&json).unwrap(), a.public());
        assert!(serde_json::from_str::<KemPublicKey>("\"abcd\"").is_err());
        let sealed = seal(&a.public(), b"i", b"x").unwrap();
        let back: Sealed = serde_json::from_str(&serde_json::to_string(&sealed).unwrap()).unwrap();
        assert_eq!(back, sealed);
    }
}
