//! Secrets through the API: create, update, delete and view them (values
//! never leave encrypted; see `secrets`).

use edge_api::model::{Event, SecretView};
use edge_api::time::now_ms;

use crate::error::HubError;
use crate::hub::{Hub, MAX_SECRETS, lock, workloads_using};

impl Hub {
    /// Creates or updates a secret; answers `created`, `configured` or
    /// `unchanged`. A new version reaches (and restarts) the replicas using it.
    pub fn apply_secret(&self, s: edge_api::model::Secret) -> Result<(&'static str, SecretView), HubError> {
        let name = s.metadata.name.clone();
        let result = self.mutate(|d, events| {
            let now = now_ms();
            let (version, created, result) = match d.secrets.get(&name) {
                None if d.secrets.len() >= MAX_SECRETS => {
                    return Err(HubError::conflict(
                        "TooMany",
                        format!("the hub holds {MAX_SECRETS} secrets already; delete some first"),
                    ));
                }
                None => (1, now, "created"),
                Some(old) => {
                    if self.secret_keys.same_values(old, &s.data) {
                        if old.labels == s.metadata.labels {
                            return Ok("unchanged");
                        }
                        let mut rec = old.clone();
                        rec.labels = s.metadata.labels.clone();
                        d.secrets.insert(name.clone(), rec);
                        return Ok("configured");
                    }
                    (old.version + 1, old.created_ms, "configured")
                }
            };
            // A key a workload's env names may not disappear under it.
            let mut missing = Vec::new();
            for (w, wl) in &d.workloads {
                let (env, _) = wl.spec.env_and_secrets();
                for (var, v) in env {
                    if let edge_api::model::EnvValue::Secret(r) = v
                        && r.secret == name
                        && !s.data.contains_key(&r.key)
                    {
                        missing.push(format!("workload {w} uses key {:?} (env {var})", r.key));
                    }
                }
            }
            if !missing.is_empty() {
                return Err(HubError::Conflict {
                    code: "Conflict",
                    message: format!("secret {name:?} would lose keys that workloads use; change the workloads first"),
                    details: missing,
                });
            }
            let rec = self.secret_keys.encrypt(&s, version, created, now).map_err(HubError::internal)?;
            for w in workloads_using(d, &name) {
                events.push((
                    w,
                    Event::new(now, false, "SecretUpdated", format!("secret {name} is now at version {version}")),
                ));
            }
            d.secrets.insert(name.clone(), rec);
            Ok(result)
        })?;
        let view = self.secret_view(&name).ok_or_else(|| HubError::not_found("secret", &name))?;
        Ok((result, view))
    }

    /// Deletes a secret no workload uses.
    pub fn delete_secret(&self, name: &str) -> Result<(), HubError> {
        self.mutate(|d, _| {
            if !d.secrets.contains_key(name) {
                return Err(HubError::not_found("secret", name));
            }
            let users = workloads_using(d, name);
            if !users.is_empty() {
                return Err(HubError::conflict(
                    "Conflict",
                    format!("secret {name:?} is used by workload(s) {}; delete or change them first", users.join(", ")),
                ));
            }
            d.secrets.remove(name);
            Ok(())
        })
    }

    pub fn secret_view(&self, name: &str) -> Option<SecretView> {
        let inner = lock(&self.inner);
        inner.d.secrets.get(name).map(|r| r.view(workloads_using(&inner.d, name)))
    }

    pub fn secret_views(&self) -> Vec<SecretView> {
        let inner = lock(&self.inner);
        inner.d.secrets.values().map(|r| r.view(workloads_using(&inner.d, &r.name))).collect()
    }
}
