//! Ed25519 identities. The hub signs desired state with its key; each agent
//! signs what it reports with its own. Keys are stored as PKCS#8 documents.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not generate a key: the system random source failed")]
    Random,
    #[error("the key file is not a valid Ed25519 PKCS#8 document")]
    Pkcs8,
    #[error("{0:?} is not an Ed25519 public key (expected 64 hex digits)")]
    Public(String),
}

pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> Result<Self, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
        Self::from_pkcs8(doc.as_ref())
    }

    pub fn from_pkcs8(bytes: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(|_| KeyError::Pkcs8)?;
        Ok(SigningKey { pair, pkcs8: bytes.to_vec() })
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public().fingerprint())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        match crate::hex::decode(s) {
            Some(b) if b.len() == 32 => {
                let mut out = [0u8; 32];
                out.copy_from_slice(&b);
                Ok(PublicKey(out))
            }
            _ => Err(KeyError::Public(s.to_string())),
        }
    }

    pub fn hex(&self) -> String {
        crate::hex::encode(&self.0)
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0).verify(msg, sig).is_ok()
    }

    /// The first 16 bytes of the key's sha256, in hex: what a join token pins.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        crate::hex::encode(&d.as_ref()[..16])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.hex())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// `n` random bytes from the operating system, hex encoded.
pub fn random_hex(n: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; n];
    SystemRandom::new().fill(&mut buf).map_err(|_| KeyError::Random)?;
    Ok(crate::hex::encode(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_the_signing_key_and_message() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let sig = a.sign(b"desired state");
        assert!(a.public().verify(b"desired state", &sig));
        assert!(!a.public().verify(b"desired statf", &sig));
        assert!(!b.public().verify(b"desired state", &sig));
    }

    #[test]
    fn keys_survive_a_pkcs8_round_trip() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::from_pkcs8(a.pkcs8()).unwrap();
        assert_eq!(a.public(), b.public());
        assert!(SigningKey::from_pkcs8(b"not a key").is_err());
        assert_eq!(PublicKey::from_hex(&a.public().hex()).unwrap(), a.public());
        assert!(PublicKey::from_hex("abcd").is_err());
    }
}
