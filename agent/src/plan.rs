//! The agent's planning logic: given what the hub wants and what this agent
//! observes, which steps bring them together. Pure functions over data,
//! tested with tables; [`crate::supervisor`] executes the steps and plans
//! again until nothing is left to do.
//!
//! The planner is never told why it runs (a new desired state, an exit, a
//! timer, a restart of the agent itself): it checks every replica each time.

use std::collections::{BTreeMap, BTreeSet};

use edge_api::digest::Digest;
use edge_api::model::{Phase, Reason};
use edge_api::wire::Assignment;

use crate::state::InstanceRecord;

/// Where an artifact stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    Ready,
    Missing,
    Fetching,
    /// The last fetch failed; try again at this wall-clock time.
    Failed {
        retry_at_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Stop a running replica (its assignment changed or went away).
    Stop(String),
    /// Drop a stopped replica that is no longer wanted, with its record and log.
    Forget(String),
    /// Track a newly assigned replica, Pending.
    Adopt(Assignment),
    /// Give a stopped replica its new assignment (a new generation or uid).
    Replace(Assignment),
    /// Download an artifact.
    Fetch(Digest),
    /// Start a run of a replica.
    Start(String),
    /// A replica that was running when the agent stopped, whose policy says
    /// never to run it again: it failed.
    MarkInterrupted(String),
    /// Stop (kill) a replica, or hold it back, because the agent's lease is
    /// too old for its `[spec.node_loss]`: a replacement may run elsewhere.
    Fence(String),
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// When to plan again if nothing else happens first (back-off, retries).
    pub wake_at_ms: Option<u64>,
}

/// Back-off after a run ends and will be repeated: 1 s, doubling, at most 5 min.
pub const BACKOFF_BASE_MS: u64 = 1_000;
pub const BACKOFF_MAX_MS: u64 = 300_000;
/// A run this long resets the back-off, as kubelet does.
pub const BACKOFF_RESET_MS: u64 = 600_000;

/// A deadline further out than the longest back-off means the clock jumped
/// backwards (devices without a real-time clock); treat it as due.
fn due(deadline_ms: u64, now_ms: u64) -> bool {
    deadline_ms <= now_ms || deadline_ms - now_ms > BACKOFF_MAX_MS
}

fn earliest(a: Option<u64>, b: u64) -> Option<u64> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// What the agent's lease says of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leased {
    /// Not fenced: it runs whatever the lease.
    Free,
    /// It may run for this many more ms.
    For(u64),
    /// It may not run.
    Expired,
}

/// What the agent's lease (how long ago it sent the last heartbeat the hub
/// acknowledged; `None`: none since it started) says of a replica of this spec.
pub fn leased(spec: &edge_api::model::WorkloadSpec, lease_age_ms: Option<u64>) -> Leased {
    match (spec.node_loss.fence(), lease_age_ms) {
        (None, _) => Leased::Free,
        (Some(f), Some(age)) if age < f.0 => Leased::For(f.0 - age),
        (Some(_), _) => Leased::Expired,
    }
}

/// What to do next. `running` names the replicas with a live run;
/// `lease_age_ms` is as [`leased`] takes it.
pub fn plan(
    desired: &[Assignment],
    observed: &BTreeMap<String, InstanceRecord>,
    running: &BTreeSet<String>,
    artifact: &dyn Fn(&Digest) -> Artifact,
    now_ms: u64,
    lease_age_ms: Option<u64>,
) -> Plan {
    let mut p = Plan::default();
    let wanted: BTreeMap<String, &Assignment> = desired.iter().map(|a| (a.key(), a)).collect();

    for key in observed.keys() {
        if !wanted.contains_key(key) {
            p.steps.push(if running.contains(key) { Step::Stop(key.clone()) } else { Step::Forget(key.clone()) });
        }
    }

    let mut fetch: BTreeSet<Digest> = BTreeSet::new();
    let mut starts = Vec::new();
    for (key, a) in &wanted {
        let Some(rec) = observed.get(key) else {
            p.steps.push(Step::Adopt((*a).clone()));
            continue;
        };
        // New secret values (or a box sealed anew) replace the replica too.
        let same = rec.assignment.uid == a.uid
            && rec.assignment.generation == a.generation
            && rec.assignment.secrets == a.secrets;
        let is_running = running.contains(key);
        if !same {
            p.steps.push(if is_running { Step::Stop(key.clone()) } else { Step::Replace((*a).clone()) });
            continue;
        }
        match leased(&a.spec, lease_age_ms) {
            Leased::Expired => {
                let held = rec.phase == Phase::Pending && rec.reason == Some(Reason::Fenced);
                if is_running || !(held || rec.phase.is_finished()) {
                    p.steps.push(Step::Fence(key.clone()));
                }
                continue;
            }
            // Look again when the lease would run out.
            Leased::For(left) if is_running => p.wake_at_ms = earliest(p.wake_at_ms, now_ms + left),
            Leased::For(_) | Leased::Free => {}
        }
        if is_running {
            continue;
        }
        let wants_run = match rec.phase {
            // Was running (or starting: the attempt is recorded before it
            // runs) when the agent stopped.
            _ if was_interrupted(rec) => {
                let spec = &rec.assignment.spec;
                if spec.restart == edge_api::model::RestartPolicy::Never
                    || (!spec.rerun_interrupted && spec.http.is_none())
                {
                    p.steps.push(Step::MarkInterrupted(key.clone()));
                    false
                } else {
                    true
                }
            }
            Phase::Running => true,
            Phase::Pending => match rec.backoff_until_ms {
                Some(t) if !due(t, now_ms) => {
                    p.wake_at_ms = earliest(p.wake_at_ms, t);
                    false
                }
                _ => true,
            },
            // Unknown is the hub's word only; an agent never records it.
            Phase::Succeeded | Phase::Failed | Phase::Unknown => false,
        };
        if !wants_run {
            continue;
        }
        // Containers pull their image as they start.
        let Some(component) = rec.assignment.spec.runtime.artifact() else {
            starts.push(Step::Start(key.clone()));
            continue;
        };
        let Some(digest) = component.digest().copied() else {
            continue; // the hub only sends digests; nothing to run otherwise
        };
        match artifact(&digest) {
            Artifact::Ready => starts.push(Step::Start(key.clone())),
            Artifact::Missing => {
                fetch.insert(digest);
            }
            Artifact::Fetching => {}
            Artifact::Failed { retry_at_ms } if due(retry_at_ms, now_ms) => {
                fetch.insert(digest);
            }
            Artifact::Failed { retry_at_ms } => p.wake_at_ms = earliest(p.wake_at_ms, retry_at_ms),
        }
    }
    p.steps.extend(fetch.into_iter().map(Step::Fetch));
    p.steps.extend(starts);
    p
}

/// Retries of a failed download: 2 s, doubling, at most a minute.
pub const FETCH_RETRY_BASE_MS: u64 = 2_000;
pub const FETCH_RETRY_MAX_MS: u64 = 60_000;

/// How long to wait before fetching again after the `failures`th failure in a row.
pub fn fetch_retry_ms(failures: u32) -> u64 {
    (FETCH_RETRY_BASE_MS << failures.saturating_sub(1).min(8)).min(FETCH_RETRY_MAX_MS)
}

/// Whether a replica waits for this artifact (Pending, and it runs it).
pub fn waits_for(rec: &InstanceRecord, digest: &Digest) -> bool {
    rec.phase == Phase::Pending && rec.assignment.spec.runtime.artifact().and_then(|a| a.digest()) == Some(digest)
}

/// Whether the record is of a run that had begun when the agent stopped:
/// Running, or Starting (recorded, durably, before a run begins).
pub fn was_interrupted(rec: &InstanceRecord) -> bool {
    rec.phase == Phase::Running || (rec.phase == Phase::Pending && rec.reason == Some(Reason::Starting))
}

/// The record as a run starts: a restart if it ran before.
pub fn starting(rec: &InstanceRecord) -> InstanceRecord {
    let mut r = rec.clone();
    if r.started_ms.is_some() {
        r.restarts += 1;
    }
    r.phase = Phase::Pending;
    r.reason = Some(Reason::Starting);
    r.message = None;
    r.exit_code = None;
    r.backoff_until_ms = None;
    r
}

/// The record of a replica stopped, or held back, by its fence.
pub fn fenced(rec: &InstanceRecord, lease_age_ms: Option<u64>) -> InstanceRecord {
    let mut r = rec.clone();
    r.phase = Phase::Pending;
    r.reason = Some(Reason::Fenced);
    r.message = Some(match lease_age_ms {
        Some(age) => format!(
            "the hub has not acknowledged this node for {}s: stopped so that a replacement may run elsewhere",
            age / 1000
        ),
        None => "waiting for the hub to acknowledge this node (its lease) before running".into(),
    });
    r.backoff_until_ms = None;
    r
}

/// The record once its run is up (a command started, a service ready).
pub fn running(rec: &InstanceRecord, now_ms: u64) -> InstanceRecord {
    let mut r = rec.clone();
    r.phase = Phase::Running;
    r.reason = None;
    r.message = None;
    r.started_ms = Some(now_ms);
    r
}

/// The record of a replica that was running when the agent stopped and
/// whose policy says never to run it again.
pub fn interrupted(rec: &InstanceRecord, now_ms: u64) -> InstanceRecord {
    let mut r = rec.clone();
    r.phase = Phase::Failed;
    r.reason = Some(Reason::Interrupted);
    r.message = Some(
        if rec.assignment.spec.restart == edge_api::model::RestartPolicy::Never {
            "the agent stopped while this ran; restart policy is never"
        } else {
            "the agent stopped while this ran; rerun_interrupted is false"
        }
        .into(),
    );
    r.finished_ms = Some(now_ms);
    r
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub succeeded: bool,
    pub reason: Reason,
    pub message: Option<String>,
}

/// The record after a run ends: finished for good, or Pending in back-off
/// when the restart policy says to run it again.
pub fn after_exit(rec: &InstanceRecord, exit: &Exit, now_ms: u64) -> InstanceRecord {
    let mut r = rec.clone();
    r.finished_ms = Some(now_ms);
    r.exit_code = exit.exit_code;
    r.last_succeeded = Some(exit.succeeded);
    let ran_ms = rec.started_ms.map(|s| now_ms.saturating_sub(s)).unwrap_or(0);
    r.streak = if ran_ms >= BACKOFF_RESET_MS { 1 } else { rec.streak + 1 };
    if rec.assignment.spec.restart.restarts_after(exit.succeeded) {
        let delay = (BACKOFF_BASE_MS << (r.streak - 1).min(16)).min(BACKOFF_MAX_MS);
        r.phase = Phase::Pending;
        r.reason = Some(Reason::BackOff);
        let how = match exit.exit_code {
            Some(c) => format!("exited with code {c}"),
            None => format!("ended ({})", exit.reason),
        };
        let detail = exit.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
        r.message = Some(format!("{how}{detail}; restarting in {}s", delay.div_ceil(1000)));
        r.backoff_until_ms = Some(now_ms + delay);
    } else {
        r.phase = if exit.succeeded { Phase::Succeeded } else { Phase::Failed };
        r.reason = Some(exit.reason.clone());
        r.message = exit.message.clone();
        r.backoff_until_ms = None;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::model::*;

    fn assignment(w: &str, generation: u64, restart: RestartPolicy) -> Assignment {
        Assignment {
            workload: w.into(),
            replica: 0,
            uid: format!("uid-{w}"),
            generation,
            spec: WorkloadSpec {
                replicas: edge_api::model::Replicas::Count(1),
                restart,
                resources: Resources::default(),
                placement: Placement::default(),
                runtime: Runtime::Wasm(WasmSpec {
                    component: ArtifactRef::Digest(Digest::of(w.as_bytes())),
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
                rollout: edge_api::model::RolloutSpec::standard(),
                node_loss: Default::default(),
            },
            secrets: Default::default(),
        }
    }

    fn record(a: &Assignment, phase: Phase) -> InstanceRecord {
        InstanceRecord {
            assignment: a.clone(),
            phase,
            restarts: 0,
            exit_code: None,
            reason: None,
            message: None,
            started_ms: None,
            finished_ms: None,
            last_succeeded: None,
            streak: 0,
            backoff_until_ms: None,
        }
    }

    struct Case {
        name: &'static str,
        desired: Vec<Assignment>,
        observed: Vec<InstanceRecord>,
        running: &'static [&'static str],
        artifact: Artifact,
        want: Vec<Step>,
        wake: Option<u64>,
    }

    #[test]
    fn plan_table() {
        use RestartPolicy::*;
        let a1 = assignment("a", 1, OnFailure);
        let a2 = assignment("a", 2, OnFailure);
        let never = assignment("a", 1, Never);
        let at_most_once = {
            let mut a = assignment("a", 1, Always);
            a.spec.rerun_interrupted = false;
            a
        };
        let service_at_most_once = {
            let mut a = at_most_once.clone();
            a.spec.http = Some(HttpSpec { hosts: vec![], paths: vec!["/".into()] });
            a
        };
        let starting = |a: &Assignment| {
            let mut r = record(a, Phase::Pending);
            r.reason = Some(Reason::Starting);
            r
        };
        let digest = Digest::of(b"a");
        let mut backing_off = record(&a1, Phase::Pending);
        backing_off.backoff_until_ms = Some(5_000);
        let mut clock_jumped = record(&a1, Phase::Pending);
        clock_jumped.backoff_until_ms = Some(1_000 + BACKOFF_MAX_MS + 1);
        let mut container = assignment("c", 1, OnFailure);
        container.spec.runtime = Runtime::Container(ContainerSpec::new("oci://r.io/c:1".parse().unwrap()));
        let cases = vec![
            Case {
                name: "a container starts without a fetch: it pulls its image as it starts",
                desired: vec![container.clone()],
                observed: vec![record(&container, Phase::Pending)],
                running: &[],
                artifact: Artifact::Missing,
                want: vec![Step::Start(container.key())],
                wake: None,
            },
            Case {
                name: "a new assignment is adopted",
                desired: vec![a1.clone()],
                observed: vec![],
                running: &[],
                artifact: Artifact::Missing,
                want: vec![Step::Adopt(a1.clone())],
                wake: None,
            },
            Case {
                name: "a pending replica with a missing artifact fetches it",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Pending)],
                running: &[],
                artifact: Artifact::Missing,
                want: vec![Step::Fetch(digest)],
                wake: None,
            },
            Case {
                name: "a fetch in flight is not repeated",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Pending)],
                running: &[],
                artifact: Artifact::Fetching,
                want: vec![],
                wake: None,
            },
            Case {
                name: "a failed fetch is retried when due",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Pending)],
                running: &[],
                artifact: Artifact::Failed { retry_at_ms: 500 },
                want: vec![Step::Fetch(digest)],
                wake: None,
            },
            Case {
                name: "a failed fetch waits for its retry time",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Pending)],
                running: &[],
                artifact: Artifact::Failed { retry_at_ms: 3_000 },
                want: vec![],
                wake: Some(3_000),
            },
            Case {
                name: "a pending replica with its artifact starts",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Pending)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Start("a.0".into())],
                wake: None,
            },
            Case {
                name: "a running replica is left alone",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Running)],
                running: &["a.0"],
                artifact: Artifact::Ready,
                want: vec![],
                wake: None,
            },
            Case {
                name: "a finished replica stays finished",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Succeeded)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![],
                wake: None,
            },
            Case {
                name: "back-off is waited out",
                desired: vec![a1.clone()],
                observed: vec![backing_off.clone()],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![],
                wake: Some(5_000),
            },
            Case {
                name: "a back-off deadline far in the future means the clock jumped: due",
                desired: vec![a1.clone()],
                observed: vec![clock_jumped],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Start("a.0".into())],
                wake: None,
            },
            Case {
                name: "a new generation stops the old run first",
                desired: vec![a2.clone()],
                observed: vec![record(&a1, Phase::Running)],
                running: &["a.0"],
                artifact: Artifact::Ready,
                want: vec![Step::Stop("a.0".into())],
                wake: None,
            },
            Case {
                name: "a stopped replica takes its new generation",
                desired: vec![a2.clone()],
                observed: vec![record(&a1, Phase::Succeeded)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Replace(a2.clone())],
                wake: None,
            },
            Case {
                name: "a removed replica is stopped, then forgotten",
                desired: vec![],
                observed: vec![record(&a1, Phase::Running)],
                running: &["a.0"],
                artifact: Artifact::Ready,
                want: vec![Step::Stop("a.0".into())],
                wake: None,
            },
            Case {
                name: "a stopped removed replica is forgotten",
                desired: vec![],
                observed: vec![record(&a1, Phase::Failed)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Forget("a.0".into())],
                wake: None,
            },
            Case {
                name: "a replica interrupted by an agent restart runs again",
                desired: vec![a1.clone()],
                observed: vec![record(&a1, Phase::Running)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Start("a.0".into())],
                wake: None,
            },
            Case {
                name: "unless its policy is never",
                desired: vec![never.clone()],
                observed: vec![record(&never, Phase::Running)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::MarkInterrupted("a.0".into())],
                wake: None,
            },
            Case {
                name: "or it runs at most once (rerun_interrupted = false)",
                desired: vec![at_most_once.clone()],
                observed: vec![record(&at_most_once, Phase::Running)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::MarkInterrupted("a.0".into())],
                wake: None,
            },
            Case {
                name: "a run that was starting counts as begun: at most once",
                desired: vec![at_most_once.clone()],
                observed: vec![starting(&at_most_once)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::MarkInterrupted("a.0".into())],
                wake: None,
            },
            Case {
                name: "and at least once by default",
                desired: vec![a1.clone()],
                observed: vec![starting(&a1)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Start("a.0".into())],
                wake: None,
            },
            Case {
                name: "a service comes back whatever rerun_interrupted says",
                desired: vec![service_at_most_once.clone()],
                observed: vec![record(&service_at_most_once, Phase::Running)],
                running: &[],
                artifact: Artifact::Ready,
                want: vec![Step::Start("a.0".into())],
                wake: None,
            },
        ];
        for c in cases {
            let observed = c.observed.into_iter().map(|r| (r.assignment.key(), r)).collect();
            let running = c.running.iter().map(|s| s.to_string()).collect();
            let art = c.artifact;
            let got = plan(&c.desired, &observed, &running, &|_| art, 1_000, None);
            assert_eq!(got.steps, c.want, "{}", c.name);
            assert_eq!(got.wake_at_ms, c.wake, "{}", c.name);
        }
    }

    #[test]
    fn one_fetch_serves_every_replica_of_an_artifact() {
        let mut a = assignment("a", 1, RestartPolicy::OnFailure);
        let mut b = a.clone();
        b.replica = 1;
        let observed = [&a, &b].iter().map(|x| (x.key(), record(x, Phase::Pending))).collect();
        a.replica = 0;
        let p = plan(&[a, b], &observed, &BTreeSet::new(), &|_| Artifact::Missing, 0, None);
        assert_eq!(p.steps, vec![Step::Fetch(Digest::of(b"a"))]);
    }

    #[test]
    fn after_exit_table() {
        use RestartPolicy::*;
        let ok = Exit { exit_code: Some(0), succeeded: true, reason: Reason::Completed, message: None };
        let fail = Exit { exit_code: Some(3), succeeded: false, reason: Reason::Error, message: None };
        let cases = [
            (Never, &ok, Phase::Succeeded, None),
            (Never, &fail, Phase::Failed, None),
            (OnFailure, &ok, Phase::Succeeded, None),
            (OnFailure, &fail, Phase::Pending, Some(10_000 + BACKOFF_BASE_MS)),
            (Always, &ok, Phase::Pending, Some(10_000 + BACKOFF_BASE_MS)),
        ];
        for (policy, exit, phase, backoff) in cases {
            let mut rec = record(&assignment("a", 1, policy), Phase::Running);
            rec.started_ms = Some(9_000);
            let r = after_exit(&rec, exit, 10_000);
            assert_eq!((r.phase, r.backoff_until_ms), (phase, backoff), "{policy:?} {exit:?}");
            assert_eq!(r.exit_code, exit.exit_code);
        }
    }

    #[test]
    fn a_replica_goes_starting_running_and_counts_its_restarts() {
        let a = assignment("a", 1, RestartPolicy::Always);
        let mut rec = record(&a, Phase::Pending);
        rec.backoff_until_ms = Some(5);
        rec.exit_code = Some(1);
        let r = starting(&rec);
        assert_eq!(
            (r.phase, r.reason.clone(), r.restarts, r.backoff_until_ms, r.exit_code),
            (Phase::Pending, Some(Reason::Starting), 0, None, None)
        );
        let r = running(&r, 7);
        assert_eq!((r.phase, r.reason.clone(), r.started_ms), (Phase::Running, None, Some(7)));
        assert_eq!(starting(&r).restarts, 1, "a run after one that started is a restart");
        let r = interrupted(&r, 9);
        assert_eq!((r.phase, r.reason, r.finished_ms), (Phase::Failed, Some(Reason::Interrupted), Some(9)));
    }

    #[test]
    fn fetch_retries_double_to_a_minute_and_touch_only_replicas_waiting_for_that_artifact() {
        let delays: Vec<u64> = (1..=7).map(fetch_retry_ms).collect();
        assert_eq!(delays, [2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]);
        assert_eq!(fetch_retry_ms(u32::MAX), FETCH_RETRY_MAX_MS);
        let a = assignment("a", 1, RestartPolicy::Always);
        let d = Digest::of(b"a");
        assert!(waits_for(&record(&a, Phase::Pending), &d));
        assert!(!waits_for(&record(&a, Phase::Running), &d));
        assert!(!waits_for(&record(&a, Phase::Pending), &Digest::of(b"b")));
    }

    #[test]
    fn back_off_doubles_to_a_cap_and_resets_after_a_long_run() {
        let mut rec = record(&assignment("a", 1, RestartPolicy::Always), Phase::Running);
        let fail = Exit { exit_code: Some(1), succeeded: false, reason: Reason::Error, message: None };
        let mut delays = vec![];
        for _ in 0..12 {
            rec.started_ms = Some(0);
            rec = after_exit(&rec, &fail, 1_000);
            delays.push(rec.backoff_until_ms.unwrap() - 1_000);
        }
        assert_eq!(&delays[..4], &[1_000, 2_000, 4_000, 8_000]);
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX_MS);
        assert!(rec.message.as_deref().unwrap().contains("exited with code 1; restarting in 300s"));
        rec.started_ms = Some(0);
        rec = after_exit(&rec, &fail, BACKOFF_RESET_MS + 5);
        assert_eq!(rec.streak, 1);
    }

    #[test]
    fn a_replica_with_node_loss_runs_only_on_a_fresh_lease() {
        let mut a = assignment("db", 1, RestartPolicy::Always);
        a.spec.node_loss.reschedule_after = Some(edge_api::model::Millis(5_000)); // fenced after 3.25 s
        let key = a.key();
        let rec = |phase: Phase, reason: Option<Reason>| InstanceRecord { reason, ..record(&a, phase) };
        let run = |r: InstanceRecord, running: bool, age: Option<u64>| {
            let observed: BTreeMap<String, InstanceRecord> = [(key.clone(), r)].into();
            let running: BTreeSet<String> = if running { [key.clone()].into() } else { BTreeSet::new() };
            plan(std::slice::from_ref(&a), &observed, &running, &|_| Artifact::Ready, 10_000, age)
        };
        // Running with a fresh lease: it runs on, and is looked at again when the lease would run out.
        let p = run(rec(Phase::Running, None), true, Some(1_000));
        assert_eq!((p.steps.as_slice(), p.wake_at_ms), (&[][..], Some(12_250)));
        // The lease is too old: killed.
        assert_eq!(run(rec(Phase::Running, None), true, Some(3_250)).steps, [Step::Fence(key.clone())]);
        // No lease since the agent started (a power cut while cut off): held back, once.
        assert_eq!(run(rec(Phase::Running, None), false, None).steps, [Step::Fence(key.clone())]);
        assert!(run(rec(Phase::Pending, Some(Reason::Fenced)), false, None).steps.is_empty());
        // The lease is back: it starts again.
        assert_eq!(run(rec(Phase::Pending, Some(Reason::Fenced)), false, Some(10)).steps, [Step::Start(key.clone())]);
        let f = fenced(&rec(Phase::Running, None), Some(4_000));
        assert_eq!((f.phase, f.reason), (Phase::Pending, Some(Reason::Fenced)));
        assert!(f.message.unwrap().contains("not acknowledged this node for 4s"));
        // Workloads without [spec.node_loss] never wait for a lease.
        let free = assignment("web", 1, RestartPolicy::Always);
        let observed: BTreeMap<String, InstanceRecord> = [(free.key(), record(&free, Phase::Pending))].into();
        let p = plan(std::slice::from_ref(&free), &observed, &BTreeSet::new(), &|_| Artifact::Ready, 0, None);
        assert_eq!(p.steps, [Step::Start(free.key())]);
    }
}
