//! Placement: which node runs a replica. Pure functions over data.
//!
//! A node is *selected* by a workload when it runs the workload's runtime,
//! has an allowed architecture (and, for a container, one the image has a
//! platform for) and its labels match the node selector. It can take a new
//! replica when, besides, it is ready and not cordoned (counted replicas
//! only: a per-node workload goes to every selected node, offline or
//! cordoned, and runs there when it can), the workload tolerates its
//! `NoSchedule` and `NoExecute` taints, no anti-affinity keeps them apart
//! (either way round), and the memory, CPU and Wasm instance slots the
//! workload reserves are still free.
//!
//! Among the nodes that can, a counted replica goes to a node without an
//! untolerated `PreferNoSchedule` taint, then to the value of the `spread`
//! label with the fewest replicas of the workload (nodes without the label
//! last), then to a node without one, then to the node with the largest
//! share of free memory, then by name, so the choice is deterministic.
//!
//! In a fleet larger than [`crate::placing::SCORED`] nodes, a workload
//! without a `spread` label is ranked among the first nodes that can take
//! it from a point set by its name (as Kubernetes scores a share of a large
//! cluster): enough of them for a node per replica, and never fewer than
//! `SCORED`. What fits nowhere is still said of every node.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use edge_api::model::{NodeFacts, Resources, Taint, TaintEffect, WorkloadSpec};
use edge_api::placement::untolerated;

/// What the scheduler needs to know about a node.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub facts: &'a NodeFacts,
    pub ready: bool,
    /// `edgectl cordon`: no new counted replicas.
    pub cordoned: bool,
    pub taints: &'a [Taint],
    /// What the replicas already placed on it request.
    pub allocated: Resources,
    /// The Wasm instances the replicas already placed on it may hold.
    pub allocated_instances: u64,
    /// The workloads with a replica on it.
    pub residents: &'a BTreeSet<String>,
}

/// One replica to place.
pub struct Ask<'a> {
    pub workload: &'a str,
    pub spec: &'a WorkloadSpec,
    /// The nodes that already run replicas of it, and how many each.
    pub siblings: &'a BTreeMap<String, usize>,
    /// Each workload's `anti_affinity`, to check it both ways round.
    pub avoids: &'a BTreeMap<String, Vec<String>>,
}

/// Why no node fits, counted per reason, kube-style:
/// `0/3 nodes are available: 1 node is offline, 2 nodes have insufficient memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub nodes: usize,
    pub reasons: BTreeMap<&'static str, usize>,
}

/// A reason for `n` nodes: `{is}` and `{has}` agree with the number.
pub fn phrase(reason: &str, n: usize) -> String {
    reason.replace("{is}", if n == 1 { "is" } else { "are" }).replace("{has}", if n == 1 { "has" } else { "have" })
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return f.write_str("no nodes have joined the hub yet");
        }
        write!(f, "0/{} nodes are available", self.nodes)?;
        let mut first = true;
        for (reason, n) in &self.reasons {
            let node = if *n == 1 { "node" } else { "nodes" };
            write!(f, "{} {n} {node} {}", if first { ":" } else { "," }, phrase(reason, *n))?;
            first = false;
        }
        Ok(())
    }
}

const NOT_READY: &str = "{is} not ready";
const CORDONED: &str = "{is} cordoned";
const NO_RUNTIME: &str = "{is} missing the workload's runtime";
const WRONG_ARCH: &str = "{has} an architecture not allowed by spec.placement.arch";
const SELECTOR: &str = "did not match spec.placement.node_selector";
const TAINTED: &str = "{has} a taint the workload does not tolerate";
const APART: &str = "{has} a replica spec.placement.anti_affinity keeps apart from it";
const NO_MEMORY: &str = "{has} insufficient memory";
const NO_CPU: &str = "{has} insufficient cpu";
const NO_PLATFORM: &str = "{has} a platform the image does not offer";
const NO_INSTANCES: &str = "{has} too few free Wasm instance slots";

/// Why the workload's placement does not select a node with these facts
/// at all, or `None` if it does.
pub fn mismatch(spec: &WorkloadSpec, facts: &NodeFacts) -> Option<&'static str> {
    if !facts.supports(spec.runtime.name()) {
        return Some(NO_RUNTIME);
    }
    let p = &spec.placement;
    if !p.arch.is_empty() && !p.arch.contains(&facts.arch) {
        return Some(WRONG_ARCH);
    }
    if let edge_api::model::Runtime::Container(c) = &spec.runtime
        && c.image_for(&facts.arch).is_none()
    {
        return Some(NO_PLATFORM);
    }
    if !p.node_selector.matches(&facts.labels) {
        return Some(SELECTOR);
    }
    None
}

/// Why a replica already on a node must leave it: the node is no longer
/// selected, or has a `NoExecute` taint the workload does not tolerate.
/// Readiness, cordons, `NoSchedule` taints and resources never move a
/// replica: agents run on through outages.
pub fn must_leave(spec: &WorkloadSpec, facts: &NodeFacts, taints: &[Taint]) -> Option<String> {
    if let Some(why) = mismatch(spec, facts) {
        return Some(format!("the node {}", phrase(why, 1)));
    }
    untolerated(&spec.placement.tolerations, taints, &[TaintEffect::NoExecute])
        .map(|t| format!("the node has the taint {t}, which the workload does not tolerate"))
}

/// Whether a replica of `a` on a node with `residents` breaks an
/// anti-affinity, of `a` or of a workload there.
fn kept_apart(a: &Ask, residents: &BTreeSet<String>) -> bool {
    let own = &a.spec.placement.anti_affinity;
    if own.is_empty() && a.avoids.is_empty() {
        return false;
    }
    residents.iter().any(|r| {
        own.contains(r)
            || a.avoids.get(r).is_some_and(|theirs| theirs.iter().any(|x| x == a.workload) && r != a.workload)
    })
}

/// Why `node` cannot take a new replica of the workload, or `None` if it
/// can. `per_node`: readiness and cordons do not count.
pub fn unfit(a: &Ask, node: &Candidate, per_node: bool) -> Option<&'static str> {
    let spec = a.spec;
    if !per_node && !node.ready {
        return Some(NOT_READY);
    }
    if !per_node && node.cordoned {
        return Some(CORDONED);
    }
    if let Some(r) = mismatch(spec, node.facts) {
        return Some(r);
    }
    let effects = [TaintEffect::NoSchedule, TaintEffect::NoExecute];
    if untolerated(&spec.placement.tolerations, node.taints, &effects).is_some() {
        return Some(TAINTED);
    }
    if kept_apart(a, node.residents) {
        return Some(APART);
    }
    let want = spec.reserved();
    if node.allocated.memory.0.saturating_add(want.memory.0) > node.facts.allocatable_memory.0 {
        return Some(NO_MEMORY);
    }
    if node.allocated.cpu.0.saturating_add(want.cpu.0) > node.facts.allocatable_cpu.0 {
        return Some(NO_CPU);
    }
    if let Some(slots) = node.facts.wasm_instances
        && node.allocated_instances.saturating_add(u64::from(spec.instances())) > u64::from(slots)
    {
        return Some(NO_INSTANCES);
    }
    None
}

/// Picks a node for one counted replica.
pub fn place<'a>(a: &Ask, nodes: &[Candidate<'a>]) -> Result<&'a str, Unschedulable> {
    let mut nodes = nodes.to_vec();
    nodes.sort_by(|x, y| x.name.cmp(y.name));
    Picker::new(a, nodes, a.spec, 1).pick()
}

/// A node's free share of memory after placing (`free / total`), compared
/// exactly, without floats; the larger share sorts first.
#[derive(Debug, Clone, Copy)]
struct Share {
    free: u128,
    total: u128,
}

impl Ord for Share {
    fn cmp(&self, o: &Share) -> Ordering {
        // free_x / total_x > free_y / total_y ⇔ free_x * total_y > free_y * total_x.
        (o.free * self.total).cmp(&(self.free * o.total))
    }
}

impl PartialOrd for Share {
    fn partial_cmp(&self, o: &Share) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Share {
    fn eq(&self, o: &Share) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Share {}

/// A fitting node's rank within its spread group: without an untolerated
/// `PreferNoSchedule` taint first, then without a replica of the workload,
/// then by free share, then by name (the nodes are in name order, so by
/// index: a string comparison per step was most of the cost).
type Member = (bool, bool, Share, usize);

/// A spread group's rank: replicas in the group (`(0, n)`), or `(1, 0)`
/// for the nodes without the label, which come after every count.
type GroupRank = (u8, usize);

/// A node's rank among all: the order of [the module docs](self).
type Top = (bool, GroupRank, bool, Share, usize);

/// From this many replicas on, a pass keeps the nodes ranked; for fewer,
/// a look at each node per replica is cheaper than sorting them.
const RANKED_FROM: usize = 8;

/// Places replicas of one workload one after another, each on the node
/// [`place`] would pick given those placed before it. The nodes are
/// checked once; for a large workload they are kept ranked per spread
/// group, so each pick costs O(log n), not a pass over every node (a
/// workload of 10,000 replicas on 1,000 nodes was 10 million node checks).
///
/// Within a pass only what a landed replica changes moves: its node's
/// allocation, instance slots and sibling count, and its group's count.
/// A node that cannot take a replica at the start cannot later in the
/// pass (placing only takes resources away).
pub struct Picker<'a, 'q> {
    ask: &'q Ask<'q>,
    /// In name order.
    nodes: Vec<Candidate<'a>>,
    /// Replicas of the workload on each node.
    siblings: Vec<usize>,
    avoided: Vec<bool>,
    fit: Vec<bool>,
    group_of: Vec<usize>,
    /// Per group: whether it has the spread label, and its replica count.
    labelled: Vec<bool>,
    counts: Vec<usize>,
    ranked: Option<Ranked>,
    /// The workload keeps away from itself.
    self_apart: bool,
    /// What the replica asks for (to fit) and what a placed one holds
    /// (its revision's: during a rollout it may be the older one).
    want: u128,
    holds: Resources,
    holds_instances: u64,
}

/// The fitting nodes of each group in rank order, and each group's best.
struct Ranked {
    members: Vec<BTreeSet<Member>>,
    top: BTreeSet<Top>,
}

impl<'a, 'q> Picker<'a, 'q> {
    /// `nodes` in name order; `holds`: the spec a placed replica runs (see
    /// [`Picker::pick`]); `replicas`: about how many will be picked.
    pub fn new(ask: &'q Ask<'q>, nodes: Vec<Candidate<'a>>, holds: &WorkloadSpec, replicas: usize) -> Picker<'a, 'q> {
        debug_assert!(nodes.is_sorted_by(|x, y| x.name < y.name), "candidates in name order");
        let spread = ask.spec.placement.spread.as_deref();
        let tolerations = &ask.spec.placement.tolerations;
        let no_siblings = ask.siblings.is_empty();
        let mut p = Picker {
            ask,
            siblings: nodes
                .iter()
                .map(|n| if no_siblings { 0 } else { ask.siblings.get(n.name).copied().unwrap_or(0) })
                .collect(),
            avoided: nodes
                .iter()
                .map(|n| {
                    !n.taints.is_empty()
                        && untolerated(tolerations, n.taints, &[TaintEffect::PreferNoSchedule]).is_some()
                })
                .collect(),
            fit: nodes.iter().map(|n| unfit(ask, n, false).is_none()).collect(),
            group_of: Vec::with_capacity(nodes.len()),
            labelled: Vec::new(),
            counts: Vec::new(),
            ranked: None,
            self_apart: ask.spec.placement.anti_affinity.iter().any(|x| x == ask.workload),
            want: ask.spec.reserved().memory.0 as u128,
            holds: holds.reserved(),
            holds_instances: u64::from(holds.instances()),
            nodes,
        };
        let mut groups: std::collections::HashMap<Option<&'a str>, usize> = std::collections::HashMap::new();
        for i in 0..p.nodes.len() {
            let value = spread.and_then(|k| p.nodes[i].facts.labels.get(k)).map(String::as_str);
            let next = groups.len();
            let g = *groups.entry(value).or_insert(next);
            if g == next {
                p.labelled.push(value.is_some());
                p.counts.push(0);
            }
            p.group_of.push(g);
            p.counts[g] += p.siblings[i];
        }
        if replicas >= RANKED_FROM {
            let mut members = vec![BTreeSet::new(); p.counts.len()];
            for i in (0..p.nodes.len()).filter(|i| p.fit[*i]) {
                members[p.group_of[i]].insert(p.member(i));
            }
            let mut ranked = Ranked { members, top: BTreeSet::new() };
            for g in 0..p.counts.len() {
                if let Some(t) = p.top_of(&ranked, g) {
                    ranked.top.insert(t);
                }
            }
            p.ranked = Some(ranked);
        }
        p
    }

    fn member(&self, i: usize) -> Member {
        let n = &self.nodes[i];
        let total = n.facts.allocatable_memory.0.max(1) as u128;
        let free = total.saturating_sub(n.allocated.memory.0 as u128 + self.want);
        (self.avoided[i], self.siblings[i] > 0, Share { free, total }, i)
    }

    fn rank(&self, g: usize) -> GroupRank {
        if self.labelled[g] { (0, self.counts[g]) } else { (1, 0) }
    }

    fn top(&self, i: usize) -> Top {
        let (avoided, shared, share, i) = self.member(i);
        (avoided, self.rank(self.group_of[i]), shared, share, i)
    }

    fn top_of(&self, r: &Ranked, g: usize) -> Option<Top> {
        r.members[g].first().map(|&(.., i)| self.top(i))
    }

    /// Why node `i` cannot take a replica now, with those placed so far.
    fn unfit_now(&self, i: usize) -> Option<&'static str> {
        let why = unfit(self.ask, &self.nodes[i], false);
        let apart = self.self_apart && self.siblings[i] > 0;
        match why {
            None | Some(NO_MEMORY | NO_CPU | NO_INSTANCES) if apart => Some(APART),
            why => why,
        }
    }

    /// The node for the next replica, counted as placed there (holding
    /// what `holds` reserves).
    pub fn pick(&mut self) -> Result<&'a str, Unschedulable> {
        let best = match &self.ranked {
            Some(r) => r.top.first().map(|t| t.4),
            None => (0..self.nodes.len()).filter(|i| self.fit[*i]).min_by_key(|i| self.top(*i)),
        };
        let Some(i) = best else {
            let mut reasons = BTreeMap::new();
            for i in 0..self.nodes.len() {
                if let Some(r) = self.unfit_now(i) {
                    *reasons.entry(r).or_insert(0) += 1;
                }
            }
            return Err(Unschedulable { nodes: self.nodes.len(), reasons });
        };
        let g = self.group_of[i];
        let mut ranked = self.ranked.take();
        if let Some(r) = &mut ranked {
            let top = self.top_of(r, g).expect("the group of the best node has a best node");
            r.top.remove(&top);
            r.members[g].remove(&self.member(i));
        }
        let n = &mut self.nodes[i];
        n.allocated.memory.0 = n.allocated.memory.0.saturating_add(self.holds.memory.0);
        n.allocated.cpu.0 = n.allocated.cpu.0.saturating_add(self.holds.cpu.0);
        n.allocated_instances = n.allocated_instances.saturating_add(self.holds_instances);
        self.siblings[i] += 1;
        self.counts[g] += 1;
        self.fit[i] = self.unfit_now(i).is_none();
        if let Some(r) = &mut ranked {
            if self.fit[i] {
                r.members[g].insert(self.member(i));
            }
            if let Some(t) = self.top_of(r, g) {
                r.top.insert(t);
            }
        }
        self.ranked = ranked;
        Ok(self.nodes[i].name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::digest::Digest;
    use edge_api::model::*;
    use edge_api::quantity::{Cpu, Memory};

    fn facts(arch: &str, mem_mib: u64, labels: &[(&str, &str)]) -> NodeFacts {
        crate::test_facts(arch, mem_mib, labels)
    }

    static NOBODY: BTreeSet<String> = BTreeSet::new();
    static NO_AVOIDS: BTreeMap<String, Vec<String>> = BTreeMap::new();

    fn cand<'a>(name: &'a str, facts: &'a NodeFacts) -> Candidate<'a> {
        Candidate {
            name,
            facts,
            ready: true,
            cordoned: false,
            taints: &[],
            allocated: free(0),
            allocated_instances: 0,
            residents: &NOBODY,
        }
    }

    fn ask<'a>(spec: &'a WorkloadSpec, siblings: &[&str]) -> Ask<'a> {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for s in siblings {
            *count.entry(s.to_string()).or_default() += 1;
        }
        Ask { workload: "w", spec, siblings: Box::leak(Box::new(count)), avoids: &NO_AVOIDS }
    }

    fn spec(mem_mib: u64, arch: &[&str], selector: &[(&str, &str)]) -> WorkloadSpec {
        WorkloadSpec {
            replicas: Replicas::Count(1),
            restart: RestartPolicy::OnFailure,
            resources: Resources { memory: Memory::mib(mem_mib), cpu: Cpu(100) },
            placement: Placement {
                arch: arch.iter().map(|s| s.to_string()).collect(),
                node_selector: Selector::from_labels(
                    &selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ),
                ..Placement::default()
            },
            runtime: Runtime::Wasm(WasmSpec {
                component: ArtifactRef::Digest(Digest::of(b"c")),
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
        }
    }

    fn free(mem_used_mib: u64) -> Resources {
        Resources { memory: Memory::mib(mem_used_mib), cpu: Cpu(0) }
    }

    #[test]
    fn placement_table() {
        let amd = facts("amd64", 1024, &[("site", "a")]);
        let arm = facts("arm64", 1024, &[("site", "b")]);
        let small = facts("arm/v7", 128, &[]);
        let mut no_wasm = facts("amd64", 4096, &[]);
        no_wasm.runtimes.clear();
        let nodes = |ready: [bool; 3], used: [u64; 3]| {
            vec![
                Candidate { ready: ready[0], allocated: free(used[0]), ..cand("amd", &amd) },
                Candidate { ready: ready[1], allocated: free(used[1]), ..cand("arm", &arm) },
                Candidate { ready: ready[2], allocated: free(used[2]), ..cand("small", &small) },
            ]
        };
        struct Case {
            name: &'static str,
            spec: WorkloadSpec,
            nodes: Vec<Candidate<'static>>,
            siblings: &'static [&'static str],
            want: Result<&'static str, &'static str>,
        }
        // Leak the facts so the table can hold 'static candidates.
        let leak = |v: Vec<Candidate<'_>>| -> Vec<Candidate<'static>> {
            v.into_iter()
                .map(|c| Candidate {
                    name: Box::leak(c.name.to_string().into_boxed_str()),
                    facts: Box::leak(Box::new(c.facts.clone())),
                    taints: &[],
                    residents: &NOBODY,
                    ..c
                })
                .collect()
        };
        let cases = vec![
            Case {
                name: "most free memory share wins",
                spec: spec(64, &[], &[]),
                nodes: leak(nodes([true; 3], [512, 0, 0])),
                siblings: &[],
                want: Ok("arm"),
            },
            Case {
                name: "arch restriction",
                spec: spec(64, &["amd64"], &[]),
                nodes: leak(nodes([true; 3], [512, 0, 0])),
                siblings: &[],
                want: Ok("amd"),
            },
            Case {
                name: "node selector",
                spec: spec(64, &[], &[("site", "a")]),
                nodes: leak(nodes([true; 3], [900, 0, 0])),
                siblings: &[],
                want: Ok("amd"),
            },
            Case {
                name: "not ready nodes are skipped",
                spec: spec(64, &[], &[]),
                nodes: leak(nodes([true, false, false], [900, 0, 0])),
                siblings: &[],
                want: Ok("amd"),
            },
            Case {
                name: "replicas spread before packing",
                spec: spec(64, &[], &[]),
                nodes: leak(nodes([true, true, false], [0, 512, 0])),
                siblings: &["amd"],
                want: Ok("arm"),
            },
            Case {
                name: "co-locate when spreading is impossible",
                spec: spec(64, &[], &[]),
                nodes: leak(nodes([true, false, false], [0, 0, 0])),
                siblings: &["amd"],
                want: Ok("amd"),
            },
            Case {
                name: "insufficient memory everywhere",
                spec: spec(1000, &[], &[]),
                nodes: leak(nodes([true; 3], [100, 100, 0])),
                siblings: &[],
                want: Err("0/3 nodes are available: 3 nodes have insufficient memory"),
            },
            Case {
                name: "mixed reasons are counted",
                spec: spec(64, &["arm64", "arm/v7"], &[("site", "b")]),
                nodes: leak(nodes([true, false, true], [0, 0, 0])),
                siblings: &[],
                want: Err("0/3 nodes are available: 1 node did not match spec.placement.node_selector, \
                     1 node has an architecture not allowed by spec.placement.arch, 1 node is not ready"),
            },
            Case {
                name: "runtime support is required",
                spec: spec(64, &[], &[]),
                nodes: leak(vec![cand("x", &no_wasm)]),
                siblings: &[],
                want: Err("0/1 nodes are available: 1 node is missing the workload's runtime"),
            },
            Case {
                name: "no nodes at all",
                spec: spec(64, &[], &[]),
                nodes: vec![],
                siblings: &[],
                want: Err("no nodes have joined the hub yet"),
            },
        ];
        for c in cases {
            let got = place(&ask(&c.spec, c.siblings), &c.nodes).map_err(|e| e.to_string());
            let want = c.want.map_err(|e| e.to_string());
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn cpu_is_reserved_too() {
        let f = facts("amd64", 1024, &[]);
        let n = [Candidate { allocated: Resources { memory: Memory(0), cpu: Cpu(3950) }, ..cand("a", &f) }];
        let e = place(&ask(&spec(64, &[], &[]), &[]), &n).unwrap_err();
        assert_eq!(e.to_string(), "0/1 nodes are available: 1 node has insufficient cpu");
    }

    #[test]
    fn a_service_reserves_memory_and_instance_slots_for_all_its_instances() {
        let mut f = facts("amd64", 1024, &[]);
        f.wasm_instances = Some(64);
        let node =
            |instances: u64| Candidate { allocated_instances: instances, ..cand("a", Box::leak(Box::new(f.clone()))) };
        let mut svc = spec(64, &[], &[]);
        svc.http = Some(edge_api::model::HttpSpec { hosts: vec![], paths: vec!["/".into()] });
        // 16 instances × 64Mi = 1Gi: fits exactly; with 17, it does not.
        assert_eq!(svc.reserved().memory, Memory::mib(1024));
        assert_eq!(place(&ask(&svc, &[]), &[node(0)]), Ok("a"));
        if let Runtime::Wasm(w) = &mut svc.runtime {
            w.max_instances = Some(17);
        }
        let e = place(&ask(&svc, &[]), &[node(0)]).unwrap_err();
        assert_eq!(e.to_string(), "0/1 nodes are available: 1 node has insufficient memory");
        // A total the agent enforces lets it take many requests at once...
        if let Runtime::Wasm(w) = &mut svc.runtime {
            w.memory_total = Some(Memory::mib(256));
        }
        assert_eq!(place(&ask(&svc, &[]), &[node(0)]), Ok("a"));
        // ...as long as the node has instance slots for them.
        let e = place(&ask(&svc, &[]), &[node(50)]).unwrap_err();
        assert_eq!(e.to_string(), "0/1 nodes are available: 1 node has too few free Wasm instance slots");
    }

    #[test]
    fn containers_go_only_where_their_image_has_a_platform() {
        let with_oci = |arch: &str| {
            let mut f = facts(arch, 1024, &[]);
            f.runtimes.push(RuntimeInfo {
                name: "oci".into(),
                version: "runc 1.1.5".into(),
                mode: "runc".into(),
                ..Default::default()
            });
            f
        };
        let (amd, arm64, armv7, arm64_wasm_only) =
            (with_oci("amd64"), with_oci("arm64"), with_oci("arm/v7"), facts("arm64", 4096, &[]));
        let all = [cand("amd", &amd), cand("pi4", &arm64), cand("pi3", &armv7), cand("pi4-wasm", &arm64_wasm_only)];
        let image = |platforms: &[&str]| {
            let mut s = spec(64, &[], &[]);
            let mut c = edge_api::model::ContainerSpec::new("oci://r.io/app:1".parse().unwrap());
            c.platforms = platforms
                .iter()
                .map(|p| edge_api::model::ImagePlatform {
                    platform: p.parse().unwrap(),
                    manifest: Digest::of(p.as_bytes()),
                })
                .collect();
            s.runtime = Runtime::Container(c);
            s
        };
        let fits = |s: &WorkloadSpec| {
            all.iter().filter(|n| unfit(&ask(s, &[]), n, false).is_none()).map(|n| n.name).collect::<Vec<_>>()
        };
        assert_eq!(fits(&image(&["linux/amd64"])), ["amd"]);
        assert_eq!(fits(&image(&["linux/arm64"])), ["pi4"], "a node without a container runtime never gets one");
        assert_eq!(fits(&image(&["linux/arm/v7"])), ["pi4", "pi3"], "64-bit ARM runs 32-bit ARM images");
        assert_eq!(fits(&image(&["linux/arm/v6", "linux/amd64"])), ["amd", "pi4", "pi3"]);
        let e = place(&ask(&image(&["linux/riscv64"]), &[]), &all).unwrap_err().to_string();
        assert_eq!(
            e,
            "0/4 nodes are available: 3 nodes have a platform the image does not offer, 1 node is missing the workload's runtime"
        );
        // spec.placement.arch still narrows it.
        let mut narrowed = image(&["linux/arm/v7"]);
        narrowed.placement.arch = vec!["arm/v7".into()];
        assert_eq!(fits(&narrowed), ["pi3"]);
    }

    /// What `place` did before `Picker`: every node checked and ranked for
    /// each replica. The oracle of the test below.
    fn place_naive<'a>(a: &Ask, nodes: &[Candidate<'a>]) -> Result<&'a str, Unschedulable> {
        let mut reasons = BTreeMap::new();
        let fit: Vec<&Candidate<'a>> = nodes
            .iter()
            .filter(|n| match unfit(a, n, false) {
                Some(r) => {
                    *reasons.entry(r).or_insert(0) += 1;
                    false
                }
                None => true,
            })
            .collect();
        let spread = a.spec.placement.spread.as_deref();
        let value = |n: &Candidate<'a>| spread.and_then(|k| n.facts.labels.get(k).cloned());
        let mut per_value: BTreeMap<String, usize> = BTreeMap::new();
        for n in nodes {
            if let (Some(v), Some(c)) = (value(n), a.siblings.get(n.name)) {
                *per_value.entry(v).or_default() += c;
            }
        }
        let want = a.spec.reserved().memory.0 as u128;
        let key = |n: &Candidate<'a>| {
            let avoided =
                untolerated(&a.spec.placement.tolerations, n.taints, &[TaintEffect::PreferNoSchedule]).is_some();
            let group = value(n).map_or((1, 0), |v| (0, per_value.get(&v).copied().unwrap_or(0)));
            let total = n.facts.allocatable_memory.0.max(1) as u128;
            let free = total.saturating_sub(n.allocated.memory.0 as u128 + want);
            (avoided, group, a.siblings.contains_key(n.name), free, total)
        };
        fit.into_iter()
            .min_by(|x, y| {
                let (kx, ky) = (key(x), key(y));
                (kx.0, kx.1, kx.2)
                    .cmp(&(ky.0, ky.1, ky.2))
                    .then_with(|| (ky.3 * kx.4).cmp(&(kx.3 * ky.4)))
                    .then_with(|| x.name.cmp(y.name))
            })
            .map(|n| n.name)
            .ok_or(Unschedulable { nodes: nodes.len(), reasons })
    }

    #[test]
    fn a_picker_places_each_replica_where_a_fresh_look_would() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut below = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            let count = 1 + below(12) as usize;
            let facts: Vec<NodeFacts> = (0..count)
                .map(|_| {
                    let site = ["a", "b", "c", ""][below(4) as usize];
                    let labels: Vec<(&str, &str)> = if site.is_empty() { vec![] } else { vec![("site", site)] };
                    facts("amd64", 64 * (1 + below(16)), &labels)
                })
                .collect();
            let names: Vec<String> = (0..count).map(|i| format!("n{i:02}")).collect();
            let prefer_not =
                vec![Taint { key: "old".into(), value: "1".into(), effect: TaintEffect::PreferNoSchedule }];
            let mut mem = spec(16 * (1 + below(8)), &[], &[]);
            if below(2) == 0 {
                mem.placement.spread = Some("site".into());
            }
            let self_apart = below(4) == 0;
            if self_apart {
                mem.placement.anti_affinity = vec!["w".into()];
            }
            mem.resources.cpu = edge_api::quantity::Cpu(100 * below(8));
            let mut siblings: BTreeMap<String, usize> = BTreeMap::new();
            let mut residents: Vec<BTreeSet<String>> = vec![BTreeSet::new(); count];
            let mut nodes: Vec<Candidate> = Vec::new();
            for i in 0..count {
                let used = 16 * below(8);
                if !self_apart && below(3) == 0 {
                    siblings.insert(names[i].clone(), 1 + below(2) as usize);
                    residents[i].insert("w".into());
                }
                nodes.push(Candidate {
                    ready: below(6) != 0,
                    cordoned: below(8) == 0,
                    taints: if below(4) == 0 { &prefer_not } else { &[] },
                    allocated: Resources { memory: Memory::mib(used), cpu: Cpu(100 * below(30)) },
                    ..cand(&names[i], &facts[i])
                });
            }
            let fixed: Vec<Candidate> = nodes.clone();
            let ask_now = Ask { workload: "w", spec: &mem, siblings: &siblings, avoids: &NO_AVOIDS };
            let mut picker = Picker::new(&ask_now, fixed, &mem, if round % 2 == 0 { 40 } else { 1 });
            // The naive way, with what each landed replica changes.
            let mut naive_siblings = siblings.clone();
            for step in 0..40 {
                let mut view = nodes.clone();
                for (v, r) in view.iter_mut().zip(&residents) {
                    v.residents = r;
                }
                let ask = Ask { workload: "w", spec: &mem, siblings: &naive_siblings, avoids: &NO_AVOIDS };
                let want = place_naive(&ask, &view).map(str::to_string).map_err(|e| e.to_string());
                let got = picker.pick().map(str::to_string).map_err(|e| e.to_string());
                assert_eq!(got, want, "round {round}, replica {step}");
                let Ok(name) = want else { break };
                let i = names.iter().position(|n| *n == name).unwrap();
                nodes[i].allocated.memory.0 += mem.reserved().memory.0;
                nodes[i].allocated.cpu.0 += mem.reserved().cpu.0;
                residents[i].insert("w".into());
                *naive_siblings.entry(name).or_default() += 1;
            }
        }
    }
}
