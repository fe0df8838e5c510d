//! Tests of the reconciler: placements, desired state, generations, and
//! that an incremental pass gives what a whole one does.

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
    assert_eq!(out.unschedulable[&("big".to_string(), 0)], "0/1 nodes are available: 1 node has insufficient memory");
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
    let touched: Vec<(Collection, String, bool)> = b.ops.iter().map(|(c, k, v)| (*c, k.clone(), v.is_some())).collect();
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
            assert_eq!(inc.placements.iter().collect::<Vec<_>>(), whole.placements.iter().collect::<Vec<_>>(), "{at}");
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
