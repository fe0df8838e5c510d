//! The MQTT wire protocol between hub and agents.
//!
//! Topics live under `edge/v1/nodes/<node>/<channel>`. Every payload is an
//! envelope:
//!
//! ```json
//! {"v":1,"kind":"desired","from":"hub","gen":7,"body":{...},"sig":"<hex>"}
//! ```
//!
//! `v` is the envelope schema version: a receiver refuses any other version
//! with a clear error instead of misreading it. `gen` is the generation the
//! message speaks for (the node's desired-state generation, or the one an
//! agent has observed). `sig` is an Ed25519 signature by the sender over the
//! kind, sender, generation and the exact body bytes, so the body is carried
//! verbatim (never re-serialized) between signing and verifying.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::keys::{PublicKey, SigningKey};
use crate::model::{InstanceStatus, NodeFacts, WorkloadSpec};
use crate::seal::{KemPublicKey, Sealed};

/// The envelope schema version this build speaks.
pub const VERSION: u32 = 1;

/// The topic root. A broker may carry other traffic; we only touch this subtree.
pub const ROOT: &str = "edge/v1/nodes";

/// 4 MiB: room for the desired state of a node running a thousand workloads,
/// far below what would strain a small device's memory.
pub const MAX_PAYLOAD: usize = 4 << 20;

/// The sender name the hub signs as.
pub const HUB: &str = "hub";

/// The channels under a node's topic, and who sends on each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// hub → agent, retained, QoS 1: the node's desired state.
    Desired,
    /// hub → agent: the answer to a join.
    Welcome,
    /// hub → agent: requests such as log reads.
    Request,
    /// agent → hub: identity and facts, sent on every connect.
    Join,
    /// agent → hub, retained, QoS 1: the full status snapshot.
    Status,
    /// agent → hub, QoS 0: liveness, signed like everything a node sends.
    Heartbeat,
    /// agent → hub, retained: online; the broker publishes the Last Will (offline).
    Presence,
    /// agent → hub: answers to requests (log chunks).
    Response,
}

impl Channel {
    pub const ALL: [Channel; 8] = [
        Channel::Desired,
        Channel::Welcome,
        Channel::Request,
        Channel::Join,
        Channel::Status,
        Channel::Heartbeat,
        Channel::Presence,
        Channel::Response,
    ];

    pub fn segment(self) -> &'static str {
        match self {
            Channel::Desired => "desired",
            Channel::Welcome => "welcome",
            Channel::Request => "req",
            Channel::Join => "join",
            Channel::Status => "status",
            Channel::Heartbeat => "hb",
            Channel::Presence => "presence",
            Channel::Response => "resp",
        }
    }

    /// The envelope kind a message on this channel must have.
    pub fn kind(self) -> Kind {
        match self {
            Channel::Desired => Kind::Desired,
            Channel::Welcome => Kind::Welcome,
            Channel::Request => Kind::Request,
            Channel::Join => Kind::Join,
            Channel::Status => Kind::Status,
            Channel::Heartbeat => Kind::Heartbeat,
            Channel::Presence => Kind::Presence,
            Channel::Response => Kind::Response,
        }
    }

    pub fn from_agent(self) -> bool {
        matches!(self, Channel::Join | Channel::Status | Channel::Heartbeat | Channel::Presence | Channel::Response)
    }
}

pub fn topic(node: &str, channel: Channel) -> String {
    format!("{ROOT}/{node}/{}", channel.segment())
}

/// Splits `edge/v1/nodes/<node>/<channel>`; `None` for anything else.
pub fn parse_topic(t: &str) -> Option<(&str, Channel)> {
    let rest = t.strip_prefix(ROOT)?.strip_prefix('/')?;
    let (node, seg) = rest.split_once('/')?;
    if node.is_empty() || seg.contains('/') {
        return None;
    }
    let ch = Channel::ALL.into_iter().find(|c| c.segment() == seg)?;
    Some((node, ch))
}

/// The filters the hub subscribes to: every agent → hub channel of every
/// node, and the desired-state channel (to restore it if another client
/// overwrites it).
pub fn hub_filters() -> Vec<String> {
    Channel::ALL.into_iter().filter(|c| c.from_agent() || *c == Channel::Desired).map(|c| topic("+", c)).collect()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Desired,
    Welcome,
    Request,
    Join,
    Status,
    Heartbeat,
    Presence,
    Response,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Desired => "desired",
            Kind::Welcome => "welcome",
            Kind::Request => "request",
            Kind::Join => "join",
            Kind::Status => "status",
            Kind::Heartbeat => "heartbeat",
            Kind::Presence => "presence",
            Kind::Response => "response",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("payload is not a JSON envelope: {0}")]
    NotJson(serde_json::Error),
    #[error("envelope has no version field \"v\"")]
    NoVersion,
    #[error("unsupported envelope version {got} (this build speaks version {VERSION}); upgrade this component")]
    UnsupportedVersion { got: u64 },
    #[error("malformed envelope: {0}")]
    Malformed(serde_json::Error),
    #[error("expected a {expected} message, got {got}")]
    WrongKind { expected: Kind, got: Kind },
    #[error("{kind} message claims to be from {claimed:?} but arrived on the topic of {topic:?}")]
    WrongSender { kind: Kind, claimed: String, topic: String },
    #[error("{kind} message from {from:?} is not signed")]
    Unsigned { kind: Kind, from: String },
    #[error("{kind} message from {from:?} has an invalid signature")]
    BadSignature { kind: Kind, from: String },
    #[error("malformed {kind} body: {source}")]
    Body { kind: Kind, source: serde_json::Error },
    #[error("could not encode a {kind} body: {source}")]
    Encode { kind: Kind, source: serde_json::Error },
}

#[derive(Serialize, Deserialize)]
struct Raw {
    v: u32,
    kind: Kind,
    from: String,
    #[serde(rename = "gen")]
    generation: u64,
    body: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
}

fn signing_bytes(kind: Kind, from: &str, generation: u64, body: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 64);
    m.extend_from_slice(b"edge-wire-v1\0");
    m.extend_from_slice(kind.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(from.as_bytes());
    m.push(0);
    m.extend_from_slice(generation.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(body.as_bytes());
    m
}

/// Builds an envelope; signs it when a key is given.
pub fn seal<T: Serialize>(
    kind: Kind,
    from: &str,
    generation: u64,
    body: &T,
    key: Option<&SigningKey>,
) -> Result<Vec<u8>, WireError> {
    let body = serde_json::to_string(body).map_err(|source| WireError::Encode { kind, source })?;
    let sig = key.map(|k| crate::hex::encode(&k.sign(&signing_bytes(kind, from, generation, &body))));
    let body = RawValue::from_string(body).map_err(|source| WireError::Encode { kind, source })?;
    let raw = Raw { v: VERSION, kind, from: from.to_string(), generation, body, sig };
    serde_json::to_vec(&raw).map_err(|source| WireError::Encode { kind, source })
}

/// A parsed envelope whose signature has not been checked yet.
#[derive(Debug)]
pub struct Opened {
    pub kind: Kind,
    pub from: String,
    pub generation: u64,
    body: Box<RawValue>,
    sig: Option<String>,
}

/// Parses an envelope, refusing oversized payloads and unknown versions first.
pub fn open(payload: &[u8]) -> Result<Opened, WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLarge(payload.len()));
    }
    #[derive(Deserialize)]
    struct Head {
        v: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(payload).map_err(WireError::NotJson)?;
    match head.v {
        None => return Err(WireError::NoVersion),
        Some(v) if v.as_u64() == Some(VERSION as u64) => {}
        Some(v) => return Err(WireError::UnsupportedVersion { got: v.as_u64().unwrap_or(0) }),
    }
    let raw: Raw = serde_json::from_slice(payload).map_err(WireError::Malformed)?;
    Ok(Opened { kind: raw.kind, from: raw.from, generation: raw.generation, body: raw.body, sig: raw.sig })
}

impl Opened {
    /// Checks the kind against what the channel carries.
    pub fn expect(&self, kind: Kind) -> Result<&Self, WireError> {
        if self.kind != kind {
            return Err(WireError::WrongKind { expected: kind, got: self.kind });
        }
        Ok(self)
    }

    /// Checks that the claimed sender is who the topic says it is.
    pub fn expect_from(&self, who: &str) -> Result<&Self, WireError> {
        if self.from != who {
            return Err(WireError::WrongSender { kind: self.kind, claimed: self.from.clone(), topic: who.to_string() });
        }
        Ok(self)
    }

    pub fn verify(&self, key: &PublicKey) -> Result<&Self, WireError> {
        let Some(sig) = &self.sig else {
            return Err(WireError::Unsigned { kind: self.kind, from: self.from.clone() });
        };
        let bad = || WireError::BadSignature { kind: self.kind, from: self.from.clone() };
        let sig = crate::hex::decode(sig).ok_or_else(bad)?;
        if key.verify(&signing_bytes(self.kind, &self.from, self.generation, self.body.get()), &sig) {
            Ok(self)
        } else {
            Err(bad())
        }
    }

    pub fn body<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        serde_json::from_str(self.body.get()).map_err(|source| WireError::Body { kind: self.kind, source })
    }
}

/// agent → hub on every connect: who it is, what it has, and (before it has
/// its own credential) the bootstrap token it enrols with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Join {
    pub node: String,
    /// The node's signing key; the join is signed with it.
    pub key: PublicKey,
    /// The node's X25519 key: what the hub seals its credential and secrets to.
    pub kem: KemPublicKey,
    /// `<id>.<secret>` of a bootstrap token (see [`crate::token`]); only
    /// while the node has no credential of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Increases at every agent start; orders messages across restarts.
    pub session: u64,
    /// The generation of the desired state the agent holds.
    #[serde(default)]
    pub observed_generation: u64,
    pub facts: NodeFacts,
}

/// hub → agent: the answer to a join, signed by the hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Welcome {
    pub node: String,
    /// The node key this answer is for, so an answer meant for another
    /// process claiming the same name is ignored.
    pub node_key: PublicKey,
    pub accepted: bool,
    /// Enrolment waits for `edgectl approve node`; the agent asks again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pending: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub hub_key: PublicKey,
    /// Where the agent fetches artifacts: `https://host:port`.
    pub api_url: String,
    pub heartbeat_ms: u64,
    /// The hub's clock when it answered: the node judges the expiry of the
    /// hub's requests, and dates its own, in the hub's time (devices without
    /// a real-time clock often have the wrong time).
    #[serde(default)]
    pub hub_time_ms: u64,
    /// The node's own MQTT password, sealed to its X25519 key
    /// ([`crate::seal::credential_info`]): sent at enrolment and when renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Sealed>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One replica of a workload placed on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Assignment {
    pub workload: String,
    pub replica: u32,
    pub uid: String,
    pub generation: u64,
    pub spec: WorkloadSpec,
    /// The values of the secrets `spec` uses, each sealed to this node's key
    /// ([`crate::seal::secret_info`]): only this node can open them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub secrets: std::collections::BTreeMap<String, SealedSecret>,
}

/// One secret's values (a JSON object of key → value), sealed to a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SealedSecret {
    pub version: u64,
    pub sealed: Sealed,
}

impl Assignment {
    /// The agent's key for this replica: `<workload>.<replica>`.
    pub fn key(&self) -> String {
        instance_key(&self.workload, self.replica)
    }
}

pub fn instance_key(workload: &str, replica: u32) -> String {
    format!("{workload}.{replica}")
}

/// hub → agent: everything this node should run. Its generation is in the envelope.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeDesired {
    pub node: String,
    pub workloads: Vec<Assignment>,
}

impl NodeDesired {
    /// The shortest fence among the replicas assigned here: how old the
    /// node's lease may grow before it stops one. None when no replica is
    /// fenced. With the hub's interval it sets how often the node sends
    /// heartbeats ([`crate::lease::heartbeat_interval`]); hub and agent
    /// both derive it from this document.
    pub fn fence(&self) -> Option<crate::model::Millis> {
        self.workloads.iter().filter_map(|a| a.spec.node_loss.fence()).min()
    }
}

/// agent → hub: everything the node runs, as a full snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node: String,
    pub session: u64,
    /// Increases with every snapshot in a session.
    pub seq: u64,
    pub observed_generation: u64,
    pub instances: Vec<InstanceStatus>,
    /// Files (components, compiled code) that failed their check when the
    /// agent read them, and were deleted, since it started.
    #[serde(default, skip_serializing_if = "crate::wire::is_zero")]
    pub corrupt_files: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub session: u64,
    pub seq: u64,
    pub observed_generation: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub online: bool,
    pub session: u64,
    /// Counts the agent's connections within a session. A connection's
    /// Last Will (offline) carries its number, so a will the broker
    /// delivers late, after the agent reconnected, is older than the new
    /// connection's "online" and is ignored.
    #[serde(default)]
    pub conn: u64,
}

/// hub → agent requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Send the log of a replica; with `follow`, keep sending until the lease
    /// runs out or is cancelled. `id` is a random nonce: an agent serves a
    /// request once, and only before `expires_ms` (hub time).
    Logs {
        id: String,
        workload: String,
        replica: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<u64>,
        follow: bool,
        lease_ms: u64,
        expires_ms: u64,
    },
    /// Extends a follow lease while the reader is still there.
    Renew {
        id: String,
        lease_ms: u64,
        expires_ms: u64,
    },
    Cancel {
        id: String,
    },
    /// Acknowledges the node's heartbeat `seq` of `session`: its lease runs
    /// from when it sent that heartbeat (see [`crate::lease`]). A replay
    /// can only give an older lease.
    Lease {
        node: String,
        session: u64,
        seq: u64,
    },
}

/// agent → hub: a piece of an answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: String,
    pub seq: u64,
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub eof: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What an agent signs to download an artifact from the hub API: its name,
/// the request path, when it signed (hub time, ms) and a random nonce
/// (`Authorization: EdgeNode <node> <time_ms>.<nonce> <signature>`). The hub
/// accepts a signature once, and only within a minute of its time.
pub fn artifact_fetch_message(node: &str, path: &str, time_ms: u64, nonce: &str) -> Vec<u8> {
    let mut m = b"edge-fetch-v2\0".to_vec();
    for part in [node, path, &time_ms.to_string(), nonce] {
        m.extend_from_slice(part.as_bytes());
        m.push(0);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_reject_strangers() {
        for ch in Channel::ALL {
            let t = topic("pi-1", ch);
            assert_eq!(parse_topic(&t), Some(("pi-1", ch)));
        }
        for bad in [
            "edge/v1/nodes/pi-1",
            "edge/v1/nodes//status",
            "edge/v1/nodes/a/b/status",
            "other/pi-1/status",
            "edge/v1/nodes/pi-1/nope",
        ] {
            assert_eq!(parse_topic(bad), None, "{bad}");
        }
        assert!(hub_filters().contains(&"edge/v1/nodes/+/status".to_string()));
        assert!(hub_filters().contains(&"edge/v1/nodes/+/desired".to_string()));
        assert!(!hub_filters().contains(&"edge/v1/nodes/+/welcome".to_string()));
    }

    #[test]
    fn sealed_envelopes_open_and_verify() {
        let key = SigningKey::generate().unwrap();
        let body = Presence { online: true, session: 3, conn: 1 };
        let bytes = seal(Kind::Presence, "pi-1", 9, &body, Some(&key)).unwrap();
        let o = open(&bytes).unwrap();
        o.expect(Kind::Presence).unwrap().expect_from("pi-1").unwrap().verify(&key.public()).unwrap();
        assert_eq!(o.generation, 9);
        assert_eq!(o.body::<Presence>().unwrap(), body);
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = SigningKey::generate().unwrap();
        let bytes = seal(Kind::Desired, HUB, 2, &NodeDesired::default(), Some(&key)).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        for tampered in [text.replace("\"gen\":2", "\"gen\":3"), text.replace("\"node\":\"\"", "\"node\":\"x\"")] {
            let o = open(tampered.as_bytes()).unwrap();
            assert!(matches!(o.verify(&key.public()), Err(WireError::BadSignature { .. })), "{tampered}");
        }
        let other = SigningKey::generate().unwrap();
        assert!(open(text.as_bytes()).unwrap().verify(&other.public()).is_err());
        let unsigned = seal(Kind::Desired, HUB, 2, &NodeDesired::default(), None).unwrap();
        assert!(matches!(open(&unsigned).unwrap().verify(&key.public()), Err(WireError::Unsigned { .. })));
    }

    #[test]
    fn bad_payloads_get_specific_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not a JSON envelope"),
            (b"{}", "no version"),
            (br#"{"v":2,"anything":"else"}"#, "unsupported envelope version 2"),
            (br#"{"v":1,"kind":"desired"}"#, "malformed envelope"),
            (br#"{"v":1,"kind":"teleport","from":"x","gen":0,"body":{}}"#, "malformed envelope"),
        ];
        for (payload, want) in cases {
            let e = open(payload).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let huge = vec![b' '; MAX_PAYLOAD + 1];
        assert!(matches!(open(&huge), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn wrong_kind_sender_and_body_are_refused() {
        let bytes = seal(Kind::Status, "pi-1", 0, &serde_json::json!({"x": 1}), None).unwrap();
        let o = open(&bytes).unwrap();
        assert!(matches!(o.expect(Kind::Desired), Err(WireError::WrongKind { .. })));
        assert!(matches!(o.expect_from("pi-2"), Err(WireError::WrongSender { .. })));
        assert!(matches!(o.body::<NodeStatus>(), Err(WireError::Body { .. })));
    }

    #[test]
    fn requests_are_tagged_by_op() {
        let r = Request::Cancel { id: "7".into() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"op":"cancel","id":"7"}"#);
    }
}
