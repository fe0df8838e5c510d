//! The agent's side of the protocol as a state machine that never touches
//! the network or the disk: each input (a CONNACK, a message, a failed
//! connection, a tick, a new status) returns the effects to perform, in
//! order. [`super::connection`] performs them; tests drive it with tables.
//!
//! Architecture invariant: the machine acts only on what the pinned hub key
//! signed (before enrolment: on a welcome whose key the join token pins),
//! never on a desired state older than the one kept on disk, and on each
//! request of the hub once, before it expires. Nothing is sent before the
//! hub's welcome but the join.

use std::time::{Duration, Instant};

use edge_api::frame::{Frame, FrameKind};
use edge_api::keys::{PublicKey, SigningKey};
use edge_api::lease::heartbeat_interval;
use edge_api::model::Millis;
use edge_api::model::NodeFacts;
use edge_api::seal::KemKeyPair;
use edge_api::token::JoinToken;
use edge_api::wire::{self, Channel, Join, Kind, NodeDesired, NodeStatus, Presence, Request, Welcome};

use crate::supervisor::Snapshot;

/// Heartbeats before the hub says how often it wants them.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Logins refused, or connections closed by the broker before it accepted
/// the login, in a row, that an agent which never enrolled takes as a
/// refused join token (one refusal may be a hub still registering it).
pub const LOGIN_CLOSURES: u32 = 3;

/// How often an agent asks again to join while the hub has not answered.
pub const JOIN_RETRY: Duration = Duration::from_secs(3);

/// How often an agent waiting for approval asks again.
pub const PENDING_RETRY: Duration = Duration::from_secs(10);

/// Longest follow lease the hub may ask for.
const MAX_LEASE: Duration = Duration::from_secs(600);

/// Heartbeats whose send time is kept for their acknowledgement.
const HEARTBEATS_REMEMBERED: usize = 64;

/// What the machine reads of the node: its identity, and what it knows of
/// its enrolment (changed only by the effects the machine asks for).
pub trait Node: Send + Sync {
    fn name(&self) -> &str;
    /// Increases at every agent start.
    fn session(&self) -> u64;
    fn key(&self) -> &SigningKey;
    fn kem(&self) -> &KemKeyPair;
    fn facts(&self) -> &NodeFacts;
    fn hub_key(&self) -> Option<PublicKey>;
    fn api_url(&self) -> Option<String>;
    fn join_token(&self) -> Option<JoinToken>;
    /// Now, by the hub's clock (as of the last welcome).
    fn hub_now_ms(&self) -> u64;
}

/// How the agent logs in to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginKind {
    /// As itself, with the credential the hub issued.
    Node,
    /// With a bootstrap token, to enrol.
    Bootstrap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
}

/// How a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// The broker refused the login (bad user name or password, not authorized).
    Refused,
    /// The broker closed the connection before accepting the login.
    ClosedAtLogin,
    /// Anything else (network, timeout, protocol).
    Other,
}

/// What the driver must do, in order. When one that writes to disk fails,
/// the rest of the batch is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Subscribe(Vec<String>),
    Publish(Publish),
    /// Keep the document (durably) and hand it to the supervisor, then
    /// call [`Machine::kept`].
    Desired {
        generation: u64,
        payload: Vec<u8>,
        doc: NodeDesired,
    },
    /// The hub's clock, from its welcome.
    HubTime(u64),
    /// The hub heard the heartbeat sent at this instant: the lease runs from it.
    Lease(Instant),
    /// Pin the hub's key and remember its API (durably).
    Enrolled {
        hub_key: PublicKey,
        api_url: String,
    },
    /// Keep this node's own credential (durably) and forget the join token.
    Credential(String),
    /// Forget the credential the broker refused.
    ClearCredential,
    /// End this connection and log in again (with what is kept now).
    Relogin,
    /// This agent cannot go on; the message says why.
    Fatal(String),
    OpenLogs {
        id: String,
        instance: String,
        tail: Option<u64>,
        follow: bool,
        lease: Duration,
    },
    RenewLogs {
        id: String,
        lease: Duration,
    },
    CancelLogs {
        id: String,
    },
}

pub struct Machine<N: Node + ?Sized> {
    node: std::sync::Arc<N>,
    /// The generation of the desired state kept on disk.
    generation: u64,
    /// A desired state that came before the hub key was pinned.
    stashed_desired: Option<Vec<u8>>,
    status_seq: u64,
    hb_seq: u64,
    /// When the last heartbeats were sent, for the hub's acknowledgements.
    hb_sent: std::collections::VecDeque<(u64, Instant)>,
    /// The hub's interval, from its welcome.
    base_heartbeat: Duration,
    /// The shortest fence of the replicas in the desired state held.
    fence: Option<Millis>,
    heartbeat: Duration,
    heartbeat_changed: bool,
    /// Request ids already served (each is a nonce), until they expire.
    nonces: edge_api::nonce::NonceCache,
    // Per connection.
    login: LoginKind,
    connected: bool,
    /// The number of the current connection (see `Presence::conn`).
    conn: u64,
    welcomed: bool,
    pending: bool,
    last_join: Option<Instant>,
    failures: u32,
    closed_at_login: u32,
    /// Logins refused (or closed before any answer) in a row.
    refused_in_a_row: u32,
    /// What the last input's welcome changed, to undo if its effects could
    /// not be kept (see [`Machine::batch_failed`]).
    undo_welcome: Option<Option<Vec<u8>>>,
}

impl<N: Node + ?Sized> Machine<N> {
    /// `fence`: that of the desired state of `generation` (held on disk).
    pub fn new(node: std::sync::Arc<N>, generation: u64, fence: Option<Millis>) -> Self {
        let mut m = Machine {
            node,
            generation,
            stashed_desired: None,
            status_seq: 0,
            hb_seq: 0,
            hb_sent: std::collections::VecDeque::new(),
            base_heartbeat: DEFAULT_HEARTBEAT,
            fence,
            heartbeat: DEFAULT_HEARTBEAT,
            heartbeat_changed: false,
            nonces: edge_api::nonce::NonceCache::with_capacity(4096),
            login: LoginKind::Bootstrap,
            connected: false,
            conn: 0,
            welcomed: false,
            pending: false,
            last_join: None,
            failures: 0,
            closed_at_login: 0,
            refused_in_a_row: 0,
            undo_welcome: None,
        };
        m.pace();
        m.heartbeat_changed = false;
        m
    }

    /// Sets how often heartbeats go: the hub's interval, or often enough to
    /// renew the lease of the fenced replicas held ([`heartbeat_interval`]).
    fn pace(&mut self) {
        let base = Millis(self.base_heartbeat.as_millis() as u64);
        let hb = Duration::from_millis(heartbeat_interval(base, self.fence).0);
        if hb != self.heartbeat {
            self.heartbeat = hb;
            self.heartbeat_changed = true;
        }
    }

    /// The driver could not perform all the effects of the last input (a
    /// write failed): a welcome they announced did not happen, so the agent
    /// keeps asking to join, and what waited for it waits again.
    pub fn batch_failed(&mut self) {
        if let Some(stash) = self.undo_welcome.take() {
            self.welcomed = false;
            if stash.is_some() {
                self.stashed_desired = stash;
            }
        }
    }

    /// How often to send heartbeats.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Whether the heartbeat interval changed since the last call.
    pub fn take_heartbeat_changed(&mut self) -> bool {
        std::mem::take(&mut self.heartbeat_changed)
    }

    pub fn welcomed(&self) -> bool {
        self.welcomed
    }

    /// The desired state of `generation`, whose shortest fence is `fence`,
    /// is kept and handed over.
    pub fn kept(&mut self, generation: u64, fence: Option<Millis>) {
        if generation >= self.generation {
            self.generation = generation;
            self.fence = fence;
            self.pace();
        }
    }

    fn seal<T: serde::Serialize>(&self, kind: Kind, generation: u64, body: &T) -> Option<Vec<u8>> {
        match wire::seal(kind, self.node.name(), generation, body, Some(self.node.key())) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!("cannot encode {kind}: {e}");
                None
            }
        }
    }

    fn publish<T: serde::Serialize>(
        &self,
        out: &mut Vec<Effect>,
        channel: Channel,
        generation: u64,
        body: &T,
        qos: Qos,
        retain: bool,
    ) {
        if let Some(payload) = self.seal(channel.kind(), generation, body) {
            out.push(Effect::Publish(Publish { topic: wire::topic(self.node.name(), channel), payload, qos, retain }));
        }
    }

    /// The presence of this connection, signed: `online`, or the "offline"
    /// the driver also registers as the connection's Last Will.
    pub fn presence(&self, conn: u64, online: bool) -> Option<Vec<u8>> {
        self.seal(Kind::Presence, 0, &Presence { online, session: self.node.session(), conn })
    }

    /// A new connection is being made.
    pub fn connecting(&mut self, login: LoginKind) {
        self.login = login;
        self.connected = false;
        self.welcomed = false;
        self.failures = 0;
        self.closed_at_login = 0;
        self.refused_in_a_row = 0;
    }

    /// Asks to join. Nothing else is sent until the hub's welcome arrives:
    /// brokers need not keep order across topics, and the hub refuses
    /// presence and status from a node it has not registered yet.
    fn join(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let n = &self.node;
        let join = Join {
            node: n.name().to_string(),
            key: n.key().public(),
            kem: n.kem().public(),
            token: match self.login {
                LoginKind::Bootstrap => n.join_token().map(|t| t.presented()),
                LoginKind::Node => None,
            },
            session: n.session(),
            observed_generation: self.generation,
            facts: n.facts().clone(),
        };
        self.publish(out, Channel::Join, 0, &join, Qos::AtLeastOnce, false);
        self.last_join = Some(now);
    }

    /// The broker accepted connection number `conn`.
    pub fn on_connack(&mut self, conn: u64, now: Instant) -> Vec<Effect> {
        if self.failures > 0 {
            tracing::info!("reconnected");
        } else {
            tracing::info!("connected");
        }
        self.connected = true;
        self.conn = conn;
        self.failures = 0;
        self.closed_at_login = 0;
        self.refused_in_a_row = 0;
        self.welcomed = false;
        // Subscriptions do not survive a reconnect (clean session).
        let channels: &[Channel] = match self.login {
            LoginKind::Node => &[Channel::Desired, Channel::Welcome, Channel::Request],
            LoginKind::Bootstrap => &[Channel::Welcome],
        };
        let mut out = vec![Effect::Subscribe(channels.iter().map(|c| wire::topic(self.node.name(), *c)).collect())];
        self.join(now, &mut out);
        out
    }

    /// A connection failed (or could not be made).
    /// `detail` is the connection's own error, for the log.
    pub fn on_link_error(&mut self, e: &LinkError, detail: &str) -> Vec<Effect> {
        self.connected = false;
        self.welcomed = false;
        self.failures += 1;
        // Brokers without a refusal code just close the connection before
        // any CONNACK; several such closures in a row mean the same.
        self.closed_at_login = if *e == LinkError::ClosedAtLogin { self.closed_at_login + 1 } else { 0 };
        let refused = *e == LinkError::Refused || self.closed_at_login >= LOGIN_CLOSURES;
        self.refused_in_a_row = if *e == LinkError::Other { 0 } else { self.refused_in_a_row + 1 };
        let loud = self.failures == 1 || self.failures.is_multiple_of(30);
        let mut out = Vec::new();
        match self.login {
            LoginKind::Node if refused => {
                if self.node.join_token().is_some() {
                    tracing::warn!("the broker refused this node's credential; enrolling again with the join token");
                    out.push(Effect::ClearCredential);
                    out.push(Effect::Relogin);
                } else if loud {
                    tracing::error!(
                        "the broker refuses this node's credential (was the node deleted from the hub?); running from local state. To enrol again, restart with a new join token"
                    );
                }
            }
            // Not at the first refusal: a hub that has just started may
            // still be registering its join tokens with an external broker.
            LoginKind::Bootstrap if self.refused_in_a_row >= LOGIN_CLOSURES && self.node.hub_key().is_none() => out.push(Effect::Fatal(
                "the broker refused the join token (unknown, expired or revoked): check --join-token-file, or make a new one with `edgectl token create`".into(),
            )),
            _ => {}
        }
        if loud {
            tracing::warn!("mqtt connection failed ({}x): {detail}; running from local state", self.failures);
        }
        out
    }

    /// A message on one of this node's topics. `Err` says why it was refused.
    pub fn on_publish(&mut self, topic: &str, payload: &[u8], status: &Snapshot) -> Result<Vec<Effect>, String> {
        self.undo_welcome = None;
        let mut out = Vec::new();
        match wire::parse_topic(topic) {
            Some((node, ch)) if node == self.node.name() => match ch {
                Channel::Desired => self.on_desired(payload, &mut out)?,
                Channel::Welcome => self.on_welcome(payload, status, &mut out)?,
                Channel::Request => self.on_request(payload, &mut out)?,
                _ => {}
            },
            _ => return Err("not one of this node's topics".into()),
        }
        Ok(out)
    }

    fn on_desired(&mut self, payload: &[u8], out: &mut Vec<Effect>) -> Result<(), String> {
        let Some((generation, doc)) = verify_desired(&*self.node, payload)? else {
            // Not enrolled yet: keep it until the welcome pins the hub key.
            self.stashed_desired = Some(payload.to_vec());
            return Ok(());
        };
        if generation <= self.generation {
            tracing::debug!(generation, have = self.generation, "desired state is not newer; ignored");
            return Ok(());
        }
        out.push(Effect::Desired { generation, payload: payload.to_vec(), doc });
        Ok(())
    }

    fn on_welcome(&mut self, payload: &[u8], status: &Snapshot, out: &mut Vec<Effect>) -> Result<(), String> {
        let env = wire::open(payload).map_err(|e| e.to_string())?;
        env.expect(Kind::Welcome).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
        let w: Welcome = env.body().map_err(|e| e.to_string())?;
        if w.node_key != self.node.key().public() {
            return Ok(()); // an answer to another agent claiming this name
        }
        let key = match (self.node.hub_key(), self.node.join_token()) {
            (Some(k), _) => k,
            (None, Some(t)) if t.pins(&w.hub_key) => w.hub_key,
            (None, t) => {
                return Err(format!(
                    "the hub's key ({}) does not match the join token's fingerprint ({}): wrong hub, or a token from another hub",
                    w.hub_key.fingerprint(),
                    t.map(|t| t.fingerprint).unwrap_or_default()
                ));
            }
        };
        env.verify(&key).map_err(|e| e.to_string())?;
        if w.hub_time_ms > 0 {
            out.push(Effect::HubTime(w.hub_time_ms));
        }
        if w.pending {
            if !self.pending {
                tracing::warn!(
                    node = self.node.name(),
                    "enrolment waits for approval: run `edgectl approve node {}` on the hub",
                    self.node.name()
                );
            }
            self.pending = true;
            return Ok(());
        }
        if !w.accepted {
            let why = w.error.unwrap_or_else(|| "no reason given".into());
            if self.node.hub_key().is_none() {
                out.push(Effect::Fatal(format!("the hub refused to enrol this agent: {why}")));
            } else {
                tracing::warn!("the hub refused this agent: {why}");
            }
            return Ok(());
        }
        self.pending = false;
        if let Some(sealed) = &w.credential {
            let info = edge_api::seal::credential_info(self.node.name());
            let opened = self.node.kem().open(&info, sealed).map_err(|e| e.to_string());
            let cred = match opened.and_then(|c| String::from_utf8(c).map_err(|_| "it is not text".to_string())) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("rejected the credential in the hub's welcome: {e}");
                    return Ok(());
                }
            };
            tracing::info!(hub = %key.fingerprint(), "enrolled; logging in with this node's own credential");
            out.push(Effect::Enrolled { hub_key: key, api_url: w.api_url });
            out.push(Effect::Credential(cred));
            out.push(Effect::Relogin);
            return Ok(());
        }
        if self.node.hub_key().is_none() || self.node.api_url().as_deref() != Some(w.api_url.as_str()) {
            tracing::info!(hub = %key.fingerprint(), api = %w.api_url, "enrolled with the hub");
            out.push(Effect::Enrolled { hub_key: key, api_url: w.api_url.clone() });
        }
        self.base_heartbeat = Duration::from_millis(w.heartbeat_ms.clamp(500, 300_000));
        self.pace();
        if self.welcomed {
            return Ok(());
        }
        self.welcomed = true;
        self.undo_welcome = Some(self.stashed_desired.clone());
        // Presence (retained) and the full status, then what waited for the key.
        if let Some(p) = self.presence(self.conn, true) {
            out.push(Effect::Publish(Publish {
                topic: wire::topic(self.node.name(), Channel::Presence),
                payload: p,
                qos: Qos::AtLeastOnce,
                retain: true,
            }));
        }
        self.status(status, out);
        if let Some(p) = self.stashed_desired.take() {
            // Verified with the key just pinned (the effects above pin it first).
            match verify_desired_with(self.node.name(), &key, &p) {
                Ok((generation, doc)) if generation > self.generation => {
                    out.push(Effect::Desired { generation, payload: p, doc })
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("rejected the desired state received before the welcome: {e}"),
            }
        }
        Ok(())
    }

    fn on_request(&mut self, payload: &[u8], out: &mut Vec<Effect>) -> Result<(), String> {
        if edge_api::frame::is_frame(payload) {
            let key = self.node.hub_key().ok_or("request before enrolment")?;
            let f = Frame::open(payload, FrameKind::Lease, self.node.name(), &key).map_err(|e| e.to_string())?;
            out.push(self.lease(self.node.name(), f.session, f.seq)?);
            return Ok(());
        }
        let env = wire::open(payload).map_err(|e| e.to_string())?;
        env.expect(Kind::Request).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
        let key = self.node.hub_key().ok_or("request before enrolment")?;
        env.verify(&key).map_err(|e| e.to_string())?;
        let now = self.node.hub_now_ms();
        let lease = |ms: u64| Duration::from_millis(ms).min(MAX_LEASE);
        out.push(match env.body::<Request>().map_err(|e| e.to_string())? {
            Request::Logs { id, workload, replica, tail, follow, lease_ms, expires_ms } => {
                self.nonces.insert(&id, expires_ms, now).map_err(|e| format!("log request {id} refused: {e}"))?;
                let instance = wire::instance_key(&workload, replica);
                Effect::OpenLogs { id, instance, tail, follow, lease: lease(lease_ms) }
            }
            Request::Renew { id, lease_ms, expires_ms } => {
                if expires_ms <= now {
                    return Err(format!("renewal of {id} refused: expired"));
                }
                Effect::RenewLogs { id, lease: lease(lease_ms) }
            }
            Request::Cancel { id } => Effect::CancelLogs { id },
            Request::Lease { node, session, seq } => self.lease(&node, session, seq)?,
        });
        Ok(())
    }

    /// The hub heard heartbeat `seq` of `session`: the lease runs from when
    /// it was sent.
    fn lease(&self, node: &str, session: u64, seq: u64) -> Result<Effect, String> {
        if node != self.node.name() || session != self.node.session() {
            return Err(format!("a lease for {node} (session {session}) is not this agent's"));
        }
        let Some(&(_, sent)) = self.hb_sent.iter().find(|(s, _)| *s == seq) else {
            return Err(format!("a lease for heartbeat {seq}, which this agent does not remember sending"));
        };
        Ok(Effect::Lease(sent))
    }

    fn status(&mut self, s: &Snapshot, out: &mut Vec<Effect>) {
        self.status_seq += 1;
        let st = NodeStatus {
            node: self.node.name().to_string(),
            session: self.node.session(),
            seq: self.status_seq,
            observed_generation: s.observed_generation,
            instances: s.instances.clone(),
            corrupt_files: s.corrupt_files,
        };
        self.publish(out, Channel::Status, s.observed_generation, &st, Qos::AtLeastOnce, true);
    }

    /// The supervisor's status changed.
    pub fn on_status(&mut self, s: &Snapshot) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.connected && self.welcomed {
            self.status(s, &mut out);
        }
        out
    }

    /// Time for a heartbeat. `stuck` when the reconcile loop has not gone
    /// round for too long: heartbeats vouch for the whole agent, so none
    /// are sent then and the hub sees the node NotReady.
    pub fn on_heartbeat_tick(&mut self, observed_generation: u64, stuck: bool, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        if !self.connected || !self.welcomed {
            return out;
        }
        if stuck {
            tracing::error!("the reconcile loop is stuck; withholding heartbeats");
            return out;
        }
        self.hb_seq += 1;
        self.hb_sent.push_back((self.hb_seq, now));
        while self.hb_sent.len() > HEARTBEATS_REMEMBERED {
            self.hb_sent.pop_front();
        }
        // A compact frame (sent all the time), signed like everything else:
        // only this node can vouch for its liveness.
        let frame = Frame::heartbeat(self.node.session(), self.hb_seq, observed_generation);
        out.push(Effect::Publish(Publish {
            topic: wire::topic(self.node.name(), Channel::Heartbeat),
            payload: frame.seal(self.node.name(), self.node.key()),
            qos: Qos::AtMostOnce,
            retain: false,
        }));
        out
    }

    /// The hub may not have been listening (restarting, say): ask again.
    pub fn on_join_tick(&mut self, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let wait = if self.pending { PENDING_RETRY } else { JOIN_RETRY };
        if self.connected && !self.welcomed && self.last_join.is_none_or(|t| now.duration_since(t) >= wait) {
            self.join(now, &mut out);
        }
        out
    }

    /// The agent stops: say so (retained) rather than leave it to the will.
    pub fn on_shutdown(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.connected
            && self.login == LoginKind::Node
            && let Some(p) = self.presence(self.conn, false)
        {
            out.push(Effect::Publish(Publish {
                topic: wire::topic(self.node.name(), Channel::Presence),
                payload: p,
                qos: Qos::AtLeastOnce,
                retain: true,
            }));
        }
        out
    }
}

/// Checks a desired-state envelope: kind, sender, the pinned hub key, the
/// node it is for. `None` when no hub key is pinned yet.
pub fn verify_desired(node: &(impl Node + ?Sized), payload: &[u8]) -> Result<Option<(u64, NodeDesired)>, String> {
    if payload.is_empty() {
        return Err("empty desired-state message ignored (only a signed document can change desired state)".into());
    }
    let env = wire::open(payload).map_err(|e| e.to_string())?;
    env.expect(Kind::Desired).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
    let Some(key) = node.hub_key() else { return Ok(None) };
    verify_desired_with(node.name(), &key, payload).map(Some)
}

fn verify_desired_with(node: &str, key: &PublicKey, payload: &[u8]) -> Result<(u64, NodeDesired), String> {
    let env = wire::open(payload).map_err(|e| e.to_string())?;
    env.expect(Kind::Desired).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
    env.verify(key).map_err(|e| e.to_string())?;
    let doc: NodeDesired = env.body().map_err(|e| e.to_string())?;
    if doc.node != node {
        return Err(format!("desired state for node {:?} sent to {node:?}", doc.node));
    }
    Ok((env.generation, doc))
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
