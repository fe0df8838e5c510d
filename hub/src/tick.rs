//! The hub's half-second tick: node readiness and its events, deleted
//! nodes' grace, and a reconcile pass over what moved without a change
//! (rollouts under way, replicas leaving or on silent nodes, nodes whose
//! readiness flipped).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use edge_api::model::{Event, NodeState};
use edge_api::time::now_ms;

use crate::controller::Scope;
use crate::hub::{Hub, lock};
use crate::liveness::node_state;

impl Hub {
    /// Recomputes node readiness; reschedules when the set of ready nodes changed.
    pub fn tick(&self, last_ready: &mut Vec<String>) {
        self.restore_pending();
        self.want_compiled();
        self.expire_tokens();
        let ended: Vec<String> = {
            let mut inner = lock(&self.inner);
            let now = Instant::now();
            let ended = inner.deleting.iter().filter(|(_, until)| now >= **until).map(|(n, _)| n.clone()).collect();
            inner.deleting.retain(|_, until| now < *until);
            ended
        };
        if !ended.is_empty() {
            // The grace to read the last desired state is over: an external
            // broker forgets the login now (the embedded one asks again).
            for n in &ended {
                self.send_all(self.broker_admin.remove_node(n));
            }
            self.revocations.send_modify(|r| *r += 1);
        }
        let ready = {
            let mut inner = lock(&self.inner);
            let now = Instant::now();
            let states: Vec<(String, NodeState, Option<String>)> = inner
                .d
                .nodes
                .values()
                .filter(|n| n.approved)
                .map(|n| {
                    let (state, why) = node_state(inner.live.get(&n.name), now, self.heartbeat);
                    (n.name.clone(), state, why)
                })
                .collect();
            let mut events = Vec::new();
            for (n, state, why) in &states {
                let before = inner.node_states.insert(n.clone(), *state);
                if before.is_some_and(|b| b != *state) {
                    let message = match why {
                        Some(why) => format!("node {n} is {state}: {why}"),
                        None => format!("node {n} is {state}"),
                    };
                    let e = Event {
                        ts_ms: now_ms(),
                        warning: *state != NodeState::Ready,
                        reason: format!("Node{state}"),
                        message,
                    };
                    events.push((format!("node/{n}"), e));
                }
            }
            // (A set: a scan of `states` per node was quadratic in the fleet.)
            let names: std::collections::HashSet<&str> = states.iter().map(|(n, _, _)| n.as_str()).collect();
            inner.node_states.retain(|n, _| names.contains(n.as_str()));
            self.record(&mut inner, events, false);
            states.into_iter().filter(|(_, s, _)| *s == NodeState::Ready).map(|(n, _, _)| n).collect::<Vec<_>>()
        };
        let epoch = self.readiness.load(Ordering::Acquire);
        let moved = self.readiness_seen.swap(epoch, Ordering::AcqRel) != epoch;
        let mut scope = Scope::default();
        {
            let inner = lock(&self.inner);
            let now = Instant::now();
            // A node silent for a workload's reschedule_after loses it; a
            // replica on its way off a node waits for the node's word.
            for ((w, r), p) in inner.d.placements.iter() {
                if p.leaving {
                    scope.workloads.insert(w.clone());
                    continue;
                }
                let live = inner.live.get(&p.node);
                let silent = live.and_then(|l| l.last_heartbeat).unwrap_or(self.started);
                let silent = now.saturating_duration_since(silent.max(self.started)).as_millis() as u64;
                let reported = live
                    .and_then(|l| l.status.as_ref())
                    .and_then(|st| st.instances.iter().find(|i| i.workload == *w && i.replica == *r))
                    .map(|i| i.generation);
                if crate::placing::lost(&inner.d, w, p, reported, silent).is_some() {
                    scope.workloads.insert(w.clone());
                }
            }
            // A rollout in progress moves with what replicas report and with time.
            scope
                .workloads
                .extend(inner.d.rollouts.iter().filter(|(_, r)| r.phase.is_active()).map(|(w, _)| w.clone()));
            if moved && !inner.unschedulable.is_empty() {
                scope.workloads.extend(inner.unschedulable.keys().map(|(w, _)| w.clone()));
            }
        }
        if ready != *last_ready {
            let was: BTreeSet<&String> = last_ready.iter().collect();
            let is: BTreeSet<&String> = ready.iter().collect();
            scope.nodes = was.symmetric_difference(&is).map(|n| n.to_string()).collect();
        }
        if !scope.workloads.is_empty() || !scope.nodes.is_empty() {
            *last_ready = ready;
            if let Err(e) = self.mutate_in(scope, |_, _| Ok(())) {
                tracing::warn!("reconcile after a readiness change failed: {e}");
            }
        }
    }
}
