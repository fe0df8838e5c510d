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
    /// The names of `known` in order, when no node came or went since it
    /// was last built (see [`Durable::known_name_at`]).
    known_names: Option<Vec<String>>,
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
    /// From its record: approved, cordoned, and its taints (so a pass over
    /// the nodes reads one map, not two).
    pub approved: bool,
    pub unschedulable: bool,
    pub taints: Vec<edge_api::model::Taint>,
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

    /// What the scheduler knows of every node, in name order.
    pub fn known_all(&self) -> impl Iterator<Item = (&String, &Known)> {
        self.known.iter()
    }

    /// How many nodes the scheduler knows.
    pub fn known_count(&self) -> usize {
        self.known.len()
    }

    /// What the scheduler knows of the nodes from `from` on, in name order.
    pub fn known_from<'a>(&'a self, from: &'a str) -> impl Iterator<Item = (&'a String, &'a Known)> + 'a {
        self.known.range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
    }

    /// What the scheduler knows of the nodes before `to`, in name order.
    pub fn known_before<'a>(&'a self, to: &'a str) -> impl Iterator<Item = (&'a String, &'a Known)> + 'a {
        self.known.range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(to)))
    }

    /// The name of the `i`th known node in name order (`i` taken modulo
    /// their number), or None when none is known. The list of names is
    /// kept until a node comes or goes.
    pub fn known_name_at(&mut self, i: u64) -> Option<String> {
        if self.known.is_empty() {
            return None;
        }
        let names = self.known_names.get_or_insert_with(|| self.known.keys().cloned().collect());
        names.get((i % names.len() as u64) as usize).cloned()
    }

    /// Rebuilds what is known of `node` from its record and placements.
    pub(crate) fn refresh(&mut self, node: &str) {
        let Some(rec) = self.nodes.get(node) else {
            if self.known.remove(node).is_some() {
                self.known_names = None;
            }
            return;
        };
        let facts = rec.effective_facts();
        let known = Known {
            facts,
            allocated: self.allocated(node),
            instances: self.allocated_instances(node),
            residents: self.workloads_on(node).into_iter().collect(),
            approved: rec.approved,
            unschedulable: rec.unschedulable,
            taints: rec.taints.clone(),
        };
        if self.known.insert(node.to_string(), known).is_none() {
            self.known_names = None;
        }
    }

    /// Rebuilds what is known of every node.
    pub(crate) fn refresh_all(&mut self) {
        self.known.clear();
        self.known_names = None;
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
#[path = "controller_tests.rs"]
pub(crate) mod tests;
