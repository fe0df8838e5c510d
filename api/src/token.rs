//! Join tokens and the proof an agent gives with them.
//!
//! A join token is `EJ1.<hub key fingerprint>.<secret>`. The fingerprint lets
//! a new agent pin the hub's public key on first contact (the same idea as
//! kubeadm's discovery hash); the secret proves the agent may join. The agent
//! proves knowledge of the secret with an HMAC over its name and public key,
//! so a captured join message cannot enrol a different key.

use std::fmt;
use std::str::FromStr;

use ring::hmac;

use crate::keys::PublicKey;

const PREFIX: &str = "EJ1";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub fingerprint: String,
    pub secret: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed join token: expected EJ1.<32 hex digits>.<secret> as printed by the hub into DATA_DIR/join.token")]
pub struct TokenError;

impl JoinToken {
    pub fn new(hub_key: &PublicKey, secret: String) -> Self {
        JoinToken { fingerprint: hub_key.fingerprint(), secret }
    }

    /// Whether `key` is the hub key this token pins.
    pub fn pins(&self, key: &PublicKey) -> bool {
        crate::hex::ct_eq(self.fingerprint.as_bytes(), key.fingerprint().as_bytes())
    }

    fn proof_tag(&self, node: &str, node_key: &PublicKey) -> hmac::Tag {
        let k = hmac::Key::new(hmac::HMAC_SHA256, self.secret.as_bytes());
        hmac::sign(&k, &proof_message(node, node_key))
    }

    /// The proof a joining agent sends: HMAC-SHA256(secret, node name and key).
    pub fn proof(&self, node: &str, node_key: &PublicKey) -> String {
        crate::hex::encode(self.proof_tag(node, node_key).as_ref())
    }

    /// Checks a proof in constant time.
    pub fn verify_proof(&self, node: &str, node_key: &PublicKey, proof_hex: &str) -> bool {
        let Some(proof) = crate::hex::decode(proof_hex) else {
            return false;
        };
        let k = hmac::Key::new(hmac::HMAC_SHA256, self.secret.as_bytes());
        hmac::verify(&k, &proof_message(node, node_key), &proof).is_ok()
    }

    /// Whether `presented` (an MQTT password, say) is this token.
    pub fn matches(&self, presented: &str) -> bool {
        crate::hex::ct_eq(presented.as_bytes(), self.to_string().as_bytes())
    }
}

fn proof_message(node: &str, node_key: &PublicKey) -> Vec<u8> {
    let mut m = b"edge-join-v1\0".to_vec();
    m.extend_from_slice(node.as_bytes());
    m.push(0);
    m.extend_from_slice(&node_key.0);
    m
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut parts = s.splitn(3, '.');
        let (Some(PREFIX), Some(fp), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError);
        };
        let fp_ok = fp.len() == 32 && fp.bytes().all(|c| c.is_ascii_hexdigit());
        let secret_ok = secret.len() >= 16 && secret.bytes().all(|c| c.is_ascii_alphanumeric());
        if !fp_ok || !secret_ok {
            return Err(TokenError);
        }
        Ok(JoinToken { fingerprint: fp.to_ascii_lowercase(), secret: secret.to_string() })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}", self.fingerprint, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({PREFIX}.{}.***)", self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn token() -> (SigningKey, JoinToken) {
        let hub = SigningKey::generate().unwrap();
        let t = JoinToken::new(&hub.public(), crate::keys::random_hex(16).unwrap());
        (hub, t)
    }

    #[test]
    fn token_round_trips_and_pins_the_hub_key() {
        let (hub, t) = token();
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(parsed.pins(&hub.public()));
        assert!(!parsed.pins(&SigningKey::generate().unwrap().public()));
        assert!(parsed.matches(&t.to_string()));
        assert!(!parsed.matches("EJ1.x.y"));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "abc",
            "EJ2.0123456789abcdef0123456789abcdef.secretsecret1234",
            "EJ1.0123.secretsecret1234",
            "EJ1.0123456789abcdef0123456789abcdef.short",
            "EJ1.0123456789abcdef0123456789abcdef.has space in it!",
        ] {
            assert_eq!(bad.parse::<JoinToken>(), Err(TokenError), "{bad:?}");
        }
    }

    #[test]
    fn proof_binds_name_and_key() {
        let (_, t) = token();
        let node = SigningKey::generate().unwrap().public();
        let other = SigningKey::generate().unwrap().public();
        let p = t.proof("pi-1", &node);
        assert!(t.verify_proof("pi-1", &node, &p));
        assert!(!t.verify_proof("pi-2", &node, &p));
        assert!(!t.verify_proof("pi-1", &other, &p));
        assert!(!t.verify_proof("pi-1", &node, "zz"));
        let wrong = JoinToken { secret: "anothersecret123".into(), ..t.clone() };
        assert!(!wrong.verify_proof("pi-1", &node, &p));
    }
}
