//! A workload's revisions and rollouts: `rollout history|undo|status|pause|resume`.

use anyhow::Context;
use bytes::Bytes;
use edge_api::model::{Revision, RolloutPhase, RolloutView};
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
    /// Follow the rollout of the current revision until it is done. Exits 0
    /// when it rolled out, non-zero when it failed or was rolled back.
    Status {
        name: String,
        /// Keep following until it ends (--watch=false: print where it is and exit).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        watch: bool,
        /// Give up after this long (e.g. 5m; exits non-zero).
        #[arg(long, value_parser = edge_api::time::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Start no new wave of the rollout in progress.
    Pause { name: String },
    /// Go on with a paused rollout.
    Resume { name: String },
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
        RolloutAction::Status { name, watch, timeout } => return status(hub, &name, watch, timeout, out).await,
        RolloutAction::Pause { name } => {
            let v: RolloutView = hub.json(Method::POST, &path(&name, "rollout/pause")?, None).await?;
            println!("workload/{name} rollout of revision {} paused", v.revision);
        }
        RolloutAction::Resume { name } => {
            let v: RolloutView = hub.json(Method::POST, &path(&name, "rollout/resume")?, None).await?;
            println!("workload/{name} rollout of revision {} resumed", v.revision);
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

/// One line on where a rollout is.
fn progress(v: &RolloutView) -> String {
    let offline = if v.pending_offline.is_empty() {
        String::new()
    } else {
        format!("; pending (offline): {}", v.pending_offline.join(", "))
    };
    match v.phase {
        RolloutPhase::Progressing | RolloutPhase::Paused => format!(
            "Waiting for the rollout of revision {} to finish{}: wave {}, {} of {} updated replicas are ready{offline}",
            v.revision,
            if v.phase == RolloutPhase::Paused { " (paused: edgectl rollout resume)" } else { "" },
            v.wave,
            v.ready,
            v.updated.max(v.total),
        ),
        _ => format!("workload/{} {}", v.workload, v.message),
    }
}

async fn status(
    hub: &Hub,
    name: &str,
    watch: bool,
    timeout: Option<std::time::Duration>,
    out: Format,
) -> anyhow::Result<()> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last = String::new();
    loop {
        let v: RolloutView = hub.get(&path(name, "rollout")?).await?;
        match out {
            Format::Json => println!("{}", serde_json::to_string(&v)?),
            Format::Yaml => print!("{}", yaml(&serde_json::to_value(&v)?)),
            _ => {
                let line = progress(&v);
                if line != last {
                    println!("{line}");
                    last = line;
                }
            }
        }
        match v.phase {
            RolloutPhase::Complete => return Ok(()),
            RolloutPhase::Failed => anyhow::bail!("the rollout of revision {} failed", v.revision),
            RolloutPhase::RolledBack => {
                anyhow::bail!("the rollout of revision {} failed and was rolled back", v.revision)
            }
            _ if !watch => return Ok(()),
            _ => {}
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            anyhow::bail!("timed out waiting for the rollout of revision {} of {name}", v.revision);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
