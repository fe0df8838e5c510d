//! The hub's core: state, the one mutation path, MQTT message handling and
//! the views the API serves.
//!
//! Architecture invariant: every change to durable state goes through
//! [`Hub::mutate`]: edit in place, reconcile what the edit touched, persist
//! what changed, then publish. The state records what a change touched (see
//! `tracked`), so a change costs what it touches, not the size of the fleet;
//! a failed edit or write takes it back, leaving memory and disk as they
//! were. The lock is never held across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edge_api::digest::Digest;
use edge_api::keys::{PublicKey, SigningKey};
use edge_api::model::{
    AuditEntry, Event, InstanceStatus, Millis, NodeState, NodeView, Phase, TokenKind, Workload, WorkloadView,
};
use edge_api::names;
use edge_api::time::now_ms;
use edge_api::wire::{self, Channel, Heartbeat, Join, Kind, NodeStatus, Presence, Request, Welcome};
use tokio::sync::{mpsc, watch};

use crate::artifacts::ArtifactStore;
use crate::broker_admin::BrokerAdmin;
use crate::controller::{self, Durable, NodeRecord, ReplicaId, Scope};
use crate::error::HubError;
use crate::events::EventLog;
use crate::ingest::{self, Message};
use crate::liveness::{Live, Moved, node_state};
use crate::logstreams::{LogChunk, LogStreams};
use crate::metrics::Metrics;
use crate::secrets::SecretKeys;
use crate::store::{Collection, Store, StoreError};
use crate::views::{self, Snapshot};
use edge_api::nonce::NonceCache;

/// How long a credential just issued is given again to a retried join.
pub const CREDENTIAL_REUSE: Duration = Duration::from_secs(120);

/// At most one restore of a tampered desired state per node per second.
const RESTORE_INTERVAL: Duration = Duration::from_secs(1);

/// Warnings kept per node, newest last.
const WARNINGS_PER_NODE: usize = 10;

/// Audit entries kept (in memory and on disk); older ones are dropped.
pub(crate) const AUDIT_ENTRIES: usize = 10_000;

/// How long a request to an agent (a log read) may wait before the agent
/// refuses it: enough for a slow link, short enough that a captured request
/// is useless soon after.
const REQUEST_TTL: Duration = Duration::from_secs(60);

/// Enrolments waiting for an external broker to make their logins.
const MAX_HELD_WELCOMES: usize = 10_000;

/// Secrets a hub holds at most (each up to 256 KiB, all in memory).
pub const MAX_SECRETS: usize = 1000;

/// How far a node's artifact-fetch signature may be from the hub's clock.
pub const FETCH_SKEW: Duration = Duration::from_secs(60);

/// How long a deleted node's session may stay connected to receive its last,
/// empty desired state before the broker cuts it off.
pub const DELETE_GRACE: Duration = Duration::from_secs(5);

/// A publish for the MQTT task. Everything the hub sends is QoS 1.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// At most once (QoS 0): for what the next one replaces, such as a lease.
    pub lossy: bool,
}

pub(crate) struct Inner {
    pub(crate) d: Durable,
    pub(crate) live: HashMap<String, Live>,
    pub(crate) unschedulable: BTreeMap<ReplicaId, String>,
    /// Replicas sent without a secret they use, with the reason.
    pub(crate) undeliverable: BTreeMap<ReplicaId, String>,
    pub(crate) events: EventLog,
    /// The newest event's number, for readers waiting for more.
    pub(crate) events_seq: watch::Sender<Option<u64>>,
    /// Each node's state when last looked at (for its events).
    pub(crate) node_states: HashMap<String, NodeState>,
    /// What the hub did not believe of what each node reported.
    pub(crate) warnings: HashMap<String, VecDeque<String>>,
    /// Nodes deleted but still allowed on the broker until the instant given
    /// (to receive their last, empty desired state).
    pub(crate) deleting: HashMap<String, Instant>,
    /// Whether a reconcile pass over everything has run since start (the
    /// first one does).
    pub(crate) whole_pass_done: bool,
}

/// What a welcome says.
enum WelcomeKind {
    /// With the node's credential when one was issued now.
    Accepted(Option<edge_api::seal::Sealed>),
    Pending,
    Refused(String),
}

pub struct Hub {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) revision: watch::Sender<u64>,
    /// Group commit, and the outbox behind it: see `durability`.
    pub(crate) durability: Arc<crate::durability::Durability>,
    pub(crate) key: SigningKey,
    pub(crate) api_url: String,
    pub(crate) heartbeat: Duration,
    pub(crate) require_approval: bool,
    pub artifacts: ArtifactStore,
    /// Compiles components for the targets nodes report.
    pub precompiler: crate::precompile::Precompiler,
    /// The compile targets the fleet's nodes report, as of the last tick.
    pub(crate) targets: Mutex<BTreeSet<edge_engine::Target>>,
    pub metrics: Metrics,
    /// Pulls `oci://` components at apply time.
    pub registry: edge_oci::Client,
    pub(crate) logs: LogStreams,
    /// When each node's desired state was last restored after tampering, and
    /// whether another restore is waiting for the rate limit.
    pub(crate) restored: Mutex<HashMap<String, (Option<Instant>, bool)>>,
    /// Bumped whenever a credential may have stopped being valid (a node
    /// deleted, a token revoked): the embedded broker then checks its
    /// sessions again and cuts off those no longer allowed.
    pub(crate) revocations: watch::Sender<u64>,
    /// Keeps an external broker's clients and roles in step (or does nothing).
    pub(crate) broker_admin: Box<dyn BrokerAdmin>,
    /// Encrypts secrets at rest and seals them to nodes.
    pub(crate) secret_keys: SecretKeys,
    /// Whether containers may ask for the node's network.
    pub(crate) allow_host_network: bool,
    /// Broker logins no node may be named (the hub's own).
    pub(crate) reserved_logins: Vec<String>,
    /// Revisions kept per workload.
    pub(crate) revision_history: usize,
    /// Artifact-fetch signatures already used.
    pub(crate) fetch_nonces: Mutex<NonceCache>,
    /// Welcomes that carry a new credential, held until the broker has the
    /// login (an external broker that makes it after a round trip): a node
    /// told its credential before would be refused with it.
    pub(crate) held_welcomes: Mutex<HashMap<String, (PublicKey, Option<edge_api::seal::Sealed>)>>,
    /// The newest audit entries with their store keys, oldest first.
    pub(crate) audit: Mutex<VecDeque<(String, AuditEntry)>>,
    pub(crate) audit_seq: AtomicU64,
    /// Credentials issued in the last [`CREDENTIAL_REUSE`], in memory only,
    /// given again to a join of the same key retried meanwhile.
    pub(crate) recent_credentials: Mutex<HashMap<String, (String, Instant, PublicKey)>>,
    /// When this hub started: a node not heard from since is taken as
    /// silent since then (never longer).
    pub(crate) started: Instant,
    /// Counts events that may change a node's readiness (joins, presence,
    /// a heartbeat after silence), and the count the last tick saw: a node
    /// that went away and came back between two ticks leaves the set of
    /// ready nodes as it was, but work refused meanwhile must be placed.
    pub(crate) readiness: AtomicU64,
    pub(crate) readiness_seen: AtomicU64,
}

pub struct HubParts {
    /// Registries spoken to over plain HTTP (besides loopback ones).
    pub insecure_registries: Vec<String>,
    pub store: Arc<dyn Store>,
    pub key: SigningKey,
    pub api_url: String,
    pub heartbeat: Duration,
    pub artifacts: ArtifactStore,
    /// Every enrolment waits for `edgectl approve node`.
    pub require_approval: bool,
    pub broker_admin: Box<dyn BrokerAdmin>,
    /// The key secrets are encrypted with (kept outside `store`).
    pub secret_keys: SecretKeys,
    /// Containers may ask for the node's network (`network = "host"`).
    pub allow_host_network: bool,
    /// Broker logins no node may be named (the hub's own).
    pub reserved_logins: Vec<String>,
    /// Revisions kept per workload (at least 1).
    pub revision_history: usize,
    /// Components compiled at once for nodes' targets.
    pub compile_jobs: usize,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; the state it guards is still
    // consistent because edits are made on a clone and swapped in whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn push_warning(warnings: &mut HashMap<String, VecDeque<String>>, node: &str, w: String) {
    let q = warnings.entry(node.to_string()).or_default();
    if q.back() == Some(&w) {
        return;
    }
    q.push_back(w);
    while q.len() > WARNINGS_PER_NODE {
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
        let mut migrated = crate::store::Batch::default();
        for (k, v) in parts.store.load(Collection::Placements)? {
            let id = controller::parse_placement_key(&k)
                .ok_or_else(|| corrupt(&k, serde::de::Error::custom("bad placement key")))?;
            let mut placed: controller::Placed = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            if placed.revision == 0 {
                // Kept before replicas had revisions: it runs its workload's
                // generation. Written back at once, so a later rollout that
                // changes some replicas cannot make the others look updated.
                placed.revision = d.workloads.get(&id.0).map_or(0, |w| w.metadata.generation);
                migrated.put(
                    Collection::Placements,
                    k.clone(),
                    serde_json::to_vec(&placed).map_err(|e| corrupt(&k, e))?,
                );
            }
            d.placements.insert(id, placed);
        }
        if !migrated.is_empty() {
            parts.store.commit(migrated)?;
        }
        for (k, v) in parts.store.load(Collection::Tokens)? {
            d.tokens.insert(k.clone(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
        }
        for (k, v) in parts.store.load(Collection::Secrets)? {
            d.secrets.insert(k.clone(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
        }
        for (k, v) in parts.store.load(Collection::Rollouts)? {
            d.rollouts.insert(k.clone(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
        }
        for (k, v) in parts.store.load(Collection::Revisions)? {
            let id = controller::parse_revision_key(&k)
                .ok_or_else(|| corrupt(&k, serde::de::Error::custom("bad revision key")))?;
            d.revisions.insert(id, Arc::new(serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?));
        }
        // What was loaded is what is on disk.
        d.settle();
        let mut audit = VecDeque::new();
        let entries = parts.store.load(Collection::Audit)?;
        let excess = entries.len().saturating_sub(AUDIT_ENTRIES);
        let mut prune = crate::store::Batch::default();
        for (i, (k, v)) in entries.into_iter().enumerate() {
            if i < excess {
                prune.delete(Collection::Audit, k);
            } else {
                let entry = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
                audit.push_back((k, entry));
            }
        }
        if !prune.is_empty() {
            parts.store.commit(prune)?;
        }
        let (events, fix, bad) = EventLog::load(parts.store.load(Collection::Events)?);
        if bad > 0 {
            tracing::warn!(bad, "events in the store that do not decode were deleted");
        }
        if !fix.is_empty() {
            parts.store.commit(fix)?;
        }
        let precompiler = crate::precompile::Precompiler::start(
            parts.artifacts.clone(),
            &parts.artifacts.root().join("precompiled"),
            &parts.key,
            parts.compile_jobs,
        )
        .map_err(|source| StoreError::Precompiled { path: parts.artifacts.root().join("precompiled"), source })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub {
            store: parts.store.clone(),
            inner: Mutex::new(Inner {
                d,
                live: HashMap::new(),
                unschedulable: BTreeMap::new(),
                undeliverable: BTreeMap::new(),
                events_seq: watch::Sender::new(events.last()),
                events,
                node_states: HashMap::new(),
                warnings: HashMap::new(),
                deleting: HashMap::new(),
                whole_pass_done: false,
            }),
            revision: watch::Sender::new(0),
            durability: crate::durability::Durability::start(parts.store.clone(), tx),
            precompiler,
            targets: Mutex::new(BTreeSet::new()),
            key: parts.key,
            api_url: parts.api_url,
            heartbeat: parts.heartbeat,
            require_approval: parts.require_approval,
            artifacts: parts.artifacts,
            metrics: Metrics::default(),
            registry: edge_oci::Client::new(parts.insecure_registries).map_err(|e| StoreError::Corrupt {
                key: "tls".into(),
                source: serde::de::Error::custom(e.to_string()),
            })?,
            logs: LogStreams::default(),
            restored: Mutex::new(HashMap::new()),
            revocations: watch::Sender::new(0),
            broker_admin: parts.broker_admin,
            secret_keys: parts.secret_keys,
            allow_host_network: parts.allow_host_network,
            reserved_logins: parts.reserved_logins,
            revision_history: parts.revision_history.max(1),
            fetch_nonces: Mutex::new(NonceCache::default()),
            audit: Mutex::new(audit),
            held_welcomes: Mutex::new(HashMap::new()),
            audit_seq: AtomicU64::new(0),
            started: Instant::now(),
            recent_credentials: Mutex::new(HashMap::new()),
            readiness: AtomicU64::new(0),
            readiness_seen: AtomicU64::new(0),
        };
        Ok((Arc::new(hub), rx))
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

    pub(crate) fn send_all(&self, msgs: Vec<Outgoing>) {
        for o in msgs {
            self.send(o);
        }
    }

    pub(crate) fn send(&self, o: Outgoing) {
        if o.payload.len() > wire::MAX_PAYLOAD {
            // The broker would refuse it and end the hub's session.
            tracing::error!(topic = o.topic, bytes = o.payload.len(), "not publishing a message over the size limit");
            return;
        }
        self.metrics.published.fetch_add(1, Ordering::Relaxed);
        // Out once what was changed before it is durable. (The receiver
        // lives as long as the MQTT task; if it is gone the hub is shutting
        // down and the message has nowhere to go anyway.)
        self.durability.send(o);
    }

    /// Publishes a node's desired state, and from then judges the node by
    /// the heartbeat pace it asks for.
    fn publish_desired(&self, live: &mut HashMap<String, Live>, rec: &NodeRecord) {
        let base = Millis(self.heartbeat.as_millis() as u64);
        let pace = Duration::from_millis(edge_api::lease::heartbeat_interval(base, rec.desired.fence()).0);
        live.entry(rec.name.clone()).or_default().ask(pace, rec.desired_generation, self.heartbeat);
        match wire::seal(Kind::Desired, wire::HUB, rec.desired_generation, &rec.desired, Some(&self.key)) {
            Ok(payload) => self.send(Outgoing {
                topic: wire::topic(&rec.name, Channel::Desired),
                payload,
                retain: true,
                lossy: false,
            }),
            Err(e) => tracing::error!(node = %rec.name, "cannot encode desired state: {e}"),
        }
    }

    /// The one mutation path (see the module docs).
    /// Adds events to the log and the store (synced with `durable`: those
    /// of a change the hub made; a node's reports are history enough). An
    /// object without a `/` is a workload's name.
    pub(crate) fn record(&self, inner: &mut Inner, events: Vec<(String, Event)>, durable: bool) {
        if events.is_empty() {
            return;
        }
        let mut batch = crate::store::Batch::default();
        for (object, e) in events {
            let object = if object.contains('/') { object } else { format!("workload/{object}") };
            inner.events.push(&object, e, &mut batch);
        }
        // Those of a change are durable with it (see `durability`).
        match self.store.record(batch) {
            Ok(()) if durable => self.durability.applied(),
            Ok(()) => {}
            Err(e) => tracing::error!("cannot persist events: {e}"),
        }
        inner.events_seq.send_replace(inner.events.last());
    }

    pub(crate) fn mutate<R>(
        &self,
        edit: impl FnOnce(&mut Durable, &mut Vec<(String, Event)>) -> Result<R, HubError>,
    ) -> Result<R, HubError> {
        self.mutate_in(Scope::default(), edit)
    }

    /// [`Hub::mutate`], with a reconcile pass over what the edit touched and
    /// what `scope` adds (always: the workloads with replicas that fit
    /// nowhere yet). The first pass after start looks at everything.
    pub(crate) fn mutate_in<R>(
        &self,
        mut scope: Scope,
        edit: impl FnOnce(&mut Durable, &mut Vec<(String, Event)>) -> Result<R, HubError>,
    ) -> Result<R, HubError> {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        debug_assert!(inner.d.is_settled(), "the hub's state was changed outside Hub::mutate");
        let mut events = Vec::new();
        let r = match edit(&mut inner.d, &mut events) {
            Ok(r) => r,
            Err(e) => {
                inner.d.revert();
                return Err(e);
            }
        };
        scope.all |= !inner.whole_pass_done;
        scope.workloads.extend(inner.unschedulable.keys().map(|(w, _)| w.clone()));
        let now = Instant::now();
        let hb = self.heartbeat;
        let live = &inner.live;
        let ready = |n: &str| node_state(live.get(n), now, hb).0 == NodeState::Ready;
        let report = |n: &str, w: &str, r: u32| {
            let st = live.get(n)?.status.as_ref()?;
            st.instances.iter().find(|i| i.workload == w && i.replica == r).cloned()
        };
        let started = self.started;
        let silent_ms = |n: &str| {
            let last = live.get(n).and_then(|l| l.last_heartbeat).unwrap_or(started).max(started);
            now.saturating_duration_since(last).as_millis() as u64
        };
        let observed_gen = |n: &str| live.get(n).map_or(0, |l| l.observed_generation);
        let seen = controller::Observed {
            ready: &ready,
            report: &report,
            silent_ms: &silent_ms,
            observed_gen: &observed_gen,
            keep_revisions: self.revision_history,
        };
        let outcome = controller::reconcile_in(&mut inner.d, &seen, now_ms(), &self.secret_keys, &scope);
        // Applied now, durable with the next group sync: nothing this
        // change sends leaves before (see `durability`).
        let written = inner.d.changes().map_err(HubError::internal).and_then(|batch| {
            if !batch.is_empty() {
                self.store.apply(batch)?;
                self.durability.applied();
            }
            Ok(())
        });
        if let Err(e) = written {
            inner.d.revert();
            return Err(e);
        }
        let removed: Vec<String> =
            inner.d.nodes.touched().filter(|n| !inner.d.nodes.contains_key(*n)).cloned().collect();
        inner.d.settle();
        inner.whole_pass_done = true;
        let mut inner = guard;
        events.extend(outcome.events.iter().cloned());
        // A warning when a replica's problem is new or changed, not at every pass.
        let changed = |old: &BTreeMap<ReplicaId, String>, new: &BTreeMap<ReplicaId, String>, reason: &str| {
            new.iter()
                .filter(|(id, msg)| old.get(*id) != Some(*msg))
                .map(|(id, msg)| {
                    let message = format!("replica {}: {msg}", id.1);
                    (id.0.clone(), Event::new(now_ms(), true, reason, message))
                })
                .collect::<Vec<_>>()
        };
        events.extend(changed(&inner.unschedulable, &outcome.unschedulable, "FailedScheduling"));
        events.extend(changed(&inner.undeliverable, &outcome.undeliverable, "SecretUnavailable"));
        inner.unschedulable = outcome.unschedulable_after(&inner.unschedulable);
        inner.undeliverable = outcome.undeliverable_after(&inner.d, &inner.undeliverable);
        self.record(&mut inner, events, true);
        let parts = &mut *inner;
        for n in &outcome.changed_nodes {
            if let Some(rec) = parts.d.nodes.get(n) {
                self.publish_desired(&mut parts.live, rec);
            }
        }
        for n in removed {
            inner.live.remove(&n);
        }
        drop(inner);
        self.bump();
        Ok(r)
    }

    /// Re-evaluates every placement and desired state.
    pub fn reconcile(&self) -> Result<(), HubError> {
        self.mutate_in(Scope::all(), |_, _| Ok(()))
    }

    /// Publishes every node's desired state (after (re)connecting to the broker).
    pub fn on_connected(&self) {
        self.send_all(self.broker_admin.on_connected());
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        for rec in inner.d.nodes.values() {
            self.publish_desired(&mut inner.live, rec);
        }
    }

    /// Handles one MQTT message. Anything malformed, unsigned, stale or from
    /// a stranger is logged with its reason and changes nothing.
    /// A node's name is its broker login: it may not be one the broker
    /// already uses for something else (the hub's own, a bootstrap token's).
    fn check_login_name(&self, node: &str) -> Result<(), String> {
        if edge_api::token::parse_bootstrap_user(node).is_some() || node.starts_with("join-") {
            return Err(format!("node name {node:?} is reserved: names starting with join- are bootstrap logins"));
        }
        if self.reserved_logins.iter().any(|r| r == node) {
            return Err(format!("node name {node:?} is reserved: it is the hub's own broker login"));
        }
        Ok(())
    }

    /// What the hub subscribes to, besides the nodes' channels.
    pub fn broker_admin_filters(&self) -> Vec<String> {
        self.broker_admin.filters()
    }

    pub fn on_message(&self, topic: &str, payload: &[u8]) {
        if topic.starts_with('$') {
            let out = {
                let inner = lock(&self.inner);
                let known = KnownLogins { d: &inner.d, deleting: &inner.deleting };
                self.broker_admin.on_message(topic, payload, &known)
            };
            self.send_all(out);
            // Logins made now (their commands went out just above): the
            // broker has them before it carries the welcomes sent after.
            for node in self.broker_admin.logins_made() {
                if let Some((key, sealed)) = lock(&self.held_welcomes).remove(&node) {
                    self.welcome(&node, key, WelcomeKind::Accepted(sealed));
                }
            }
            return;
        }
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        if let Err(reason) = self.handle(topic, payload) {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic, "rejected message: {reason}");
        }
    }

    fn handle(&self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let msg = ingest::decode(topic, payload, |n| self.node_key(n)).map_err(|e| e.to_string())?;
        match msg {
            Message::Desired { node } => self.check_desired(&node, payload),
            Message::Join { node, join } => self.on_join(&node, *join),
            Message::Heartbeat { node, heartbeat, compact } => {
                self.on_heartbeat(&node, &heartbeat, compact);
                Ok(())
            }
            Message::Status { node, status } => self.on_status(&node, status),
            Message::Presence { node, presence } => {
                self.on_presence(&node, &presence);
                Ok(())
            }
            Message::Response { node, response } => self.logs.on_response(&node, response).map_err(|e| e.to_string()),
            Message::Ignored => Ok(()),
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
            self.send(Outgoing {
                topic: wire::topic(node, Channel::Desired),
                payload: genuine,
                retain: true,
                lossy: false,
            });
        }
    }

    /// Performs restores that were held back by the rate limit.
    pub(crate) fn restore_pending(&self) {
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

    /// Welcomes a node with its new credential: now, or once the broker has
    /// made its login.
    pub(crate) fn welcome_with_credential(&self, node: &str, key: PublicKey, sealed: Option<edge_api::seal::Sealed>) {
        if !self.broker_admin.makes_logins_later() {
            return self.welcome(node, key, WelcomeKind::Accepted(sealed));
        }
        let mut held = lock(&self.held_welcomes);
        if held.len() >= MAX_HELD_WELCOMES && !held.contains_key(node) {
            tracing::warn!(node, "too many enrolments wait for the broker; this one asks again later");
            return;
        }
        held.insert(node.to_string(), (key, sealed));
    }

    fn welcome(&self, node: &str, node_key: PublicKey, kind: WelcomeKind) {
        let (accepted, pending, error, credential) = match kind {
            WelcomeKind::Accepted(c) => (true, false, None, c),
            WelcomeKind::Pending => (false, true, None, None),
            WelcomeKind::Refused(e) => (false, false, Some(e), None),
        };
        let w = Welcome {
            node: node.to_string(),
            node_key,
            accepted,
            pending,
            error,
            hub_key: self.key.public(),
            api_url: self.api_url.clone(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            hub_time_ms: now_ms(),
            credential,
        };
        match wire::seal(Kind::Welcome, wire::HUB, 0, &w, Some(&self.key)) {
            Ok(payload) => {
                self.send(Outgoing { topic: wire::topic(node, Channel::Welcome), payload, retain: false, lossy: false })
            }
            Err(e) => tracing::error!("cannot encode welcome: {e}"),
        }
    }

    /// A join, already checked to be signed by the key it enrols.
    fn on_join(&self, node: &str, j: Join) -> Result<(), String> {
        if let Err(e) = names::check_node_name(node).and_then(|_| self.check_login_name(node)) {
            self.welcome(node, j.key, WelcomeKind::Refused(e.clone()));
            return Err(e);
        }
        // A join retried before its welcome arrived (a slow or loaded link)
        // gets the credential that welcome carries, not a new one that
        // would leave the node holding a refused one.
        let fresh = {
            let mut recent = lock(&self.recent_credentials);
            recent.retain(|_, (_, at, _)| at.elapsed() < CREDENTIAL_REUSE);
            match recent.get(node) {
                Some((c, _, key)) if *key == j.key => c.clone(),
                _ => edge_api::token::new_secret().map_err(|e| e.to_string())?,
            }
        };
        let require_approval = self.require_approval;
        let joined = self.mutate(|d, events| {
            let joined =
                crate::enrol::apply_join(d, &j, require_approval, &fresh, now_ms()).map_err(HubError::Refused)?;
            if joined.new {
                // (What `get nodes --watch` sees of a node that just joined.)
                let message = format!("node {node} enrolled ({})", j.facts.arch);
                events.push(crate::node_admin::node_event(node, "Registered", message));
            }
            Ok(joined)
        });
        let joined = match joined {
            Ok(j) => j,
            Err(HubError::Refused(e)) => {
                self.welcome(node, j.key, WelcomeKind::Refused(e.clone()));
                return Err(e);
            }
            Err(e) => return Err(e.to_string()),
        };
        {
            let mut inner = lock(&self.inner);
            if joined.new {
                // Enrolled again after a delete: its old grace must not
                // remove the new login when it ends.
                inner.deleting.remove(node);
            }
            let Inner { live, warnings, .. } = &mut *inner;
            for w in &joined.warnings {
                push_warning(warnings, node, w.clone());
            }
            self.readiness.fetch_add(1, Ordering::AcqRel);
            live.entry(node.to_string()).or_default().on_join(j.session, Instant::now(), now_ms());
        }
        for w in &joined.warnings {
            tracing::warn!(node, "{w}");
        }
        if joined.new {
            tracing::info!(node, arch = %j.facts.arch, pending = joined.pending, "node enrolled");
        }
        if joined.pending {
            self.welcome(node, j.key, WelcomeKind::Pending);
            self.bump();
            return Ok(());
        }
        match &joined.credential {
            Some(c) => {
                lock(&self.recent_credentials).insert(node.to_string(), (c.clone(), Instant::now(), j.key));
                // The broker must know the credential before the node tries it.
                self.send_all(self.broker_admin.add_node(node, c));
                let sealed = edge_api::seal::seal(&j.kem, &edge_api::seal::credential_info(node), c.as_bytes())
                    .map_err(|e| e.to_string())?;
                self.welcome_with_credential(node, j.key, Some(sealed));
            }
            // Its credential's welcome is waiting for the broker: a join
            // retried meanwhile gets nothing (not a welcome without it).
            None if lock(&self.held_welcomes).contains_key(node) => {}
            None => self.welcome(node, j.key, WelcomeKind::Accepted(None)),
        }
        // (Re)publish its desired state: a new node has none on the broker yet,
        // and an embedded broker forgets retained messages when it restarts.
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        if let Some(rec) = inner.d.nodes.get(node) {
            self.publish_desired(&mut inner.live, rec);
        }
        Ok(())
    }

    fn on_heartbeat(&self, node: &str, hb: &Heartbeat, compact: bool) {
        let (moved, fenced) = {
            let mut inner = lock(&self.inner);
            let moved = inner.live.entry(node.to_string()).or_default().on_heartbeat(
                hb,
                compact,
                Instant::now(),
                now_ms(),
                self.heartbeat,
            );
            // Not while the node has yet to apply its desired state: that
            // may take a replica from it, which a fresh lease must not revive.
            // Only what the node's desired state holds needs the lease: a
            // replica leaving it is not there, and the node stops it.
            let fenced = inner
                .d
                .nodes
                .get(node)
                .is_some_and(|r| hb.observed_generation >= r.desired_generation && r.desired.fence().is_some());
            (moved, fenced)
        };
        // The node's lease: only nodes running replicas fenced by it need one.
        // In the form the heartbeat came in: an agent of an earlier release
        // knows only the JSON request.
        if fenced && moved != Moved::Stale {
            if compact {
                let payload = edge_api::frame::Frame::lease(hb.session, hb.seq).seal(node, &self.key);
                self.send(Outgoing { topic: wire::topic(node, Channel::Request), payload, retain: false, lossy: true });
            } else {
                self.send_request(node, &Request::Lease { node: node.to_string(), session: hb.session, seq: hb.seq });
            }
        }
        if moved == (Moved::Taken { readiness: true }) {
            self.readiness.fetch_add(1, Ordering::AcqRel);
            self.bump();
        }
    }

    fn on_presence(&self, node: &str, p: &Presence) {
        let moved =
            lock(&self.inner).live.entry(node.to_string()).or_default().on_presence(p, Instant::now(), now_ms());
        if moved != Moved::Stale {
            self.readiness.fetch_add(1, Ordering::AcqRel);
            tracing::info!(node, online = p.online, "presence");
            self.bump();
        }
    }

    fn on_status(&self, node: &str, st: NodeStatus) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        let Inner { d, live, .. } = &mut *inner;
        let mut events = Vec::new();
        let l = live.entry(node.to_string()).or_default();
        let reported: Vec<InstanceStatus> = st.instances.clone();
        let old = l.on_status(st, Instant::now(), now_ms()).map_err(|e| e.to_string())?;
        let ts = now_ms();
        for inst in &reported {
            let Some(w) = d.workloads.get(&inst.workload) else { continue };
            if w.metadata.uid != inst.uid {
                continue;
            }
            let prev = old.as_ref().and_then(|o| {
                o.instances
                    .iter()
                    .find(|p| p.workload == inst.workload && p.replica == inst.replica && p.uid == inst.uid)
            });
            if let Some(e) = views::transition_event(node, prev, inst, ts) {
                events.push((inst.workload.clone(), e));
            }
        }
        self.record(&mut inner, events, false);
        drop(inner);
        self.bump();
        Ok(())
    }

    // ---- views ----

    pub(crate) fn snapshot<'a>(&self, inner: &'a Inner) -> Snapshot<'a> {
        Snapshot {
            d: &inner.d,
            live: &inner.live,
            unschedulable: &inner.unschedulable,
            events: &inner.events,
            warnings: &inner.warnings,
            now: Instant::now(),
            heartbeat: self.heartbeat,
        }
    }

    pub fn workload_view(&self, name: &str, with_events: bool) -> Option<WorkloadView> {
        let inner = lock(&self.inner);
        let w = inner.d.workloads.get(name)?;
        let mut view = views::workload(&self.snapshot(&inner), w, with_events);
        if let Some(d) = w.spec.runtime.artifact().and_then(|a| a.digest()) {
            view.compiled = self.precompiler.views(d);
        }
        Some(view)
    }

    /// Asks for every Wasm component a workload names to be compiled for
    /// every engine a node reports that this hub compiles for (new
    /// workloads, and nodes with a new target, are covered on the next tick).
    pub fn want_compiled(&self) {
        let wanted: Vec<(Digest, edge_engine::Target)> = {
            let inner = lock(&self.inner);
            let targets: BTreeSet<edge_engine::Target> = inner
                .d
                .nodes
                .values()
                .filter(|n| n.approved)
                .flat_map(|n| n.facts.runtimes.iter())
                .filter(|r| r.name == "wasm")
                .filter_map(|r| edge_engine::Target::from_fingerprint(&r.fingerprint))
                .collect();
            *lock(&self.targets) = targets.clone();
            let digests: std::collections::HashSet<Digest> = inner
                .d
                .workloads
                .values()
                .filter_map(|w| w.spec.runtime.artifact().and_then(|a| a.digest()).copied())
                .collect();
            let wanted = digests.iter().flat_map(|d| targets.iter().map(move |t| (*d, *t))).collect();
            self.precompiler.set_named(digests);
            wanted
        };
        for (d, t) in wanted {
            if self.artifacts.has(&d) {
                self.precompiler.want(d, t);
            }
        }
    }

    /// Starts compiling `w`'s component for the targets the fleet reported
    /// at the last tick (a new target is seen at the next one).
    pub fn want_compiled_for(&self, w: &Workload) {
        let Some(d) = w.spec.runtime.artifact().and_then(|a| a.digest()).copied() else { return };
        if !self.artifacts.has(&d) {
            return;
        }
        self.precompiler.name(d);
        let targets = lock(&self.targets).clone();
        for t in targets {
            self.precompiler.want(d, t);
        }
    }

    pub fn workload_views(&self) -> Vec<WorkloadView> {
        let inner = lock(&self.inner);
        let s = self.snapshot(&inner);
        inner.d.workloads.values().map(|w| views::workload(&s, w, false)).collect()
    }

    pub fn node_view(&self, name: &str) -> Option<NodeView> {
        let inner = lock(&self.inner);
        let rec = inner.d.nodes.get(name)?;
        Some(views::node(&self.snapshot(&inner), rec, true))
    }

    /// A page of nodes in name order: those after `after` that `selector`
    /// matches (by their labels, as placement sees them), at most `limit`,
    /// and the name to continue after when more match.
    pub fn node_page(
        &self,
        selector: Option<&edge_api::placement::Selector>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<NodeView>, Option<String>) {
        use std::ops::Bound;
        let inner = lock(&self.inner);
        let s = self.snapshot(&inner);
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut matching = inner
            .d
            .nodes
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| selector.is_none_or(|sel| sel.matches(&r.effective_facts().labels)));
        let page: Vec<NodeView> = matching.by_ref().take(limit).map(|r| views::node(&s, r, false)).collect();
        let more = page.len() == limit && matching.next().is_some();
        let next = if more { page.last().map(|n| n.name.clone()) } else { None };
        (page, next)
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        let inner = lock(&self.inner);
        let s = self.snapshot(&inner);
        inner.d.nodes.values().map(|r| views::node(&s, r, false)).collect()
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
    ) -> Result<(String, String, mpsc::Receiver<LogChunk>), HubError> {
        let node = {
            let inner = lock(&self.inner);
            let w = inner.d.workloads.get(workload).ok_or_else(|| HubError::not_found("workload", workload))?;
            let node = match inner.d.placements.get(&(workload.to_string(), replica)) {
                Some(p) => p.node.clone(),
                None if w.spec.replicas.count().is_some_and(|n| replica < n) => {
                    return Err(HubError::conflict(
                        "NotScheduled",
                        format!("replica {replica} of {workload:?} is not placed on any node yet"),
                    ));
                }
                None => {
                    let has = match w.spec.replicas {
                        edge_api::model::Replicas::Count(n) => format!("{n} replica(s)"),
                        edge_api::model::Replicas::PerNode => {
                            "one replica per selected node (see `edgectl get workload -o wide`)".into()
                        }
                    };
                    return Err(HubError::NotFound(format!(
                        "workload {workload:?} has {has}; there is no replica {replica}"
                    )));
                }
            };
            if !inner.live.get(&node).is_some_and(|l| l.online) {
                return Err(HubError::NodeOffline(format!(
                    "node {node} is offline; its logs stay on the node and can be read when it reconnects"
                )));
            }
            node
        };
        // A random id is also the request's nonce: the agent serves it once.
        let id = edge_api::keys::random_hex(16).map_err(HubError::internal)?;
        let rx = self.logs.open(&id, &node);
        let req = Request::Logs {
            id: id.clone(),
            workload: workload.to_string(),
            replica,
            tail,
            follow,
            lease_ms: lease.as_millis() as u64,
            expires_ms: Self::request_expiry(),
        };
        self.send_request(&node, &req);
        Ok((id, node, rx))
    }

    /// When a request sent now stops being valid (hub time).
    pub fn request_expiry() -> u64 {
        now_ms() + REQUEST_TTL.as_millis() as u64
    }

    pub fn send_request(&self, node: &str, req: &Request) {
        match wire::seal(Kind::Request, wire::HUB, 0, req, Some(&self.key)) {
            Ok(payload) => {
                self.send(Outgoing { topic: wire::topic(node, Channel::Request), payload, retain: false, lossy: false })
            }
            Err(e) => tracing::error!("cannot encode request: {e}"),
        }
    }

    /// Ends a log stream from the hub's side (the reader left).
    pub fn close_logs(&self, id: &str) {
        if let Some(node) = self.logs.close(id) {
            self.send_request(&node, &Request::Cancel { id: id.to_string() });
        }
    }

    /// Whether a node's signed artifact fetch may be served: signed by the
    /// node's key over this path, within [`FETCH_SKEW`] of the hub's clock,
    /// and never seen before. `stamp` is `<time_ms>.<nonce>`.
    pub fn verify_node_fetch(&self, node: &str, path: &str, stamp: &str, sig_hex: &str) -> Result<(), String> {
        let key = self.node_key(node).ok_or_else(|| format!("no enrolled node {node:?}"))?;
        let (time, nonce) = stamp.split_once('.').ok_or("malformed fetch stamp")?;
        let time: u64 = time.parse().map_err(|_| "malformed fetch time")?;
        if nonce.len() < 16 || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("malformed fetch nonce".into());
        }
        let sig = edge_api::hex::decode(sig_hex).ok_or("malformed signature")?;
        if !key.verify(&wire::artifact_fetch_message(node, path, time, nonce), &sig) {
            return Err("bad signature".into());
        }
        let now = now_ms();
        let skew = FETCH_SKEW.as_millis() as u64;
        if time.abs_diff(now) > skew {
            return Err(format!("signature time is {} s away from the hub's clock", time.abs_diff(now) / 1000));
        }
        lock(&self.fetch_nonces).insert(&format!("{node}/{nonce}"), time + skew, now)
    }

    pub(crate) fn check_artifact(&self, w: &Workload, digest: Digest) -> Result<(), HubError> {
        if self.artifacts.has(&digest) {
            return Ok(());
        }
        Err(HubError::invalid_with(
            format!("workload {:?} is invalid", w.metadata.name),
            vec![format!(
                "spec.wasm.component: artifact {digest} is not in the hub's artifact store; upload it first (edgectl apply uploads local files)"
            )],
        ))
    }

    pub fn has_artifact(&self, d: &Digest) -> bool {
        self.artifacts.has(d)
    }
}

/// The logins the hub stands by, for an external broker's accounts.
struct KnownLogins<'a> {
    d: &'a Durable,
    deleting: &'a HashMap<String, Instant>,
}

impl crate::broker_admin::Known for KnownLogins<'_> {
    fn node(&self, name: &str) -> bool {
        self.deleting.contains_key(name)
            || self.d.nodes.get(name).is_some_and(|r| r.approved && r.credential_hash.is_some())
    }
    fn bootstrap(&self, id: &str) -> bool {
        self.d.tokens.get(id).is_some_and(|t| {
            t.info.kind == TokenKind::Join
                && t.info.revoked_ms.is_none()
                && t.info.expires_ms.is_none_or(|e| e > now_ms())
                && t.info.max_uses.is_none_or(|m| t.info.uses < m)
        })
    }
}

/// The workloads that use a secret, by name.
pub(crate) fn workloads_using(d: &Durable, secret: &str) -> Vec<String> {
    d.workloads.iter().filter(|(_, w)| w.spec.secret_names().contains(secret)).map(|(n, _)| n.clone()).collect()
}

/// Every secret a workload names exists, with every key its env names.
pub(crate) fn check_secret_refs(d: &Durable, w: &Workload) -> Result<(), HubError> {
    let (env, mounts) = w.spec.env_and_secrets();
    let field = match &w.spec.runtime {
        edge_api::model::Runtime::Wasm(_) => "spec.wasm",
        edge_api::model::Runtime::Container(_) => "spec.container",
    };
    let mut problems = Vec::new();
    for (var, v) in env {
        let edge_api::model::EnvValue::Secret(r) = v else { continue };
        match d.secrets.get(&r.secret) {
            None => problems.push(format!("{field}.env.{var}: secret {:?} does not exist", r.secret)),
            Some(rec) if !rec.keys.contains_key(&r.key) => problems.push(format!(
                "{field}.env.{var}: secret {:?} has no key {:?} (it has: {})",
                r.secret,
                r.key,
                rec.keys.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            Some(_) => {}
        }
    }
    for (i, m) in mounts.iter().enumerate() {
        if !d.secrets.contains_key(&m.secret) {
            problems.push(format!("{field}.secrets[{i}].secret: secret {:?} does not exist", m.secret));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(HubError::invalid_with(format!("workload {:?} is invalid", w.metadata.name), problems))
}

#[cfg(test)]
#[path = "hub_tests.rs"]
pub(crate) mod tests;
