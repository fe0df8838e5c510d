//! Decoding what arrives on the nodes' topics: topic → channel, envelope,
//! kind, sender, signature, body. Pure: the caller passes the keys of
//! enrolled nodes in and acts on the typed message that comes out.
//!
//! Architecture invariant: a message reaches the hub's state only as one of
//! [`Message`]'s variants, which exist only for envelopes signed by the node
//! whose topic they came on (a join by the key it enrols), about that node.

use edge_api::frame::{Frame, FrameError, FrameKind};
use edge_api::keys::PublicKey;
use edge_api::wire::{self, Channel, Heartbeat, Join, NodeStatus, Presence, Response, WireError};

/// A message from a node, checked.
#[derive(Debug)]
pub enum Message {
    /// Something on a node's desired-state topic: the hub's own publish
    /// echoed back, or a forgery to undo (the caller compares the bytes).
    Desired {
        node: String,
    },
    /// A join, signed by the key it enrols.
    Join {
        node: String,
        join: Box<Join>,
    },
    Heartbeat {
        node: String,
        heartbeat: Heartbeat,
        /// It came as a compact frame ([`edge_api::frame`]), so its lease
        /// goes back as one; an agent of an earlier release sends JSON.
        compact: bool,
    },
    Status {
        node: String,
        status: NodeStatus,
    },
    Presence {
        node: String,
        presence: Presence,
    },
    Response {
        node: String,
        response: Response,
    },
    /// Nothing for the hub: its own channels to agents, or a cleared
    /// retained message.
    Ignored,
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("not an edge/v1 node topic")]
    NotNodeTopic,
    #[error(transparent)]
    Envelope(#[from] WireError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("node {0:?} has not joined")]
    NotJoined(String),
    #[error("{kind} for {claimed:?} sent on the topic of {node:?}")]
    WrongTopic { kind: &'static str, claimed: String, node: String },
}

/// Decodes one message; `key_of` gives an enrolled node's key.
pub fn decode(topic: &str, payload: &[u8], key_of: impl Fn(&str) -> Option<PublicKey>) -> Result<Message, IngestError> {
    let (node, channel) = wire::parse_topic(topic).ok_or(IngestError::NotNodeTopic)?;
    let node = node.to_string();
    if channel == Channel::Desired {
        return Ok(Message::Desired { node });
    }
    if !channel.from_agent() || (payload.is_empty() && matches!(channel, Channel::Status | Channel::Presence)) {
        return Ok(Message::Ignored);
    }
    if channel == Channel::Heartbeat && edge_api::frame::is_frame(payload) {
        let key = key_of(&node).ok_or_else(|| IngestError::NotJoined(node.clone()))?;
        let f = Frame::open(payload, FrameKind::Heartbeat, &node, &key)?;
        let heartbeat = Heartbeat { session: f.session, seq: f.seq, observed_generation: f.generation };
        return Ok(Message::Heartbeat { node, heartbeat, compact: true });
    }
    let env = wire::open(payload)?;
    env.expect(channel.kind())?;
    env.expect_from(&node)?;
    if channel == Channel::Join {
        let join: Join = env.body()?;
        // Self-signed: proves the sender holds the key it enrols.
        env.verify(&join.key)?;
        if join.node != node {
            return Err(IngestError::WrongTopic { kind: "join", claimed: join.node, node });
        }
        return Ok(Message::Join { node, join: Box::new(join) });
    }
    let key = key_of(&node).ok_or_else(|| IngestError::NotJoined(node.clone()))?;
    env.verify(&key)?;
    Ok(match channel {
        Channel::Heartbeat => Message::Heartbeat { heartbeat: env.body()?, node, compact: false },
        Channel::Status => {
            let status: NodeStatus = env.body()?;
            if status.node != node {
                return Err(IngestError::WrongTopic { kind: "status", claimed: status.node, node });
            }
            Message::Status { node, status }
        }
        Channel::Presence => Message::Presence { presence: env.body()?, node },
        Channel::Response => Message::Response { response: env.body()?, node },
        _ => Message::Ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::keys::SigningKey;
    use edge_api::seal::KemKeyPair;
    use edge_api::wire::Kind;

    fn seal<T: serde::Serialize>(kind: Kind, from: &str, body: &T, key: Option<&SigningKey>) -> Vec<u8> {
        wire::seal(kind, from, 0, body, key).unwrap()
    }

    fn status(node: &str) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            session: 1,
            seq: 1,
            observed_generation: 0,
            instances: vec![],
            corrupt_files: 0,
        }
    }

    #[test]
    fn only_signed_messages_of_the_topics_own_node_come_through() {
        let pi = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let pi_pub = pi.public();
        let key_of = |n: &str| (n == "pi").then_some(pi_pub);
        let hb = Heartbeat { session: 1, seq: 1, observed_generation: 0 };
        let t = |c| wire::topic("pi", c);
        let cases: Vec<(String, Vec<u8>, &str)> = vec![
            ("elsewhere/x".into(), b"{}".to_vec(), "not an edge/v1 node topic"),
            (t(Channel::Desired), b"anything".to_vec(), "Desired"),
            (t(Channel::Welcome), b"junk".to_vec(), "Ignored"),
            (t(Channel::Status), Vec::new(), "Ignored"),
            (t(Channel::Heartbeat), b"\xff".to_vec(), "not a JSON envelope"),
            (t(Channel::Heartbeat), seal(Kind::Status, "pi", &status("pi"), Some(&pi)), "expected"),
            (t(Channel::Heartbeat), seal(Kind::Heartbeat, "evil", &hb, Some(&pi)), "evil"),
            (t(Channel::Heartbeat), seal(Kind::Heartbeat, "pi", &hb, None), "is not signed"),
            (t(Channel::Heartbeat), seal(Kind::Heartbeat, "pi", &hb, Some(&other)), "invalid signature"),
            (t(Channel::Heartbeat), seal(Kind::Heartbeat, "pi", &hb, Some(&pi)), "compact: false"),
            // The compact form: the same rules.
            (t(Channel::Heartbeat), Frame::heartbeat(1, 1, 0).seal("pi", &pi), "compact: true"),
            (t(Channel::Heartbeat), Frame::heartbeat(1, 1, 0).seal("pi", &other), "invalid signature"),
            (t(Channel::Heartbeat), Frame::heartbeat(1, 1, 0).seal("pi-2", &pi), "invalid signature"),
            (t(Channel::Heartbeat), Frame::lease(1, 1).seal("pi", &pi), "expected a Heartbeat frame"),
            (t(Channel::Heartbeat), vec![edge_api::frame::FORMAT, 1, 0], "frame of 3 bytes"),
            (wire::topic("ghost", Channel::Heartbeat), Frame::heartbeat(1, 1, 0).seal("ghost", &pi), "has not joined"),
            (t(Channel::Status), seal(Kind::Status, "pi", &status("pi-2"), Some(&pi)), "status for \"pi-2\""),
            (t(Channel::Status), seal(Kind::Status, "pi", &status("pi"), Some(&pi)), "Status"),
            (
                wire::topic("ghost", Channel::Heartbeat),
                seal(Kind::Heartbeat, "ghost", &hb, Some(&other)),
                "node \"ghost\" has not joined",
            ),
        ];
        for (topic, payload, want) in cases {
            let got = match decode(&topic, &payload, key_of) {
                Ok(m) => format!("{m:?}"),
                Err(e) => e.to_string(),
            };
            assert!(got.contains(want), "{topic}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn a_join_must_be_signed_by_the_key_it_enrols_for_its_own_topic() {
        let key = SigningKey::generate().unwrap();
        let join = |node: &str, k: &SigningKey| Join {
            node: node.into(),
            key: k.public(),
            kem: KemKeyPair::generate().unwrap().public(),
            facts: crate::test_facts("arm64", 1024, &[]),
            token: None,
            session: 1,
            observed_generation: 0,
        };
        let nobody = |_: &str| None;
        let ok = seal(Kind::Join, "pi", &join("pi", &key), Some(&key));
        assert!(matches!(decode(&wire::topic("pi", Channel::Join), &ok, nobody), Ok(Message::Join { .. })));
        let other = SigningKey::generate().unwrap();
        let forged = seal(Kind::Join, "pi", &join("pi", &key), Some(&other));
        let e = decode(&wire::topic("pi", Channel::Join), &forged, nobody).unwrap_err();
        assert!(e.to_string().contains("invalid signature"), "{e}");
        let elsewhere = seal(Kind::Join, "pi", &join("pi-2", &key), Some(&key));
        let e = decode(&wire::topic("pi", Channel::Join), &elsewhere, nobody).unwrap_err();
        assert_eq!(e.to_string(), "join for \"pi-2\" sent on the topic of \"pi\"");
    }
}
