//! Rollouts: how a workload's new revision reaches its replicas, a wave at
//! a time, gated on their health. Pure: [`advance`] takes the rollout's
//! record, the policy and what each replica shows, and says which replicas
//! to give the new revision now, and whether the rollout completed, failed
//! or must roll back. The controller applies that; the record is persisted,
//! so a hub that restarts goes on from the wave it was in.
//!
//! Rules (table-tested below):
//! - A wave is healthy when every replica in it on a Ready node is ready
//!   at the new revision; it passes once healthy for `min_ready` without a
//!   break. Replicas on nodes that are not Ready are given the revision
//!   with their wave but never hold it up nor fail it: they run it when
//!   they return (`Pending (offline)` until then).
//! - A wave fails when one of its replicas on a Ready node fails at the new
//!   revision or crash-loops (restarted twice there), or when it is not
//!   healthy `progress_deadline` after it started (not counted while
//!   paused).
//! - Per-node workloads: the first wave is `canary` replicas (if set), then
//!   `batch` (default 25%) or all the replicas of one `by_label` value at a
//!   time (values in order, nodes without the label last); replicas on
//!   Ready nodes go first. Counted workloads: `max_unavailable` replicas at
//!   a time, plus `max_surge` for services (the agent keeps the old version
//!   of a service serving until the new one is ready).

use edge_api::model::{Phase, RolloutPhase, RolloutSpec};
use serde::{Deserialize, Serialize};

/// A rollout as the hub persists it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// The revision being rolled out.
    pub revision: u64,
    /// The revision it came from, and returns to on rollback.
    pub from: u64,
    pub phase: RolloutPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Waves started so far.
    pub waves: usize,
    /// The replicas of the wave in progress.
    #[serde(default)]
    pub current: Vec<u32>,
    pub wave_started_ms: u64,
    /// Since when the wave in progress has been healthy without a break.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since_ms: Option<u64>,
    /// Time spent paused in the wave in progress (not counted against the deadline).
    #[serde(default)]
    pub paused_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_ms: Option<u64>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

impl Rollout {
    pub fn new(revision: u64, from: u64, now_ms: u64) -> Rollout {
        Rollout {
            revision,
            from,
            phase: RolloutPhase::Progressing,
            message: String::new(),
            waves: 0,
            current: Vec::new(),
            wave_started_ms: now_ms,
            healthy_since_ms: None,
            paused_ms: 0,
            paused_at_ms: None,
            started_ms: now_ms,
            finished_ms: None,
        }
    }

    /// Pauses (`true`) or resumes an active rollout; false if it is not active.
    pub fn set_paused(&mut self, paused: bool, now_ms: u64) -> bool {
        match (self.phase, paused) {
            (RolloutPhase::Progressing, true) => {
                self.phase = RolloutPhase::Paused;
                self.paused_at_ms = Some(now_ms);
                true
            }
            (RolloutPhase::Paused, false) => {
                self.phase = RolloutPhase::Progressing;
                self.paused_ms += self.paused_at_ms.take().map_or(0, |t| now_ms.saturating_sub(t));
                true
            }
            (RolloutPhase::Paused, true) | (RolloutPhase::Progressing, false) => true,
            _ => false,
        }
    }
}

/// What the planner needs to know of one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub replica: u32,
    pub node: String,
    pub node_ready: bool,
    /// Whether its revision runs what the workload's spec says now.
    pub up_to_date: bool,
    /// The revision it was given.
    pub revision: u64,
    /// The node's `by_label` label, if the policy has one.
    pub label: Option<String>,
    /// What the node last reported of it.
    pub report: Option<Report>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The revision the report is about.
    pub generation: u64,
    pub phase: Phase,
    /// Its readiness probe, if it has one.
    pub ready: Option<bool>,
    pub restarts: u32,
    pub message: String,
}

impl Seen {
    /// Running (or done) and ready at its revision, which is the new one.
    fn ready(&self) -> bool {
        self.up_to_date
            && self.report.as_ref().is_some_and(|r| {
                r.generation == self.revision
                    && matches!(r.phase, Phase::Running | Phase::Succeeded)
                    && r.ready != Some(false)
            })
    }

    /// Failed or crash-looping at the new revision: why.
    fn failure(&self) -> Option<String> {
        let r = self.report.as_ref().filter(|r| self.up_to_date && r.generation == self.revision)?;
        let detail = if r.message.is_empty() { String::new() } else { format!(": {}", r.message) };
        if r.phase == Phase::Failed {
            Some(format!("replica {} on {} failed{detail}", self.replica, self.node))
        } else if r.restarts >= CRASH_LOOP_RESTARTS {
            Some(format!("replica {} on {} restarted {} times{detail}", self.replica, self.node, r.restarts))
        } else {
            None
        }
    }

    fn state(&self) -> String {
        match &self.report {
            None => "not reported yet".into(),
            Some(r) if r.generation != self.revision => "still starting".into(),
            Some(r) if r.ready == Some(false) => {
                format!("not ready{}", if r.message.is_empty() { String::new() } else { format!(" ({})", r.message) })
            }
            Some(r) => r.phase.to_string(),
        }
    }
}

/// Restarts at the new revision that count as crash-looping.
pub const CRASH_LOOP_RESTARTS: u32 = 2;

/// What to do now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Advance {
    /// Replicas to give the new revision.
    pub update: Vec<u32>,
    /// The rollout failed and must return to `from` (auto_rollback).
    pub roll_back: bool,
    /// Events: (warning, reason, message).
    pub events: Vec<(bool, &'static str, String)>,
}

/// How many replicas a wave takes.
fn wave_size(spec: &RolloutSpec, per_node: bool, service: bool, total: usize, first: bool) -> usize {
    let n = if per_node {
        match (first, spec.canary) {
            (true, Some(c)) => c.of(total, true),
            _ => spec.batch.unwrap_or(edge_api::model::Amount::Percent(25)).of(total, true),
        }
    } else {
        let unavailable = spec.max_unavailable.unwrap_or(edge_api::model::Amount::Percent(25)).of(total, false);
        let surge = spec.max_surge.unwrap_or(edge_api::model::Amount::Percent(25)).of(total, true);
        if service { unavailable + surge } else { unavailable }
    };
    n.max(1)
}

/// The next wave: replicas not yet up to date, those on Ready nodes first.
fn next_wave(
    spec: &RolloutSpec,
    per_node: bool,
    service: bool,
    total: usize,
    first: bool,
    replicas: &[Seen],
) -> Vec<u32> {
    let mut todo: Vec<&Seen> = replicas.iter().filter(|s| !s.up_to_date).collect();
    if per_node && spec.by_label.is_some() && !(first && spec.canary.is_some()) {
        // One label value at a time, in order; nodes without it last.
        todo.sort_by(|a, b| (a.label.is_none(), &a.label, &a.node).cmp(&(b.label.is_none(), &b.label, &b.node)));
        let Some(value) = todo.first().map(|s| s.label.clone()) else { return Vec::new() };
        return todo.iter().filter(|s| s.label == value).map(|s| s.replica).collect();
    }
    todo.sort_by(|a, b| (!a.node_ready, &a.node, a.replica).cmp(&(!b.node_ready, &b.node, b.replica)));
    let n = wave_size(spec, per_node, service, total, first);
    todo.iter().take(n).map(|s| s.replica).collect()
}

/// One step of a rollout. `replicas`: every placed replica of the workload.
pub fn advance(
    r: &mut Rollout,
    spec: &RolloutSpec,
    per_node: bool,
    service: bool,
    replicas: &[Seen],
    now_ms: u64,
) -> Advance {
    let mut out = Advance::default();
    if !r.phase.is_active() {
        return out;
    }
    // (A replica number of the wave may have been taken since by another
    // replica, on another node, which was not given the revision: not watched.)
    let wave: Vec<&Seen> = replicas.iter().filter(|s| r.current.contains(&s.replica) && s.up_to_date).collect();
    let watched: Vec<&Seen> = wave.iter().copied().filter(|s| s.node_ready).collect();
    let failure = watched.iter().find_map(|s| s.failure()).or_else(|| {
        let waited = now_ms.saturating_sub(r.wave_started_ms).saturating_sub(r.paused_ms);
        let late = r.phase == RolloutPhase::Progressing && waited > spec.progress_deadline.0;
        let stuck = watched.iter().find(|s| !s.ready());
        match (late, stuck) {
            (true, Some(s)) => Some(format!(
                "wave {} was not ready within {} (replica {} on {}: {})",
                r.waves,
                spec.progress_deadline,
                s.replica,
                s.node,
                s.state()
            )),
            _ => None,
        }
    });
    if let Some(why) = failure {
        r.finished_ms = Some(now_ms);
        r.current.clear();
        if spec.auto_rollback {
            r.phase = RolloutPhase::RolledBack;
            r.message = format!("revision {} failed: {why}; rolled back to revision {}", r.revision, r.from);
            out.roll_back = true;
            out.events.push((true, "RolledBack", r.message.clone()));
        } else {
            r.phase = RolloutPhase::Failed;
            r.message = format!("revision {} failed: {why}; the rollout stopped (rollout undo returns)", r.revision);
            out.events.push((true, "RolloutFailed", r.message.clone()));
        }
        return out;
    }
    let healthy = watched.iter().all(|s| s.ready());
    r.healthy_since_ms = if healthy { Some(r.healthy_since_ms.unwrap_or(now_ms)) } else { None };
    if r.phase == RolloutPhase::Paused {
        return out;
    }
    let passed =
        r.current.is_empty() || r.healthy_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= spec.min_ready.0);
    if !passed {
        return out;
    }
    if !r.current.is_empty() {
        out.events.push((false, "WaveReady", format!("wave {} of revision {} is ready", r.waves, r.revision)));
    }
    let next = next_wave(spec, per_node, service, replicas.len(), r.waves == 0, replicas);
    if next.is_empty() {
        r.phase = RolloutPhase::Complete;
        r.finished_ms = Some(now_ms);
        r.current.clear();
        let offline: Vec<&str> =
            replicas.iter().filter(|s| !s.node_ready && !s.ready()).map(|s| s.node.as_str()).collect();
        r.message = if offline.is_empty() {
            format!("revision {} rolled out", r.revision)
        } else {
            format!("revision {} rolled out; pending (offline): {}", r.revision, offline.join(", "))
        };
        out.events.push((false, "RolloutComplete", r.message.clone()));
        return out;
    }
    r.waves += 1;
    r.current = next.clone();
    r.wave_started_ms = now_ms;
    r.healthy_since_ms = None;
    r.paused_ms = 0;
    let on: Vec<String> = replicas.iter().filter(|s| next.contains(&s.replica)).map(|s| s.node.clone()).collect();
    out.events.push((false, "WaveStarted", format!("wave {} of revision {}: {}", r.waves, r.revision, on.join(", "))));
    out.update = next;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::model::{Amount, Millis};

    const NEW: u64 = 5;

    fn seen(replica: u32, node: &str) -> Seen {
        Seen {
            replica,
            node: node.into(),
            node_ready: true,
            up_to_date: false,
            revision: 4,
            label: None,
            report: Some(Report {
                generation: 4,
                phase: Phase::Running,
                ready: None,
                restarts: 0,
                message: String::new(),
            }),
        }
    }

    fn fleet(n: u32) -> Vec<Seen> {
        (0..n).map(|i| seen(i, &format!("n{i:02}"))).collect()
    }

    /// Gives the replicas the new revision, as the controller would.
    fn update(replicas: &mut [Seen], ids: &[u32]) {
        for s in replicas.iter_mut().filter(|s| ids.contains(&s.replica)) {
            s.up_to_date = true;
            s.revision = NEW;
            s.report = None;
        }
    }

    /// The agent reports the replica at the new revision.
    fn report(replicas: &mut [Seen], id: u32, phase: Phase, ready: Option<bool>, restarts: u32) {
        let s = replicas.iter_mut().find(|s| s.replica == id).unwrap();
        s.report = Some(Report { generation: NEW, phase, ready, restarts, message: "probe said no".into() });
    }

    fn per_node_spec() -> RolloutSpec {
        RolloutSpec {
            canary: Some(Amount::Count(1)),
            batch: Some(Amount::Percent(50)),
            min_ready: Millis(10_000),
            progress_deadline: Millis(60_000),
            auto_rollback: true,
            ..RolloutSpec::standard()
        }
    }

    #[test]
    fn a_healthy_canary_then_batches_each_ready_for_min_ready() {
        let spec = per_node_spec();
        let mut reps = fleet(5);
        let mut r = Rollout::new(NEW, 4, 0);
        let a = advance(&mut r, &spec, true, false, &reps, 0);
        assert_eq!(a.update, [0], "the canary");
        update(&mut reps, &a.update);
        assert!(advance(&mut r, &spec, true, false, &reps, 1_000).update.is_empty(), "not reported yet");
        report(&mut reps, 0, Phase::Running, Some(true), 0);
        assert!(advance(&mut r, &spec, true, false, &reps, 2_000).update.is_empty(), "ready, but not for min_ready");
        assert!(advance(&mut r, &spec, true, false, &reps, 11_000).update.is_empty());
        let a = advance(&mut r, &spec, true, false, &reps, 12_000);
        assert_eq!(a.update, [1, 2, 3], "then half of the five, rounded up");
        assert!(a.events.iter().any(|e| e.1 == "WaveReady") && a.events.iter().any(|e| e.1 == "WaveStarted"));
        update(&mut reps, &a.update);
        for id in [1, 2, 3] {
            report(&mut reps, id, Phase::Running, None, 0);
        }
        advance(&mut r, &spec, true, false, &reps, 13_000);
        // A break in readiness starts min_ready again.
        report(&mut reps, 2, Phase::Running, Some(false), 0);
        advance(&mut r, &spec, true, false, &reps, 20_000);
        report(&mut reps, 2, Phase::Running, Some(true), 0);
        advance(&mut r, &spec, true, false, &reps, 21_000);
        assert!(advance(&mut r, &spec, true, false, &reps, 30_000).update.is_empty(), "9 s since the break");
        let a = advance(&mut r, &spec, true, false, &reps, 31_000);
        assert_eq!(a.update, [4]);
        update(&mut reps, &a.update);
        report(&mut reps, 4, Phase::Running, None, 0);
        advance(&mut r, &spec, true, false, &reps, 32_000);
        let a = advance(&mut r, &spec, true, false, &reps, 42_000);
        assert_eq!((r.phase, a.update.len()), (RolloutPhase::Complete, 0));
        assert_eq!(r.message, "revision 5 rolled out");
        assert_eq!(r.waves, 3);
    }

    #[test]
    fn a_failing_canary_rolls_back_and_no_later_wave_is_touched() {
        let spec = per_node_spec();
        for (phase, ready, restarts, says) in [
            (Phase::Failed, None, 0, "failed: probe said no"),
            (Phase::Running, None, 2, "restarted 2 times"),
            (Phase::Running, Some(false), 0, "was not ready within 1m (replica 0 on n00: not ready (probe said no))"),
        ] {
            let mut reps = fleet(4);
            let mut r = Rollout::new(NEW, 4, 0);
            let a = advance(&mut r, &spec, true, false, &reps, 0);
            update(&mut reps, &a.update);
            report(&mut reps, 0, phase, ready, restarts);
            let a = advance(&mut r, &spec, true, false, &reps, 61_000);
            assert!(a.roll_back && a.update.is_empty(), "{says}: {a:?}");
            assert_eq!(r.phase, RolloutPhase::RolledBack);
            assert!(r.message.contains(says) && r.message.contains("rolled back to revision 4"), "{}", r.message);
            assert!(a.events.iter().any(|e| e.0 && e.1 == "RolledBack"));
            assert!(
                advance(&mut r, &spec, true, false, &reps, 70_000) == Advance::default(),
                "a finished rollout does nothing"
            );
        }
        // Without auto_rollback it stops where it is.
        let spec = RolloutSpec { auto_rollback: false, ..per_node_spec() };
        let mut reps = fleet(4);
        let mut r = Rollout::new(NEW, 4, 0);
        let a = advance(&mut r, &spec, true, false, &reps, 0);
        update(&mut reps, &a.update);
        report(&mut reps, 0, Phase::Failed, None, 0);
        let a = advance(&mut r, &spec, true, false, &reps, 1_000);
        assert!(!a.roll_back && r.phase == RolloutPhase::Failed, "{a:?}");
    }

    #[test]
    fn offline_nodes_go_last_and_neither_hold_up_nor_fail_a_wave() {
        let spec = RolloutSpec { canary: Some(Amount::Count(1)), batch: Some(Amount::Percent(100)), ..per_node_spec() };
        let mut reps = fleet(4);
        reps[0].node_ready = false;
        reps[2].node_ready = false;
        let mut r = Rollout::new(NEW, 4, 0);
        let a = advance(&mut r, &spec, true, false, &reps, 0);
        assert_eq!(a.update, [1], "the canary is on a node that is up");
        update(&mut reps, &a.update);
        report(&mut reps, 1, Phase::Running, None, 0);
        advance(&mut r, &spec, true, false, &reps, 1_000);
        let a = advance(&mut r, &spec, true, false, &reps, 11_000);
        assert_eq!(a.update, [3, 0, 2], "the rest, those that are up first");
        update(&mut reps, &a.update);
        report(&mut reps, 3, Phase::Running, None, 0);
        // The offline ones never report, and would be late: they do not count.
        advance(&mut r, &spec, true, false, &reps, 12_000);
        let a = advance(&mut r, &spec, true, false, &reps, 100_000);
        assert_eq!(r.phase, RolloutPhase::Complete, "{a:?} {r:?}");
        assert_eq!(r.message, "revision 5 rolled out; pending (offline): n00, n02");
    }

    #[test]
    fn by_label_rolls_one_value_at_a_time() {
        let spec = RolloutSpec {
            canary: None,
            batch: None,
            by_label: Some("site".into()),
            min_ready: Millis(0),
            ..per_node_spec()
        };
        let mut reps = fleet(5);
        for (i, site) in [Some("b"), Some("a"), None, Some("b"), Some("a")].into_iter().enumerate() {
            reps[i].label = site.map(String::from);
        }
        let mut r = Rollout::new(NEW, 4, 0);
        let mut waves = Vec::new();
        for t in 0..10 {
            let a = advance(&mut r, &spec, true, false, &reps, t * 1_000);
            if !a.update.is_empty() {
                waves.push(a.update.clone());
                update(&mut reps, &a.update);
                for id in a.update {
                    report(&mut reps, id, Phase::Running, None, 0);
                }
            }
        }
        assert_eq!(waves, [vec![1, 4], vec![0, 3], vec![2]]);
        assert_eq!(r.phase, RolloutPhase::Complete);
    }

    #[test]
    fn counted_replicas_go_max_unavailable_at_a_time_plus_max_surge_for_services() {
        let table = [
            // (max_unavailable, max_surge, service, count, first wave)
            (None, None, false, 4, 1),
            (None, None, true, 4, 2),
            (Some(Amount::Count(0)), Some(Amount::Count(1)), false, 4, 1),
            (Some(Amount::Count(2)), Some(Amount::Count(1)), true, 4, 3),
            (Some(Amount::Percent(50)), None, false, 10, 5),
        ];
        for (mu, ms, service, count, want) in table {
            let spec = RolloutSpec { max_unavailable: mu, max_surge: ms, ..RolloutSpec::standard() };
            let reps = fleet(count);
            let mut r = Rollout::new(NEW, 4, 0);
            let a = advance(&mut r, &spec, false, service, &reps, 0);
            assert_eq!(a.update.len(), want, "{mu:?} {ms:?} service={service} of {count}");
        }
    }

    #[test]
    fn a_paused_rollout_starts_no_wave_and_its_pause_does_not_count_against_the_deadline() {
        let spec = RolloutSpec { min_ready: Millis(0), ..per_node_spec() };
        let mut reps = fleet(3);
        let mut r = Rollout::new(NEW, 4, 0);
        let a = advance(&mut r, &spec, true, false, &reps, 0);
        update(&mut reps, &a.update);
        assert!(r.set_paused(true, 1_000));
        assert!(advance(&mut r, &spec, true, false, &reps, 200_000).update.is_empty());
        assert_eq!(r.phase, RolloutPhase::Paused, "not failed while paused");
        report(&mut reps, 0, Phase::Running, None, 0);
        assert!(advance(&mut r, &spec, true, false, &reps, 201_000).update.is_empty(), "healthy, but paused");
        assert!(r.set_paused(false, 201_000));
        let a = advance(&mut r, &spec, true, false, &reps, 202_000);
        assert_eq!(a.update, [1, 2]);
        assert!(
            !Rollout { phase: RolloutPhase::Complete, ..r.clone() }.set_paused(true, 0),
            "only active rollouts pause"
        );
    }

    #[test]
    fn a_wave_member_whose_number_went_to_another_node_is_not_watched() {
        let spec = per_node_spec();
        let mut reps = fleet(3);
        let mut r = Rollout::new(NEW, 4, 0);
        let a = advance(&mut r, &spec, true, false, &reps, 0);
        assert_eq!(a.update, [0]);
        // Node n00 left; a new node took number 0, at the old revision.
        reps[0] = seen(0, "n99");
        let a = advance(&mut r, &spec, true, false, &reps, 61_000);
        assert!(!a.roll_back && r.phase == RolloutPhase::Progressing, "{a:?} {r:?}");
    }
}
