//! Seals of precompiled components: who compiled which component, for which
//! engine, into which bytes.
//!
//! Loading compiled code is trusting it completely (wasmtime's
//! `deserialize` is `unsafe`: the bytes become machine code). So compiled
//! bytes travel and rest with a [`Seal`]: the component's digest, the engine
//! fingerprint, and the compiled bytes' digest and size, signed by whoever
//! compiled them: the hub (with its key, which every agent pins at
//! enrolment) or the agent itself (with its node key, for code it compiled
//! locally). An agent loads compiled bytes only after checking the seal's
//! signature and hashing the bytes against it, every time it reads them.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::keys::{PublicKey, SigningKey};

/// Who compiled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compiler {
    Hub,
    Node,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// The component that was compiled.
    pub component: Digest,
    /// The engine it was compiled for (`edge_engine::Target::fingerprint`).
    pub fingerprint: String,
    /// The compiled bytes.
    pub digest: Digest,
    pub size: u64,
    pub compiler: Compiler,
    /// Ed25519 over [`Seal::signed_bytes`], hex.
    pub signature: String,
}

/// Why a seal or the bytes it covers were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the seal is for component {found}, not {expected}")]
    Component { expected: Digest, found: Digest },
    #[error("the seal is for engine {found}, not {expected}")]
    Fingerprint { expected: String, found: String },
    #[error("the seal's signature does not verify with the {0:?} key")]
    Signature(Compiler),
    #[error(
        "the compiled bytes hash to {actual} ({actual_size} bytes), the seal says {expected} ({expected_size} bytes)"
    )]
    Bytes { expected: Digest, expected_size: u64, actual: Digest, actual_size: u64 },
    #[error("the seal is not valid JSON: {0}")]
    Malformed(String),
}

impl Seal {
    /// What the signature covers: a domain, then each field, NUL-separated.
    pub fn signed_bytes(component: &Digest, fingerprint: &str, digest: &Digest, size: u64, by: Compiler) -> Vec<u8> {
        let by = match by {
            Compiler::Hub => "hub",
            Compiler::Node => "node",
        };
        format!("edge-precompiled-v1\0{component}\0{fingerprint}\0{digest}\0{size}\0{by}").into_bytes()
    }

    pub fn sign(
        component: Digest,
        fingerprint: &str,
        digest: Digest,
        size: u64,
        by: Compiler,
        key: &SigningKey,
    ) -> Seal {
        let sig = key.sign(&Self::signed_bytes(&component, fingerprint, &digest, size, by));
        Seal {
            component,
            fingerprint: fingerprint.to_string(),
            digest,
            size,
            compiler: by,
            signature: crate::hex::encode(&sig),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Seal, SealError> {
        serde_json::from_slice(bytes).map_err(|e| SealError::Malformed(e.to_string()))
    }

    /// Checks that this seal is for `component` on `fingerprint` and signed
    /// by the key of its compiler: `hub` (pinned) or `node` (this node's own).
    pub fn verify(
        &self,
        component: &Digest,
        fingerprint: &str,
        hub: Option<&PublicKey>,
        node: &PublicKey,
    ) -> Result<(), SealError> {
        if self.component != *component {
            return Err(SealError::Component { expected: *component, found: self.component });
        }
        if self.fingerprint != fingerprint {
            return Err(SealError::Fingerprint { expected: fingerprint.to_string(), found: self.fingerprint.clone() });
        }
        let key = match self.compiler {
            Compiler::Hub => hub,
            Compiler::Node => Some(node),
        };
        let msg = Self::signed_bytes(&self.component, &self.fingerprint, &self.digest, self.size, self.compiler);
        let sig = crate::hex::decode(&self.signature).unwrap_or_default();
        match key {
            Some(k) if k.verify(&msg, &sig) => Ok(()),
            _ => Err(SealError::Signature(self.compiler)),
        }
    }

    /// Checks bytes (their digest and size, as measured) against the seal.
    pub fn covers(&self, actual: Digest, actual_size: u64) -> Result<(), SealError> {
        if actual == self.digest && actual_size == self.size {
            return Ok(());
        }
        Err(SealError::Bytes { expected: self.digest, expected_size: self.size, actual, actual_size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seal_verifies_only_for_its_component_engine_and_signer() {
        let hub = SigningKey::generate().unwrap();
        let node = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let c = Digest::of(b"component");
        let bytes = b"compiled";
        let d = Digest::of(bytes);
        let seal = Seal::sign(c, "fp-1", d, 8, Compiler::Hub, &hub);
        let hub_pk = hub.public();
        let node_pk = node.public();
        assert_eq!(seal.verify(&c, "fp-1", Some(&hub_pk), &node_pk), Ok(()));
        assert_eq!(seal.covers(d, 8), Ok(()));
        let round = Seal::parse(&serde_json::to_vec(&seal).unwrap()).unwrap();
        assert_eq!(round, seal);

        let cases: Vec<(&str, Seal, Option<PublicKey>, SealError)> = vec![
            ("no pinned hub key", seal.clone(), None, SealError::Signature(Compiler::Hub)),
            (
                "signed by another key",
                Seal::sign(c, "fp-1", d, 8, Compiler::Hub, &other),
                Some(hub_pk),
                SealError::Signature(Compiler::Hub),
            ),
            (
                "hub-signed but claims the node compiled it",
                Seal { compiler: Compiler::Node, ..seal.clone() },
                Some(hub_pk),
                SealError::Signature(Compiler::Node),
            ),
            (
                "digest swapped after signing",
                Seal { digest: Digest::of(b"evil"), ..seal.clone() },
                Some(hub_pk),
                SealError::Signature(Compiler::Hub),
            ),
            (
                "another engine",
                Seal::sign(c, "fp-2", d, 8, Compiler::Hub, &hub),
                Some(hub_pk),
                SealError::Fingerprint { expected: "fp-1".into(), found: "fp-2".into() },
            ),
            (
                "another component",
                Seal::sign(d, "fp-1", d, 8, Compiler::Hub, &hub),
                Some(hub_pk),
                SealError::Component { expected: c, found: d },
            ),
        ];
        for (name, s, key, want) in cases {
            assert_eq!(s.verify(&c, "fp-1", key.as_ref(), &node_pk), Err(want), "{name}");
        }
        let local = Seal::sign(c, "fp-1", d, 8, Compiler::Node, &node);
        assert_eq!(local.verify(&c, "fp-1", None, &node_pk), Ok(()), "own compile, no hub needed");
        assert!(matches!(seal.covers(Digest::of(b"compiled!"), 9), Err(SealError::Bytes { .. })));
        assert!(matches!(seal.covers(d, 9), Err(SealError::Bytes { .. })), "size is checked too");
        assert!(matches!(Seal::parse(b"{\"component\":1}"), Err(SealError::Malformed(_))));
    }
}
