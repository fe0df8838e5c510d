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
#[path = "placing_tests.rs"]
mod tests;
