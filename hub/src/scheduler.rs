//! Placement: which node runs a replica. Pure functions over data.
//!
//! A node is a candidate when it is ready, runs the workload's runtime, has
//! an allowed architecture (and, for a container, one the image has a
//! platform for), carries every label of the node selector, and has
//! the memory and CPU the workload requests still unallocated. Among the
//! candidates, nodes that do not yet hold a replica of the same workload come
//! first (spreading replicas), then the node with the largest share of free
//! memory, then the name, so the choice is deterministic.

use std::collections::BTreeMap;
use std::fmt;

use edge_api::model::{NodeFacts, Resources, WorkloadSpec};

/// What the scheduler needs to know about a node.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub facts: &'a NodeFacts,
    pub ready: bool,
    /// What the replicas already placed on it request.
    pub allocated: Resources,
    /// The Wasm instances the replicas already placed on it may hold.
    pub allocated_instances: u64,
}

/// Why no node fits, counted per reason, kube-style:
/// `0/3 nodes are available: 1 node is offline, 2 nodes have insufficient memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub nodes: usize,
    pub reasons: BTreeMap<&'static str, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return f.write_str("no nodes have joined the hub yet");
        }
        write!(f, "0/{} nodes are available", self.nodes)?;
        let mut first = true;
        for (reason, n) in &self.reasons {
            let (node, verb) = if *n == 1 { ("node", "is") } else { ("nodes", "are") };
            let reason = reason.replace("{is}", verb).replace("{has}", if *n == 1 { "has" } else { "have" });
            write!(f, "{} {n} {node} {reason}", if first { ":" } else { "," })?;
            first = false;
        }
        Ok(())
    }
}

const NOT_READY: &str = "{is} not ready";
const NO_RUNTIME: &str = "{is} missing the workload's runtime";
const WRONG_ARCH: &str = "{has} an architecture not allowed by spec.placement.arch";
const SELECTOR: &str = "did not match spec.placement.node_selector";
const NO_MEMORY: &str = "{has} insufficient memory";
const NO_CPU: &str = "{has} insufficient cpu";
const NO_PLATFORM: &str = "{has} a platform the image does not offer";
const NO_INSTANCES: &str = "{has} too few free Wasm instance slots";

/// Why `node` cannot take a replica of `spec`, or `None` if it can.
pub fn unfit(spec: &WorkloadSpec, node: &Candidate) -> Option<&'static str> {
    if !node.ready {
        return Some(NOT_READY);
    }
    if !node.facts.supports(spec.runtime.name()) {
        return Some(NO_RUNTIME);
    }
    let p = &spec.placement;
    if !p.arch.is_empty() && !p.arch.contains(&node.facts.arch) {
        return Some(WRONG_ARCH);
    }
    if let edge_api::model::Runtime::Container(c) = &spec.runtime
        && c.image_for(&node.facts.arch).is_none()
    {
        return Some(NO_PLATFORM);
    }
    if !p.node_selector.iter().all(|(k, v)| node.facts.labels.get(k) == Some(v)) {
        return Some(SELECTOR);
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

/// Picks a node for one replica. `siblings` names the nodes that already run
/// a replica of the same workload.
pub fn place<'a>(spec: &WorkloadSpec, nodes: &[Candidate<'a>], siblings: &[&str]) -> Result<&'a str, Unschedulable> {
    let mut reasons = BTreeMap::new();
    let mut best: Option<(&Candidate<'a>, (bool, u128))> = None;
    for node in nodes {
        if let Some(r) = unfit(spec, node) {
            *reasons.entry(r).or_insert(0) += 1;
            continue;
        }
        let spread = !siblings.contains(&node.name);
        // Free share of memory after placing, compared without floats:
        // free_a / total_a > free_b / total_b  ⇔  free_a * total_b > free_b * total_a.
        let total = node.facts.allocatable_memory.0.max(1) as u128;
        let want = spec.reserved().memory.0 as u128;
        let free = total - (node.allocated.memory.0 as u128 + want);
        let better = match &best {
            None => true,
            Some((b, (b_spread, _))) => {
                let b_total = b.facts.allocatable_memory.0.max(1) as u128;
                let b_free = b_total - (b.allocated.memory.0 as u128 + want);
                (spread, free * b_total, std::cmp::Reverse(node.name))
                    > (*b_spread, b_free * total, std::cmp::Reverse(b.name))
            }
        };
        if better {
            best = Some((node, (spread, free)));
        }
    }
    best.map(|(n, _)| n.name).ok_or(Unschedulable { nodes: nodes.len(), reasons })
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

    fn spec(mem_mib: u64, arch: &[&str], selector: &[(&str, &str)]) -> WorkloadSpec {
        WorkloadSpec {
            replicas: 1,
            restart: RestartPolicy::OnFailure,
            resources: Resources { memory: Memory::mib(mem_mib), cpu: Cpu(100) },
            placement: Placement {
                arch: arch.iter().map(|s| s.to_string()).collect(),
                node_selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
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
                Candidate {
                    name: "amd",
                    facts: &amd,
                    ready: ready[0],
                    allocated: free(used[0]),
                    allocated_instances: 0,
                },
                Candidate {
                    name: "arm",
                    facts: &arm,
                    ready: ready[1],
                    allocated: free(used[1]),
                    allocated_instances: 0,
                },
                Candidate {
                    name: "small",
                    facts: &small,
                    ready: ready[2],
                    allocated: free(used[2]),
                    allocated_instances: 0,
                },
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
                    ready: c.ready,
                    allocated: c.allocated,
                    allocated_instances: c.allocated_instances,
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
                nodes: leak(vec![Candidate {
                    name: "x",
                    facts: &no_wasm,
                    ready: true,
                    allocated: free(0),
                    allocated_instances: 0,
                }]),
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
            let got = place(&c.spec, &c.nodes, c.siblings).map_err(|e| e.to_string());
            let want = c.want.map_err(|e| e.to_string());
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn cpu_is_reserved_too() {
        let f = facts("amd64", 1024, &[]);
        let n = [Candidate {
            name: "a",
            facts: &f,
            ready: true,
            allocated: Resources { memory: Memory(0), cpu: Cpu(3950) },
            allocated_instances: 0,
        }];
        let e = place(&spec(64, &[], &[]), &n, &[]).unwrap_err();
        assert_eq!(e.to_string(), "0/1 nodes are available: 1 node has insufficient cpu");
    }

    #[test]
    fn a_service_reserves_memory_and_instance_slots_for_all_its_instances() {
        let mut f = facts("amd64", 1024, &[]);
        f.wasm_instances = Some(64);
        let node = |instances: u64| Candidate {
            name: "a",
            facts: Box::leak(Box::new(f.clone())),
            ready: true,
            allocated: free(0),
            allocated_instances: instances,
        };
        let mut svc = spec(64, &[], &[]);
        svc.http = Some(edge_api::model::HttpSpec { hosts: vec![], paths: vec!["/".into()] });
        // 16 instances × 64Mi = 1Gi: fits exactly; with 17, it does not.
        assert_eq!(svc.reserved().memory, Memory::mib(1024));
        assert_eq!(place(&svc, &[node(0)], &[]), Ok("a"));
        if let Runtime::Wasm(w) = &mut svc.runtime {
            w.max_instances = Some(17);
        }
        let e = place(&svc, &[node(0)], &[]).unwrap_err();
        assert_eq!(e.to_string(), "0/1 nodes are available: 1 node has insufficient memory");
        // A total the agent enforces lets it take many requests at once...
        if let Runtime::Wasm(w) = &mut svc.runtime {
            w.memory_total = Some(Memory::mib(256));
        }
        assert_eq!(place(&svc, &[node(0)], &[]), Ok("a"));
        // ...as long as the node has instance slots for them.
        let e = place(&svc, &[node(50)], &[]).unwrap_err();
        assert_eq!(e.to_string(), "0/1 nodes are available: 1 node has too few free Wasm instance slots");
    }

    #[test]
    fn containers_go_only_where_their_image_has_a_platform() {
        let with_oci = |arch: &str| {
            let mut f = facts(arch, 1024, &[]);
            f.runtimes.push(RuntimeInfo { name: "oci".into(), version: "runc 1.1.5".into(), mode: "runc".into() });
            f
        };
        let (amd, arm64, armv7, arm64_wasm_only) =
            (with_oci("amd64"), with_oci("arm64"), with_oci("arm/v7"), facts("arm64", 4096, &[]));
        let all = [
            Candidate { name: "amd", facts: &amd, ready: true, allocated: free(0), allocated_instances: 0 },
            Candidate { name: "pi4", facts: &arm64, ready: true, allocated: free(0), allocated_instances: 0 },
            Candidate { name: "pi3", facts: &armv7, ready: true, allocated: free(0), allocated_instances: 0 },
            Candidate {
                name: "pi4-wasm",
                facts: &arm64_wasm_only,
                ready: true,
                allocated: free(0),
                allocated_instances: 0,
            },
        ];
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
        let fits = |s: &WorkloadSpec| all.iter().filter(|n| unfit(s, n).is_none()).map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(fits(&image(&["linux/amd64"])), ["amd"]);
        assert_eq!(fits(&image(&["linux/arm64"])), ["pi4"], "a node without a container runtime never gets one");
        assert_eq!(fits(&image(&["linux/arm/v7"])), ["pi4", "pi3"], "64-bit ARM runs 32-bit ARM images");
        assert_eq!(fits(&image(&["linux/arm/v6", "linux/amd64"])), ["amd", "pi4", "pi3"]);
        let e = place(&image(&["linux/riscv64"]), &all, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            "0/4 nodes are available: 3 nodes have a platform the image does not offer, 1 node is missing the workload's runtime"
        );
        // spec.placement.arch still narrows it.
        let mut narrowed = image(&["linux/arm/v7"]);
        narrowed.placement.arch = vec!["arm/v7".into()];
        assert_eq!(fits(&narrowed), ["pi3"]);
    }
}
