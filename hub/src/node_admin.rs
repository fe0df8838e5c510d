//! What an admin does to nodes through the API: delete, approve, label,
//! taint, cordon and drain. Each change goes through `Hub::mutate`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use edge_api::model::{Drained, Event, MovedReplica, NodeState, NodeView, Resources};
use edge_api::names;
use edge_api::placement::TaintChange;
use edge_api::time::now_ms;
use edge_api::token::hash_secret;
use edge_api::wire::{self, Channel, Kind};

use crate::controller::ReplicaId;
use crate::error::HubError;
use crate::hub::{DELETE_GRACE, Hub, Outgoing, lock};

/// An event about a node, for `Hub::mutate`'s list.
pub(crate) fn node_event(node: &str, reason: &str, message: String) -> (String, Event) {
    (format!("node/{node}"), Event::new(now_ms(), false, reason, message))
}

impl Hub {
    /// Forgets a node; its replicas are placed elsewhere. The node is sent a
    /// last, empty desired state (retained) so that its agent stops them too
    /// and nothing runs twice.
    ///
    /// Its credential is revoked at once: it can no longer log in, and its
    /// open session is cut off as soon as it has acknowledged that last
    /// document, or after [`DELETE_GRACE`] at the latest.
    pub fn delete_node(&self, name: &str) -> Result<(), HubError> {
        let generation = self.mutate(|d, events| {
            d.nodes.get(name).ok_or_else(|| HubError::not_found("node", name))?;
            // A singleton may run elsewhere only once this node stopped it (or
            // fenced it): the drain that waits for that comes first.
            let held: Vec<String> = d
                .placements
                .iter()
                .filter(|((w, _), p)| {
                    p.node == name
                        && (d.workloads.get(w).is_some_and(|wl| wl.spec.node_loss.singleton)
                            || d.spec_of(w, p.revision).is_some_and(|s| s.node_loss.singleton))
                })
                .map(|((w, r), _)| format!("{w}/{r}"))
                .collect();
            if !held.is_empty() {
                return Err(HubError::conflict(
                    "SingletonsOnNode",
                    format!(
                        "node {name} holds singleton replicas ({}): run `edgectl drain {name}` first; they leave once the node has stopped them, or has been silent long enough to have fenced them",
                        held.join(", ")
                    ),
                ));
            }
            d.nodes.remove(name);
            events.push(node_event(name, "Deleted", format!("node {name} deleted; its credential is revoked")));
            Ok(d.next_generation(now_ms()))
        })?;
        lock(&self.held_welcomes).remove(name);
        lock(&self.inner).deleting.insert(name.to_string(), Instant::now() + DELETE_GRACE);
        let last = edge_api::wire::NodeDesired { node: name.to_string(), workloads: vec![] };
        match wire::seal(Kind::Desired, wire::HUB, generation, &last, Some(&self.key)) {
            Ok(payload) => {
                self.send(Outgoing { topic: wire::topic(name, Channel::Desired), payload, retain: true, lossy: false })
            }
            Err(e) => tracing::error!(node = name, "cannot encode desired state: {e}"),
        }
        tracing::info!(node = name, "node deleted; its credential is revoked");
        Ok(())
    }

    /// Lets a node that waits for approval in: it gets its credential now
    /// (sealed in a welcome) and can be scheduled. `capacity` overrides what
    /// it may offer (also for nodes already approved).
    pub fn approve_node(&self, name: &str, capacity: Option<Resources>) -> Result<NodeView, HubError> {
        let credential = edge_api::token::new_secret().map_err(HubError::internal)?;
        let (issued, key, kem) = self.mutate(|d, _| {
            let rec = d.nodes.get_mut(name).ok_or_else(|| HubError::not_found("node", name))?;
            if let Some(c) = capacity {
                rec.capacity = Some(c);
            }
            let issued = !rec.approved;
            if issued {
                rec.approved = true;
                rec.credential_hash = Some(hash_secret(&credential));
            }
            Ok((issued, rec.key, rec.kem))
        })?;
        if issued {
            self.send_all(self.broker_admin.add_node(name, &credential));
            let sealed = kem.and_then(|k| {
                edge_api::seal::seal(&k, &edge_api::seal::credential_info(name), credential.as_bytes()).ok()
            });
            self.welcome_with_credential(name, key, sealed);
            tracing::info!(node = name, "node approved");
        }
        self.node_view(name).ok_or_else(|| HubError::not_found("node", name))
    }

    /// Sets (`Some`) or removes (`None`) labels only the API may set.
    pub fn label_node(&self, name: &str, changes: &BTreeMap<String, Option<String>>) -> Result<NodeView, HubError> {
        let mut problems = Vec::new();
        for (k, v) in changes {
            if let Err(e) = names::check_label_key(k) {
                problems.push(e);
            }
            if let Some(Err(e)) = v.as_deref().map(names::check_label_value) {
                problems.push(e);
            }
        }
        if !problems.is_empty() {
            return Err(HubError::invalid_with(format!("labels for node {name:?} are invalid"), problems));
        }
        self.mutate(|d, events| {
            let rec = d.nodes.get_mut(name).ok_or_else(|| HubError::not_found("node", name))?;
            for (k, v) in changes {
                match v {
                    Some(v) => rec.admin_labels.insert(k.clone(), v.clone()),
                    None => rec.admin_labels.remove(k),
                };
            }
            let said: Vec<String> = changes
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}={v}"),
                    None => format!("{k}-"),
                })
                .collect();
            events.push(node_event(name, "Labelled", format!("labels changed: {}", said.join(" "))));
            Ok(())
        })?;
        self.node_view(name).ok_or_else(|| HubError::not_found("node", name))
    }

    /// Changes a node's taints as `kubectl taint` does (`key=value:Effect`
    /// sets, `key[:Effect]-` removes). All or nothing: a change that does
    /// not parse, or removes a taint the node does not have, changes nothing.
    pub fn taint_node(&self, name: &str, changes: &[String]) -> Result<NodeView, HubError> {
        let parsed: Vec<Result<TaintChange, String>> = changes.iter().map(|c| TaintChange::parse(c)).collect();
        let problems: Vec<String> = parsed.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
        if !problems.is_empty() || changes.is_empty() {
            let problems = if changes.is_empty() { vec!["give at least one taint".to_string()] } else { problems };
            return Err(HubError::invalid_with(format!("taints for node {name:?} are invalid"), problems));
        }
        self.mutate(|d, events| {
            let rec = d.nodes.get_mut(name).ok_or_else(|| HubError::not_found("node", name))?;
            events.push(node_event(name, "Tainted", format!("taints changed: {}", changes.join(" "))));
            for (text, change) in changes.iter().zip(parsed.into_iter().flatten()) {
                if !change.apply(&mut rec.taints) {
                    return Err(HubError::NotFound(format!(
                        "node {name} has no taint {:?} to remove",
                        text.trim_end_matches('-')
                    )));
                }
            }
            Ok(())
        })?;
        self.node_view(name).ok_or_else(|| HubError::not_found("node", name))
    }

    /// Cordons (`true`) or uncordons a node: a cordoned node gets no new
    /// counted replicas; those it has stay (`drain` moves them).
    pub fn cordon_node(&self, name: &str, cordon: bool) -> Result<NodeView, HubError> {
        self.mutate(|d, events| {
            let rec = d.nodes.get_mut(name).ok_or_else(|| HubError::not_found("node", name))?;
            if rec.unschedulable != cordon {
                let (reason, what) =
                    if cordon { ("Cordoned", "no new replicas") } else { ("Uncordoned", "schedulable again") };
                events.push(node_event(name, reason, format!("node {name}: {what}")));
            }
            rec.unschedulable = cordon;
            Ok(())
        })?;
        self.node_view(name).ok_or_else(|| HubError::not_found("node", name))
    }

    /// Cordons a node and moves its counted replicas to other nodes (in the
    /// same change, so each is placed by the scheduler at once). Per-node
    /// workloads stay, as with `kubectl drain --ignore-daemonsets`.
    pub fn drain_node(&self, name: &str) -> Result<Drained, HubError> {
        let (evicted, stayed) = self.mutate(|d, events| {
            let rec = d.nodes.get_mut(name).ok_or_else(|| HubError::not_found("node", name))?;
            rec.unschedulable = true;
            events.push(node_event(name, "Drained", format!("node {name} cordoned; its counted replicas move")));
            let here: Vec<ReplicaId> =
                d.placements.iter().filter(|(_, p)| p.node == name).map(|(id, _)| id.clone()).collect();
            let (mut evicted, mut stayed) = (Vec::new(), BTreeSet::new());
            for id in here {
                if d.workloads.get(&id.0).is_some_and(|w| w.spec.replicas.is_per_node()) {
                    stayed.insert(id.0.clone());
                    continue;
                }
                if d.placements.get(&id).is_some_and(|p| p.leaving) {
                    continue; // a singleton on its way off already
                }
                let singleton = d.workloads.get(&id.0).is_some_and(|w| w.spec.node_loss.singleton);
                let message = crate::placing::leave(d, &id, singleton, name, "the node is being drained");
                events.push((id.0.clone(), Event::new(now_ms(), false, "Evicted", message)));
                evicted.push(id);
            }
            Ok((evicted, stayed))
        })?;
        let inner = lock(&self.inner);
        let moved = evicted
            .into_iter()
            .map(|id| MovedReplica {
                to: inner.d.placements.get(&id).filter(|p| !p.leaving).map(|p| p.node.clone()),
                waiting: match inner.d.placements.get(&id) {
                    Some(p) if p.leaving => Some(format!("a singleton: it runs elsewhere once stopped on {name}")),
                    _ => inner.unschedulable.get(&id).cloned(),
                },
                workload: id.0,
                replica: id.1,
            })
            .collect();
        let state = crate::liveness::node_state(inner.live.get(name), Instant::now(), self.heartbeat).0;
        let warning = (state != NodeState::Ready).then(|| {
            format!(
                "node {name} is {state}: it stops its copies only when it hears from the hub again; until then they may run there too"
            )
        });
        tracing::info!(node = name, "node drained");
        Ok(Drained { node: name.to_string(), moved, stayed: stayed.into_iter().collect(), warning })
    }
}

#[cfg(test)]
mod tests {
    use crate::hub::tests::{enrol, fixture, workload};
    use edge_api::model::{Phase, Replicas};

    #[test]
    fn drain_moves_counted_replicas_and_leaves_per_node_ones() {
        let mut f = fixture();
        enrol(&mut f, "pi1");
        enrol(&mut f, "pi2");
        let mut web = workload(&f, "web");
        web.spec.replicas = Replicas::Count(2);
        f.hub.apply_workload(web, "admin").unwrap();
        let mut agent = workload(&f, "agentd");
        agent.spec.replicas = Replicas::PerNode;
        f.hub.apply_workload(agent, "admin").unwrap();
        let nodes = |w: &str| -> Vec<String> {
            let v = f.hub.workload_view(w, false).unwrap();
            v.status.replicas.iter().map(|r| format!("{}@{}", r.replica, r.node.clone().unwrap_or_default())).collect()
        };
        assert_eq!(nodes("web"), ["0@pi1", "1@pi2"]);
        assert_eq!(nodes("agentd"), ["0@pi1", "1@pi2"], "one per node");

        let d = f.hub.drain_node("pi1").unwrap();
        assert_eq!(d.stayed, ["agentd"]);
        assert_eq!(d.moved.len(), 1);
        assert_eq!(
            (d.moved[0].workload.as_str(), d.moved[0].replica, d.moved[0].to.as_deref()),
            ("web", 0, Some("pi2"))
        );
        assert_eq!(d.warning, None, "the node is Ready: it stops its copy at once");
        assert_eq!(nodes("web"), ["0@pi2", "1@pi2"]);
        assert_eq!(nodes("agentd"), ["0@pi1", "1@pi2"]);
        assert!(f.hub.node_view("pi1").unwrap().unschedulable);
        let v = f.hub.workload_view("web", true).unwrap();
        assert!(v.events.iter().any(|e| e.reason == "Evicted" && e.message.contains("drained")), "{:?}", v.events);
        // Uncordoned, it takes new work again; what moved stays where it went.
        f.hub.cordon_node("pi1", false).unwrap();
        let mut more = f.hub.workload_view("web", false).unwrap().workload;
        more.spec.replicas = Replicas::Count(3);
        f.hub.apply_workload(more, "admin").unwrap();
        assert_eq!(nodes("web"), ["0@pi2", "1@pi2", "2@pi1"]);
        // Draining a node that does not exist says so.
        assert!(f.hub.drain_node("nope").unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn taints_change_all_or_nothing_and_bad_ones_are_named() {
        let mut f = fixture();
        enrol(&mut f, "pi");
        let before = (f.store.dump(), f.hub.node_view("pi").unwrap().taints);
        for (changes, says) in [
            (vec!["a=b:NoSchedule", "c=d"], "taint \"c=d\": expected key[=value]:effect"),
            (vec!["a=b:Sometimes"], "unknown effect \"Sometimes\""),
            (vec!["a=b:NoSchedule", "gone:NoExecute-"], "no taint \"gone:NoExecute\""),
            (vec![], "at least one taint"),
        ] {
            let changes: Vec<String> = changes.into_iter().map(String::from).collect();
            let e = f.hub.taint_node("pi", &changes).unwrap_err();
            assert!(format!("{e:?}").replace("\\\"", "\"").contains(says), "{changes:?}: {e:?}");
            assert_eq!(
                (f.store.dump(), f.hub.node_view("pi").unwrap().taints),
                before,
                "{changes:?} changed something"
            );
        }
        let set = |c: &[&str]| f.hub.taint_node("pi", &c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let v = set(&["dedicated=gw:NoSchedule", "flaky:NoExecute"]).unwrap();
        assert_eq!(
            v.taints.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["dedicated=gw:NoSchedule", "flaky:NoExecute"]
        );
        // A workload that does not tolerate them waits, and says why.
        f.hub.apply_workload(workload(&f, "web"), "admin").unwrap();
        let v = f.hub.workload_view("web", false).unwrap();
        assert_eq!(v.status.phase, Phase::Pending);
        assert!(
            v.status.message.as_deref().unwrap_or("").contains("1 node has a taint the workload does not tolerate"),
            "{:?}",
            v.status
        );
        let v = set(&["dedicated-", "flaky-"]).unwrap();
        assert!(v.taints.is_empty());
        let v = f.hub.workload_view("web", false).unwrap();
        assert_eq!(v.status.replicas[0].node.as_deref(), Some("pi"));
    }

    #[test]
    fn a_drained_singleton_leaves_only_once_stopped_and_its_node_cannot_be_deleted_before() {
        let mut f = fixture();
        enrol(&mut f, "pi1");
        enrol(&mut f, "pi2");
        f.hub.cordon_node("pi2", true).unwrap();
        let mut db = workload(&f, "db");
        db.spec.node_loss.singleton = true;
        f.hub.apply_workload(db, "admin").unwrap();
        f.hub.cordon_node("pi2", false).unwrap();
        let e = f.hub.delete_node("pi1").unwrap_err();
        assert!(format!("{e:?}").contains("SingletonsOnNode") && format!("{e:?}").contains("db/0"), "{e:?}");
        assert!(f.hub.node_view("pi1").is_some(), "nothing was deleted");
        let d = f.hub.drain_node("pi1").unwrap();
        assert_eq!(d.moved.len(), 1);
        assert_eq!(d.moved[0].to, None, "not placed elsewhere yet");
        assert!(d.moved[0].waiting.as_deref().unwrap_or("").contains("singleton"), "{d:?}");
        let v = f.hub.workload_view("db", false).unwrap();
        assert_eq!(v.status.replicas[0].node.as_deref(), Some("pi1"), "still on pi1 until it stops it");
        assert!(f.hub.delete_node("pi1").is_err(), "still held");
    }
}
