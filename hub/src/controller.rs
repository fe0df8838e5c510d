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

use crate::secrets::{SealSecret, SecretRecord};
use crate::store::{Batch, Collection};
use crate::tokens::TokenRecord;

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

/// Everything the hub must not lose.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Durable {
    pub workloads: BTreeMap<String, Workload>,
    pub nodes: BTreeMap<String, NodeRecord>,
    pub placements: BTreeMap<ReplicaId, Placed>,
    /// The last generation handed out, to any node. Generations come from
    /// this one counter so they never repeat, even for a node that is
    /// deleted and joins again: an agent never sees a new document with a
    /// generation it has already passed. Only the hub moves it: nothing a
    /// node reports does.
    pub last_generation: u64,
    /// Bootstrap and API tokens, by id (secrets only as hashes).
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Secrets, by name (values encrypted).
    pub secrets: BTreeMap<String, SecretRecord>,
    /// The last revisions of each workload, by (workload, revision). Shared,
    /// so a mutation's copy of the state does not copy the specs.
    pub revisions: BTreeMap<(String, u64), std::sync::Arc<edge_api::model::Revision>>,
    /// Each workload's latest rollout.
    pub rollouts: BTreeMap<String, crate::rollout::Rollout>,
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
}

impl Durable {
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
        self.placements
            .iter()
            .filter(move |(_, p)| p.node == node)
            .filter_map(|((w, _), p)| self.spec_of(w, p.revision))
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
        let set: BTreeSet<&String> =
            self.placements.iter().filter(|(_, p)| p.node == node).map(|((w, _), _)| w).collect();
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
    let mut out = Outcome::default();

    // 1. Placements: drop those that no longer hold, place what has no node.
    crate::placing::place_all(d, seen, now_ms, &mut out);

    // 2. Rollouts: which replicas get the workload's new revision now.
    crate::rollouts::roll(d, seen, now_ms, &mut out);

    // 3. Rebuild desired state per node.
    let mut docs: BTreeMap<String, Vec<Assignment>> = d.nodes.keys().map(|n| (n.clone(), Vec::new())).collect();
    for ((w, r), placed) in d.placements.iter().filter(|(_, p)| !p.leaving) {
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

/// The writes that turn `old` into `new` on disk.
pub fn diff(old: &Durable, new: &Durable) -> Result<Batch, serde_json::Error> {
    let mut b = Batch::default();
    diff_map(&mut b, Collection::Workloads, &old.workloads, &new.workloads, |k| k.clone())?;
    diff_map(&mut b, Collection::Nodes, &old.nodes, &new.nodes, |k| k.clone())?;
    diff_map(&mut b, Collection::Placements, &old.placements, &new.placements, placement_key)?;
    diff_map(&mut b, Collection::Tokens, &old.tokens, &new.tokens, |k| k.clone())?;
    diff_map(&mut b, Collection::Secrets, &old.secrets, &new.secrets, |k| k.clone())?;
    diff_map(&mut b, Collection::Rollouts, &old.rollouts, &new.rollouts, |k| k.clone())?;
    for (k, v) in &new.revisions {
        if old.revisions.get(k) != Some(v) {
            b.put(Collection::Revisions, revision_key(k), serde_json::to_vec(&**v)?);
        }
    }
    for k in old.revisions.keys() {
        if !new.revisions.contains_key(k) {
            b.delete(Collection::Revisions, revision_key(k));
        }
    }
    if old.last_generation != new.last_generation {
        b.put(Collection::Meta, LAST_GENERATION, serde_json::to_vec(&new.last_generation)?);
    }
    Ok(b)
}

fn diff_map<K: Ord, V: PartialEq + Serialize>(
    b: &mut Batch,
    c: Collection,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    key: impl Fn(&K) -> String,
) -> Result<(), serde_json::Error> {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            b.put(c, key(k), serde_json::to_vec(v)?);
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            b.delete(c, key(k));
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
            placements: BTreeMap::new(),
            last_generation: 0,
            tokens: BTreeMap::new(),
            secrets: BTreeMap::new(),
            revisions: BTreeMap::new(),
            rollouts: BTreeMap::new(),
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
    fn diff_writes_only_what_changed() {
        let mut d = cluster(&[("a", 1024)], &[workload("x", 1, 64, 1)]);
        let old = d.clone();
        reconcile(&mut d, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        let b = diff(&old, &d).unwrap();
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
        let mut e = d.clone();
        e.workloads.remove("x");
        reconcile(&mut e, &Observed::nodes(ALL_READY), 0, &NoSecrets);
        let b = diff(&d, &e).unwrap();
        assert!(b.ops.iter().any(|(c, k, v)| *c == Collection::Workloads && k == "x" && v.is_none()));
        assert!(b.ops.iter().any(|(c, k, v)| *c == Collection::Placements && k == "x/0" && v.is_none()));
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
}
