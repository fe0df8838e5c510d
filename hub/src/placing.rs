//! The placement half of the reconciler: which replicas a workload has and
//! on which node each runs. Pure: edits `Durable::placements` and reports.
//!
//! Invariant: a placed replica stays on its node while the node exists and
//! the workload still selects it (its runtime, architecture, platform and
//! labels) with no `NoExecute` taint it does not tolerate. Readiness,
//! cordons, `NoSchedule` taints and resources never move a replica: agents
//! run on through outages, and moving their work would run it twice when
//! they return. A per-node workload has one replica on every approved node
//! it selects and tolerates (offline or cordoned ones too: they run it when
//! they can); its replicas are numbered by the lowest free index.

use std::collections::{BTreeMap, BTreeSet};

use edge_api::model::{Event, Millis, Replicas, TaintEffect, WorkloadSpec};
use edge_api::placement::untolerated;

use crate::controller::{Durable, Known, Observed, Outcome, Placed, ReplicaId};
use crate::scheduler::{self, Ask, Candidate};

fn event(now_ms: u64, reason: &str, message: String) -> Event {
    Event::new(now_ms, false, reason, message)
}

/// The longest of `policy` over every revision the node may hold of a
/// replica (the one it was given, the one it last reported — `reported`,
/// or, with no report, every kept one before — and those between): what
/// its agent fences by is one of them. None if any of them has none.
fn held(
    d: &Durable,
    w: &str,
    placed: &Placed,
    reported: Option<u64>,
    policy: impl Fn(&WorkloadSpec) -> Option<Millis>,
) -> Option<Millis> {
    let (lo, hi) = match reported {
        Some(g) => (g.min(placed.revision), g.max(placed.revision)),
        None => (0, placed.revision),
    };
    let kept = d.revisions.range((w.to_string(), lo)..=(w.to_string(), hi)).map(|((_, r), _)| *r);
    let mut longest = Millis(0);
    for r in kept.chain([placed.revision]).chain(reported) {
        longest = longest.max(policy(d.spec_of(w, r)?)?);
    }
    Some(longest)
}

/// `reschedule_after`, if the replica must leave a node silent for
/// `silent_ms`: judged by what the node holds, not only by the workload now
/// (a policy made shorter while the node was away does not apply to it).
pub fn lost(d: &Durable, w: &str, placed: &Placed, reported: Option<u64>, silent_ms: u64) -> Option<Millis> {
    if d.workloads.get(w).is_none_or(|wl| wl.spec.replicas.is_per_node()) {
        return None;
    }
    held(d, w, placed, reported, |s| s.node_loss.reschedule_after).filter(|r| silent_ms >= r.0)
}

/// How long a node must be silent before a singleton it held may run
/// elsewhere without its word (its agent has fenced it by then), or never.
pub fn fence_basis(d: &Durable, w: &str, placed: &Placed, reported: Option<u64>) -> Option<Millis> {
    held(d, w, placed, reported, |s| {
        s.node_loss.fence().map(|_| s.node_loss.reschedule_after.unwrap_or(edge_api::lease::SINGLETON_FENCE_BASIS))
    })
}

/// Moves a replica off its node: at once, or for a singleton, by marking it
/// leaving (it goes from the node's desired state, and is placed elsewhere
/// once the node has stopped it). Says what happened.
pub fn leave(d: &mut Durable, id: &ReplicaId, singleton: bool, node: &str, why: &str) -> String {
    if singleton {
        d.placements.update(id, |_, leaving| *leaving = true);
        format!("replica {} leaves node {node}: {why}; it runs elsewhere once stopped there (singleton)", id.1)
    } else {
        d.placements.remove(id);
        format!("replica {} left node {node}: {why}", id.1)
    }
}

/// Whether `w` may have a replica numbered `r` (a per-node workload may
/// have any).
fn in_range(spec: &WorkloadSpec, r: u32) -> bool {
    match spec.replicas {
        Replicas::Count(n) => r < n,
        Replicas::PerNode => true,
    }
}

/// Drops the placements that no longer hold and places every replica that
/// has no node. `seen.ready` says which nodes may take new counted
/// replicas; a replica whose workload has `reschedule_after` leaves a node
/// not heard from for that long (its agent has fenced it by then: see
/// `edge_api::lease`).
///
/// With a `focus`, only the placements of its workloads and on its nodes
/// are looked at, and only its workloads (with those that lost a replica
/// now, and per-node ones when a node is in focus) are placed: the rest is
/// as the last pass left it. `d.known` must be current for every node.
pub fn place_all(d: &mut Durable, seen: &Observed, now_ms: u64, out: &mut Outcome, focus: Option<&Focus>) {
    let ready = seen.ready;
    // 1. Forget placements of deleted workloads, removed replicas and
    //    deleted nodes; move replicas off nodes that no longer hold them.
    let before: Vec<(ReplicaId, Placed)> = match focus {
        None => d.placements.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(f) => {
            let mut ids: BTreeSet<ReplicaId> = BTreeSet::new();
            for w in &f.workloads {
                ids.extend(d.placements.of(w).map(|(id, _)| id.clone()));
            }
            for n in &f.nodes {
                ids.extend(d.placements.on(n).map(|(id, _)| id.clone()));
            }
            ids.into_iter().filter_map(|id| d.placements.get(&id).cloned().map(|p| (id, p))).collect()
        }
    };
    // Per-node workloads: the nodes already holding one (a workload that
    // was counted before may have two on a node).
    let mut holding: BTreeSet<(String, String)> = BTreeSet::new();
    for (id, placed) in before {
        let node = placed.node.clone();
        if d.nodes.contains_key(&node) && d.known(&node).is_none() {
            d.refresh(&node);
        }
        let (Some(wl), Some(rec), Some(known)) = (d.workloads.get(&id.0), d.nodes.get(&node), d.known(&node)) else {
            d.placements.remove(&id);
            continue;
        };
        let leaving = placed.leaving;
        let silent = (seen.silent_ms)(&node);
        let reported = (seen.report)(&node, &id.0, id.1).map(|i| i.generation);
        let singleton =
            wl.spec.node_loss.singleton || d.spec_of(&id.0, placed.revision).is_some_and(|s| s.node_loss.singleton);
        let must_leave = scheduler::must_leave(&wl.spec, &known.facts, &rec.taints);
        let desired_generation = rec.desired_generation;
        let in_range = in_range(&wl.spec, id.1);
        if wl.spec.replicas.is_per_node() && !leaving && !holding.insert((id.0.clone(), node.clone())) {
            let message = leave(d, &id, singleton, &node, "the node has another replica of this per-node workload");
            out.events.push((id.0.clone(), event(now_ms, "Evicted", message)));
            continue;
        }
        if leaving {
            // Placed elsewhere once the node shows it stopped the replica
            // (it applied a desired state without it and reports no such
            // replica), or has been silent long enough to have fenced it.
            let stopped = (seen.ready)(&node)
                && (seen.observed_gen)(&node) >= desired_generation
                && (seen.report)(&node, &id.0, id.1).is_none();
            let fenced = fence_basis(d, &id.0, &placed, reported).is_some_and(|b| silent >= b.0);
            if stopped || fenced {
                d.placements.remove(&id);
                let how = if stopped {
                    "it stopped there".to_string()
                } else {
                    format!("silent for {}s, it has fenced it", silent / 1000)
                };
                let message = format!("replica {} released by node {node} ({how}): it may run elsewhere", id.1);
                out.events.push((id.0.clone(), event(now_ms, "Released", message)));
            }
        } else if !in_range {
            d.placements.remove(&id);
        } else if let Some(why) = must_leave {
            // (The workload's placement now, whatever revision the replica runs.)
            let message = leave(d, &id, singleton, &node, &why);
            out.events.push((id.0.clone(), event(now_ms, "Evicted", message)));
        } else if let Some(after) = lost(d, &id.0, &placed, reported, silent) {
            d.placements.remove(&id);
            let message = format!(
                "replica {} left node {node}: not heard from for {}s (reschedule_after = \"{after}\"); its agent has stopped it",
                id.1,
                silent / 1000
            );
            out.events.push((id.0.clone(), Event { warning: true, ..event(now_ms, "Rescheduled", message) }));
        }
    }
    // What the nodes that lost a replica now hold.
    for n in d.placements.touched_nodes() {
        d.refresh(&n);
    }

    // 2. Place every replica that has no node, keeping what is known of
    //    each node up to date as replicas land.
    let avoids: BTreeMap<String, Vec<String>> = d
        .workloads
        .iter()
        .filter(|(_, wl)| !wl.spec.placement.anti_affinity.is_empty())
        .map(|(n, wl)| (n.clone(), wl.spec.placement.anti_affinity.clone()))
        .collect();
    let names: Vec<String> = match focus {
        None => d.workloads.keys().cloned().collect(),
        Some(f) => {
            let mut names: BTreeSet<String> = f.workloads.clone();
            names.extend(d.placements.touched().map(|(w, _)| w.clone()));
            if !f.nodes.is_empty() {
                names.extend(
                    d.workloads.iter().filter(|(_, wl)| wl.spec.replicas.is_per_node()).map(|(n, _)| n.clone()),
                );
            }
            // (Deleted ones too: nothing of theirs waits any more.)
            out.placed = Some(names.clone());
            names.retain(|w| d.workloads.contains_key(w));
            names.into_iter().collect()
        }
    };
    let none = BTreeMap::new();
    for w in names {
        let spec = d.workloads[&w].spec.clone();
        let mut pending: Vec<u32> = match spec.replicas {
            Replicas::Count(n) => (0..n).filter(|r| !d.placements.contains_key(&(w.clone(), *r))).collect(),
            Replicas::PerNode => vec![],
        };
        pending.reverse();
        // Replicas of it per node.
        let mut siblings: BTreeMap<String, usize> = BTreeMap::new();
        let mut scheduled: Vec<(u32, String)> = Vec::new();
        if !pending.is_empty() {
            for (_, p) in d.placements.of(&w) {
                *siblings.entry(p.node.clone()).or_default() += 1;
            }
        }
        if pending.is_empty() && !spec.replicas.is_per_node() {
            // (Checked first: a whole pass over 10,000 workloads otherwise
            // looked at every node for each.)
            continue;
        }
        let revision = crate::rollouts::initial_revision(d, &w);
        if spec.replicas.is_per_node() {
            let candidates = candidates(d, ready);
            // (replica, node) to place now.
            let mut landed: Vec<(u32, String)> = Vec::new();
            let mine: BTreeMap<u32, &str> = d.placements.of(&w).map(|((_, r), p)| (*r, p.node.as_str())).collect();
            let on: BTreeSet<&str> = mine.values().copied().collect();
            let mut free_index = (0u32..).filter(|r| !mine.contains_key(r));
            let ask = Ask { workload: &w, spec: &spec, siblings: &none, avoids: &avoids };
            let keep_away = [TaintEffect::NoSchedule, TaintEffect::NoExecute];
            for n in candidates.iter().filter(|n| !on.contains(n.name)) {
                let selected = d.nodes[n.name].approved
                    && scheduler::mismatch(&spec, n.facts).is_none()
                    && untolerated(&spec.placement.tolerations, n.taints, &keep_away).is_none();
                if !selected {
                    continue;
                }
                let Some(r) = free_index.next() else { break };
                match scheduler::unfit(&ask, n, true) {
                    None => landed.push((r, n.name.to_string())),
                    Some(why) => {
                        let msg = format!("node {} {}", n.name, scheduler::phrase(why, 1));
                        out.unschedulable.insert((w.clone(), r), msg);
                    }
                }
            }
            land(d, &w, revision, landed, &mut scheduled, &mut siblings);
        }
        if !pending.is_empty() {
            // Each counted replica goes where `scheduler::place` would put it
            // (among the nodes looked at), given those placed before it.
            // Where its look at the nodes starts (with spread, every node
            // counts: the groups' numbers are the whole fleet's).
            let start = match spec.placement.spread {
                None => d.known_name_at(start_of(&w)),
                Some(_) => None,
            };
            let ask = Ask { workload: &w, spec: &spec, siblings: &siblings, avoids: &avoids };
            // (At least one node that can take it per replica: each can
            // take one, so a sample never runs out before every node would.)
            let enough = SCORED.max(pending.len() + siblings.len());
            let (candidates, complete) = start
                .as_deref()
                .and_then(|start| sample(d, ready, &ask, enough, start))
                .unwrap_or_else(|| (candidates(d, ready), true));
            let holds = d.spec_of(&w, revision).unwrap_or(&spec);
            let mut picker = scheduler::Picker::new(&ask, candidates, holds, pending.len());
            let mut landed: Vec<(u32, String)> = Vec::new();
            while let Some(r) = pending.pop() {
                match picker.pick() {
                    Ok(node) => landed.push((r, node.to_string())),
                    Err(e) => {
                        debug_assert!(complete, "a sample ran out of nodes");
                        // The others would find the same nodes.
                        for r in std::iter::once(r).chain(pending.drain(..)) {
                            out.unschedulable.insert((w.clone(), r), e.to_string());
                        }
                    }
                }
            }
            drop(picker);
            land(d, &w, revision, landed, &mut scheduled, &mut siblings);
        }
        scheduled_events(&w, scheduled, now_ms, out);
    }
}

/// Counts replicas placed on their nodes and brings what is known of
/// those nodes up to date.
fn land(
    d: &mut Durable,
    w: &str,
    revision: u64,
    landed: Vec<(u32, String)>,
    scheduled: &mut Vec<(u32, String)>,
    siblings: &mut BTreeMap<String, usize>,
) {
    let mut touched: BTreeSet<String> = BTreeSet::new();
    for (r, node) in landed {
        *siblings.entry(node.clone()).or_default() += 1;
        scheduled.push((r, node.clone()));
        d.placements.insert((w.to_string(), r), Placed::on(node.clone(), revision));
        touched.insert(node);
    }
    for n in touched {
        d.refresh(&n);
    }
}

/// How many nodes that can take a counted replica are ranked, at least,
/// in a large fleet (and one more for each replica to place and each node
/// already holding one): not every node, as Kubernetes' scheduler scores
/// a share of a large cluster. At 10,000 nodes a look at every node was
/// most of the time of an apply.
pub const SCORED: usize = 500;

/// A stable hash of a name (FNV-1a): where a workload's look at the nodes
/// starts, the same in every pass and every hub.
fn start_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The nodes from `start` onwards (round to the first), until `enough`
/// of them can take a replica; in name order, and whether that is every
/// node. None when every node is to be looked at anyway.
fn sample<'d>(
    d: &'d Durable,
    ready: &dyn Fn(&str) -> bool,
    ask: &Ask,
    enough: usize,
    start: &'d str,
) -> Option<(Vec<Candidate<'d>>, bool)> {
    let n = d.known_count();
    if n <= enough {
        return None;
    }
    let (mut low, mut high) = (Vec::new(), Vec::new());
    let mut fit = 0;
    let from = d.known_from(start).map(|k| (true, k));
    let before = d.known_before(start).map(|k| (false, k));
    for (later, (name, k)) in from.chain(before) {
        let c = candidate(name, k, ready);
        fit += usize::from(scheduler::unfit(ask, &c, false).is_none());
        if later {
            high.push(c)
        } else {
            low.push(c)
        }
        if fit >= enough {
            break;
        }
    }
    let complete = low.len() + high.len() == n;
    // (Both runs are in name order, and every name of `low` is before those of `high`.)
    low.extend(high);
    Some((low, complete))
}

/// A node as the scheduler sees it now.
fn candidate<'d>(name: &'d str, k: &'d Known, ready: &dyn Fn(&str) -> bool) -> Candidate<'d> {
    Candidate {
        name,
        facts: &k.facts,
        ready: k.approved && ready(name),
        cordoned: k.unschedulable,
        taints: &k.taints,
        allocated: k.allocated,
        allocated_instances: k.instances,
        residents: &k.residents,
    }
}

/// Every node the scheduler knows, as it is now, in name order.
fn candidates<'d>(d: &'d Durable, ready: &dyn Fn(&str) -> bool) -> Vec<Candidate<'d>> {
    d.known_all().map(|(name, k)| candidate(name, k, ready)).collect()
}

/// An event per replica placed; past a few, one that sums them up (a
/// workload of ten thousand replicas is not ten thousand events).
fn scheduled_events(w: &str, mut scheduled: Vec<(u32, String)>, now_ms: u64, out: &mut Outcome) {
    const EACH: usize = 5;
    if scheduled.len() <= EACH {
        for (r, node) in scheduled {
            out.events
                .push((w.to_string(), event(now_ms, "Scheduled", format!("replica {r} assigned to node {node}"))));
        }
        return;
    }
    scheduled.sort();
    let nodes: BTreeSet<&str> = scheduled.iter().map(|(_, n)| n.as_str()).collect();
    let first: Vec<String> = scheduled.iter().take(3).map(|(r, n)| format!("{r} to {n}")).collect();
    let message =
        format!("{} replicas assigned to {} nodes (replica {}, …)", scheduled.len(), nodes.len(), first.join(", "));
    out.events.push((w.to_string(), event(now_ms, "Scheduled", message)));
}

/// What an incremental pass looks at: the workloads and nodes a change
/// touched, and those the caller adds (see [`crate::controller::Scope`]).
#[derive(Debug, Default, Clone)]
pub struct Focus {
    pub workloads: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole pass, as the reconciler makes it.
    fn place_all(d: &mut Durable, seen: &Observed, now_ms: u64, out: &mut Outcome) {
        d.refresh_all();
        super::place_all(d, seen, now_ms, out, None);
    }
    use crate::controller::tests::{cluster, workload};
    use edge_api::model::{Placement, Selector, Workload};
    use edge_api::placement::TaintChange;

    /// Places everything; returns (workload, replica) → node, and the
    /// reasons of what could not be placed.
    fn run(d: &mut Durable, ready: &dyn Fn(&str) -> bool) -> (Vec<String>, BTreeMap<ReplicaId, String>) {
        let mut out = Outcome::default();
        place_all(d, &Observed::nodes(ready), 1, &mut out);
        let placed = d.placements.iter().map(|((w, r), p)| format!("{w}/{r}@{}", p.node)).collect();
        (placed, out.unschedulable)
    }

    fn label(d: &mut Durable, node: &str, k: &str, v: &str) {
        d.nodes.get_mut(node).unwrap().facts.labels.insert(k.into(), v.into());
    }

    fn taint(d: &mut Durable, node: &str, t: &str) {
        TaintChange::parse(t).unwrap().apply(&mut d.nodes.get_mut(node).unwrap().taints);
    }

    fn per_node(name: &str, selector: &str) -> Workload {
        let mut w = workload(name, 1, 64, 1);
        w.spec.replicas = Replicas::PerNode;
        w.spec.placement.node_selector = Selector::parse(selector).unwrap();
        w
    }

    const READY: &dyn Fn(&str) -> bool = &|_| true;

    /// A fleet larger than what a replica is ranked among.
    fn fleet(size: usize, workloads: &[Workload]) -> Durable {
        let names: Vec<String> = (0..size).map(|i| format!("n{i:04}")).collect();
        let nodes: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1024)).collect();
        cluster(&nodes, workloads)
    }

    #[test]
    fn in_a_large_fleet_a_sample_of_the_nodes_still_finds_the_one_that_fits_and_says_why_none_does() {
        let size = SCORED * 2 + 200;
        let mut d = fleet(size, &[workload("one", 1, 64, 1), workload("huge", 1, 4096, 1)]);
        // Only the node just before where "one" starts to look can take it:
        // found by going round to the start.
        let start = (start_of("one") % size as u64) as usize;
        let only = format!("n{:04}", (start + size - 1) % size);
        let names: Vec<String> = d.nodes.keys().cloned().collect();
        for name in names {
            d.nodes.get_mut(&name).unwrap().unschedulable = name != only;
        }
        let (placed, waiting) = run(&mut d, READY);
        assert_eq!(placed, [format!("one/0@{only}")]);
        assert_eq!(
            waiting[&("huge".to_string(), 0)],
            format!("0/{size} nodes are available: 1 node has insufficient memory, {} nodes are cordoned", size - 1),
            "every node counted"
        );
    }

    #[test]
    fn in_a_large_fleet_a_big_workload_still_gets_a_node_per_replica_and_passes_agree() {
        let size = SCORED * 2 + 200;
        let many = workload("many", (SCORED + 200) as u32, 64, 1);
        let ones: Vec<Workload> = (0..20).map(|i| workload(&format!("w{i}"), 1, 64, 1)).collect();
        let mut all = ones.clone();
        all.push(many.clone());
        all.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        // A whole pass from nothing (workloads in name order), and one
        // workload at a time.
        let mut whole = fleet(size, &all);
        run(&mut whole, READY);
        let mut inc = fleet(size, &[]);
        inc.refresh_all();
        for w in &all {
            inc.workloads.insert(w.metadata.name.clone(), w.clone());
            let focus = Focus { workloads: [w.metadata.name.clone()].into(), nodes: BTreeSet::new() };
            super::place_all(&mut inc, &Observed::nodes(READY), 1, &mut Outcome::default(), Some(&focus));
        }
        let differ = inc.placements.iter().zip(whole.placements.iter()).find(|(a, b)| a != b);
        assert_eq!(differ, None);
        assert_eq!(inc.placements.len(), whole.placements.len());
        let on: BTreeSet<&str> = whole.placements.of("many").map(|(_, p)| p.node.as_str()).collect();
        assert_eq!(on.len(), SCORED + 200, "one node per replica");
        // The small ones look from points of their own: not all at the same nodes.
        let small: BTreeSet<&str> =
            whole.placements.iter().filter(|((w, _), _)| w != "many").map(|(_, p)| p.node.as_str()).collect();
        assert_eq!(small.len(), 20);
    }

    #[test]
    fn a_pass_that_places_many_replicas_records_one_event_for_them() {
        let mut d = cluster(&[("a", 4096), ("b", 4096)], &[workload("few", 3, 16, 1), workload("many", 30, 16, 1)]);
        let mut out = Outcome::default();
        place_all(&mut d, &Observed::nodes(READY), 1, &mut out);
        let said = |w: &str| -> Vec<String> {
            out.events
                .iter()
                .filter(|(o, e)| o == w && e.reason == "Scheduled")
                .map(|(_, e)| e.message.clone())
                .collect()
        };
        assert_eq!(said("few").len(), 3, "a few: one each");
        let many = said("many");
        assert_eq!(many.len(), 1, "{many:?}");
        assert!(many[0].starts_with("30 replicas assigned to 2 nodes (replica 0 to "), "{many:?}");
        assert_eq!(d.placements.of("many").count(), 30);
    }

    #[test]
    fn a_per_node_workload_follows_the_nodes_it_selects() {
        let mut d = cluster(&[("a", 1024), ("b", 1024), ("c", 1024)], &[per_node("agentd", "role=gw")]);
        label(&mut d, "a", "role", "gw");
        label(&mut d, "c", "role", "gw");
        // Not ready and cordoned nodes get it too: they run it when they can.
        d.nodes.get_mut("c").unwrap().unschedulable = true;
        let (placed, waiting) = run(&mut d, &|n| n != "c");
        assert_eq!(placed, ["agentd/0@a", "agentd/1@c"]);
        assert!(waiting.is_empty());
        // A node that starts to match gets the lowest free number.
        label(&mut d, "a", "role", "db");
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["agentd/1@c"], "a node that stops matching loses it");
        label(&mut d, "b", "role", "gw");
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["agentd/0@b", "agentd/1@c"]);
        // A node the replica does not fit on says so, by name.
        let mut big = per_node("big", "role=gw");
        big.spec.resources.memory = edge_api::quantity::Memory::mib(2000);
        d.workloads.insert("big".into(), big);
        d.nodes.get_mut("c").unwrap().facts.allocatable_memory = edge_api::quantity::Memory::mib(4096);
        let (placed, waiting) = run(&mut d, READY);
        assert!(placed.contains(&"big/1@c".to_string()), "{placed:?}");
        assert_eq!(waiting.get(&("big".into(), 0)).map(String::as_str), Some("node b has insufficient memory"));
        // Unapproved nodes get nothing.
        d.nodes.get_mut("b").unwrap().approved = false;
        d.workloads.remove("big");
        d.placements.clear();
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["agentd/0@c"]);
    }

    #[test]
    fn taints_keep_replicas_away_unless_tolerated_and_no_execute_moves_them() {
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[workload("web", 2, 64, 1)]);
        taint(&mut d, "a", "dedicated=gw:NoSchedule");
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["web/0@b", "web/1@b"], "NoSchedule keeps new replicas away");
        // NoSchedule leaves replicas already there alone; NoExecute moves them.
        d.placements.insert(("web".into(), 1), Placed::on("a", 1));
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["web/0@b", "web/1@a"]);
        taint(&mut d, "a", "dedicated=gw:NoExecute");
        let mut out = Outcome::default();
        place_all(&mut d, &Observed::nodes(READY), 1, &mut out);
        assert_eq!(d.placements.get(&("web".into(), 1)).map(|p| p.node.as_str()), Some("b"));
        assert!(out.events.iter().any(|(_, e)| e.reason == "Evicted" && e.message.contains("dedicated=gw:NoExecute")));
        // A toleration lets it back.
        let spec: Placement = serde_json::from_value(
            serde_json::json!({ "tolerations": [{ "key": "dedicated", "operator": "Exists" }] }),
        )
        .unwrap();
        let mut gw = workload("gw", 1, 64, 1);
        gw.spec.placement = spec;
        d.workloads.insert("gw".into(), gw);
        d.nodes.get_mut("b").unwrap().unschedulable = true;
        let (placed, _) = run(&mut d, READY);
        assert!(placed.contains(&"gw/0@a".to_string()), "{placed:?}");
        // PreferNoSchedule: avoided while another node fits.
        let mut d = cluster(&[("a", 4096), ("b", 1024)], &[workload("web", 1, 64, 1)]);
        taint(&mut d, "a", "old=1:PreferNoSchedule");
        assert_eq!(run(&mut d, READY).0, ["web/0@b"]);
        let mut d = cluster(&[("a", 4096), ("b", 1024)], &[workload("web", 1, 64, 1)]);
        taint(&mut d, "a", "old=1:PreferNoSchedule");
        d.nodes.get_mut("b").unwrap().unschedulable = true;
        assert_eq!(run(&mut d, READY).0, ["web/0@a"], "but used when nothing else fits");
    }

    #[test]
    fn cordoned_nodes_keep_their_replicas_and_get_no_new_ones() {
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[workload("web", 2, 64, 1)]);
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["web/0@a", "web/1@b"]);
        d.nodes.get_mut("b").unwrap().unschedulable = true;
        d.workloads.get_mut("web").unwrap().spec.replicas = Replicas::Count(3);
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["web/0@a", "web/1@b", "web/2@a"]);
    }

    #[test]
    fn counted_replicas_spread_over_a_label_then_over_nodes() {
        let mut w = workload("web", 4, 64, 1);
        w.spec.placement.spread = Some("site".into());
        // Site x has three nodes, site y one, and one node has no site.
        let mut d = cluster(&[("x1", 1024), ("x2", 1024), ("x3", 1024), ("y1", 1024), ("z", 8192)], &[w]);
        for (n, s) in [("x1", "x"), ("x2", "x"), ("x3", "x"), ("y1", "y")] {
            label(&mut d, n, "site", s);
        }
        let (placed, _) = run(&mut d, READY);
        let on = |p: &[String], n: &str| p.iter().filter(|x| x.ends_with(&format!("@{n}"))).count();
        let site_x = on(&placed, "x1") + on(&placed, "x2") + on(&placed, "x3");
        assert_eq!((site_x, on(&placed, "y1"), on(&placed, "z")), (2, 2, 0), "{placed:?}");
        assert!(on(&placed, "x1") <= 1 && on(&placed, "x2") <= 1 && on(&placed, "x3") <= 1, "{placed:?}");
        // Nodes without the label are used when no labelled node fits.
        d.workloads.get_mut("web").unwrap().spec.replicas = Replicas::Count(5);
        for n in ["x1", "x2", "x3", "y1"] {
            d.nodes.get_mut(n).unwrap().unschedulable = true;
        }
        let (placed, _) = run(&mut d, READY);
        assert_eq!(on(&placed, "z"), 1);
    }

    #[test]
    fn anti_affinity_keeps_replicas_apart_both_ways_round() {
        let mut web = workload("web", 3, 64, 1);
        web.spec.placement.anti_affinity = vec!["web".into()];
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[web]);
        let (placed, waiting) = run(&mut d, READY);
        assert_eq!(placed, ["web/0@a", "web/1@b"]);
        assert_eq!(
            waiting.get(&("web".into(), 2)).map(String::as_str),
            Some("0/2 nodes are available: 2 nodes have a replica spec.placement.anti_affinity keeps apart from it")
        );
        // db keeps away from web: it takes the one node without web, and
        // web then finds none left.
        let mut db = workload("db", 1, 64, 1);
        db.spec.placement.anti_affinity = vec!["web".into()];
        d.workloads.insert("db".into(), db);
        d.nodes.insert("c".into(), crate::controller::tests::node("c", 1024));
        let (placed, waiting) = run(&mut d, READY);
        assert_eq!(placed, ["db/0@c", "web/0@a", "web/1@b"]);
        assert!(
            waiting[&("web".into(), 2)].contains("3 nodes have a replica spec.placement.anti_affinity"),
            "{waiting:?}"
        );
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[workload("db", 1, 64, 1), workload("web", 1, 64, 1)]);
        d.workloads.get_mut("db").unwrap().spec.placement.anti_affinity = vec!["web".into()];
        let (placed, _) = run(&mut d, READY);
        assert_eq!(placed, ["db/0@a", "web/0@b"], "web, which names nobody, still keeps away from db");
    }

    #[test]
    fn a_counted_replica_moves_when_its_node_no_longer_matches() {
        let mut w = workload("web", 1, 64, 1);
        w.spec.placement.node_selector = Selector::parse("site=x").unwrap();
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[w]);
        label(&mut d, "a", "site", "x");
        assert_eq!(run(&mut d, READY).0, ["web/0@a"]);
        // Offline, it stays; relabelled, it moves.
        assert_eq!(run(&mut d, &|_| false).0, ["web/0@a"]);
        label(&mut d, "a", "site", "y");
        label(&mut d, "b", "site", "x");
        assert_eq!(run(&mut d, READY).0, ["web/0@b"]);
    }

    #[test]
    fn a_node_silent_for_reschedule_after_loses_those_replicas_only() {
        let mut moved = workload("db", 1, 64, 1);
        moved.spec.node_loss.reschedule_after = Some(edge_api::model::Millis(5_000));
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[moved, workload("web", 1, 64, 1)]);
        d.nodes.get_mut("b").unwrap().unschedulable = true;
        assert_eq!(run(&mut d, READY).0, ["db/0@a", "web/0@a"]);
        d.nodes.get_mut("b").unwrap().unschedulable = false;
        let not_a = |n: &str| n != "a";
        let pass = |d: &mut Durable, silent: u64| {
            let silent_ms = move |n: &str| if n == "a" { silent } else { 0 };
            let seen = Observed {
                ready: &not_a,
                report: &|_, _, _| None,
                silent_ms: &silent_ms,
                observed_gen: &|_| 0,
                keep_revisions: 10,
            };
            let mut out = Outcome::default();
            place_all(d, &seen, 1, &mut out);
            out
        };
        let out = pass(&mut d, 4_999);
        assert!(out.events.is_empty(), "not yet: {:?}", out.events);
        let out = pass(&mut d, 5_000);
        let placed: Vec<String> = d.placements.iter().map(|((w, r), p)| format!("{w}/{r}@{}", p.node)).collect();
        assert_eq!(placed, ["db/0@b", "web/0@a"], "web has no reschedule_after: it waits for its node");
        let e = out.events.iter().find(|(_, e)| e.reason == "Rescheduled").expect("an event");
        assert!(e.1.warning && e.1.message.contains("not heard from for 5s"), "{e:?}");
    }

    #[test]
    fn a_singleton_moves_only_once_its_node_stopped_it_or_fenced_it() {
        let mut one = workload("db", 1, 64, 1);
        one.spec.node_loss.singleton = true;
        one.spec.placement.node_selector = Selector::parse("site=x").unwrap();
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[one]);
        label(&mut d, "a", "site", "x");
        label(&mut d, "b", "site", "x");
        d.nodes.get_mut("b").unwrap().unschedulable = true;
        assert_eq!(run(&mut d, READY).0, ["db/0@a"]);
        d.nodes.get_mut("b").unwrap().unschedulable = false;
        d.nodes.get_mut("a").unwrap().desired_generation = 7;
        label(&mut d, "a", "site", "y");
        // (running: whether node a still reports it; applied: the generation it applied.)
        let pass = |d: &mut Durable, running: bool, applied: u64, silent: u64| {
            let report = move |n: &str, _: &str, _: u32| {
                (n == "a" && running).then(|| {
                    serde_json::from_value(serde_json::json!({
                        "workload": "db", "replica": 0, "uid": "uid-db", "generation": 1, "phase": "Running"
                    }))
                    .unwrap()
                })
            };
            let (applied_gen, silent_ms) = (move |_: &str| applied, move |n: &str| if n == "a" { silent } else { 0 });
            let seen = Observed {
                ready: READY,
                report: &report,
                silent_ms: &silent_ms,
                observed_gen: &applied_gen,
                keep_revisions: 10,
            };
            let mut out = Outcome::default();
            place_all(d, &seen, 1, &mut out);
            let placed: Vec<String> = d
                .placements
                .iter()
                .map(|((w, r), p)| format!("{w}/{r}@{}{}", p.node, if p.leaving { " leaving" } else { "" }))
                .collect();
            (placed, out)
        };
        let (placed, out) = pass(&mut d, true, 6, 0);
        assert_eq!(placed, ["db/0@a leaving"], "not placed elsewhere while a may still run it");
        assert!(out.events.iter().any(|(_, e)| e.message.contains("once stopped there")), "{:?}", out.events);
        assert_eq!(pass(&mut d, true, 7, 0).0, ["db/0@a leaving"], "a applied its new state but still runs it");
        assert_eq!(pass(&mut d, false, 6, 0).0, ["db/0@a leaving"], "a has not applied the state without it");
        let (placed, out) = pass(&mut d, false, 7, 0);
        assert_eq!(placed, ["db/0@b"]);
        assert!(out.events.iter().any(|(_, e)| e.reason == "Released" && e.message.contains("stopped there")));
        // A node that goes silent instead is trusted to have fenced it after 30 s.
        label(&mut d, "b", "site", "y");
        label(&mut d, "a", "site", "x");
        d.nodes.get_mut("b").unwrap().desired_generation = 9;
        let silent_b = |d: &mut Durable, silent: u64| {
            let (applied_gen, silent_ms) = (|_: &str| 0, move |n: &str| if n == "b" { silent } else { 0 });
            let seen = Observed {
                ready: READY,
                report: &|_, _, _| None,
                silent_ms: &silent_ms,
                observed_gen: &applied_gen,
                keep_revisions: 10,
            };
            place_all(d, &seen, 1, &mut Outcome::default());
            d.placements
                .iter()
                .map(|((w, r), p)| format!("{w}/{r}@{}{}", p.node, if p.leaving { " leaving" } else { "" }))
                .collect::<Vec<_>>()
        };
        assert_eq!(silent_b(&mut d, 29_999), ["db/0@b leaving"]);
        assert_eq!(silent_b(&mut d, 30_000), ["db/0@a"]);
    }

    #[test]
    fn a_shorter_policy_does_not_apply_to_a_node_that_still_holds_the_longer_one() {
        let mut db = workload("db", 1, 64, 1);
        db.spec.node_loss.reschedule_after = Some(Millis(300_000));
        let mut d = cluster(&[("a", 1024), ("b", 1024)], &[db]);
        d.nodes.get_mut("b").unwrap().unschedulable = true;
        run(&mut d, READY);
        d.nodes.get_mut("b").unwrap().unschedulable = false;
        let old = d.workloads["db"].clone();
        crate::revisions::record_revision(&mut d, &old, "t", "created".into(), 0, 10);
        let wl = d.workloads.get_mut("db").unwrap();
        wl.spec.node_loss.reschedule_after = Some(Millis(30_000));
        wl.metadata.generation = 2;
        let wl = wl.clone();
        crate::revisions::record_revision(&mut d, &wl, "t", "shorter".into(), 0, 10);
        let placed = d.placements[&("db".to_string(), 0)].clone();
        assert_eq!(placed.revision, 1, "the node was away: it holds revision 1");
        assert_eq!(lost(&d, "db", &placed, Some(1), 31_000), None, "its agent fences only after 300 s");
        assert_eq!(lost(&d, "db", &placed, Some(1), 300_000), Some(Millis(300_000)));
        let updated = Placed::on("a", 2);
        assert_eq!(lost(&d, "db", &updated, Some(2), 31_000), Some(Millis(30_000)), "once it holds revision 2");
        assert_eq!(lost(&d, "db", &updated, None, 31_000), None, "no report: it may hold revision 1");
        // A revision without a policy: its agent never fences it.
        let mut free = Placed::on("a", 1);
        d.workloads.get_mut("db").unwrap().spec.node_loss = Default::default();
        d.workloads.get_mut("db").unwrap().metadata.generation = 3;
        free.revision = 3;
        assert_eq!(lost(&d, "db", &free, Some(1), 10_000_000), None);
    }

    #[test]
    fn a_counted_workload_made_per_node_keeps_one_replica_per_node() {
        let mut d = cluster(&[("a", 4096), ("b", 4096)], &[workload("agentd", 3, 64, 1)]);
        for r in 0..3 {
            d.placements.insert(("agentd".into(), r), Placed::on(if r < 2 { "a" } else { "b" }, 1));
        }
        d.workloads.get_mut("agentd").unwrap().spec.replicas = Replicas::PerNode;
        assert_eq!(run(&mut d, READY).0, ["agentd/0@a", "agentd/2@b"]);
    }
}
