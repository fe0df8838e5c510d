//! The hub's core: state, the one mutation path, MQTT message handling and
//! the views the API serves.
//!
//! Architecture invariant: every change to durable state goes through
//! [`Hub::mutate`]: clone, edit, reconcile, persist the difference, then swap
//! the new state in and publish. A failed write leaves both memory and disk
//! as they were. The lock is never held across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edge_api::digest::Digest;
use edge_api::keys::{PublicKey, SigningKey};
use edge_api::model::{
    Event, InstanceStatus, NodeState, NodeView, Phase, ReplicaStatus, Workload, WorkloadStatus, WorkloadView,
};
use edge_api::names;
use edge_api::time::now_ms;
use edge_api::token::JoinToken;
use edge_api::wire::{self, Channel, Heartbeat, Join, Kind, NodeStatus, Presence, Request, Response, Welcome};
use tokio::sync::{mpsc, watch};

use crate::artifacts::ArtifactStore;
use crate::controller::{self, Durable, NodeRecord, ReplicaId};
use crate::metrics::Metrics;
use crate::store::{Collection, Store, StoreError};

/// Events kept per workload, newest last; older ones are dropped.
const EVENTS_PER_WORKLOAD: usize = 25;

/// At most one restore of a tampered desired state per node per second.
const RESTORE_INTERVAL: Duration = Duration::from_secs(1);

/// A node is Ready while its last heartbeat is younger than this many intervals.
const MISSED_HEARTBEATS: u32 = 3;

/// A publish for the MQTT task. Everything the hub sends is QoS 1.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// An error the API turns into a status code and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: Vec::new() }
    }
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{what} {name:?} not found"))
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(500, "Internal", e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        ApiError::new(503, "StoreUnavailable", msg)
    }
}

/// What the hub knows about a node's connection; not persisted, rebuilt
/// from what agents (re)send.
#[derive(Debug, Default, Clone)]
pub struct Live {
    /// The newest agent session seen; older messages are stale.
    pub session: u64,
    pub online: bool,
    pub last_seen: Option<Instant>,
    pub last_seen_ms: u64,
    pub status: Option<NodeStatus>,
    /// (session, seq) of the status held; a status is accepted only if newer.
    pub status_order: (u64, u64),
    pub observed_generation: u64,
}

struct Inner {
    d: Durable,
    live: HashMap<String, Live>,
    unschedulable: BTreeMap<ReplicaId, String>,
    events: HashMap<String, VecDeque<Event>>,
}

/// How a log stream reaches the HTTP reader.
#[derive(Debug)]
pub enum LogChunk {
    Data(String),
    Error(String),
}

struct LogStream {
    node: String,
    tx: mpsc::Sender<LogChunk>,
    next_seq: u64,
}

pub struct Hub {
    store: Arc<dyn Store>,
    inner: Mutex<Inner>,
    revision: watch::Sender<u64>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    key: SigningKey,
    join: JoinToken,
    admin_token: String,
    api_url: String,
    heartbeat: Duration,
    pub artifacts: ArtifactStore,
    pub metrics: Metrics,
    /// Pulls `oci://` components at apply time.
    pub registry: edge_oci::Client,
    logs: Mutex<HashMap<String, LogStream>>,
    next_id: AtomicU64,
    /// When each node's desired state was last restored after tampering, and
    /// whether another restore is waiting for the rate limit.
    restored: Mutex<HashMap<String, (Option<Instant>, bool)>>,
}

pub struct HubParts {
    /// Registries spoken to over plain HTTP (besides loopback ones).
    pub insecure_registries: Vec<String>,
    pub store: Arc<dyn Store>,
    pub key: SigningKey,
    pub join: JoinToken,
    pub admin_token: String,
    pub api_url: String,
    pub heartbeat: Duration,
    pub artifacts: ArtifactStore,
}

/// Whether a node is Ready, NotReady or Offline, and why.
pub fn node_state(live: Option<&Live>, now: Instant, heartbeat: Duration) -> (NodeState, Option<String>) {
    let Some(l) = live.filter(|l| l.online) else {
        return (NodeState::Offline, Some("disconnected".into()));
    };
    match l.last_seen {
        Some(t) if now.duration_since(t) <= heartbeat * MISSED_HEARTBEATS => (NodeState::Ready, None),
        Some(t) => (NodeState::NotReady, Some(format!("no heartbeat for {}s", now.duration_since(t).as_secs()))),
        None => (NodeState::NotReady, Some("no heartbeat yet".into())),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; the state it guards is still
    // consistent because edits are made on a clone and swapped in whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn push_event(events: &mut HashMap<String, VecDeque<Event>>, workload: &str, e: Event) {
    let q = events.entry(workload.to_string()).or_default();
    q.push_back(e);
    while q.len() > EVENTS_PER_WORKLOAD {
        q.pop_front();
    }
}

impl Hub {
    /// Loads durable state and returns the hub with the receiving end of its outbox.
    pub fn new(parts: HubParts) -> Result<(Arc<Hub>, mpsc::UnboundedReceiver<Outgoing>), StoreError> {
        let mut d = Durable::default();
        let corrupt = |key: &str, source| StoreError::Corrupt { key: key.to_string(), source };
        for (k, v) in parts.store.load(Collection::Workloads)? {
            d.workloads.insert(k.clone(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
        }
        for (k, v) in parts.store.load(Collection::Nodes)? {
            d.nodes.insert(k.clone(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
        }
        for (k, v) in parts.store.load(Collection::Meta)? {
            if k == controller::LAST_GENERATION {
                d.last_generation = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            }
        }
        for (k, v) in parts.store.load(Collection::Placements)? {
            let id = controller::parse_placement_key(&k)
                .ok_or_else(|| corrupt(&k, serde::de::Error::custom("bad placement key")))?;
            d.placements.insert(id, serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub {
            store: parts.store,
            inner: Mutex::new(Inner {
                d,
                live: HashMap::new(),
                unschedulable: BTreeMap::new(),
                events: HashMap::new(),
            }),
            revision: watch::Sender::new(0),
            outbox: tx,
            key: parts.key,
            join: parts.join,
            admin_token: parts.admin_token,
            api_url: parts.api_url,
            heartbeat: parts.heartbeat,
            artifacts: parts.artifacts,
            metrics: Metrics::default(),
            registry: edge_oci::Client::new(parts.insecure_registries).map_err(|e| StoreError::Corrupt {
                key: "tls".into(),
                source: serde::de::Error::custom(e.to_string()),
            })?,
            logs: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            restored: Mutex::new(HashMap::new()),
        };
        Ok((Arc::new(hub), rx))
    }

    pub fn admin_token_matches(&self, presented: &str) -> bool {
        edge_api::hex::ct_eq(presented.as_bytes(), self.admin_token.as_bytes())
    }

    pub fn join_token(&self) -> &JoinToken {
        &self.join
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// The key a joined node signs with, for authenticating its artifact fetches.
    pub fn node_key(&self, node: &str) -> Option<PublicKey> {
        lock(&self.inner).d.nodes.get(node).map(|n| n.key)
    }

    pub fn revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn bump(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    fn send(&self, o: Outgoing) {
        self.metrics.published.fetch_add(1, Ordering::Relaxed);
        // The receiver lives as long as the MQTT task; if it is gone the hub
        // is shutting down and the message has nowhere to go anyway.
        let _ = self.outbox.send(o);
    }

    fn publish_desired(&self, rec: &NodeRecord) {
        match wire::seal(Kind::Desired, wire::HUB, rec.desired_generation, &rec.desired, Some(&self.key)) {
            Ok(payload) => {
                self.send(Outgoing { topic: wire::topic(&rec.name, Channel::Desired), payload, retain: true })
            }
            Err(e) => tracing::error!(node = %rec.name, "cannot encode desired state: {e}"),
        }
    }

    /// The one mutation path (see the module docs).
    fn mutate<R>(
        &self,
        edit: impl FnOnce(&mut Durable, &mut Vec<(String, Event)>) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let mut inner = lock(&self.inner);
        let mut next = inner.d.clone();
        let mut events = Vec::new();
        let r = edit(&mut next, &mut events)?;
        let now = Instant::now();
        let hb = self.heartbeat;
        let live = &inner.live;
        let ready = |n: &str| node_state(live.get(n), now, hb).0 == NodeState::Ready;
        let outcome = controller::reconcile(&mut next, &ready, now_ms());
        let batch = controller::diff(&inner.d, &next).map_err(ApiError::internal)?;
        if !batch.is_empty() {
            self.store.commit(batch)?;
        }
        let removed: Vec<String> = inner.d.nodes.keys().filter(|n| !next.nodes.contains_key(*n)).cloned().collect();
        inner.d = next;
        events.extend(outcome.events);
        for (id, msg) in &outcome.unschedulable {
            if inner.unschedulable.get(id) != Some(msg) {
                events.push((
                    id.0.clone(),
                    Event {
                        ts_ms: now_ms(),
                        warning: true,
                        reason: "FailedScheduling".into(),
                        message: format!("replica {}: {msg}", id.1),
                    },
                ));
            }
        }
        inner.unschedulable = outcome.unschedulable;
        for (w, e) in events {
            push_event(&mut inner.events, &w, e);
        }
        for n in &outcome.changed_nodes {
            if let Some(rec) = inner.d.nodes.get(n) {
                self.publish_desired(rec);
            }
        }
        for n in removed {
            inner.live.remove(&n);
        }
        drop(inner);
        self.bump();
        Ok(r)
    }

    /// Re-evaluates placements (after readiness changes, say).
    pub fn reconcile(&self) -> Result<(), ApiError> {
        self.mutate(|_, _| Ok(()))
    }

    /// Creates or updates a workload; answers `created`, `configured` or `unchanged`.
    pub fn apply_workload(&self, mut w: Workload) -> Result<(&'static str, WorkloadView), ApiError> {
        if let edge_api::model::Runtime::Container(c) = &w.spec.runtime
            && (c.image.digest.is_none() || c.platforms.is_empty())
        {
            return Err(ApiError::new(
                422,
                "Invalid",
                "spec.container.image must be resolved to a digest and platforms",
            ));
        }
        if let Some(artifact) = w.spec.runtime.artifact() {
            let Some(digest) = artifact.digest().copied() else {
                return Err(ApiError::new(422, "Invalid", "spec.wasm.component must be a digest"));
            };
            self.check_artifact(&w, digest)?;
        }
        let name = w.metadata.name.clone();
        let result = self.mutate(|d, events| {
            let now = now_ms();
            let result = match d.workloads.get(&name) {
                None => {
                    w.metadata.uid = edge_api::keys::random_hex(8).map_err(ApiError::internal)?;
                    w.metadata.generation = 1;
                    w.metadata.created_ms = now;
                    events.push((
                        name.clone(),
                        Event { ts_ms: now, warning: false, reason: "Created".into(), message: "generation 1".into() },
                    ));
                    "created"
                }
                Some(old) => {
                    w.metadata.uid = old.metadata.uid.clone();
                    w.metadata.created_ms = old.metadata.created_ms;
                    w.metadata.generation = old.metadata.generation;
                    if old.spec == w.spec && old.metadata.labels == w.metadata.labels {
                        return Ok("unchanged");
                    }
                    // Where a component came from is for people; it restarts nothing.
                    if without_source(&old.spec) != without_source(&w.spec) {
                        w.metadata.generation += 1;
                        events.push((
                            name.clone(),
                            Event {
                                ts_ms: now,
                                warning: false,
                                reason: "Updated".into(),
                                message: format!("generation {}", w.metadata.generation),
                            },
                        ));
                    }
                    "configured"
                }
            };
            d.workloads.insert(name.clone(), w);
            Ok(result)
        })?;
        let view = self.workload_view(&name, true).ok_or_else(|| ApiError::not_found("workload", &name))?;
        Ok((result, view))
    }

    pub fn delete_workload(&self, name: &str) -> Result<(), ApiError> {
        self.mutate(|d, _| d.workloads.remove(name).map(|_| ()).ok_or_else(|| ApiError::not_found("workload", name)))?;
        lock(&self.inner).events.remove(name);
        Ok(())
    }

    /// Forgets a node; its replicas are placed elsewhere. The node is sent a
    /// last, empty desired state (retained) so that its agent stops them too
    /// and nothing runs twice.
    pub fn delete_node(&self, name: &str) -> Result<(), ApiError> {
        let generation = self.mutate(|d, _| {
            d.nodes.remove(name).ok_or_else(|| ApiError::not_found("node", name))?;
            Ok(d.next_generation())
        })?;
        let last = edge_api::wire::NodeDesired { node: name.to_string(), workloads: vec![] };
        match wire::seal(Kind::Desired, wire::HUB, generation, &last, Some(&self.key)) {
            Ok(payload) => self.send(Outgoing { topic: wire::topic(name, Channel::Desired), payload, retain: true }),
            Err(e) => tracing::error!(node = name, "cannot encode desired state: {e}"),
        }
        tracing::info!(node = name, "node deleted");
        Ok(())
    }

    /// Publishes every node's desired state (after (re)connecting to the broker).
    pub fn on_connected(&self) {
        let inner = lock(&self.inner);
        for rec in inner.d.nodes.values() {
            self.publish_desired(rec);
        }
    }

    /// Recomputes node readiness; reschedules when the set of ready nodes changed.
    pub fn tick(&self, last_ready: &mut Vec<String>) {
        self.restore_pending();
        let ready = {
            let inner = lock(&self.inner);
            let now = Instant::now();
            inner
                .d
                .nodes
                .keys()
                .filter(|n| node_state(inner.live.get(*n), now, self.heartbeat).0 == NodeState::Ready)
                .cloned()
                .collect::<Vec<_>>()
        };
        if ready != *last_ready {
            *last_ready = ready;
            if let Err(e) = self.reconcile() {
                tracing::warn!("reconcile after a readiness change failed: {}", e.message);
            }
        }
    }

    /// Handles one MQTT message. Anything malformed, unsigned, stale or from
    /// a stranger is logged with its reason and changes nothing.
    pub fn on_message(&self, topic: &str, payload: &[u8]) {
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        if let Err(reason) = self.handle(topic, payload) {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, "rejected message: {reason}");
        }
    }

    fn handle(&self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let (node, channel) = wire::parse_topic(topic).ok_or("not an edge/v1 node topic")?;
        if channel == Channel::Desired {
            return self.check_desired(node, payload);
        }
        if !channel.from_agent() {
            return Ok(());
        }
        if payload.is_empty() && matches!(channel, Channel::Status | Channel::Presence) {
            return Ok(()); // a cleared retained message
        }
        let env = wire::open(payload).map_err(|e| e.to_string())?;
        env.expect(channel.kind()).map_err(|e| e.to_string())?;
        env.expect_from(node).map_err(|e| e.to_string())?;
        if channel == Channel::Join {
            return self.on_join(node, &env);
        }
        let key = self.node_key(node).ok_or_else(|| format!("node {node:?} has not joined"))?;
        match channel {
            // Heartbeats are unsigned: they only refresh liveness (see wire::Channel).
            Channel::Heartbeat => {
                let hb: Heartbeat = env.body().map_err(|e| e.to_string())?;
                self.on_heartbeat(node, hb);
                Ok(())
            }
            Channel::Status => {
                env.verify(&key).map_err(|e| e.to_string())?;
                let st: NodeStatus = env.body().map_err(|e| e.to_string())?;
                if st.node != node {
                    return Err(format!("status for {:?} sent on the topic of {node:?}", st.node));
                }
                self.on_status(node, st)
            }
            Channel::Presence => {
                env.verify(&key).map_err(|e| e.to_string())?;
                let p: Presence = env.body().map_err(|e| e.to_string())?;
                self.on_presence(node, p);
                Ok(())
            }
            Channel::Response => {
                env.verify(&key).map_err(|e| e.to_string())?;
                let r: Response = env.body().map_err(|e| e.to_string())?;
                self.on_response(node, r)
            }
            _ => Ok(()),
        }
    }

    /// The retained desired state on the broker must be exactly what the hub
    /// published. Agents refuse forgeries anyway, but a forgery left in place
    /// would hide the real document from agents that (re)connect, so it is
    /// put back (at most once a second per node, so a hostile client cannot
    /// make the hub flood the broker).
    fn check_desired(&self, node: &str, payload: &[u8]) -> Result<(), String> {
        let genuine = {
            let inner = lock(&self.inner);
            match inner.d.nodes.get(node) {
                Some(rec) => {
                    wire::seal(Kind::Desired, wire::HUB, rec.desired_generation, &rec.desired, Some(&self.key))
                        .map_err(|e| e.to_string())?
                }
                None => return Ok(()), // not ours (or a deleted node's final document)
            }
        };
        if genuine == payload {
            return Ok(()); // our own publish, echoed back
        }
        self.restore(node, genuine);
        Err(format!("the desired state of {node} was overwritten by another client; restoring it"))
    }

    /// Republishes a node's desired state now, or, if it was restored less
    /// than a second ago, at the next tick after that second.
    fn restore(&self, node: &str, genuine: Vec<u8>) {
        let now = Instant::now();
        let mut restored = lock(&self.restored);
        let (last, pending) = restored.entry(node.to_string()).or_insert((None, false));
        if last.is_some_and(|t| now.duration_since(t) < RESTORE_INTERVAL) {
            *pending = true;
        } else {
            *last = Some(now);
            *pending = false;
            self.send(Outgoing { topic: wire::topic(node, Channel::Desired), payload: genuine, retain: true });
        }
    }

    /// Performs restores that were held back by the rate limit.
    fn restore_pending(&self) {
        let due: Vec<String> = {
            let now = Instant::now();
            let r = lock(&self.restored);
            r.iter()
                .filter(|(_, (last, pending))| {
                    *pending && last.is_none_or(|t| now.duration_since(t) >= RESTORE_INTERVAL)
                })
                .map(|(n, _)| n.clone())
                .collect()
        };
        for node in due {
            let genuine = {
                let inner = lock(&self.inner);
                inner.d.nodes.get(&node).and_then(|rec| {
                    wire::seal(Kind::Desired, wire::HUB, rec.desired_generation, &rec.desired, Some(&self.key)).ok()
                })
            };
            match genuine {
                Some(g) => self.restore(&node, g),
                None => {
                    lock(&self.restored).remove(&node);
                }
            }
        }
    }

    fn welcome(&self, node: &str, node_key: PublicKey, error: Option<String>) {
        let w = Welcome {
            node: node.to_string(),
            node_key,
            accepted: error.is_none(),
            error,
            hub_key: self.key.public(),
            api_url: self.api_url.clone(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
        };
        match wire::seal(Kind::Welcome, wire::HUB, 0, &w, Some(&self.key)) {
            Ok(payload) => self.send(Outgoing { topic: wire::topic(node, Channel::Welcome), payload, retain: false }),
            Err(e) => tracing::error!("cannot encode welcome: {e}"),
        }
    }

    fn on_join(&self, node: &str, env: &wire::Opened) -> Result<(), String> {
        let j: Join = env.body().map_err(|e| e.to_string())?;
        // Self-signed: proves the sender holds the key it enrols.
        env.verify(&j.key).map_err(|e| e.to_string())?;
        if j.node != node {
            return Err(format!("join for {:?} sent on the topic of {node:?}", j.node));
        }
        if let Err(e) = names::check_node_name(node) {
            self.welcome(node, j.key, Some(e.clone()));
            return Err(e);
        }
        if !self.join.verify_proof(node, &j.key, &j.proof) {
            let e = "invalid join token".to_string();
            self.welcome(node, j.key, Some(format!("{e}: check --join-token against the hub's DATA_DIR/join.token")));
            return Err(e);
        }
        if let Some(existing) = self.node_key(node)
            && existing != j.key
        {
            let e = format!(
                "node name {node:?} is already taken by another agent (key {}); delete it first with `edgectl delete node {node}` or choose another --name",
                existing.fingerprint()
            );
            self.welcome(node, j.key, Some(e.clone()));
            return Err(e);
        }
        let facts = j.facts.clone();
        let key = j.key;
        let is_new = self.node_key(node).is_none();
        {
            let mut inner = lock(&self.inner);
            let live = inner.live.entry(node.to_string()).or_default();
            if j.session >= live.session {
                live.session = j.session;
                live.online = true;
                live.last_seen = Some(Instant::now());
                live.last_seen_ms = now_ms();
            }
        }
        // Registers or refreshes the node and, now that it is ready, places
        // whatever was waiting for a node like it.
        self.mutate(|d, _| {
            let rec = d.nodes.entry(node.to_string()).or_insert_with(|| NodeRecord {
                name: node.to_string(),
                key,
                facts: facts.clone(),
                joined_ms: now_ms(),
                desired_generation: 0,
                desired: edge_api::wire::NodeDesired { node: node.to_string(), workloads: vec![] },
            });
            rec.facts = facts;
            // The agent holds a newer document than this record (the node was
            // deleted and joined again, or the hub lost it): move past it so
            // the agent accepts what comes next.
            if j.observed_generation > rec.desired_generation {
                let generation = d.next_generation().max(j.observed_generation + 1);
                d.last_generation = generation;
                if let Some(rec) = d.nodes.get_mut(node) {
                    rec.desired_generation = generation;
                }
            }
            Ok(())
        })
        .map_err(|e| e.message)?;
        if is_new {
            tracing::info!(node, arch = %j.facts.arch, "node joined");
        }
        self.welcome(node, key, None);
        // (Re)publish its desired state: a new node has none on the broker yet,
        // and an embedded broker forgets retained messages when it restarts.
        if let Some(rec) = lock(&self.inner).d.nodes.get(node) {
            self.publish_desired(rec);
        }
        Ok(())
    }

    fn on_heartbeat(&self, node: &str, hb: Heartbeat) {
        let mut inner = lock(&self.inner);
        let live = inner.live.entry(node.to_string()).or_default();
        if hb.session < live.session {
            return;
        }
        let was_ready = node_state(Some(live), Instant::now(), self.heartbeat).0 == NodeState::Ready;
        live.session = hb.session;
        live.online = true;
        live.last_seen = Some(Instant::now());
        live.last_seen_ms = now_ms();
        live.observed_generation = hb.observed_generation;
        drop(inner);
        if !was_ready {
            self.bump();
        }
    }

    fn on_presence(&self, node: &str, p: Presence) {
        let mut inner = lock(&self.inner);
        let live = inner.live.entry(node.to_string()).or_default();
        if p.session < live.session {
            return; // e.g. the last will of a session replaced by a newer one
        }
        live.session = p.session;
        live.online = p.online;
        if p.online {
            live.last_seen = Some(Instant::now());
            live.last_seen_ms = now_ms();
        }
        drop(inner);
        tracing::info!(node, online = p.online, "presence");
        self.bump();
    }

    fn on_status(&self, node: &str, st: NodeStatus) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        let Inner { d, live, events, .. } = &mut *inner;
        let l = live.entry(node.to_string()).or_default();
        if l.status.is_some() && (st.session, st.seq) <= l.status_order {
            return Err(format!(
                "stale status (session {}, seq {}; have session {}, seq {})",
                st.session, st.seq, l.status_order.0, l.status_order.1
            ));
        }
        let old = l.status.take();
        for inst in &st.instances {
            let Some(w) = d.workloads.get(&inst.workload) else { continue };
            if w.metadata.uid != inst.uid {
                continue;
            }
            let prev = old.as_ref().and_then(|o| {
                o.instances
                    .iter()
                    .find(|p| p.workload == inst.workload && p.replica == inst.replica && p.uid == inst.uid)
            });
            if let Some(e) = transition_event(node, prev, inst) {
                push_event(events, &inst.workload, e);
            }
        }
        l.status_order = (st.session, st.seq);
        if st.session >= l.session {
            l.session = st.session;
            l.online = true;
        }
        l.last_seen = Some(Instant::now());
        l.last_seen_ms = now_ms();
        l.observed_generation = st.observed_generation;
        l.status = Some(st);
        drop(inner);
        self.bump();
        Ok(())
    }

    // ---- views ----

    pub fn workload_view(&self, name: &str, with_events: bool) -> Option<WorkloadView> {
        let inner = lock(&self.inner);
        let w = inner.d.workloads.get(name)?;
        Some(self.view_of(&inner, w, with_events))
    }

    pub fn workload_views(&self) -> Vec<WorkloadView> {
        let inner = lock(&self.inner);
        inner.d.workloads.values().map(|w| self.view_of(&inner, w, false)).collect()
    }

    fn view_of(&self, inner: &Inner, w: &Workload, with_events: bool) -> WorkloadView {
        let name = &w.metadata.name;
        let now = Instant::now();
        let replicas = (0..w.spec.replicas)
            .map(|r| {
                let id = (name.clone(), r);
                let Some(node) = inner.d.placements.get(&id) else {
                    return ReplicaStatus {
                        replica: r,
                        node: None,
                        phase: Phase::Pending,
                        restarts: 0,
                        exit_code: None,
                        reason: Some("Unschedulable".into()),
                        message: inner.unschedulable.get(&id).cloned(),
                        started_ms: None,
                        finished_ms: None,
                        observed_generation: 0,
                    };
                };
                let live = inner.live.get(node);
                let inst = live.and_then(|l| l.status.as_ref()).and_then(|s| {
                    s.instances.iter().find(|i| i.workload == *name && i.replica == r && i.uid == w.metadata.uid)
                });
                let mut rs = match inst {
                    Some(i) => ReplicaStatus {
                        replica: r,
                        node: Some(node.clone()),
                        phase: i.phase,
                        restarts: i.restarts,
                        exit_code: i.exit_code,
                        reason: i.reason.clone(),
                        message: i.message.clone(),
                        started_ms: i.started_ms,
                        finished_ms: i.finished_ms,
                        observed_generation: i.generation,
                    },
                    None => ReplicaStatus {
                        replica: r,
                        node: Some(node.clone()),
                        phase: Phase::Pending,
                        restarts: 0,
                        exit_code: None,
                        reason: Some("Scheduled".into()),
                        message: Some(format!("waiting for node {node} to report")),
                        started_ms: None,
                        finished_ms: None,
                        observed_generation: 0,
                    },
                };
                let (state, _) = node_state(live, now, self.heartbeat);
                if state != NodeState::Ready {
                    let last = rs.reason.take().unwrap_or_else(|| rs.phase.to_string());
                    rs.message = Some(format!("node {node} is {state}; last reported: {last}"));
                    rs.reason = Some(format!("Node{state}"));
                }
                rs
            })
            .collect();
        WorkloadView {
            workload: w.clone(),
            status: WorkloadStatus::aggregate(w.metadata.generation, replicas),
            events: if with_events {
                inner.events.get(name).map(|q| q.iter().cloned().collect()).unwrap_or_default()
            } else {
                Vec::new()
            },
        }
    }

    pub fn node_view(&self, name: &str) -> Option<NodeView> {
        let inner = lock(&self.inner);
        let rec = inner.d.nodes.get(name)?;
        Some(self.node_view_of(&inner, rec))
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        let inner = lock(&self.inner);
        inner.d.nodes.values().map(|r| self.node_view_of(&inner, r)).collect()
    }

    fn node_view_of(&self, inner: &Inner, rec: &NodeRecord) -> NodeView {
        let live = inner.live.get(&rec.name);
        let (state, reason) = node_state(live, Instant::now(), self.heartbeat);
        NodeView {
            name: rec.name.clone(),
            state,
            reason,
            facts: rec.facts.clone(),
            key_fingerprint: rec.key.fingerprint(),
            joined_ms: rec.joined_ms,
            last_seen_ms: live.map(|l| l.last_seen_ms).unwrap_or(0),
            desired_generation: rec.desired_generation,
            observed_generation: live.map(|l| l.observed_generation).unwrap_or(0),
            allocated: inner.d.allocated(&rec.name),
            workloads: inner.d.workloads_on(&rec.name),
        }
    }

    /// Counts for the metrics endpoint: nodes by state and workloads by phase.
    pub fn gauges(&self) -> (BTreeMap<NodeState, usize>, BTreeMap<Phase, usize>) {
        let mut nodes = BTreeMap::new();
        for n in self.node_views() {
            *nodes.entry(n.state).or_insert(0) += 1;
        }
        let mut phases = BTreeMap::new();
        for w in self.workload_views() {
            *phases.entry(w.status.phase).or_insert(0) += 1;
        }
        (nodes, phases)
    }

    // ---- logs ----

    /// Asks the node running a replica for its log. The receiver yields
    /// chunks until the agent ends the stream or the reader goes away.
    pub fn open_logs(
        &self,
        workload: &str,
        replica: u32,
        tail: Option<u64>,
        follow: bool,
        lease: Duration,
    ) -> Result<(String, String, mpsc::Receiver<LogChunk>), ApiError> {
        let node = {
            let inner = lock(&self.inner);
            let w = inner.d.workloads.get(workload).ok_or_else(|| ApiError::not_found("workload", workload))?;
            if replica >= w.spec.replicas {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("workload {workload:?} has {} replica(s); there is no replica {replica}", w.spec.replicas),
                ));
            }
            let node = inner.d.placements.get(&(workload.to_string(), replica)).cloned().ok_or_else(|| {
                ApiError::new(
                    409,
                    "NotScheduled",
                    format!("replica {replica} of {workload:?} is not placed on any node yet"),
                )
            })?;
            if !inner.live.get(&node).is_some_and(|l| l.online) {
                return Err(ApiError::new(
                    503,
                    "NodeOffline",
                    format!("node {node} is offline; its logs stay on the node and can be read when it reconnects"),
                ));
            }
            node
        };
        let id = format!(
            "{}-{}",
            self.next_id.fetch_add(1, Ordering::Relaxed),
            edge_api::keys::random_hex(4).unwrap_or_default()
        );
        let (tx, rx) = mpsc::channel(256);
        lock(&self.logs).insert(id.clone(), LogStream { node: node.clone(), tx, next_seq: 0 });
        let req = Request::Logs {
            id: id.clone(),
            workload: workload.to_string(),
            replica,
            tail,
            follow,
            lease_ms: lease.as_millis() as u64,
        };
        self.send_request(&node, &req);
        Ok((id, node, rx))
    }

    pub fn send_request(&self, node: &str, req: &Request) {
        match wire::seal(Kind::Request, wire::HUB, 0, req, Some(&self.key)) {
            Ok(payload) => self.send(Outgoing { topic: wire::topic(node, Channel::Request), payload, retain: false }),
            Err(e) => tracing::error!("cannot encode request: {e}"),
        }
    }

    /// Ends a log stream from the hub's side (the reader left).
    pub fn close_logs(&self, id: &str) {
        if let Some(s) = lock(&self.logs).remove(id) {
            self.send_request(&s.node, &Request::Cancel { id: id.to_string() });
        }
    }

    fn on_response(&self, node: &str, r: Response) -> Result<(), String> {
        let mut logs = lock(&self.logs);
        let Some(s) = logs.get_mut(&r.id) else {
            return Ok(()); // the reader already left
        };
        if s.node != node {
            return Err(format!("response for stream {} from {node:?}, expected {:?}", r.id, s.node));
        }
        if r.seq < s.next_seq {
            return Ok(()); // a redelivered duplicate (QoS 1)
        }
        s.next_seq = r.seq + 1;
        let mut ok = true;
        if !r.data.is_empty() {
            ok = s.tx.try_send(LogChunk::Data(r.data)).is_ok();
        }
        if let Some(e) = r.error {
            ok = s.tx.try_send(LogChunk::Error(e)).is_ok() && ok;
        }
        if r.eof || !ok {
            logs.remove(&r.id);
        }
        Ok(())
    }

    /// Whether an artifact digest may be served to this node signature.
    pub fn verify_node_fetch(&self, node: &str, path: &str, sig_hex: &str) -> bool {
        let Some(key) = self.node_key(node) else { return false };
        let Some(sig) = edge_api::hex::decode(sig_hex) else { return false };
        key.verify(&wire::artifact_fetch_message(node, path), &sig)
    }

    fn check_artifact(&self, w: &Workload, digest: Digest) -> Result<(), ApiError> {
        if self.artifacts.has(&digest) {
            return Ok(());
        }
        let mut e = ApiError::new(422, "Invalid", format!("workload {:?} is invalid", w.metadata.name));
        e.details.push(format!(
            "spec.wasm.component: artifact {digest} is not in the hub's artifact store; upload it first (edgectl apply uploads local files)"
        ));
        Err(e)
    }

    pub fn has_artifact(&self, d: &Digest) -> bool {
        self.artifacts.has(d)
    }
}

fn without_source(spec: &edge_api::model::WorkloadSpec) -> edge_api::model::WorkloadSpec {
    let mut s = spec.clone();
    match &mut s.runtime {
        edge_api::model::Runtime::Wasm(w) => w.source = None,
        edge_api::model::Runtime::Container(c) => c.source = None,
    }
    s
}

/// The event worth recording when a replica's reported state changes.
fn transition_event(node: &str, prev: Option<&InstanceStatus>, now: &InstanceStatus) -> Option<Event> {
    let same = prev.is_some_and(|p| p.phase == now.phase && p.restarts == now.restarts && p.reason == now.reason);
    if same {
        return None;
    }
    let r = now.replica;
    let detail = now.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    let (warning, reason, message) = match (now.phase, now.reason.as_deref()) {
        (Phase::Running, _) => (false, "Started", format!("replica {r} started on {node}")),
        (Phase::Succeeded, _) => (false, "Completed", format!("replica {r} exited 0 on {node}")),
        (Phase::Failed, reason) => {
            (true, "Failed", format!("replica {r} on {node}: {}{detail}", reason.unwrap_or("failed")))
        }
        (Phase::Pending, Some(reason @ ("BackOff" | "FetchFailed"))) => {
            (true, reason, format!("replica {r} on {node}{detail}"))
        }
        (Phase::Pending, Some("Fetching")) => {
            (false, "Fetching", format!("replica {r}: node {node} is downloading the component"))
        }
        _ => return None,
    };
    Some(Event { ts_ms: now_ms(), warning, reason: reason.to_string(), message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use edge_api::model::{NodeFacts, RuntimeInfo};
    use edge_api::quantity::{Cpu, Memory};

    struct Fixture {
        hub: Arc<Hub>,
        outbox: mpsc::UnboundedReceiver<Outgoing>,
        store: Arc<MemStore>,
        _dir: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "edge-hub-unit-{}-{}",
            std::process::id(),
            edge_api::keys::random_hex(4).unwrap()
        ));
        let key = SigningKey::generate().unwrap();
        let join = JoinToken::new(&key.public(), "secretsecretsecret".into());
        let store = Arc::new(MemStore::default());
        let (hub, outbox) = Hub::new(HubParts {
            insecure_registries: vec![],
            store: store.clone(),
            key,
            join,
            admin_token: "admin".into(),
            api_url: "http://hub".into(),
            heartbeat: Duration::from_secs(5),
            artifacts: ArtifactStore::open(&dir).unwrap(),
        })
        .unwrap();
        Fixture { hub, outbox, store, _dir: dir }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            arch: "arm64".into(),
            os: "linux".into(),
            os_release: String::new(),
            kernel: String::new(),
            cpus: 4,
            memory: Memory::mib(1024),
            allocatable_memory: Memory::mib(900),
            allocatable_cpu: Cpu(4000),
            labels: Default::default(),
            runtimes: vec![RuntimeInfo { name: "wasm".into(), version: "t".into(), mode: "cranelift".into() }],
            agent_version: String::new(),
        }
    }

    fn join_msg(node: &str, key: &SigningKey, token: &JoinToken, session: u64) -> Vec<u8> {
        let j = Join {
            node: node.into(),
            key: key.public(),
            proof: token.proof(node, &key.public()),
            session,
            observed_generation: 0,
            facts: facts(),
        };
        wire::seal(Kind::Join, node, 0, &j, Some(key)).unwrap()
    }

    fn welcome(f: &mut Fixture, node: &str) -> Welcome {
        while let Ok(o) = f.outbox.try_recv() {
            if o.topic == wire::topic(node, Channel::Welcome) {
                return wire::open(&o.payload).unwrap().body().unwrap();
            }
        }
        panic!("no welcome for {node}");
    }

    fn status(node: &str, key: &SigningKey, session: u64, seq: u64) -> Vec<u8> {
        let st = NodeStatus { node: node.into(), session, seq, observed_generation: 0, instances: vec![] };
        wire::seal(Kind::Status, node, 0, &st, Some(key)).unwrap()
    }

    #[test]
    fn a_join_with_a_valid_proof_registers_the_node_and_is_welcomed() {
        let mut f = fixture();
        let key = SigningKey::generate().unwrap();
        let token = f.hub.join_token().clone();
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &token, 1));
        let w = welcome(&mut f, "pi");
        assert!(w.accepted, "{w:?}");
        assert_eq!(w.hub_key, f.hub.public_key());
        assert_eq!(f.hub.node_view("pi").unwrap().state, NodeState::Ready);
    }

    #[test]
    fn a_join_with_a_wrong_secret_or_a_taken_name_is_refused() {
        let mut f = fixture();
        let key = SigningKey::generate().unwrap();
        let wrong = JoinToken { secret: "notthesecretatall".into(), ..f.hub.join_token().clone() };
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &wrong, 1));
        let w = welcome(&mut f, "pi");
        assert!(!w.accepted && w.error.as_deref().unwrap().contains("invalid join token"));
        assert!(f.hub.node_view("pi").is_none());

        let token = f.hub.join_token().clone();
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &token, 1));
        assert!(welcome(&mut f, "pi").accepted);
        let impostor = SigningKey::generate().unwrap();
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &impostor, &token, 2));
        let w = welcome(&mut f, "pi");
        assert!(!w.accepted && w.error.as_deref().unwrap().contains("already taken"));
        assert_eq!(f.hub.node_key("pi"), Some(key.public()), "the first agent keeps its name");
    }

    #[test]
    fn status_is_ordered_by_session_then_sequence() {
        let f = fixture();
        let key = SigningKey::generate().unwrap();
        let token = f.hub.join_token().clone();
        let topic = wire::topic("pi", Channel::Status);
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &token, 1));
        let rejected = || f.hub.metrics.rejected.load(Ordering::Relaxed);
        f.hub.on_message(&topic, &status("pi", &key, 1, 7));
        assert_eq!(rejected(), 0);
        f.hub.on_message(&topic, &status("pi", &key, 1, 6));
        assert_eq!(rejected(), 1, "an older sequence in the same session is stale");
        // A restarted agent (new session) starts its sequence again: accepted.
        let p = Presence { online: true, session: 2 };
        f.hub.on_message(
            &wire::topic("pi", Channel::Presence),
            &wire::seal(Kind::Presence, "pi", 0, &p, Some(&key)).unwrap(),
        );
        f.hub.on_message(&topic, &status("pi", &key, 2, 1));
        assert_eq!(rejected(), 1, "seq 1 of a new session is newer");
        f.hub.on_message(&topic, &status("pi", &key, 1, 99));
        assert_eq!(rejected(), 2, "anything from an older session is stale");
    }

    #[test]
    fn a_failed_store_write_changes_nothing() {
        let mut f = fixture();
        let key = SigningKey::generate().unwrap();
        let token = f.hub.join_token().clone();
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &token, 1));
        while f.outbox.try_recv().is_ok() {}
        f.store.fail_writes.store(true, Ordering::SeqCst);
        let e = f.hub.delete_node("pi").unwrap_err();
        assert_eq!(e.status, 503);
        assert!(f.hub.node_view("pi").is_some(), "the node is still there");
        assert!(f.outbox.try_recv().is_err(), "nothing was published");
    }
}
