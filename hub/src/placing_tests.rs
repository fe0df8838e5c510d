//! The placement pass, table-tested.

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
        out.events.iter().filter(|(o, e)| o == w && e.reason == "Scheduled").map(|(_, e)| e.message.clone()).collect()
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
    let spec: Placement =
        serde_json::from_value(serde_json::json!({ "tolerations": [{ "key": "dedicated", "operator": "Exists" }] }))
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
    assert!(waiting[&("web".into(), 2)].contains("3 nodes have a replica spec.placement.anti_affinity"), "{waiting:?}");
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
