//! Compact frames for the two messages that flow for a node's whole life:
//! its heartbeat (node → hub) and the hub's acknowledgement of it, the
//! node's lease (hub → node). Every other message is a JSON envelope
//! ([`crate::wire`]); these two are fixed-size binary, about a third of an
//! envelope, and signed the same way, so idle traffic stays small on
//! metered links.
//!
//! ```text
//! byte 0       FORMAT (0xE1; a JSON envelope starts with '{')
//! byte 1       kind: 1 heartbeat, 2 lease
//! bytes 2..10  session (u64, big-endian): the agent's, which it raises at every start
//! bytes 10..18 seq: the heartbeat's number (a lease names the heartbeat it acknowledges)
//! bytes 18..26 generation: of the desired state the node has applied (heartbeat; 0 in a lease)
//! bytes 26..90 Ed25519 signature by the sender over
//!              "edge-frame-v1\0" <node name> "\0" bytes 0..26
//! ```
//!
//! The signature covers the name of the node the frame is about in both
//! directions, so a frame copied to another node's topic does not verify.
//! A receiver accepts the JSON form too (agents and hubs of earlier
//! releases), and the hub answers a heartbeat in the form it came in.

use crate::keys::{PublicKey, SigningKey};

/// The first byte of every frame: never the first byte of a JSON envelope.
pub const FORMAT: u8 = 0xE1;

/// Every frame is this long.
pub const LEN: usize = 90;

const SIGNED: usize = 26;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// node → hub: alive, and applied the desired state of `generation`.
    Heartbeat = 1,
    /// hub → node: heard the node's heartbeat `seq` of `session`.
    Lease = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub session: u64,
    pub seq: u64,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("compact frame of {0} bytes (a frame is {LEN})")]
    Length(usize),
    #[error("not a compact frame (first byte {0:#04x})")]
    Format(u8),
    #[error("compact frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} frame, got a {got:?}")]
    WrongKind { expected: FrameKind, got: FrameKind },
    #[error("{kind:?} frame about {node:?} has an invalid signature")]
    BadSignature { kind: FrameKind, node: String },
}

/// Whether a payload is a compact frame rather than a JSON envelope.
pub fn is_frame(payload: &[u8]) -> bool {
    payload.first() == Some(&FORMAT)
}

fn signing_bytes(node: &str, head: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + node.len() + head.len());
    m.extend_from_slice(b"edge-frame-v1\0");
    m.extend_from_slice(node.as_bytes());
    m.push(0);
    m.extend_from_slice(head);
    m
}

impl Frame {
    pub fn heartbeat(session: u64, seq: u64, generation: u64) -> Self {
        Frame { kind: FrameKind::Heartbeat, session, seq, generation }
    }

    pub fn lease(session: u64, seq: u64) -> Self {
        Frame { kind: FrameKind::Lease, session, seq, generation: 0 }
    }

    /// The frame about `node`, signed by `key` (the node's for a
    /// heartbeat, the hub's for a lease).
    pub fn seal(&self, node: &str, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.push(FORMAT);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.generation.to_be_bytes());
        let sig = key.sign(&signing_bytes(node, &out));
        out.extend_from_slice(&sig);
        out
    }

    /// Checks a frame about `node` of the `expected` kind, signed by `key`.
    /// Length, format and kind are checked before the signature, and
    /// nothing is read from an unverified frame.
    pub fn open(payload: &[u8], expected: FrameKind, node: &str, key: &PublicKey) -> Result<Frame, FrameError> {
        if payload.len() != LEN {
            return Err(FrameError::Length(payload.len()));
        }
        if payload[0] != FORMAT {
            return Err(FrameError::Format(payload[0]));
        }
        let kind = match payload[1] {
            1 => FrameKind::Heartbeat,
            2 => FrameKind::Lease,
            k => return Err(FrameError::UnknownKind(k)),
        };
        if kind != expected {
            return Err(FrameError::WrongKind { expected, got: kind });
        }
        let (head, sig) = payload.split_at(SIGNED);
        if !key.verify(&signing_bytes(node, head), sig) {
            return Err(FrameError::BadSignature { kind, node: node.to_string() });
        }
        let u64_at = |i: usize| u64::from_be_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        Ok(Frame { kind, session: u64_at(2), seq: u64_at(10), generation: u64_at(18) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_opens_only_as_what_it_was_sealed_as() {
        let node = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let hb = Frame::heartbeat(1_796_243_259_000, 42, 7);
        let bytes = hb.seal("pi", &node);
        assert_eq!(bytes.len(), LEN);
        assert!(is_frame(&bytes) && !is_frame(b"{\"v\":1}") && !is_frame(b""));
        assert_eq!(Frame::open(&bytes, FrameKind::Heartbeat, "pi", &node.public()), Ok(hb));

        let refused = |payload: &[u8], kind: FrameKind, name: &str, key: &PublicKey| {
            Frame::open(payload, kind, name, key).unwrap_err().to_string()
        };
        // Another node's topic, another key, another kind.
        assert!(refused(&bytes, FrameKind::Heartbeat, "pj", &node.public()).contains("invalid signature"));
        assert!(refused(&bytes, FrameKind::Heartbeat, "pi", &other.public()).contains("invalid signature"));
        assert!(refused(&bytes, FrameKind::Lease, "pi", &node.public()).contains("expected a Lease"));
        // Any flipped bit, anywhere.
        for i in 0..LEN {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Frame::open(&bad, FrameKind::Heartbeat, "pi", &node.public()).is_err(), "bit flipped in byte {i}");
        }
        // Truncated, padded, not a frame, an unknown kind.
        assert!(refused(&bytes[..LEN - 1], FrameKind::Heartbeat, "pi", &node.public()).contains("89 bytes"));
        let mut long = bytes.clone();
        long.push(0);
        assert!(refused(&long, FrameKind::Heartbeat, "pi", &node.public()).contains("91 bytes"));
        let mut json = bytes.clone();
        json[0] = b'{';
        assert!(refused(&json, FrameKind::Heartbeat, "pi", &node.public()).contains("0x7b"));
        let mut kind = bytes.clone();
        kind[1] = 9;
        assert!(refused(&kind, FrameKind::Heartbeat, "pi", &node.public()).contains("unknown kind 9"));

        let lease = Frame::lease(1, 42).seal("pi", &other);
        assert_eq!(Frame::open(&lease, FrameKind::Lease, "pi", &other.public()), Ok(Frame::lease(1, 42)));
    }
}
