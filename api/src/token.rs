//! Tokens: bootstrap (join) tokens, API tokens, and node credentials.
//!
//! - A **join token** `EJ1.<hub key fingerprint>.<id>.<secret>` enrols a new
//!   device. The fingerprint lets the agent pin the hub's public key on first
//!   contact (as kubeadm's discovery hash does); `<id>.<secret>` is a
//!   bootstrap token in the manner of Kubernetes': the hub keeps only the
//!   hash of the secret, and a token may expire, be limited in uses, and be
//!   revoked. After enrolment a node uses its own credential and never the
//!   join token again.
//! - An **API token** `EA1.<id>.<secret>` authenticates `edgectl` with a role.
//! - A **node credential** is the random secret a node logs in to the MQTT
//!   broker with, issued by the hub at enrolment (sealed to the node's key).
//!
//! Secrets are checked against their hash in constant time. The hash is
//! SHA-256 over a domain prefix: the secrets are 190 random bits, so a slow
//! password hash would add nothing but latency.

use std::fmt;
use std::str::FromStr;

use crate::keys::PublicKey;

const JOIN_PREFIX: &str = "EJ1";
const API_PREFIX: &str = "EA1";

/// Characters of a token id (lowercase letters and digits), and its length.
const ID_LEN: usize = 8;
/// Characters of a secret; 32 alphanumerics are ~190 bits.
const SECRET_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub fingerprint: String,
    pub id: String,
    pub secret: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "malformed join token: expected EJ1.<32 hex digits>.<id>.<secret> as printed by `edgectl token create` or the hub into DATA_DIR/join.token"
    )]
    Join,
    #[error("malformed API token: expected EA1.<id>.<secret> as printed by `edgectl token create --role ROLE`")]
    Api,
    #[error("could not make a token: the system random source failed")]
    Random,
}

fn id_ok(id: &str) -> bool {
    (6..=16).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn secret_ok(secret: &str) -> bool {
    (16..=128).contains(&secret.len()) && secret.bytes().all(|c| c.is_ascii_alphanumeric())
}

/// `n` characters from `alphabet`, uniformly (rejection sampling).
fn random_string(n: usize, alphabet: &[u8]) -> Result<String, TokenError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        rng.fill(&mut buf).map_err(|_| TokenError::Random)?;
        for b in buf {
            if (b as usize) < limit && out.len() < n {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

/// A fresh token id: 8 lowercase letters and digits.
pub fn new_id() -> Result<String, TokenError> {
    random_string(ID_LEN, b"abcdefghijklmnopqrstuvwxyz0123456789")
}

/// A fresh secret: 32 letters and digits.
pub fn new_secret() -> Result<String, TokenError> {
    random_string(SECRET_LEN, b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
}

/// What the hub stores for a secret: hex SHA-256 over a domain prefix.
pub fn hash_secret(secret: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"edge-secret-v1\0");
    ctx.update(secret.as_bytes());
    crate::hex::encode(ctx.finish().as_ref())
}

/// Whether `secret` hashes to `hash`, in constant time.
pub fn secret_matches(hash: &str, secret: &str) -> bool {
    crate::hex::ct_eq(hash.as_bytes(), hash_secret(secret).as_bytes())
}

impl JoinToken {
    /// A new join token for the hub with this key.
    pub fn generate(hub_key: &PublicKey) -> Result<Self, TokenError> {
        Ok(JoinToken { fingerprint: hub_key.fingerprint(), id: new_id()?, secret: new_secret()? })
    }

    /// Whether `key` is the hub key this token pins.
    pub fn pins(&self, key: &PublicKey) -> bool {
        crate::hex::ct_eq(self.fingerprint.as_bytes(), key.fingerprint().as_bytes())
    }

    /// The MQTT user name a device logs in with before it has its own
    /// credential (the password is the secret).
    pub fn mqtt_user(&self) -> String {
        bootstrap_user(&self.id)
    }

    /// What a joining agent presents to the hub: `<id>.<secret>`.
    pub fn presented(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// The MQTT user of a bootstrap token: `join-<id>`.
pub fn bootstrap_user(id: &str) -> String {
    format!("join-{id}")
}

/// The token id of a bootstrap MQTT user name.
pub fn parse_bootstrap_user(user: &str) -> Option<&str> {
    user.strip_prefix("join-").filter(|id| id_ok(id))
}

/// Splits what a joining agent presents (`<id>.<secret>`).
pub fn parse_presented(s: &str) -> Option<(&str, &str)> {
    let (id, secret) = s.split_once('.')?;
    (id_ok(id) && secret_ok(secret)).then_some((id, secret))
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parts: Vec<&str> = s.split('.').collect();
        let [JOIN_PREFIX, fp, id, secret] = parts.as_slice() else {
            return Err(TokenError::Join);
        };
        let fp_ok = fp.len() == 32 && fp.bytes().all(|c| c.is_ascii_hexdigit());
        if !fp_ok || !id_ok(id) || !secret_ok(secret) {
            return Err(TokenError::Join);
        }
        Ok(JoinToken { fingerprint: fp.to_ascii_lowercase(), id: id.to_string(), secret: secret.to_string() })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{JOIN_PREFIX}.{}.{}.{}", self.fingerprint, self.id, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({JOIN_PREFIX}.{}.{}.***)", self.fingerprint, self.id)
    }
}

/// An API token: `EA1.<id>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub secret: String,
}

impl ApiToken {
    pub fn generate() -> Result<Self, TokenError> {
        Ok(ApiToken { id: new_id()?, secret: new_secret()? })
    }
}

impl FromStr for ApiToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        match parts.as_slice() {
            [API_PREFIX, id, secret] if id_ok(id) && secret_ok(secret) => {
                Ok(ApiToken { id: id.to_string(), secret: secret.to_string() })
            }
            _ => Err(TokenError::Api),
        }
    }
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{API_PREFIX}.{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken({API_PREFIX}.{}.***)", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    #[test]
    fn join_tokens_round_trip_and_pin_the_hub_key() {
        let hub = SigningKey::generate().unwrap();
        let t = JoinToken::generate(&hub.public()).unwrap();
        let parsed: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(parsed, t);
        assert!(parsed.pins(&hub.public()));
        assert!(!parsed.pins(&SigningKey::generate().unwrap().public()));
        assert_eq!(parse_presented(&t.presented()), Some((t.id.as_str(), t.secret.as_str())));
        assert_eq!(parse_bootstrap_user(&t.mqtt_user()), Some(t.id.as_str()));
        assert!(!format!("{t:?}").contains(&t.secret), "Debug never shows the secret");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "abc",
            "EJ1.0123456789abcdef0123456789abcdef.secretsecret1234",
            "EJ2.0123456789abcdef0123456789abcdef.abcdef12.secretsecret1234",
            "EJ1.0123.abcdef12.secretsecret1234",
            "EJ1.0123456789abcdef0123456789abcdef.ABCDEF12.secretsecret1234",
            "EJ1.0123456789abcdef0123456789abcdef.abcdef12.short",
            "EJ1.0123456789abcdef0123456789abcdef.abcdef12.has space in it!",
            "EJ1.0123456789abcdef0123456789abcdef.abcdef12.secretsecret1234.extra",
        ] {
            assert_eq!(bad.parse::<JoinToken>(), Err(TokenError::Join), "{bad:?}");
        }
        for bad in ["", "EA1.x.y", "EA1.abcdef12", "EA2.abcdef12.secretsecret1234", "Bearer"] {
            assert_eq!(bad.parse::<ApiToken>(), Err(TokenError::Api), "{bad:?}");
        }
        assert_eq!(parse_bootstrap_user("join-"), None);
        assert_eq!(parse_bootstrap_user("pi-1"), None);
        assert_eq!(parse_presented("abcdef12"), None);
    }

    #[test]
    fn secrets_match_only_their_hash() {
        let t = ApiToken::generate().unwrap();
        let h = hash_secret(&t.secret);
        assert!(secret_matches(&h, &t.secret));
        assert!(!secret_matches(&h, &new_secret().unwrap()));
        assert!(!secret_matches("", &t.secret));
        assert_ne!(h, t.secret, "only the hash is kept");
        // Fresh values differ and use only their alphabet.
        let ids: std::collections::BTreeSet<String> = (0..50).map(|_| new_id().unwrap()).collect();
        assert_eq!(ids.len(), 50);
        assert!(ids.iter().all(|i| id_ok(i)));
        assert!(secret_ok(&new_secret().unwrap()));
    }
}
