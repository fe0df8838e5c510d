//! Workloads through the API: apply (each new spec a revision), roll out,
//! pause and resume, look back at revisions, undo, delete.

use edge_api::model::{Event, RolloutView, Workload, WorkloadView};
use edge_api::time::now_ms;

use crate::error::HubError;
use crate::hub::{Hub, check_secret_refs, lock};
use crate::revisions::{changed_fields, record_revision, revisions_of, without_source};
use crate::views;

impl Hub {
    /// Creates or updates a workload; answers `created`, `configured` or
    /// `unchanged`. A new spec makes a new revision, made `by` this caller.
    pub fn apply_workload(&self, mut w: Workload, by: &str) -> Result<(&'static str, WorkloadView), HubError> {
        if let edge_api::model::Runtime::Container(c) = &w.spec.runtime
            && c.network == edge_api::model::ContainerNetwork::Host
            && !self.allow_host_network
        {
            return Err(HubError::invalid_with(
                format!("workload {:?} is invalid", w.metadata.name),
                vec![
                    "spec.container.network: \"host\" is not allowed by this hub (edge-hub serve --allow-host-network)"
                        .into(),
                ],
            ));
        }
        if let edge_api::model::Runtime::Container(c) = &w.spec.runtime
            && (c.image.digest.is_none() || c.platforms.is_empty())
        {
            return Err(HubError::invalid("spec.container.image must be resolved to a digest and platforms"));
        }
        if let Some(artifact) = w.spec.runtime.artifact() {
            let Some(digest) = artifact.digest().copied() else {
                return Err(HubError::invalid("spec.wasm.component must be a digest"));
            };
            self.check_artifact(&w, digest)?;
        }
        let name = w.metadata.name.clone();
        let result = self.mutate(|d, events| {
            check_secret_refs(d, &w)?;
            let now = now_ms();
            let result = match d.workloads.get(&name).cloned() {
                None => {
                    w.metadata.uid = edge_api::keys::random_hex(8).map_err(HubError::internal)?;
                    w.metadata.generation = 1;
                    w.metadata.created_ms = now;
                    events.push((name.clone(), Event::new(now, false, "Created", "generation 1")));
                    record_revision(d, &w, by, "created".into(), now, self.revision_history);
                    "created"
                }
                Some(old) => {
                    w.metadata.uid = old.metadata.uid.clone();
                    w.metadata.created_ms = old.metadata.created_ms;
                    w.metadata.generation = old.metadata.generation;
                    if old.spec == w.spec && old.metadata.labels == w.metadata.labels {
                        return Ok("unchanged");
                    }
                    // Where a component came from is for people; it restarts nothing.
                    if without_source(&old.spec) != without_source(&w.spec) {
                        // A workload from before revisions were kept: its spec
                        // becomes the revision it can be returned to.
                        if !d.revisions.contains_key(&(name.clone(), old.metadata.generation)) {
                            let change = "recorded at the first change after an upgrade".to_string();
                            record_revision(d, &old, "-", change, old.metadata.created_ms, self.revision_history);
                        }
                        w.metadata.generation += 1;
                        let change = changed_fields(&old.spec, &w.spec);
                        record_revision(d, &w, by, change, now, self.revision_history);
                        events.push((
                            name.clone(),
                            Event::new(now, false, "Updated", format!("generation {}", w.metadata.generation)),
                        ));
                    }
                    "configured"
                }
            };
            d.workloads.insert(name.clone(), w);
            Ok(result)
        })?;
        let view = self.workload_view(&name, true).ok_or_else(|| HubError::not_found("workload", &name))?;
        Ok((result, view))
    }

    /// A workload's latest rollout, with how far it got.
    pub fn rollout_view(&self, name: &str) -> Result<RolloutView, HubError> {
        let inner = lock(&self.inner);
        let w = inner.d.workloads.get(name).ok_or_else(|| HubError::not_found("workload", name))?;
        let view = views::workload(&self.snapshot(&inner), w, false);
        let r = inner.d.rollouts.get(name).filter(|r| r.revision <= w.metadata.generation);
        Ok(views::rollout(w, r, &view.status))
    }

    /// Pauses (`true`) or resumes a workload's rollout in progress.
    pub fn pause_rollout(&self, name: &str, paused: bool) -> Result<RolloutView, HubError> {
        self.mutate(|d, events| {
            d.workloads.get(name).ok_or_else(|| HubError::not_found("workload", name))?;
            let r = d.rollouts.get_mut(name).filter(|r| r.phase.is_active()).ok_or_else(|| {
                HubError::conflict(
                    "NoRollout",
                    format!("workload {name:?} has no rollout in progress to pause or resume"),
                )
            })?;
            let was = r.phase;
            r.set_paused(paused, now_ms());
            if r.phase != was {
                let (reason, what) = if paused { ("RolloutPaused", "paused") } else { ("RolloutResumed", "resumed") };
                let message = format!("rollout of revision {} {what}", r.revision);
                events.push((name.to_string(), Event::new(now_ms(), false, reason, message)));
            }
            Ok(())
        })?;
        self.rollout_view(name)
    }

    /// A workload's kept revisions, oldest first.
    pub fn revisions(&self, name: &str) -> Result<Vec<edge_api::model::Revision>, HubError> {
        let inner = lock(&self.inner);
        if !inner.d.workloads.contains_key(name) {
            return Err(HubError::not_found("workload", name));
        }
        Ok(revisions_of(&inner.d, name).map(|r| (**r).clone()).collect())
    }

    /// Returns a workload to the spec of an earlier revision (by default the
    /// one before the current), as a new revision. Answers the revision
    /// returned to and `configured`, or `unchanged` when the spec is that
    /// revision's already.
    pub fn undo_workload(
        &self,
        name: &str,
        to: Option<u64>,
        by: &str,
    ) -> Result<(u64, &'static str, WorkloadView), HubError> {
        let target = {
            let inner = lock(&self.inner);
            let w = inner.d.workloads.get(name).ok_or_else(|| HubError::not_found("workload", name))?;
            let kept: Vec<u64> = revisions_of(&inner.d, name).map(|r| r.revision).collect();
            let wanted = match to {
                Some(r) => kept.iter().copied().find(|k| *k == r),
                None => kept.iter().copied().filter(|k| *k < w.metadata.generation).max(),
            };
            let Some(r) = wanted else {
                let which = to.map_or("earlier revision".to_string(), |r| format!("revision {r}"));
                let list = kept.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
                return Err(HubError::NotFound(format!("workload {name:?} has no {which} (kept: {list})")));
            };
            (inner.d.revisions[&(name.to_string(), r)].clone(), w.metadata.uid.clone(), w.metadata.generation)
        };
        let (target, uid, generation) = target;
        if let edge_api::model::Runtime::Container(c) = &target.spec.runtime
            && c.network == edge_api::model::ContainerNetwork::Host
            && !self.allow_host_network
        {
            return Err(HubError::invalid(format!(
                "revision {} asks for the node's network (network = \"host\"), which this hub does not allow (--allow-host-network)",
                target.revision
            )));
        }
        if let Some(digest) = target.spec.runtime.artifact().and_then(|a| a.digest()).copied()
            && !self.artifacts.has(&digest)
        {
            return Err(HubError::conflict(
                "ArtifactGone",
                format!("revision {} needs artifact {digest}, which is no longer in the hub's store", target.revision),
            ));
        }
        let result = self.mutate(|d, events| {
            let w = d.workloads.get(name).cloned().ok_or_else(|| HubError::not_found("workload", name))?;
            if w.metadata.uid != uid || w.metadata.generation != generation {
                return Err(HubError::conflict(
                    "Conflict",
                    format!("workload {name:?} changed while the undo was prepared; try again"),
                ));
            }
            if without_source(&w.spec) == without_source(&target.spec) {
                return Ok("unchanged");
            }
            let mut w = w;
            w.spec = target.spec.clone();
            check_secret_refs(d, &w)?;
            let now = now_ms();
            w.metadata.generation += 1;
            events.push((
                name.to_string(),
                Event::new(
                    now,
                    false,
                    "RolledBack",
                    format!("to revision {} (generation {})", target.revision, w.metadata.generation),
                ),
            ));
            let change = format!("rolled back to revision {}", target.revision);
            record_revision(d, &w, by, change, now, self.revision_history);
            d.workloads.insert(name.to_string(), w);
            Ok("configured")
        })?;
        let view = self.workload_view(name, true).ok_or_else(|| HubError::not_found("workload", name))?;
        Ok((target.revision, result, view))
    }

    pub fn delete_workload(&self, name: &str) -> Result<(), HubError> {
        self.mutate(|d, _| {
            d.workloads.remove(name).ok_or_else(|| HubError::not_found("workload", name))?;
            d.revisions.retain(|(w, _), _| w != name);
            Ok(())
        })?;
        let deleted = Event::new(now_ms(), false, "Deleted", format!("workload {name} deleted"));
        self.record(&mut lock(&self.inner), vec![(name.to_string(), deleted)], true);
        Ok(())
    }
}
