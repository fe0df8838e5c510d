//! Revisions: a workload's spec at each generation, kept (the last N) so
//! it can be looked back at and returned to. Pure functions over
//! [`Durable`]; `Hub` calls them inside its one mutation path.

use std::sync::Arc;

use edge_api::model::{Revision, Workload, WorkloadSpec};

use crate::controller::Durable;

/// A spec without where its component came from (for people; it restarts nothing).
pub fn without_source(spec: &WorkloadSpec) -> WorkloadSpec {
    let mut s = spec.clone();
    match &mut s.runtime {
        edge_api::model::Runtime::Wasm(w) => w.source = None,
        edge_api::model::Runtime::Container(c) => c.source = None,
    }
    s
}

/// What a replica runs: the spec without how many replicas there are,
/// where they go, how updates roll out and where the component came from.
/// Replicas whose revision has the workload's template are up to date.
pub fn template(spec: &WorkloadSpec) -> WorkloadSpec {
    let mut s = without_source(spec);
    s.replicas = edge_api::model::Replicas::Count(1);
    s.placement = Default::default();
    s.rollout = edge_api::model::RolloutSpec::standard();
    s
}

/// A workload's kept revisions, oldest first.
pub fn revisions_of<'a>(d: &'a Durable, name: &'a str) -> impl Iterator<Item = &'a Arc<Revision>> + 'a {
    d.revisions.range((name.to_string(), 0)..=(name.to_string(), u64::MAX)).map(|(_, r)| r)
}

/// Keeps `w`'s spec as the revision of its generation, and only the last
/// `keep` revisions of it, besides those a replica runs or a rollout may
/// return to.
pub fn record_revision(d: &mut Durable, w: &Workload, by: &str, change: String, now: u64, keep: usize) {
    let name = &w.metadata.name;
    let rev =
        Revision { revision: w.metadata.generation, created_ms: now, by: by.to_string(), change, spec: w.spec.clone() };
    d.revisions.insert((name.clone(), rev.revision), Arc::new(rev));
    let mut in_use: std::collections::BTreeSet<u64> =
        d.placements.range((name.clone(), 0)..=(name.clone(), u32::MAX)).map(|(_, p)| p.revision).collect();
    if let Some(r) = d.rollouts.get(name) {
        in_use.extend([r.from, r.revision]);
    }
    let kept: Vec<u64> = revisions_of(d, name).map(|r| r.revision).collect();
    for old in &kept[..kept.len().saturating_sub(keep)] {
        if !in_use.contains(old) {
            d.revisions.remove(&(name.clone(), *old));
        }
    }
}

/// What changed between two specs, by field path (two levels deep):
/// `changed replicas, wasm.env`.
pub fn changed_fields(old: &WorkloadSpec, new: &WorkloadSpec) -> String {
    let (a, b) = (serde_json::to_value(without_source(old)), serde_json::to_value(without_source(new)));
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
        return "changed".into();
    };
    let mut fields = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (x, y) if x == y => {}
            (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y))) => {
                let inner: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                fields.extend(inner.into_iter().filter(|i| x.get(*i) != y.get(*i)).map(|i| format!("{k}.{i}")));
            }
            _ => fields.push(k.clone()),
        }
    }
    format!("changed {}", fields.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_names_the_fields_it_touched() {
        let toml = format!(
            "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"w\"\n[spec.wasm]\ncomponent = \"{}\"\n",
            edge_api::digest::Digest::of(b"c")
        );
        let w = edge_api::manifest::parse_toml(&toml, edge_api::manifest::Origin::Api).unwrap();
        let mut changed = w.spec.clone();
        changed.replicas = edge_api::model::Replicas::Count(3);
        if let edge_api::model::Runtime::Wasm(s) = &mut changed.runtime {
            s.args.push("-v".into());
        }
        assert_eq!(changed_fields(&w.spec, &changed), "changed replicas, wasm.args");
        let mut d = Durable::default();
        for g in 1..=5 {
            let mut v = w.clone();
            v.metadata.generation = g;
            record_revision(&mut d, &v, "me", format!("g{g}"), g, 2);
        }
        let kept: Vec<u64> = revisions_of(&d, "w").map(|r| r.revision).collect();
        assert_eq!(kept, [4, 5]);
    }
}
