//! The hub's reconciler: from workloads and nodes to placements and per-node
//! desired state. Pure: it edits a [`Durable`] value and reports what
//! happened; the caller persists the difference and publishes.
//!
//! Architecture invariant: a replica, once placed, stays on its node while
//! the node exists and the workload selects it, even when the node goes
//! offline. Agents keep running what they were told when the link is gone;
//! moving their work elsewhere would duplicate it when they come back (see
//! `placing` for what does move a replica).

use std::collections::{BTreeMap, BTreeSet};

use edge_api::keys::PublicKey;
use edge_api::model::{Event, Labels, NodeFacts, Resources, Taint, Workload, WorkloadSpec};
use edge_api::quantity::{Cpu, Memory};
use edge_api::seal::KemPublicKey;
use edge_api::wire::{Assignment, NodeDesired, SealedSecret};
use serde::{Deserialize, Serialize};

use crate::placing::Focus;
use crate::secrets::{SealSecret, SecretRecord};
use crate::store::{Batch, Collection};
use crate::tokens::TokenRecord;
use crate::tracked::Tracked;

/// A joined node as the hub persists it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    pub key: PublicKey,
    pub facts: NodeFacts,
    pub joined_ms: u64,
    /// The generation of `desired`; increases whenever `desired` changes.
    pub desired_generation: u64,
    pub desired: NodeDesired,
    /// What the hub seals the node's credential and secrets to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kem: Option<KemPublicKey>,
    /// The hash of the node's MQTT password ([`edge_api::token::hash_secret`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_hash: Option<String>,
    /// False while enrolment waits for `edgectl approve node`.
    #[serde(default = "yes")]
    pub approved: bool,
    /// Labels set through the API or by the bootstrap token; they win over
    /// the agent's own and alone may use the `admin.edge/` prefix.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub admin_labels: Labels,
    /// The most the node may offer, whatever it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    /// The id of the bootstrap token it enrolled with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_with: Option<String>,
    /// Set with `edgectl taint node`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// `edgectl cordon`: no new counted replicas are placed here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

fn yes() -> bool {
    true
}

impl NodeRecord {
    /// A node as it first enrols: nothing placed, nothing trusted beyond what
    /// the caller sets.
    pub fn new(name: &str, key: PublicKey, facts: NodeFacts, joined_ms: u64) -> Self {
        NodeRecord {
            name: name.to_string(),
            key,
            facts,
            joined_ms,
            desired_generation: 0,
            desired: NodeDesired { node: name.to_string(), workloads: vec![] },
            kem: None,
            credential_hash: None,
            approved: true,
            admin_labels: Labels::new(),
            capacity: None,
            enrolled_with: None,
            taints: Vec::new(),
            unschedulable: false,
        }
    }

    /// What the scheduler believes of the node: its own facts, with the
    /// admin's labels over its own and its offer capped by `capacity`.
    pub fn effective_facts(&self) -> NodeFacts {
        let mut f = self.facts.clone();
        f.labels.retain(|k, _| !edge_api::names::is_admin_label(k));
        f.labels.extend(self.admin_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(cap) = self.capacity {
            f.allocatable_memory.0 = f.allocatable_memory.0.min(cap.memory.0);
            f.allocatable_cpu.0 = f.allocatable_cpu.0.min(cap.cpu.0);
        }
        f
    }
}

pub type ReplicaId = (String, u32);

/// Where a replica runs and which revision of its workload it was given.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub node: String,
    pub revision: u64,
    /// A singleton on its way off the node: no longer in the node's desired
    /// state, and placed elsewhere only once the node has shown it stopped
    /// (or been silent long enough to have fenced it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

impl Placed {
    pub fn on(node: impl Into<String>, revision: u64) -> Placed {
        Placed { node: node.into(), revision, leaving: false }
    }
}

impl<'de> Deserialize<'de> for Placed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            /// Before revisions per replica: the node alone (revision 0,
            /// taken as the workload's generation when loaded).
            Node(String),
            Placed {
                node: String,
                revision: u64,
                #[serde(default)]
                leaving: bool,
            },
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Node(node) => Placed::on(node, 0),
            Raw::Placed { node, revision, leaving } => Placed { node, revision, leaving },
        })
    }
}

impl PartialEq<&str> for Placed {
    fn eq(&self, other: &&str) -> bool {
        self.node == *other
    }
}

/// Everything the hub must not lose, edited in place: each collection
/// records what a change touched (see [`Tracked`]), so a change writes only
/// that and [`Durable::revert`] takes it back. Besides, derived and never
/// written: each node's effective facts and load, kept up to date by the
/// reconciler for the nodes a change touches.
#[derive(Clone, Debug, Default)]
pub struct Durable {
    pub workloads: Tracked<String, Workload>,
    pub nodes: Tracked<String, NodeRecord>,
    pub placements: Placements,
    /// The last generation handed out, to any node. Generations come from
    /// this one counter so they never repeat, even for a node that is
    /// deleted and joins again: an agent never sees a new document with a
    /// generation it has already passed. Only the hub moves it: nothing a
    /// node reports does.
    pub last_generation: u64,
    /// Bootstrap and API tokens, by id (secrets only as hashes).
    pub tokens: Tracked<String, TokenRecord>,
    /// Secrets, by name (values encrypted).
    pub secrets: Tracked<String, SecretRecord>,
    /// The last revisions of each workload, by (workload, revision).
    pub revisions: Tracked<(String, u64), std::sync::Arc<edge_api::model::Revision>>,
    /// Each workload's latest rollout.
    pub rollouts: Tracked<String, crate::rollout::Rollout>,
    /// `last_generation` when last settled.
    settled_generation: u64,
    /// What the scheduler knows of each node, by name: exactly the nodes
    /// of `nodes` once a reconcile pass has run.
    known: BTreeMap<String, Known>,
}

impl PartialEq for Durable {
    /// The durable contents (not what is open, not what is derived).
    fn eq(&self, o: &Self) -> bool {
        self.workloads == o.workloads
            && self.nodes == o.nodes
            && *self.placements == *o.placements
            && self.last_generation == o.last_generation
            && self.tokens == o.tokens
            && self.secrets == o.secrets
            && self.revisions == o.revisions
            && self.rollouts == o.rollouts
    }
}

/// What the scheduler knows of a node: derived from its record and what is
/// placed on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Known {
    /// [`NodeRecord::effective_facts`].
    pub facts: NodeFacts,
    /// What the replicas placed there reserve.
    pub allocated: Resources,
    /// The Wasm instances they may hold at once.
    pub instances: u64,
    /// The workloads with a replica there.
    pub residents: BTreeSet<String>,
}

/// The placements, with an index of the replicas on each node. Reads go
/// through `Deref`; writes through `insert`, `remove` and `update`, which
/// keep the index and record what changed.
#[derive(Clone, Debug, Default)]
pub struct Placements {
    map: Tracked<ReplicaId, Placed>,
    by_node: BTreeMap<String, BTreeSet<ReplicaId>>,
}

impl std::ops::Deref for Placements {
    type Target = Tracked<ReplicaId, Placed>;
    fn deref(&self) -> &Tracked<ReplicaId, Placed> {
        &self.map
    }
}

impl<'a> IntoIterator for &'a Placements {
    type Item = (&'a ReplicaId, &'a Placed);
    type IntoIter = std::collections::btree_map::Iter<'a, ReplicaId, Placed>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl Placements {
    pub fn insert(&mut self, id: ReplicaId, p: Placed) -> Option<Placed> {
        let node = p.node.clone();
        let old = self.map.insert(id.clone(), p);
        if let Some(o) = &old {
            self.unindex(&o.node, &id);
        }
        self.by_node.entry(node).or_default().insert(id);
        old
    }

    pub fn remove(&mut self, id: &ReplicaId) -> Option<Placed> {
        let old = self.map.remove(id)?;
        self.unindex(&old.node, id);
        Some(old)
    }

    /// Edits a placement's revision or leaving mark (not its node: that is
    /// a remove and an insert).
    pub fn update(&mut self, id: &ReplicaId, edit: impl FnOnce(&mut u64, &mut bool)) {
        if let Some(p) = self.map.get_mut(id) {
            edit(&mut p.revision, &mut p.leaving);
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.by_node.clear();
    }

    fn unindex(&mut self, node: &str, id: &ReplicaId) {
        if let Some(set) = self.by_node.get_mut(node) {
            set.remove(id);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// The replicas placed on `node`.
    pub fn on<'a>(&'a self, node: &str) -> impl Iterator<Item = (&'a ReplicaId, &'a Placed)> + 'a {
        self.by_node.get(node).into_iter().flatten().filter_map(|id| self.map.get_key_value(id))
    }

    /// The replicas of workload `w`.
    pub fn of<'a>(&'a self, w: &str) -> impl Iterator<Item = (&'a ReplicaId, &'a Placed)> + 'a {
        self.map.range((w.to_string(), 0)..=(w.to_string(), u32::MAX))
    }

    /// The nodes that held or hold a placement touched since the last settle.
    pub fn touched_nodes(&self) -> BTreeSet<String> {
        let mut nodes = BTreeSet::new();
        for id in self.map.touched() {
            if let Some(Some(p)) = self.map.before(id) {
                nodes.insert(p.node.clone());
            }
            if let Some(p) = self.map.get(id) {
                nodes.insert(p.node.clone());
            }
        }
        nodes
    }

    fn settle(&mut self) {
        self.map.settle();
    }

    fn revert(&mut self) {
        let touched: Vec<ReplicaId> = self.map.touched().cloned().collect();
        for id in &touched {
            if let Some(p) = self.map.get(id) {
                let node = p.node.clone();
                self.unindex(&node, id);
            }
        }
        self.map.revert();
        for id in touched {
            if let Some(p) = self.map.get(&id) {
                self.by_node.entry(p.node.clone()).or_default().insert(id);
            }
        }
    }
}

/// Generations per millisecond of the clock floor (see [`Durable::next_generation`]).
const GENERATIONS_PER_MS: u64 = 1000;

impl Durable {
    /// A fresh generation, larger than every one handed out before, and not
    /// below `now_ms × 1000`: a hub whose state was restored from an older
    /// copy still hands out generations above those its agents hold, without
    /// believing what they report. (u64 holds this until the year 2554.)
    pub fn next_generation(&mut self, now_ms: u64) -> u64 {
        let floor = now_ms.saturating_mul(GENERATIONS_PER_MS);
        self.last_generation = self.last_generation.saturating_add(1).max(floor);
        self.last_generation
    }
}

/// What a reconcile pass found, besides its edits to [`Durable`].
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Replicas that fit nowhere, with the reason.
    pub unschedulable: BTreeMap<ReplicaId, String>,
    /// Events to record, by workload.
    pub events: Vec<(String, Event)>,
    /// Nodes whose desired state changed (publish them).
    pub changed_nodes: Vec<String>,
    /// Replicas sent without a secret they use, with the reason.
    pub undeliverable: BTreeMap<ReplicaId, String>,
    /// The workloads this pass placed (None: all): `unschedulable` is
    /// the whole truth for them only.
    pub placed: Option<BTreeSet<String>>,
    /// The nodes whose desired state this pass rebuilt (None: all):
    /// `undeliverable` is the whole truth for the replicas there only.
    pub rebuilt: Option<BTreeSet<String>>,
}

impl Outcome {
    /// The replicas that fit nowhere, given what was known before this pass.
    pub fn unschedulable_after(&self, before: &BTreeMap<ReplicaId, String>) -> BTreeMap<ReplicaId, String> {
        let Some(placed) = &self.placed else { return self.unschedulable.clone() };
        let mut all: BTreeMap<ReplicaId, String> =
            before.iter().filter(|(id, _)| !placed.contains(&id.0)).map(|(k, v)| (k.clone(), v.clone())).collect();
        all.extend(self.unschedulable.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// The replicas sent without a secret they use, given what was known
    /// before this pass.
    pub fn undeliverable_after(
        &self,
        d: &Durable,
        before: &BTreeMap<ReplicaId, String>,
    ) -> BTreeMap<ReplicaId, String> {
        let Some(rebuilt) = &self.rebuilt else { return self.undeliverable.clone() };
        let mut all: BTreeMap<ReplicaId, String> = before
            .iter()
            .filter(|(id, _)| d.placements.get(*id).is_some_and(|p| !p.leaving && !rebuilt.contains(&p.node)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.extend(self.undeliverable.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }
}

/// What a reconcile pass looks at besides what the open change touched.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    /// Everything (at start, now and then, and in tests).
    pub all: bool,
    /// Workloads whose state may have moved without a change to them: with
    /// replicas that fit nowhere, with a rollout under way, with replicas
    /// on nodes gone silent or on their way off a node.
    pub workloads: BTreeSet<String>,
    /// Nodes whose readiness changed.
    pub nodes: BTreeSet<String>,
}

impl Scope {
    pub fn all() -> Scope {
        Scope { all: true, ..Scope::default() }
    }
}

impl Durable {
    /// The writes that make the disk what memory is, for everything
    /// changed since the last settle.
    pub fn changes(&self) -> Result<Batch, serde_json::Error> {
        let mut b = Batch::default();
        changes_of(&mut b, Collection::Workloads, &self.workloads, |k| k.clone())?;
        changes_of(&mut b, Collection::Nodes, &self.nodes, |k| k.clone())?;
        changes_of(&mut b, Collection::Placements, &self.placements.map, placement_key)?;
        changes_of(&mut b, Collection::Tokens, &self.tokens, |k| k.clone())?;
        changes_of(&mut b, Collection::Secrets, &self.secrets, |k| k.clone())?;
        changes_of(&mut b, Collection::Rollouts, &self.rollouts, |k| k.clone())?;
        for (k, v) in self.revisions.changes() {
            match v {
                Some(v) => b.put(Collection::Revisions, revision_key(k), serde_json::to_vec(&**v)?),
                None => b.delete(Collection::Revisions, revision_key(k)),
            }
        }
        if self.settled_generation != self.last_generation {
            b.put(Collection::Meta, LAST_GENERATION, serde_json::to_vec(&self.last_generation)?);
        }
        Ok(b)
    }

    /// Whether nothing is open (every change is settled or reverted).
    pub fn is_settled(&self) -> bool {
        self.workloads.is_settled()
            && self.nodes.is_settled()
            && self.placements.map.is_settled()
            && self.tokens.is_settled()
            && self.secrets.is_settled()
            && self.revisions.is_settled()
            && self.rollouts.is_settled()
            && self.settled_generation == self.last_generation
    }

    /// Accepts every change since the last settle (once it is on disk).
    pub fn settle(&mut self) {
        self.workloads.settle();
        self.nodes.settle();
        self.placements.settle();
        self.tokens.settle();
        self.secrets.settle();
        self.revisions.settle();
        self.rollouts.settle();
        self.settled_generation = self.last_generation;
    }

    /// Takes back every change since the last settle (a write failed). The
    /// derived state is rebuilt for the nodes they touched.
    pub fn revert(&mut self) {
        let nodes: BTreeSet<String> = self.nodes.touched().cloned().chain(self.placements.touched_nodes()).collect();
        self.workloads.revert();
        self.nodes.revert();
        self.placements.revert();
        self.tokens.revert();
        self.secrets.revert();
        self.revisions.revert();
        self.rollouts.revert();
        self.last_generation = self.settled_generation;
        for n in nodes {
            self.refresh(&n);
        }
    }

    /// What the scheduler knows of `node` (built by the reconciler).
    pub fn known(&self, node: &str) -> Option<&Known> {
        self.known.get(node)
    }

    /// Rebuilds what is known of `node` from its record and placements.
    pub(crate) fn refresh(&mut self, node: &str) {
        let Some(rec) = self.nodes.get(node) else {
            self.known.remove(node);
            return;
        };
        let facts = rec.effective_facts();
        let known = Known {
            facts,
            allocated: self.allocated(node),
            instances: self.allocated_instances(node),
            residents: self.workloads_on(node).into_iter().collect(),
        };
        self.known.insert(node.to_string(), known);
    }

    /// Rebuilds what is known of every node.
    pub(crate) fn refresh_all(&mut self) {
        self.known.clear();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            self.refresh(&n);
        }
    }

    /// The spec of a workload's revision: its current spec for its
    /// generation, else the kept revision (else, if that was lost, the
    /// current spec).
    pub fn spec_of(&self, w: &str, revision: u64) -> Option<&WorkloadSpec> {
        let wl = self.workloads.get(w)?;
        if revision == wl.metadata.generation {
            return Some(&wl.spec);
        }
        Some(self.revisions.get(&(w.to_string(), revision)).map_or(&wl.spec, |r| &r.spec))
    }

    /// The specs of the replicas placed on `node`.
    fn specs_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a WorkloadSpec> + 'a {
        self.placements.on(node).filter_map(|((w, _), p)| self.spec_of(w, p.revision))
    }

    /// What the replicas placed on `node` request in total.
    pub fn allocated(&self, node: &str) -> Resources {
        let mut r = Resources { memory: Memory(0), cpu: Cpu(0) };
        for spec in self.specs_on(node) {
            let want = spec.reserved();
            r.memory.0 = r.memory.0.saturating_add(want.memory.0);
            r.cpu.0 = r.cpu.0.saturating_add(want.cpu.0);
        }
        r
    }

    /// The Wasm instances the replicas placed on `node` may hold at once.
    pub fn allocated_instances(&self, node: &str) -> u64 {
        self.specs_on(node).map(|s| u64::from(s.instances())).sum()
    }

    /// The workload names with a replica on `node`.
    pub fn workloads_on(&self, node: &str) -> Vec<String> {
        let set: BTreeSet<&String> = self.placements.on(node).map(|((w, _), _)| w).collect();
        set.into_iter().cloned().collect()
    }
}

/// What the reconciler knows of the live fleet.
pub struct Observed<'a> {
    /// Which nodes are Ready (may take new counted replicas).
    pub ready: &'a dyn Fn(&str) -> bool,
    /// What a node last reported of a replica: (node, workload, replica).
    pub report: &'a dyn Fn(&str, &str, u32) -> Option<edge_api::model::InstanceStatus>,
    /// How long ago the hub last heard a heartbeat of a node (ms; since the
    /// hub started if none since).
    pub silent_ms: &'a dyn Fn(&str) -> u64,
    /// The newest desired-state generation a node says it applied.
    pub observed_gen: &'a dyn Fn(&str) -> u64,
    /// Revisions kept per workload (a rollback records one).
    pub keep_revisions: usize,
}

impl<'a> Observed<'a> {
    /// Nodes as `ready` says, with no reports.
    pub fn nodes(ready: &'a dyn Fn(&str) -> bool) -> Observed<'a> {
        Observed { ready, report: &|_, _, _| None, silent_ms: &|_| 0, observed_gen: &|_| 0, keep_revisions: 10 }
    }
}

/// Drops placements that no longer make sense, places unplaced replicas, and
/// rebuilds each node's desired state, bumping its generation when it changed.
/// `seen` says which nodes may take new replicas and what they report.
/// `seal` puts the secrets each assignment uses into it, sealed to its node.
pub fn reconcile(d: &mut Durable, seen: &Observed, now_ms: u64, seal: &dyn SealSecret) -> Outcome {
    reconcile_in(d, seen, now_ms, seal, &Scope::all())
}

/// What a change touched, with what `scope` adds: the focus of an
/// incremental pass. What is known of those nodes, and of the nodes where
/// those workloads run, is brought up to date.
fn focus(d: &mut Durable, scope: &Scope) -> Focus {
    let mut f = Focus { workloads: scope.workloads.clone(), nodes: scope.nodes.clone() };
    f.workloads.extend(d.workloads.touched().cloned());
    f.workloads.extend(d.revisions.touched().map(|(w, _)| w.clone()));
    f.workloads.extend(d.rollouts.touched().cloned());
    f.workloads.extend(d.placements.touched().map(|(w, _)| w.clone()));
    let secrets: BTreeSet<&String> = d.secrets.touched().collect();
    if !secrets.is_empty() {
        let users = d
            .workloads
            .iter()
            .filter(|(_, wl)| wl.spec.secret_names().into_iter().any(|s| secrets.iter().any(|x| x.as_str() == s)));
        f.workloads.extend(users.map(|(n, _)| n.clone()).collect::<Vec<_>>());
    }
    f.nodes.extend(d.nodes.touched().cloned());
    f.nodes.extend(d.placements.touched_nodes());
    let mut stale = f.nodes.clone();
    for w in &f.workloads {
        stale.extend(d.placements.of(w).map(|(_, p)| p.node.clone()));
    }
    for n in stale {
        d.refresh(&n);
    }
    f
}

/// [`reconcile`], over what `scope` says: everything, or what the open
/// change touched and what the scope adds. An incremental pass gives the
/// same result as a whole one when the scope names everything that moved
/// without a change (see [`Scope`]).
pub fn reconcile_in(d: &mut Durable, seen: &Observed, now_ms: u64, seal: &dyn SealSecret, scope: &Scope) -> Outcome {
    let mut out = Outcome::default();
    let focus = if scope.all {
        d.refresh_all();
        None
    } else {
        Some(focus(d, scope))
    };

    // 1. Placements: drop those that no longer hold, place what has no node.
    crate::placing::place_all(d, seen, now_ms, &mut out, focus.as_ref());
    if focus.is_none() {
        out.placed = None;
    }

    // 2. Rollouts: which replicas get the workload's new revision now.
    let rolling: Option<BTreeSet<String>> = focus.as_ref().map(|f| {
        let mut w = f.workloads.clone();
        w.extend(d.placements.touched().map(|(w, _)| w.clone()));
        w.extend(d.rollouts.iter().filter(|(_, r)| r.phase.is_active()).map(|(n, _)| n.clone()));
        w
    });
    crate::rollouts::roll(d, seen, now_ms, &mut out, rolling.as_ref());

    // 3. Rebuild desired state per node: every node, or those where
    //    something the pass looked at runs or ran.
    let nodes: Vec<String> = match &focus {
        None => d.nodes.keys().cloned().collect(),
        Some(f) => {
            let mut nodes = f.nodes.clone();
            nodes.extend(d.placements.touched_nodes());
            for w in rolling.iter().flatten().chain(&f.workloads) {
                nodes.extend(d.placements.of(w).map(|(_, p)| p.node.clone()));
            }
            nodes.retain(|n| d.nodes.contains_key(n));
            out.rebuilt = Some(nodes.clone());
            nodes.into_iter().collect()
        }
    };
    let mut docs: BTreeMap<String, Vec<Assignment>> = nodes.iter().map(|n| (n.clone(), Vec::new())).collect();
    let placed: Vec<(&ReplicaId, &Placed)> = nodes.iter().flat_map(|n| d.placements.on(n)).collect();
    for ((w, r), placed) in placed.into_iter().filter(|(_, p)| !p.leaving) {
        let node = &placed.node;
        let wl = &d.workloads[w];
        let Some(spec) = d.spec_of(w, placed.revision) else { continue };
        let Some(list) = docs.get_mut(node) else { continue };
        // A secret that cannot be sealed is left out: the agent reports the
        // replica as SecretUnavailable, which says more than a missing replica.
        let mut secrets = BTreeMap::new();
        for name in spec.secret_names() {
            let sealed = match (d.secrets.get(name), d.nodes.get(node).and_then(|n| n.kem.as_ref())) {
                (Some(rec), Some(kem)) => seal.seal(node, kem, rec).map(|s| (rec.version, s)),
                (None, _) => Err(format!("secret {name:?} does not exist")),
                (_, None) => Err(format!("node {node} has no sealing key (enrol it again)")),
            };
            match sealed {
                Ok((version, sealed)) => {
                    secrets.insert(name.to_string(), SealedSecret { version, sealed });
                }
                Err(e) => {
                    out.undeliverable.insert((w.clone(), *r), e);
                }
            }
        }
        list.push(Assignment {
            workload: w.clone(),
            replica: *r,
            uid: wl.metadata.uid.clone(),
            generation: placed.revision,
            spec: spec.clone(),
            secrets,
        });
    }
    for (name, workloads) in docs {
        let doc = NodeDesired { node: name.clone(), workloads };
        if d.nodes.get(&name).is_some_and(|rec| rec.desired != doc) {
            // A document the broker (or the node) would refuse is not sent:
            // the node keeps its last one, and each replica says why.
            let size = serde_json::to_vec(&doc).map_or(usize::MAX, |v| v.len());
            if size > DESIRED_BODY_LIMIT {
                for a in &doc.workloads {
                    out.undeliverable.insert(
                        (a.workload.clone(), a.replica),
                        format!(
                            "node {name}'s desired state would be {size} bytes, over the {DESIRED_BODY_LIMIT}-byte limit: use fewer or smaller secrets, or spread the workloads over more nodes"
                        ),
                    );
                }
                continue;
            }
            let generation = d.next_generation(now_ms);
            if let Some(rec) = d.nodes.get_mut(&name) {
                rec.desired = doc;
                rec.desired_generation = generation;
            }
            out.changed_nodes.push(name);
        }
    }
    out
}

/// The largest desired-state body the hub sends: the wire's limit, less
/// room for the envelope.
pub const DESIRED_BODY_LIMIT: usize = edge_api::wire::MAX_PAYLOAD - (16 << 10);

/// The Meta key of [`Durable::last_generation`].
pub const LAST_GENERATION: &str = "last_generation";

fn placement_key((w, r): &ReplicaId) -> String {
    format!("{w}/{r}")
}

/// `<workload>/<revision>`, the number zero-padded so keys sort by it.
pub fn revision_key((w, r): &(String, u64)) -> String {
    format!("{w}/{r:020}")
}

pub fn parse_revision_key(k: &str) -> Option<(String, u64)> {
    let (w, r) = k.rsplit_once('/')?;
    Some((w.to_string(), r.parse().ok()?))
}

pub fn parse_placement_key(k: &str) -> Option<ReplicaId> {
    let (w, r) = k.rsplit_once('/')?;
    Some((w.to_string(), r.parse().ok()?))
}

fn changes_of<K: Ord + Clone, V: Clone + PartialEq + Serialize>(
    b: &mut Batch,
    c: Collection,
    map: &Tracked<K, V>,
    key: impl Fn(&K) -> String,
) -> Result<(), serde_json::Error> {
    for (k, v) in map.changes() {
        match v {
            Some(v) => b.put(c, key(k), serde_json::to_vec(v)?),
            None => b.delete(c, key(k)),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use edge_api::digest::Digest;
    use edge_api::keys::SigningKey;
    use edge_api::model::*;

    pub(crate) fn workload(name: &str, replicas: u32, mem_mib: u64, generation: u64) -> Workload {
        Workload {
            api_version: "edge/v1".into(),
            kind: "Workload".into(),
            metadata: Metadata { name: name.into(), uid: format!("uid-{name}"), generation, ..Default::default() },
            spec: WorkloadSpec {
                replicas: edge_api::model::Replicas::Count(replicas),
                restart: RestartPolicy::OnFailure,
                resources: Resources { memory: Memory::mib(mem_mib), cpu: Cpu(100) },
                placement: Placement::default(),
                runtime: Runtime::Wasm(WasmSpec {
                    component: ArtifactRef::Digest(Digest::of(name.as_bytes())),
                    args: vec![],
                    env: Default::default(),
                    secrets: vec![],
                    max_instances: None,
                    memory_total: None,
                    cpu_budget: None,
                    request_timeout: None,
                    outbound: vec![],
                    key_value: false,
                    source: None,
                }),
                http: None,
                health: Default::default(),
                rerun_interrupted: true,
                rollout: RolloutSpec::standard(),
                node_loss: Default::default(),
            },
        }
    }

    pub(crate) fn node(name: &str, mem_mib: u64) -> NodeRecord {
        NodeRecord::new(
            name,
            SigningKey::generate().unwrap().public(),
            NodeFacts {
                arch: "amd64".into(),
                os: "linux".into(),
                os_release: String::new(),
                kernel: String::new(),
                cpus: 2,
                memory: Memory::mib(mem_mib),
                allocatable_memory: Memory::mib(mem_mib),
                allocatable_cpu: Cpu(2000),
                labels: Default::default(),
                runtimes: vec![RuntimeInfo { name: "wasm".into(), ..Default::default() }],
                agent_version: String::new(),
                wasm_instances: None,
            },
            0,
        )
    }

    pub(crate) fn cluster(nodes: &[(&str, u64)], workloads: &[Workload]) -> Durable {
        Durable {
            workloads: workloads.iter().map(|w| (w.metadata.name.clone(), w.clone())).collect(),
            nodes: nodes.iter().map(|(n, m)| (n.to_string(), node(n, *m))).collect(),
            ..Durable::default()
        }
    }

    const ALL_READY: &dyn Fn(&str) -> bool = &|_| true;

    /// Sealing for workloads that use no secrets.
    struct NoSecrets;
    impl SealSecret for NoSecrets {
        fn seal(&self, _: &str, _: &KemPublicKey, rec: &SecretRecord) -> Result<edge_api::seal::Sealed, String> {
            Err(format!("unexpected secret {}", rec.name))
        }
    }

    #[test]
    fn secrets_go_sealed_to_each_node_and_only_changes_republish() {
        let keys = crate::secrets::SecretKeys::random();
        let secret = |v: &str| Secret {
            api_version: "edge/v1".into(),
            kind: "Secret".into(),
            metadata: SecretMetadata { name: "db".into(), labels: Labels::new() },
            data: [("password".to_string(), v.to_string())].into(),
        };
        let mut w = workload("web", 2, 64, 1);
        if let Runtime::Wasm(spec) = &mut w.spec.runtime {
            spec.env.insert("P".into(), EnvValue::Secret(SecretKeyRef { secret: "db".into(), key: "password".into() }));
        }
        let mut d = cluster(&[("a", 1024), ("b", 1024), ("nokey", 1024)], &[w, workload("plain", 1, 64, 1)]);
        let kems: BTreeMap<&str, edge_api::seal::KemKeyPair> =
            ["a", "b"].into_iter().map(|n| (n, edge_api::seal::KemKeyPair::generate().unwrap())).collect();
        for (n, k) in &kems {
            d.nodes.get_mut(*n).unwrap().kem = Some(k.public());
        }
        d.nodes.get_mut("nokey").unwrap().facts.allocatable_memory = Memory::mib(1);
        d.secrets.insert("db".into(), keys.encrypt(&secret("hunter2"), 1, 0, 0).unwrap());
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &keys);
        for (n, k) in &kems {
            let a = d.nodes[*n].desired.workloads.iter().find(|a| a.workload == "web").unwrap();
            let s = &a.secrets["db"];
            let plain = k.open(&edge_api::seal::secret_info(n, "db", 1), &s.sealed).unwrap();
            assert_eq!(plain, br#"{"password":"hunter2"}"#);
            assert!(!serde_json::to_string(&d.nodes[*n].desired).unwrap().contains("hunter2"));
        }
        let plain = d.nodes.values().flat_map(|n| &n.desired.workloads).find(|a| a.workload == "plain").unwrap();
        assert!(plain.secrets.is_empty(), "a workload gets only the secrets it uses");

        // Unchanged: byte-identical documents, nothing republished.
        let snapshot = d.clone();
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &keys);
        assert!(out.changed_nodes.is_empty());
        assert_eq!(d, snapshot);

        // A new version reaches both nodes with web, and not the other.
        d.secrets.insert("db".into(), keys.encrypt(&secret("hunter3"), 2, 0, 0).unwrap());
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &keys);
        assert_eq!(out.changed_nodes, ["a", "b"]);

        // A node without a sealing key gets the replica without the secret, and an event says why.
        d.nodes.get_mut("nokey").unwrap().facts.allocatable_memory = Memory::mib(1024);
        d.nodes.get_mut("a").unwrap().facts.allocatable_memory = Memory::mib(1);
        d.nodes.get_mut("b").unwrap().facts.allocatable_memory = Memory::mib(1);
        d.workloads.get_mut("web").unwrap().spec.replicas = edge_api::model::Replicas::Count(3);
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &keys);
        let a = d.nodes["nokey"].desired.workloads.iter().find(|a| a.workload == "web").unwrap();
        assert!(a.secrets.is_empty());
        let why = out.undeliverable.values().next().unwrap();
        assert!(why.contains("node nokey has no sealing key"), "{why}");
    }

    #[test]
    fn a_desired_state_too_large_to_send_is_held_back_and_explained() {
        let keys = crate::secrets::SecretKeys::random();
        let big = "x".repeat(edge_api::manifest::MAX_SECRET_VALUE);
        let mut d = cluster(&[("a", 1 << 20)], &[]);
        d.nodes.get_mut("a").unwrap().kem = Some(edge_api::seal::KemKeyPair::generate().unwrap().public());
        d.nodes.get_mut("a").unwrap().facts.allocatable_memory = Memory::mib(1 << 20);
        for i in 0..12 {
            let name = format!("s{i}");
            let data = (0..4).map(|k| (format!("k{k}"), big.clone())).collect();
            let s = Secret {
                api_version: "edge/v1".into(),
                kind: "Secret".into(),
                metadata: SecretMetadata { name: name.clone(), labels: Labels::new() },
                data,
            };
            d.secrets.insert(name.clone(), keys.encrypt(&s, 1, 0, 0).unwrap());
            let mut w = workload(&format!("w{i}"), 1, 1, 1);
            if let Runtime::Wasm(spec) = &mut w.spec.runtime {
                spec.secrets.push(SecretMount { secret: name, path: "/s".into() });
            }
            d.workloads.insert(w.metadata.name.clone(), w);
        }
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &keys);
        assert!(d.nodes["a"].desired.workloads.is_empty(), "the oversized document was not taken");
        assert!(out.changed_nodes.is_empty());
        assert_eq!(out.undeliverable.len(), 12);
        assert!(out.undeliverable.values().all(|m| m.contains("byte limit")));
    }

    #[test]
    fn replicas_are_placed_and_published_once() {
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[workload("web", 2, 64, 1)]);
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_eq!(d.placements.len(), 2);
        let nodes: BTreeSet<&String> = d.placements.values().map(|p| &p.node).collect();
        assert_eq!(nodes.len(), 2, "replicas spread over both nodes");
        assert_eq!(out.changed_nodes, vec!["a", "b"]);
        assert_eq!((d.nodes["a"].desired_generation, d.nodes["b"].desired_generation), (1, 2));
        assert_eq!(d.last_generation, 2);
        assert_eq!(out.events.len(), 2);

        // A second pass with nothing new changes nothing: level-triggered and idempotent.
        let snapshot = d.clone();
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_eq!(d, snapshot);
        assert!(out.changed_nodes.is_empty() && out.events.is_empty());
    }

    #[test]
    fn a_spec_change_bumps_only_the_nodes_that_run_it() {
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[workload("x", 1, 64, 1), workload("y", 1, 64, 1)]);
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        let x_node = d.placements[&("x".to_string(), 0)].node.clone();
        let y_node = d.placements[&("y".to_string(), 0)].node.clone();
        assert_ne!(x_node, y_node);
        let old = d.workloads["x"].clone();
        crate::revisions::record_revision(&mut d, &old, "t", "created".into(), 0, 10);
        d.workloads.insert("x".into(), workload("x", 1, 65, 2));
        let (x_gen, y_gen) = (d.nodes[&x_node].desired_generation, d.nodes[&y_node].desired_generation);
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_eq!(out.changed_nodes, vec![x_node.clone()]);
        assert!(d.nodes[&x_node].desired_generation > x_gen.max(y_gen), "a fresh generation, above all before");
        assert_eq!(d.nodes[&y_node].desired_generation, y_gen);
        assert_eq!(d.nodes[&x_node].desired.workloads[0].generation, 2);
    }

    #[test]
    fn offline_nodes_keep_their_replicas_but_get_no_new_ones() {
        let mut d = cluster(&[("a", 1024)], &[workload("x", 1, 64, 1)]);
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        d.nodes.insert("b".into(), node("b", 1024));
        d.workloads.insert("y".into(), workload("y", 1, 64, 1));
        let out = reconcile(&mut d, &Observed::nodes(&|n| n == "b"), 0, &NoSecrets);
        assert_eq!(d.placements[&("x".to_string(), 0)], "a", "x stays on offline a");
        assert_eq!(d.placements[&("y".to_string(), 0)], "b");
        assert!(out.unschedulable.is_empty());
    }

    #[test]
    fn unschedulable_replicas_wait_and_are_placed_when_a_node_fits() {
        let mut d = cluster(&[("small", 100)], &[workload("big", 1, 512, 1)]);
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert!(d.placements.is_empty());
        assert_eq!(
            out.unschedulable[&("big".to_string(), 0)],
            "0/1 nodes are available: 1 node has insufficient memory"
        );
        d.nodes.insert("large".into(), node("large", 2048));
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_eq!(d.placements[&("big".to_string(), 0)], "large");
        assert!(out.unschedulable.is_empty());
    }

    #[test]
    fn deleting_workloads_replicas_and_nodes_cleans_placements() {
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[workload("x", 2, 64, 1), workload("y", 1, 64, 1)]);
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        d.workloads.remove("y");
        d.workloads.insert("x".into(), workload("x", 1, 64, 2));
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_eq!(d.placements.keys().cloned().collect::<Vec<_>>(), vec![("x".to_string(), 0)]);
        let on = d.placements[&("x".to_string(), 0)].node.clone();
        d.nodes.remove(&on);
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_ne!(d.placements[&("x".to_string(), 0)].node, on, "rescheduled off the deleted node");
    }

    #[test]
    fn a_change_writes_only_what_changed_and_reverts_whole() {
        let mut d = cluster(&[("a", 1024)], &[workload("x", 1, 64, 1)]);
        d.settle();
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        let b = d.changes().unwrap();
        let touched: Vec<(Collection, String, bool)> =
            b.ops.iter().map(|(c, k, v)| (*c, k.clone(), v.is_some())).collect();
        assert_eq!(
            touched,
            vec![
                (Collection::Nodes, "a".into(), true),
                (Collection::Placements, "x/0".into(), true),
                (Collection::Meta, LAST_GENERATION.into(), true),
            ]
        );
        d.settle();
        let settled = d.clone();
        d.workloads.remove("x");
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        let b = d.changes().unwrap();
        assert!(b.ops.iter().any(|(c, k, v)| *c == Collection::Workloads && k == "x" && v.is_none()));
        assert!(b.ops.iter().any(|(c, k, v)| *c == Collection::Placements && k == "x/0" && v.is_none()));
        // A write that failed: all of it is taken back, the index too.
        d.revert();
        assert_eq!(d, settled);
        assert_eq!(d.placements.on("a").count(), 1);
        assert!(d.changes().unwrap().is_empty());
    }

    #[test]
    fn generations_never_repeat_even_for_a_node_that_joins_again() {
        let mut d = cluster(&[("a", 1024)], &[workload("x", 1, 64, 1)]);
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        let first = d.nodes["a"].desired_generation;
        d.nodes.remove("a");
        d.workloads.clear();
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        d.nodes.insert("a".into(), node("a", 1024));
        d.workloads.insert("y".into(), workload("y", 1, 64, 1));
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert!(d.nodes["a"].desired_generation > first);
    }

    #[test]
    fn the_scheduler_believes_admin_labels_and_capacity_over_what_a_node_reports() {
        let mut rogue = node("rogue", 1 << 40); // claims a mebibyte of mebibytes
        rogue.facts.labels.insert("admin.edge/site".into(), "plant-1".into());
        rogue.facts.labels.insert("site".into(), "plant-1".into());
        rogue.capacity = Some(Resources { memory: Memory::mib(256), cpu: Cpu(500) });
        let f = rogue.effective_facts();
        assert_eq!(f.labels.get("admin.edge/site"), None, "a node cannot give itself an admin label");
        assert_eq!(f.labels.get("site").map(String::as_str), Some("plant-1"), "its own labels stay");
        assert_eq!((f.allocatable_memory, f.allocatable_cpu), (Memory::mib(256), Cpu(500)));
        let mut genuine = node("genuine", 1024);
        genuine.admin_labels.insert("admin.edge/site".into(), "plant-1".into());
        genuine.admin_labels.insert("site".into(), "plant-2".into());
        assert_eq!(genuine.effective_facts().labels.get("site").map(String::as_str), Some("plant-2"), "admin wins");

        let mut pinned = workload("pinned", 1, 64, 1);
        pinned.spec.placement.node_selector = edge_api::model::Selector::parse("admin.edge/site=plant-1").unwrap();
        let mut d = cluster(&[], &[pinned, workload("big", 1, 512, 1)]);
        d.nodes.insert("rogue".into(), rogue);
        d.nodes.insert("genuine".into(), genuine);
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert_eq!(d.placements[&("pinned".to_string(), 0)], "genuine");
        assert_eq!(d.placements[&("big".to_string(), 0)], "genuine", "the rogue's claimed memory is capped");
    }

    #[test]
    fn nodes_waiting_for_approval_get_no_work() {
        let mut d = cluster(&[("a", 1024)], &[workload("x", 1, 64, 1)]);
        d.nodes.get_mut("a").unwrap().approved = false;
        let out = reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        assert!(d.placements.is_empty());
        assert!(out.changed_nodes.is_empty());
        assert_eq!(out.unschedulable[&("x".to_string(), 0)], "0/1 nodes are available: 1 node is not ready");
    }

    #[test]
    fn generations_follow_the_clock_floor_and_never_wrap() {
        let mut d = Durable::default();
        assert_eq!(d.next_generation(0), 1);
        assert_eq!(d.next_generation(5), 5000, "jumps to the floor");
        assert_eq!(d.next_generation(5), 5001, "then counts on within the same millisecond");
        assert_eq!(d.next_generation(1), 5002, "a clock that went back changes nothing");
        d.last_generation = u64::MAX - 1;
        assert_eq!(d.next_generation(0), u64::MAX);
        assert_eq!(d.next_generation(0), u64::MAX, "saturates instead of wrapping to 0");
    }

    #[test]
    fn placements_kept_before_revisions_still_load() {
        let old: Placed = serde_json::from_str(r#""pi-1""#).unwrap();
        assert_eq!(old, Placed::on("pi-1", 0));
        let new = Placed { node: "pi-1".into(), revision: 7, leaving: true };
        assert_eq!(serde_json::from_slice::<Placed>(&serde_json::to_vec(&new).unwrap()).unwrap(), new);
        assert!(serde_json::from_str::<Placed>(r#"{"node":1}"#).is_err());
    }

    #[test]
    fn placement_keys_round_trip() {
        assert_eq!(parse_placement_key("web/3"), Some(("web".into(), 3)));
        assert_eq!(parse_placement_key("web"), None);
    }

    /// A small deterministic generator, so a failing sequence is named by its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a>(&mut self, names: &'a [String]) -> Option<&'a String> {
            (!names.is_empty()).then(|| &names[self.below(names.len() as u64) as usize])
        }
    }

    /// One random change, as the API or a node would make it; returns a
    /// node whose readiness flipped, if it was that.
    fn random_change(rng: &mut Rng, d: &mut Durable, down: &mut BTreeSet<String>, key: &PublicKey) -> Option<String> {
        let workloads: Vec<String> = d.workloads.keys().cloned().collect();
        let nodes: Vec<String> = d.nodes.keys().cloned().collect();
        match rng.below(12) {
            0..=2 => {
                let name = format!("w{}", rng.below(12));
                let generation = d.workloads.get(&name).map_or(1, |w| w.metadata.generation + 1);
                let mut w = workload(&name, rng.below(5) as u32, 64 * (1 + rng.below(8)), generation);
                match rng.below(6) {
                    0 => w.spec.replicas = edge_api::model::Replicas::PerNode,
                    1 => w.spec.placement.node_selector = edge_api::placement::Selector::parse("zone=a").unwrap(),
                    2 => w.spec.placement.anti_affinity = vec![name.clone()],
                    3 => w.spec.placement.spread = Some("zone".into()),
                    4 => w.spec.node_loss.singleton = true,
                    _ => {}
                }
                d.workloads.insert(name, w);
            }
            3 => {
                if let Some(w) = rng.pick(&workloads) {
                    d.workloads.remove(w);
                }
            }
            4 | 5 => {
                let name = format!("n{}", rng.below(10));
                let mut rec = node(&name, 128 * (1 + rng.below(16)));
                rec.key = *key;
                if rng.below(2) == 0 {
                    rec.facts.labels.insert("zone".into(), if rng.below(2) == 0 { "a" } else { "b" }.into());
                }
                if let Some(old) = d.nodes.get(&name) {
                    rec.desired = old.desired.clone();
                    rec.desired_generation = old.desired_generation;
                }
                d.nodes.insert(name, rec);
            }
            6 => {
                if let Some(n) = rng.pick(&nodes) {
                    d.nodes.remove(n);
                }
            }
            7 => {
                if let Some(n) = rng.pick(&nodes) {
                    let rec = d.nodes.get_mut(n).unwrap();
                    let zone = ["a", "b", "c"][rng.below(3) as usize];
                    rec.admin_labels.insert("zone".into(), zone.into());
                }
            }
            8 => {
                if let Some(n) = rng.pick(&nodes) {
                    let rec = d.nodes.get_mut(n).unwrap();
                    let t = if rec.taints.is_empty() { "dedicated=x:NoExecute" } else { "dedicated-" };
                    edge_api::placement::TaintChange::parse(t).unwrap().apply(&mut rec.taints);
                }
            }
            9 => {
                if let Some(n) = rng.pick(&nodes) {
                    let rec = d.nodes.get_mut(n).unwrap();
                    match rng.below(3) {
                        0 => rec.unschedulable = !rec.unschedulable,
                        1 => rec.approved = !rec.approved,
                        _ => rec.capacity = Some(Resources { memory: Memory::mib(64 * rng.below(10)), cpu: Cpu(4000) }),
                    }
                }
            }
            _ => {
                if let Some(n) = rng.pick(&nodes) {
                    if !down.remove(n) {
                        down.insert(n.clone());
                    }
                    return Some(n.clone());
                }
            }
        }
        None
    }

    #[test]
    fn an_incremental_pass_gives_what_a_whole_one_does() {
        let key = SigningKey::generate().unwrap().public();
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut inc = Durable::default();
            let mut whole = Durable::default();
            let (mut inc_waiting, mut inc_undelivered) = (BTreeMap::new(), BTreeMap::new());
            let mut down: BTreeSet<String> = BTreeSet::new();
            for step in 0..120 {
                // The same change to both.
                let mut twin = Rng(rng.0);
                let flipped = random_change(&mut rng, &mut inc, &mut down.clone(), &key);
                random_change(&mut twin, &mut whole, &mut down, &key);
                let ready = |n: &str| !down.contains(n);
                let seen = Observed::nodes(&ready);
                let mut scope = Scope::default();
                scope.nodes.extend(flipped);
                scope.workloads.extend(inc_waiting.keys().map(|(w, _): &ReplicaId| w.clone()));
                let a = reconcile_in(&mut inc, &seen, step, &NoSecrets, &scope);
                let b = reconcile(&mut whole, &seen, step, &NoSecrets);
                inc_waiting = a.unschedulable_after(&inc_waiting);
                inc_undelivered = a.undeliverable_after(&inc, &inc_undelivered);
                let at = format!("seed {seed}, step {step}");
                assert_eq!(
                    inc.placements.iter().collect::<Vec<_>>(),
                    whole.placements.iter().collect::<Vec<_>>(),
                    "{at}"
                );
                assert_eq!(inc.nodes.values().collect::<Vec<_>>(), whole.nodes.values().collect::<Vec<_>>(), "{at}");
                assert!(inc == whole, "{at}: the states differ");
                assert_eq!(inc_waiting, b.unschedulable, "{at}");
                assert_eq!(inc_undelivered, b.undeliverable, "{at}");
                let mut ea = a.events.clone();
                let mut eb = b.events.clone();
                ea.sort_by(|x, y| (&x.0, &x.1.message).cmp(&(&y.0, &y.1.message)));
                eb.sort_by(|x, y| (&x.0, &x.1.message).cmp(&(&y.0, &y.1.message)));
                assert_eq!(ea, eb, "{at}");
                // What is known of each node is what a fresh look finds.
                let mut fresh = inc.clone();
                fresh.refresh_all();
                assert_eq!(inc.known, fresh.known, "{at}");
                inc.settle();
                whole.settle();
            }
        }
    }
}
