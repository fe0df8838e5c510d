//! A workload's revisions: `rollout history` and `rollout undo`.

use anyhow::Context;
use bytes::Bytes;
use edge_api::model::Revision;
use edge_api::time::{age, now_ms};
use hyper::Method;

use crate::client::Hub;
use crate::output::{Format, table, yaml};

#[derive(clap::Subcommand)]
pub enum RolloutAction {
    /// One line per kept revision, starting with its number: when, by whom, what changed.
    History { name: String },
    /// Return a workload to an earlier revision (by default the one before
    /// the current), as a new revision.
    Undo {
        name: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

fn path(name: &str, what: &str) -> anyhow::Result<String> {
    edge_api::names::check_name(name).map_err(anyhow::Error::msg).with_context(|| format!("workload {name:?}"))?;
    Ok(format!("/v1/workloads/{name}/{what}"))
}

pub async fn rollout(hub: &Hub, action: RolloutAction, out: Format) -> anyhow::Result<()> {
    match action {
        RolloutAction::History { name } => {
            let revs: Vec<Revision> = hub.get(&path(&name, "revisions")?).await?;
            match out {
                Format::Json => println!("{}", serde_json::to_string_pretty(&revs)?),
                Format::Yaml => print!("{}", yaml(&serde_json::to_value(&revs)?)),
                _ => {
                    let now = now_ms();
                    let rows: Vec<Vec<String>> = revs
                        .iter()
                        .map(|r| {
                            vec![
                                r.revision.to_string(),
                                age(now.saturating_sub(r.created_ms)),
                                r.by.clone(),
                                r.change.clone(),
                            ]
                        })
                        .collect();
                    let text = table(&["REVISION", "AGE", "BY", "CHANGE"], &rows);
                    // Every line starts with a revision number (no header), for scripts.
                    for line in text.lines().skip(1) {
                        println!("{line}");
                    }
                }
            }
        }
        RolloutAction::Undo { name, to_revision } => {
            let body = Bytes::from(serde_json::to_vec(&serde_json::json!({ "to_revision": to_revision }))?);
            let v: serde_json::Value =
                hub.json(Method::POST, &path(&name, "undo")?, Some(("application/json", body))).await?;
            match out {
                Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Format::Yaml => print!("{}", yaml(&v)),
                _ => {
                    let revision = v["revision"].as_u64().unwrap_or_default();
                    if v["result"] == "unchanged" {
                        println!("workload/{name} unchanged: it runs the spec of revision {revision} already");
                    } else {
                        let generation = &v["workload"]["metadata"]["generation"];
                        println!("workload/{name} rolled back to revision {revision} (now revision {generation})");
                    }
                }
            }
        }
    }
    Ok(())
}
