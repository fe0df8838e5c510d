//! What the API shows: workloads with the status of each replica, nodes
//! with their state, and the events worth recording when a replica's
//! reported state changes. Pure functions of a snapshot of the hub's state.
//!
//! Architecture invariant: a view never says more than the hub knows. A
//! replica on a node that is not Ready is `Unknown` (`NodeOffline`,
//! `NodeNotReady`), with its last report as history, never running now.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use edge_api::model::{
    Event, InstanceStatus, NodeState, NodeView, Phase, Reason, ReplicaStatus, Replicas, Workload, WorkloadStatus,
    WorkloadView,
};

use crate::controller::{Durable, NodeRecord, ReplicaId};
use crate::liveness::{Live, node_state};
use crate::revisions::template;

/// The state the views are made of, borrowed for one call.
pub struct Snapshot<'a> {
    pub d: &'a Durable,
    pub live: &'a HashMap<String, Live>,
    pub unschedulable: &'a BTreeMap<ReplicaId, String>,
    pub events: &'a crate::events::EventLog,
    pub warnings: &'a HashMap<String, VecDeque<String>>,
    pub now: Instant,
    pub heartbeat: Duration,
}

fn pending(replica: u32, node: Option<&str>, reason: Reason, message: Option<String>) -> ReplicaStatus {
    ReplicaStatus {
        replica,
        node: node.map(str::to_string),
        phase: Phase::Pending,
        restarts: 0,
        exit_code: None,
        reason: Some(reason),
        message,
        started_ms: None,
        finished_ms: None,
        observed_generation: 0,
        ready: None,
        probe: None,
        revision: 0,
        up_to_date: false,
    }
}

fn replica(s: &Snapshot, w: &Workload, r: u32) -> ReplicaStatus {
    let name = &w.metadata.name;
    let id = (name.clone(), r);
    let Some(placed) = s.d.placements.get(&id) else {
        return pending(r, None, Reason::Unschedulable, s.unschedulable.get(&id).cloned());
    };
    let node = &placed.node;
    let up_to_date = s.d.spec_of(name, placed.revision).is_some_and(|spec| template(spec) == template(&w.spec));
    let live = s.live.get(node);
    let inst = live
        .and_then(|l| l.status.as_ref())
        .and_then(|st| st.instances.iter().find(|i| i.workload == *name && i.replica == r && i.uid == w.metadata.uid));
    let mut rs = match inst {
        Some(i) => ReplicaStatus {
            replica: r,
            node: Some(node.clone()),
            phase: i.phase,
            restarts: i.restarts,
            exit_code: i.exit_code,
            reason: i.reason.clone(),
            message: i.message.clone(),
            started_ms: i.started_ms,
            finished_ms: i.finished_ms,
            observed_generation: i.generation,
            ready: i.ready,
            probe: i.probe.clone(),
            revision: placed.revision,
            up_to_date,
        },
        None => ReplicaStatus {
            revision: placed.revision,
            up_to_date,
            ..pending(r, Some(node), Reason::Scheduled, Some(format!("waiting for node {node} to report")))
        },
    };
    let (state, _) = node_state(live, s.now, s.heartbeat);
    if state != NodeState::Ready && !rs.phase.is_finished() {
        let last = rs.reason.take().map_or_else(|| rs.phase.to_string(), |r| format!("{} ({r})", rs.phase));
        rs.message = Some(format!("node {node} is {state}; last reported: {last}"));
        rs.phase = Phase::Unknown;
        rs.ready = None;
        rs.reason = Some(if state == NodeState::Offline { Reason::NodeOffline } else { Reason::NodeNotReady });
    }
    rs
}

/// A workload with the status of each replica (and its events if asked).
pub fn workload(s: &Snapshot, w: &Workload, with_events: bool) -> WorkloadView {
    let name = &w.metadata.name;
    let ids: Vec<u32> = match w.spec.replicas {
        Replicas::Count(n) => (0..n).collect(),
        // One per selected node: those placed, and those that could not be.
        Replicas::PerNode => {
            let range = (name.clone(), 0)..=(name.clone(), u32::MAX);
            let placed = s.d.placements.range(range.clone()).map(|((_, r), _)| *r);
            let waiting = s.unschedulable.range(range).map(|((_, r), _)| *r);
            placed.chain(waiting).collect::<BTreeSet<u32>>().into_iter().collect()
        }
    };
    let replicas = ids.into_iter().map(|r| replica(s, w, r)).collect();
    let mut status = WorkloadStatus::aggregate(replicas);
    if status.replicas.is_empty() && w.spec.replicas.is_per_node() {
        status.reason = Some(Reason::Unschedulable);
        status.message = Some("no node is selected by spec.placement".into());
    }
    WorkloadView {
        workload: w.clone(),
        status,
        events: if with_events {
            // Those of this workload, not of one of the same name before it.
            s.events.of(&format!("workload/{name}"), w.metadata.created_ms)
        } else {
            Vec::new()
        },
        compiled: Vec::new(),
    }
}

/// A rollout and how far it got, from its record and the workload's status.
/// A workload never updated has no record: its first revision is rolled out
/// once every replica on a Ready node is ready.
pub fn rollout(
    w: &Workload,
    r: Option<&crate::rollout::Rollout>,
    status: &WorkloadStatus,
) -> edge_api::model::RolloutView {
    let name = &w.metadata.name;
    let first;
    let r = match r {
        Some(r) => r,
        None => {
            let generation = w.metadata.generation;
            let mut f = crate::rollout::Rollout::new(generation, generation, w.metadata.created_ms);
            let waiting = status.replicas.iter().any(|x| {
                x.revision == 0
                    || (!x.is_ready() && !matches!(x.reason, Some(Reason::NodeOffline | Reason::NodeNotReady)))
            });
            if !waiting {
                f.phase = edge_api::model::RolloutPhase::Complete;
                f.message = format!("revision {generation} rolled out");
            }
            first = f;
            &first
        }
    };
    let reps = &status.replicas;
    let placed = reps.iter().filter(|x| x.revision != 0);
    let mut pending_offline: Vec<String> = reps
        .iter()
        .filter(|x| {
            x.up_to_date && !x.is_ready() && matches!(x.reason, Some(Reason::NodeOffline | Reason::NodeNotReady))
        })
        .filter_map(|x| x.node.clone())
        .collect();
    pending_offline.dedup();
    edge_api::model::RolloutView {
        workload: name.to_string(),
        revision: r.revision,
        from: r.from,
        phase: r.phase,
        message: r.message.clone(),
        wave: r.waves,
        updated: reps.iter().filter(|x| x.up_to_date).count() as u32,
        ready: status.ready,
        total: placed.count() as u32,
        pending_offline,
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
    }
}

/// A node with its state, what it offers and what runs on it (and its
/// events if asked).
pub fn node(s: &Snapshot, rec: &NodeRecord, with_events: bool) -> NodeView {
    let live = s.live.get(&rec.name);
    let (state, reason) = if rec.approved {
        node_state(live, s.now, s.heartbeat)
    } else {
        (NodeState::Pending, Some(format!("waiting for `edgectl approve node {}`", rec.name)))
    };
    NodeView {
        name: rec.name.clone(),
        state,
        reason,
        facts: rec.effective_facts(),
        key_fingerprint: rec.key.fingerprint(),
        joined_ms: rec.joined_ms,
        last_seen_ms: live.map(|l| l.last_seen_ms).unwrap_or(0),
        desired_generation: rec.desired_generation,
        observed_generation: live.map(|l| l.observed_generation).unwrap_or(0),
        allocated: s.d.allocated(&rec.name),
        workloads: s.d.workloads_on(&rec.name),
        admin_labels: rec.admin_labels.clone(),
        capacity: rec.capacity,
        warnings: s.warnings.get(&rec.name).map(|q| q.iter().cloned().collect()).unwrap_or_default(),
        enrolled_with: rec.enrolled_with.clone(),
        taints: rec.taints.clone(),
        unschedulable: rec.unschedulable,
        events: if with_events { s.events.of(&format!("node/{}", rec.name), rec.joined_ms) } else { Vec::new() },
        corrupt_files: live.and_then(|l| l.status.as_ref()).map_or(0, |st| st.corrupt_files),
    }
}

/// The event worth recording when a replica's reported state changes.
pub fn transition_event(node: &str, prev: Option<&InstanceStatus>, now: &InstanceStatus, ts_ms: u64) -> Option<Event> {
    let same = prev.is_some_and(|p| p.phase == now.phase && p.restarts == now.restarts && p.reason == now.reason);
    if same {
        return None;
    }
    let r = now.replica;
    let detail = now.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    let (warning, reason, message) = match (now.phase, now.reason.as_ref()) {
        (Phase::Running, _) => (false, "Started", format!("replica {r} started on {node}")),
        (Phase::Succeeded, _) => (false, "Completed", format!("replica {r} exited 0 on {node}")),
        (Phase::Failed, reason) => {
            (true, "Failed", format!("replica {r} on {node}: {}{detail}", reason.map_or("failed", Reason::as_str)))
        }
        (Phase::Pending, Some(reason @ (Reason::BackOff | Reason::FetchFailed))) => {
            (true, reason.as_str(), format!("replica {r} on {node}{detail}"))
        }
        (Phase::Pending, Some(Reason::Fetching)) => {
            (false, "Fetching", format!("replica {r}: node {node} is downloading the component"))
        }
        _ => return None,
    };
    Some(Event::new(ts_ms, warning, reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::keys::SigningKey;
    use edge_api::wire::NodeStatus;

    fn workload(name: &str, replicas: u32) -> Workload {
        let toml = format!(
            "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec]\nreplicas = {replicas}\n[spec.wasm]\ncomponent = \"{}\"\n",
            edge_api::digest::Digest::of(b"c")
        );
        edge_api::manifest::parse_toml(&toml, edge_api::manifest::Origin::Api).unwrap()
    }

    fn instance(w: &Workload, replica: u32, phase: Phase, reason: Option<&str>) -> InstanceStatus {
        let mut i: InstanceStatus = serde_json::from_value(serde_json::json!({
            "workload": w.metadata.name, "replica": replica, "uid": w.metadata.uid, "generation": 1,
            "phase": phase, "restarts": 0,
        }))
        .unwrap();
        i.reason = reason.map(Reason::from);
        i
    }

    #[test]
    fn each_replica_says_what_is_known_of_it_and_no_more() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(2);
        let w = workload("web", 4);
        let mut d = Durable::default();
        d.workloads.insert("web".into(), w.clone());
        for n in ["up", "silent", "gone"] {
            let rec =
                NodeRecord::new(n, SigningKey::generate().unwrap().public(), crate::test_facts("amd64", 1024, &[]), 0);
            d.nodes.insert(n.into(), rec);
        }
        d.placements.insert(("web".into(), 0), crate::controller::Placed::on("up", w.metadata.generation));
        d.placements.insert(("web".into(), 1), crate::controller::Placed::on("silent", w.metadata.generation));
        d.placements.insert(("web".into(), 2), crate::controller::Placed::on("gone", w.metadata.generation));
        let status = |node: &str, r: u32| NodeStatus {
            node: node.into(),
            session: 1,
            seq: 1,
            observed_generation: 1,
            instances: vec![instance(&w, r, Phase::Running, None)],
            corrupt_files: 0,
        };
        let heard = |node: &str, r: u32, ago: u64, online: bool| Live {
            online,
            last_seen: Some(t0 - Duration::from_secs(ago)),
            status: Some(status(node, r)),
            ..Live::default()
        };
        let live: HashMap<String, Live> = [
            ("up".to_string(), heard("up", 0, 0, true)),
            ("silent".to_string(), heard("silent", 1, 60, true)),
            ("gone".to_string(), heard("gone", 2, 0, false)),
        ]
        .into();
        let mut unschedulable = BTreeMap::new();
        unschedulable.insert(("web".to_string(), 3), "no node has 1Gi free".to_string());
        let (events, warnings) = (crate::events::EventLog::default(), HashMap::new());
        let s = Snapshot {
            d: &d,
            live: &live,
            unschedulable: &unschedulable,
            events: &events,
            warnings: &warnings,
            now: t0,
            heartbeat: hb,
        };
        let v = super::workload(&s, &w, false);
        let got: Vec<(Phase, Option<&str>, Option<&str>)> = v
            .status
            .replicas
            .iter()
            .map(|r| (r.phase, r.reason.as_ref().map(Reason::as_str), r.message.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Phase::Running, None, None),
                (Phase::Unknown, Some("NodeNotReady"), Some("node silent is NotReady; last reported: Running")),
                (Phase::Unknown, Some("NodeOffline"), Some("node gone is Offline; last reported: Running")),
                (Phase::Pending, Some("Unschedulable"), Some("no node has 1Gi free")),
            ]
        );
        assert_eq!(super::node(&s, &d.nodes["silent"], false).state, NodeState::NotReady);
        // A replica that finished keeps its phase when its node goes away.
        let mut done = live.clone();
        if let Some(l) = done.get_mut("gone") {
            l.status.as_mut().unwrap().instances[0].phase = Phase::Succeeded;
        }
        let s2 = Snapshot { live: &done, ..s };
        assert_eq!(super::workload(&s2, &w, false).status.replicas[2].phase, Phase::Succeeded);
        assert_eq!(super::node(&s, &d.nodes["up"], false).workloads, vec!["web".to_string()]);
    }

    #[test]
    fn only_changes_worth_telling_make_events() {
        let w = workload("job", 1);
        let running = instance(&w, 0, Phase::Running, None);
        let backoff = instance(&w, 0, Phase::Pending, Some("BackOff"));
        let starting = instance(&w, 0, Phase::Pending, Some("Starting"));
        let failed = instance(&w, 0, Phase::Failed, Some("OOMKilled"));
        type Case<'a> = (Option<&'a InstanceStatus>, &'a InstanceStatus, Option<(&'a str, bool)>);
        let cases: &[Case] = &[
            (None, &running, Some(("Started", false))),
            (Some(&running), &running, None),
            (Some(&running), &backoff, Some(("BackOff", true))),
            (Some(&running), &starting, None),
            (Some(&running), &failed, Some(("Failed", true))),
        ];
        for (prev, now, want) in cases {
            let got = transition_event("pi", *prev, now, 7);
            assert_eq!(got.as_ref().map(|e| (e.reason.as_str(), e.warning)), *want, "{prev:?} -> {now:?}");
            assert!(got.is_none_or(|e| e.ts_ms == 7 && e.message.contains("replica 0")));
        }
    }
}
