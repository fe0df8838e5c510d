//! The hub's half-second tick: node readiness and its events, deleted
//! nodes' grace, and a reconcile pass over what moved without a change
//! (rollouts under way, replicas leaving or on silent nodes, nodes whose
//! readiness flipped).

use std::sync::atomic::Ordering;
use std::time::Instant;

use edge_api::model::{Event, NodeState};
use edge_api::time::now_ms;

use crate::controller::Scope;
use crate::hub::{Hub, lock};
use crate::liveness::node_state;

impl Hub {
    /// Recomputes node readiness; reschedules when a node became Ready or
    /// stopped being Ready, and what else moves with time.
    ///
    /// Cost per tick: one look at each node and a short one at each
    /// placement, without allocating for those that did not move (at
    /// 10,000 nodes the tick holds the lock every half second).
    pub fn tick(&self) {
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
        let mut scope = Scope::default();
        {
            let mut guard = lock(&self.inner);
            let inner = &mut *guard;
            let now = Instant::now();
            let mut events = Vec::new();
            let mut approved = 0;
            for n in inner.d.nodes.values().filter(|n| n.approved) {
                approved += 1;
                let (state, why) = node_state(inner.live.get(&n.name), now, self.heartbeat);
                let before = match inner.node_states.get_mut(&n.name) {
                    Some(s) if *s == state => continue,
                    Some(s) => Some(std::mem::replace(s, state)),
                    None => {
                        inner.node_states.insert(n.name.clone(), state);
                        None
                    }
                };
                if before.unwrap_or(NodeState::Offline).eq(&NodeState::Ready) != (state == NodeState::Ready) {
                    scope.nodes.insert(n.name.clone());
                }
                if before.is_some() {
                    let name = &n.name;
                    let message = match why {
                        Some(why) => format!("node {name} is {state}: {why}"),
                        None => format!("node {name} is {state}"),
                    };
                    let e = Event::new(now_ms(), state != NodeState::Ready, format!("Node{state}"), message);
                    events.push((format!("node/{name}"), e));
                }
            }
            if inner.node_states.len() != approved {
                // Deleted or unapproved since.
                let nodes = &inner.d.nodes;
                inner.node_states.retain(|n, state| {
                    let keep = nodes.get(n).is_some_and(|r| r.approved);
                    if !keep && *state == NodeState::Ready {
                        scope.nodes.insert(n.clone());
                    }
                    keep
                });
            }
            self.record(inner, events, false);
        }
        let epoch = self.readiness.load(Ordering::Acquire);
        let moved = self.readiness_seen.swap(epoch, Ordering::AcqRel) != epoch;
        {
            let inner = lock(&self.inner);
            let now = Instant::now();
            // A node silent for a workload's reschedule_after loses it; a
            // replica on its way off a node waits for the node's word.
            let mut last: Option<(&String, Option<&edge_api::model::Workload>)> = None;
            for ((w, r), p) in inner.d.placements.iter() {
                if p.leaving {
                    scope.workloads.insert(w.clone());
                    continue;
                }
                // (Placements come by workload: one lookup for each.)
                let wl = match last {
                    Some((name, wl)) if name == w => wl,
                    _ => inner.d.workloads.get(w),
                };
                last = Some((w, wl));
                let Some(wl) = wl else { continue };
                // Cheap first: `lost` needs a policy in the revision the
                // node was given, and at least the shortest one of silence.
                let current = p.revision == wl.metadata.generation;
                if wl.spec.replicas.is_per_node() || (current && wl.spec.node_loss.reschedule_after.is_none()) {
                    continue;
                }
                let live = inner.live.get(&p.node);
                let silent = live.and_then(|l| l.last_heartbeat).unwrap_or(self.started);
                let silent = now.saturating_duration_since(silent.max(self.started)).as_millis() as u64;
                if silent < edge_api::lease::MIN_RESCHEDULE_AFTER.0 {
                    continue;
                }
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
        if (!scope.workloads.is_empty() || !scope.nodes.is_empty())
            && let Err(e) = self.mutate_in(scope, |_, _| Ok(()))
        {
            tracing::warn!("reconcile after a readiness change failed: {e}");
        }
    }
}
