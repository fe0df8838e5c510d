//! The rollout step of the reconciler: starts a rollout when a workload's
//! replicas run an older template than its spec, moves each one wave by
//! wave through [`crate::rollout::advance`], and carries out a rollback.
//! Pure, over [`Durable`].
//!
//! A replica is up to date when its revision's *template* (the spec
//! without replicas, placement, rollout policy and where the component came
//! from) equals the workload's: scaling, moving or a changed rollout policy
//! restart nothing, and a rollback to a spec replicas still run leaves them
//! running.

use std::collections::BTreeSet;

use edge_api::model::{Event, RolloutPhase, WorkloadSpec};

use crate::controller::{Durable, Observed, Outcome};
use crate::revisions::{record_revision, template};
use crate::rollout::{self, Report, Rollout, Seen};

/// The revision a new replica of `w` starts at: the workload's, except
/// while a rollout of it is paused or failed (the new revision is not
/// trusted yet), and for a per-node replica while one is under way (a node
/// that joins then waits for its wave, not ahead of the canary).
pub fn initial_revision(d: &Durable, w: &str) -> u64 {
    let Some(wl) = d.workloads.get(w) else { return 0 };
    let generation = wl.metadata.generation;
    match d.rollouts.get(w) {
        Some(r)
            if r.revision == generation
                && (matches!(r.phase, RolloutPhase::Paused | RolloutPhase::Failed)
                    || (r.phase == RolloutPhase::Progressing && wl.spec.replicas.is_per_node())) =>
        {
            r.from
        }
        _ => generation,
    }
}

fn event(now_ms: u64, warning: bool, reason: &str, message: String) -> Event {
    Event::new(now_ms, warning, reason, message)
}

/// The revision most of the replicas run (ties: the newest).
fn most_run(revisions: impl Iterator<Item = u64>) -> Option<u64> {
    let mut counts = std::collections::BTreeMap::new();
    for r in revisions {
        *counts.entry(r).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by_key(|(r, n)| (*n, *r)).map(|(r, _)| r)
}

/// Moves rollouts on: of every workload, or of those in `only`.
pub fn roll(d: &mut Durable, seen: &Observed, now_ms: u64, out: &mut Outcome, only: Option<&BTreeSet<String>>) {
    let gone: Vec<String> = match only {
        None => d.rollouts.keys().filter(|w| !d.workloads.contains_key(*w)).cloned().collect(),
        Some(only) => {
            only.iter().filter(|w| d.rollouts.contains_key(*w) && !d.workloads.contains_key(*w)).cloned().collect()
        }
    };
    for w in gone {
        d.rollouts.remove(&w);
    }
    let names: Vec<String> = match only {
        None => d.workloads.keys().cloned().collect(),
        Some(only) => only.iter().filter(|w| d.workloads.contains_key(*w)).cloned().collect(),
    };
    for w in names {
        let (target, uid, spec) = {
            let wl = &d.workloads[&w];
            (wl.metadata.generation, wl.metadata.uid.clone(), wl.spec.clone())
        };
        let want = template(&spec);
        let range = (w.clone(), 0)..=(w.clone(), u32::MAX);
        let by_label = spec.rollout.by_label.as_deref();
        let replicas: Vec<Seen> = d
            .placements
            .range(range.clone())
            .map(|((_, r), p)| Seen {
                replica: *r,
                node: p.node.clone(),
                node_ready: (seen.ready)(&p.node),
                up_to_date: d.spec_of(&w, p.revision).is_some_and(|s| template(s) == want),
                revision: p.revision,
                label: by_label.and_then(|k| d.nodes.get(&p.node)?.effective_facts().labels.get(k).cloned()),
                report: (seen.report)(&p.node, &w, *r).filter(|i| i.uid == uid).map(|i| Report {
                    generation: i.generation,
                    phase: i.phase,
                    ready: i.ready,
                    restarts: i.restarts,
                    message: i.probe.or(i.message).or(i.reason.map(|r| r.to_string())).unwrap_or_default(),
                }),
            })
            .collect();
        let behind = replicas.iter().any(|s| !s.up_to_date);
        let current = d.rollouts.get(&w).filter(|r| r.revision == target);
        match current {
            None if behind => {
                let from = match d.rollouts.get(&w) {
                    // A rollout superseded before it finished: back to where it came from.
                    Some(old) if old.phase.is_active() || old.phase == RolloutPhase::Failed => old.from,
                    _ => most_run(replicas.iter().filter(|s| !s.up_to_date).map(|s| s.revision)).unwrap_or(target),
                };
                let message = format!("rolling out revision {target} (from {from})");
                out.events.push((w.clone(), event(now_ms, false, "RolloutStarted", message)));
                d.rollouts.insert(w.clone(), Rollout::new(target, from, now_ms));
            }
            Some(r) if r.phase == RolloutPhase::Complete && behind => {
                // Replicas that fell behind after it completed catch up at once.
                for s in replicas.iter().filter(|s| !s.up_to_date) {
                    d.placements.update(&(w.clone(), s.replica), |revision, _| *revision = target);
                }
                continue;
            }
            _ => {}
        }
        let Some(r) = d.rollouts.get_mut(&w).filter(|r| r.revision == target) else { continue };
        let per_node = spec.replicas.is_per_node();
        let adv = rollout::advance(r, &spec.rollout, per_node, spec.http.is_some(), &replicas, now_ms);
        let from = r.from;
        for (warning, reason, message) in adv.events {
            out.events.push((w.clone(), event(now_ms, warning, reason, message)));
        }
        for id in adv.update {
            d.placements.update(&(w.clone(), id), |revision, _| *revision = target);
        }
        if adv.roll_back {
            roll_back(d, &w, from, seen.keep_revisions, now_ms);
        }
    }
}

/// Returns `w` to revision `from`'s spec, recorded as a new revision, and
/// gives the replicas that were updated `from` again, all at once (it ran
/// before). Those still at `from` keep running.
fn roll_back(d: &mut Durable, w: &str, from: u64, keep: usize, now_ms: u64) {
    let Some(old): Option<WorkloadSpec> = d.spec_of(w, from).cloned() else { return };
    let Some(wl) = d.workloads.get_mut(w) else { return };
    // What runs goes back; how many, where and how to roll out stay as now.
    let now = std::mem::replace(&mut wl.spec, old);
    wl.spec.replicas = now.replicas;
    wl.spec.placement = now.placement;
    wl.spec.rollout = now.rollout;
    wl.metadata.generation += 1;
    let wl = wl.clone();
    let change = format!("rolled back to revision {from} automatically");
    record_revision(d, &wl, "auto-rollback", change, now_ms, keep);
    let want = template(&wl.spec);
    let behind: Vec<(String, u32)> = d
        .placements
        .range((w.to_string(), 0)..=(w.to_string(), u32::MAX))
        .filter(|(_, p)| d.spec_of(w, p.revision).is_none_or(|s| template(s) != want))
        .map(|(id, _)| id.clone())
        .collect();
    for id in behind {
        d.placements.update(&id, |revision, _| *revision = from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::tests::{cluster, node, workload};
    use crate::controller::{Placed, ReplicaId};
    use edge_api::model::{Amount, InstanceStatus, Millis, Phase, Replicas, RolloutSpec, Runtime};
    use std::collections::BTreeMap;

    /// What nodes report: (workload, replica) → (generation, phase, ready).
    type Reports = BTreeMap<ReplicaId, (u64, Phase, Option<bool>)>;

    fn step(d: &mut Durable, reports: &Reports, up: &dyn Fn(&str) -> bool, now_ms: u64) -> Outcome {
        let report = |_: &str, w: &str, r: u32| {
            reports.get(&(w.to_string(), r)).map(|(g, phase, ready)| InstanceStatus {
                workload: w.into(),
                replica: r,
                uid: format!("uid-{w}"),
                generation: *g,
                phase: *phase,
                restarts: 0,
                exit_code: None,
                reason: None,
                message: None,
                started_ms: None,
                finished_ms: None,
                ready: *ready,
                probe: None,
            })
        };
        let seen = Observed { ready: up, report: &report, silent_ms: &|_| 0, observed_gen: &|_| 0, keep_revisions: 10 };
        let mut out = Outcome::default();
        d.refresh_all();
        crate::placing::place_all(d, &seen, now_ms, &mut out, None);
        roll(d, &seen, now_ms, &mut out, None);
        out
    }

    fn revisions(d: &Durable, w: &str) -> Vec<u64> {
        d.placements.range((w.to_string(), 0)..=(w.to_string(), u32::MAX)).map(|(_, p)| p.revision).collect()
    }

    /// A new spec, as `apply` makes it: the next generation, its revision kept.
    fn change(d: &mut Durable, w: &str, edit: impl FnOnce(&mut WorkloadSpec)) {
        let wl = d.workloads.get_mut(w).unwrap();
        if !d.revisions.contains_key(&(w.to_string(), wl.metadata.generation)) {
            let old = wl.clone();
            record_revision(d, &old, "t", "created".into(), 0, 10);
        }
        let wl = d.workloads.get_mut(w).unwrap();
        edit(&mut wl.spec);
        wl.metadata.generation += 1;
        let wl = wl.clone();
        record_revision(d, &wl, "t", "changed".into(), 0, 10);
    }

    fn arg(s: &mut WorkloadSpec, a: &str) {
        if let Runtime::Wasm(w) = &mut s.runtime {
            w.args = vec![a.into()];
        }
    }

    const UP: &dyn Fn(&str) -> bool = &|_| true;

    #[test]
    fn scaling_moving_and_policy_changes_restart_nothing() {
        let mut d = cluster(&[("a", 4096), ("b", 4096)], &[workload("web", 2, 64, 1)]);
        step(&mut d, &Reports::new(), UP, 0);
        assert_eq!(revisions(&d, "web"), [1, 1]);
        change(&mut d, "web", |s| {
            s.replicas = Replicas::Count(3);
            s.rollout.min_ready = Millis(5_000);
        });
        step(&mut d, &Reports::new(), UP, 1);
        assert_eq!(revisions(&d, "web"), [1, 1, 2], "the new replica starts at the new revision, the others stay");
        assert!(!d.rollouts.contains_key("web"), "nothing to roll out");
    }

    #[test]
    fn a_per_node_rollout_goes_in_waves_and_a_failed_canary_rolls_back() {
        let nodes: Vec<(String, u64)> = (0..6).map(|i| (format!("n{i}"), 4096)).collect();
        let nodes: Vec<(&str, u64)> = nodes.iter().map(|(n, m)| (n.as_str(), *m)).collect();
        let mut agent = workload("agentd", 1, 64, 1);
        agent.spec.replicas = Replicas::PerNode;
        agent.spec.rollout = RolloutSpec {
            canary: Some(Amount::Count(1)),
            batch: Some(Amount::Percent(50)),
            progress_deadline: Millis(30_000),
            auto_rollback: true,
            ..RolloutSpec::standard()
        };
        let mut d = cluster(&nodes, &[agent]);
        let mut reports = Reports::new();
        step(&mut d, &reports, UP, 0);
        let all_ready = |d: &Durable, reports: &mut Reports| {
            for ((w, r), p) in &d.placements {
                reports.insert((w.clone(), *r), (p.revision, Phase::Running, Some(true)));
            }
        };
        all_ready(&d, &mut reports);
        // Revision 2 is good: canary, then three, then two.
        change(&mut d, "agentd", |s| arg(s, "v2"));
        let mut waves = Vec::new();
        for t in 1..10 {
            let before = revisions(&d, "agentd");
            step(&mut d, &reports, UP, t * 1000);
            let now = revisions(&d, "agentd");
            let moved = before.iter().zip(&now).filter(|(a, b)| a != b).count();
            if moved > 0 {
                waves.push(moved);
            }
            all_ready(&d, &mut reports);
        }
        assert_eq!(waves, [1, 3, 2]);
        assert_eq!(d.rollouts["agentd"].phase, RolloutPhase::Complete);
        // Revision 3 fails its readiness probe on the canary: back to 2.
        change(&mut d, "agentd", |s| arg(s, "v3"));
        step(&mut d, &reports, UP, 20_000);
        assert_eq!(revisions(&d, "agentd"), [3, 2, 2, 2, 2, 2]);
        reports.insert(("agentd".into(), 0), (3, Phase::Running, Some(false)));
        let out = step(&mut d, &reports, UP, 40_000);
        assert_eq!(revisions(&d, "agentd"), [3, 2, 2, 2, 2, 2], "waiting for the canary");
        assert!(out.events.is_empty(), "{:?}", out.events);
        let out = step(&mut d, &reports, UP, 51_000);
        assert_eq!(d.rollouts["agentd"].phase, RolloutPhase::RolledBack, "{:?}", d.rollouts["agentd"]);
        assert_eq!(revisions(&d, "agentd"), [2, 2, 2, 2, 2, 2], "no wave beyond the canary was touched");
        let wl = &d.workloads["agentd"];
        assert_eq!(wl.metadata.generation, 4);
        assert_eq!(template(&wl.spec), template(d.spec_of("agentd", 2).unwrap()), "the spec is revision 2's again");
        assert!(out.events.iter().any(|(_, e)| e.reason == "RolledBack" && e.warning));
        // Nothing more happens: revision 4 is what every replica runs.
        step(&mut d, &reports, UP, 60_000);
        assert_eq!(d.rollouts["agentd"].revision, 3);
    }

    #[test]
    fn a_node_that_joins_during_a_per_node_rollout_waits_for_its_wave() {
        let mut agent = workload("agentd", 1, 64, 1);
        agent.spec.replicas = Replicas::PerNode;
        agent.spec.rollout.canary = Some(Amount::Count(1));
        agent.spec.rollout.batch = Some(Amount::Percent(100));
        let mut d = cluster(&[("a", 4096), ("b", 4096)], &[agent]);
        let mut reports = Reports::new();
        step(&mut d, &reports, UP, 0);
        change(&mut d, "agentd", |s| arg(s, "v2"));
        step(&mut d, &reports, UP, 1);
        assert_eq!(revisions(&d, "agentd"), [2, 1]);
        d.nodes.insert("c".into(), node("c", 4096));
        step(&mut d, &reports, UP, 2);
        assert_eq!(revisions(&d, "agentd"), [2, 1, 1], "the new node starts where the fleet is");
        reports.insert(("agentd".into(), 0), (2, Phase::Running, None));
        step(&mut d, &reports, UP, 3);
        assert_eq!(revisions(&d, "agentd"), [2, 2, 2]);
        for r in 1..3 {
            reports.insert(("agentd".into(), r), (2, Phase::Running, None));
        }
        step(&mut d, &reports, UP, 4);
        assert_eq!(d.rollouts["agentd"].phase, RolloutPhase::Complete);
        d.nodes.insert("e".into(), node("e", 4096));
        step(&mut d, &reports, UP, 5);
        assert_eq!(revisions(&d, "agentd"), [2, 2, 2, 2], "after it, new nodes start at the new revision");
        let _: Option<&Placed> = d.placements.get(&("agentd".into(), 3));
    }

    #[test]
    fn a_rollback_returns_what_runs_and_keeps_how_many_and_where() {
        let mut web = workload("web", 2, 64, 1);
        web.spec.rollout =
            RolloutSpec { auto_rollback: true, progress_deadline: Millis(5_000), ..RolloutSpec::standard() };
        let mut d = cluster(&[("a", 4096), ("b", 4096), ("c", 4096)], &[web]);
        let mut reports = Reports::new();
        step(&mut d, &reports, UP, 0);
        change(&mut d, "web", |s| {
            s.replicas = Replicas::Count(3);
            arg(s, "bad");
        });
        step(&mut d, &reports, UP, 1_000);
        for ((w, r), p) in &d.placements {
            reports.insert(
                (w.clone(), *r),
                (p.revision, if p.revision == 2 { Phase::Failed } else { Phase::Running }, None),
            );
        }
        step(&mut d, &reports, UP, 2_000);
        assert_eq!(d.rollouts["web"].phase, RolloutPhase::RolledBack);
        let wl = &d.workloads["web"];
        assert_eq!(wl.spec.replicas, Replicas::Count(3), "the scale-up stays");
        assert_eq!(template(&wl.spec), template(d.spec_of("web", 1).unwrap()), "what runs is revision 1's");
    }
}
