//! `edgectl describe`: one workload or node in detail, kubectl-style.

use edge_api::model::{NodeView, Runtime, WorkloadView};
use edge_api::time::now_ms;

use crate::output::{clean, table};
use crate::{labels, when};

/// Env as `K=v,P=<secret db/password>`: values of secrets are never in a workload.
fn env(e: &edge_api::model::Env) -> String {
    if e.is_empty() {
        return "<none>".into();
    }
    e.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn mounts(m: &[edge_api::model::SecretMount]) -> String {
    if m.is_empty() {
        return "<none>".into();
    }
    m.iter().map(|m| format!("{} at {} (read-only)", m.secret, m.path)).collect::<Vec<_>>().join(", ")
}

pub fn describe_workload(v: &WorkloadView) -> String {
    let w = &v.workload;
    let mut s = String::new();
    let mut field = |k: &str, val: String| s.push_str(&format!("{:<14}{}\n", format!("{k}:"), clean(&val)));
    field("Name", w.metadata.name.clone());
    field("Labels", labels(&w.metadata.labels));
    field("UID", w.metadata.uid.clone());
    field("Generation", w.metadata.generation.to_string());
    field("Created", when(Some(w.metadata.created_ms)));
    let list = |v: &[String]| if v.is_empty() { "<none>".to_string() } else { v.join(" ") };
    match &w.spec.runtime {
        Runtime::Wasm(wasm) => {
            let kind = if w.spec.http.is_some() { "wasi:http/proxy" } else { "wasi:cli/command" };
            field("Runtime", format!("wasm ({kind})"));
            field(
                "Component",
                match &wasm.source {
                    Some(src) => format!("{} (from {src})", wasm.component),
                    None => wasm.component.to_string(),
                },
            );
            field("Args", list(&wasm.args));
            field("Env", env(&wasm.env));
            field("Secrets", mounts(&wasm.secrets));
        }
        Runtime::Container(c) => {
            field("Runtime", "oci (container)".into());
            field(
                "Image",
                match &c.source {
                    Some(src) if *src != c.image.to_string() => format!("{} (from {src})", c.image),
                    _ => c.image.to_string(),
                },
            );
            let platforms: Vec<String> = c.platforms.iter().map(|p| p.platform.to_string()).collect();
            field("Platforms", platforms.join(", "));
            field("Command", list(&c.command));
            field("Args", list(&c.args));
            field("Env", env(&c.env));
            field("Secrets", mounts(&c.secrets));
            field("User", c.user.clone().unwrap_or_else(|| "the image's (never root unless asked)".into()));
            let network = format!("{:?}", c.network).to_lowercase();
            field(
                "Network",
                match c.port {
                    Some(p) => format!("{network}, serving on port {p}"),
                    None => network,
                },
            );
        }
    }
    field("Restart", format!("{:?}", w.spec.restart).to_lowercase().replace("onfailure", "on-failure"));
    field("Resources", format!("memory {}, cpu {}", w.spec.resources.memory, w.spec.resources.cpu));
    field("Replicas", w.spec.replicas.to_string());
    field("Placement", placement(&w.spec.placement));
    field("Phase", v.status.phase.to_string());
    if let Some(r) = &v.status.reason {
        field("Reason", r.to_string());
    }
    if let Some(m) = &v.status.message {
        field("Message", m.clone());
    }
    s.push_str("Replicas:\n");
    let rows: Vec<Vec<String>> = v
        .status
        .replicas
        .iter()
        .map(|r| {
            vec![
                r.replica.to_string(),
                r.node.clone().unwrap_or_else(|| "<none>".into()),
                r.phase.to_string(),
                r.restarts.to_string(),
                r.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                r.observed_generation.to_string(),
                match r.ready {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                r.reason.as_ref().map_or_else(|| "-".into(), |r| r.to_string()),
                [r.probe.as_deref(), r.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ")
                    .replace('\n', " "),
            ]
        })
        .collect();
    let heads = ["REPLICA", "NODE", "PHASE", "RESTARTS", "EXIT", "GEN", "READY", "REASON", "MESSAGE"];
    for line in table(&heads, &rows).lines() {
        s.push_str(&format!("  {line}\n"));
    }
    if !v.compiled.is_empty() {
        s.push_str("Compiled by the hub:\n");
        let rows: Vec<Vec<String>> = v
            .compiled
            .iter()
            .map(|c| {
                vec![
                    c.target.clone(),
                    c.state.clone(),
                    c.compile_ms.map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                    c.size.map_or_else(|| "-".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64)),
                    c.error.clone().unwrap_or_default().replace('\n', " "),
                ]
            })
            .collect();
        for line in table(&["TARGET", "STATE", "TIME", "SIZE", "ERROR"], &rows).lines() {
            s.push_str(&format!("  {line}\n"));
        }
    }
    s.push_str(&events_section(&v.events));
    s
}

/// `Events:` and a table of them, as `kubectl describe` ends.
fn events_section(events: &[edge_api::model::Event]) -> String {
    if events.is_empty() {
        return "Events:\n  <none>\n".into();
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                crate::output::event_age(e, now),
                if e.warning { "Warning".into() } else { "Normal".into() },
                e.reason.clone(),
                e.message.replace('\n', " "),
            ]
        })
        .collect();
    let mut s = "Events:\n".to_string();
    for line in table(&["AGE", "TYPE", "REASON", "MESSAGE"], &rows).lines() {
        s.push_str(&format!("  {line}\n"));
    }
    s
}

/// `[spec.placement]` in one line: `any node`, or its parts.
fn placement(p: &edge_api::model::Placement) -> String {
    if p.is_empty() {
        return "any node".into();
    }
    let mut parts = vec![format!("arch {}", if p.arch.is_empty() { "any".into() } else { p.arch.join(",") })];
    if !p.node_selector.is_empty() {
        parts.push(format!("node_selector {}", p.node_selector));
    }
    if let Some(k) = &p.spread {
        parts.push(format!("spread over {k}"));
    }
    if !p.anti_affinity.is_empty() {
        parts.push(format!("apart from {}", p.anti_affinity.join(",")));
    }
    for t in &p.tolerations {
        let what = match (t.key.as_str(), t.operator) {
            ("", _) => "every taint".to_string(),
            (k, edge_api::placement::TolerationOp::Exists) => k.to_string(),
            (k, _) => format!("{k}={}", t.value),
        };
        parts.push(format!("tolerates {what}{}", t.effect.map(|e| format!(":{e}")).unwrap_or_default()));
    }
    parts.join("; ")
}

pub fn describe_node(n: &NodeView) -> String {
    let mut s = String::new();
    let mut field = |k: &str, val: String| s.push_str(&format!("{:<22}{}\n", format!("{k}:"), clean(&val)));
    field("Name", n.name.clone());
    field(
        "Status",
        match &n.reason {
            Some(r) => format!("{} ({r})", n.state),
            None => n.state.to_string(),
        },
    );
    field("Labels", labels(&n.facts.labels));
    field("Admin labels", labels(&n.admin_labels));
    let taints: Vec<String> = n.taints.iter().map(ToString::to_string).collect();
    field("Taints", if taints.is_empty() { "<none>".into() } else { taints.join(", ") });
    field("Unschedulable", if n.unschedulable { "true (cordoned)".into() } else { "false".into() });
    if let Some(c) = n.capacity {
        field("Capacity", format!("memory {}, cpu {} (approved; reports above are capped)", c.memory.human(), c.cpu));
    }
    if let Some(t) = &n.enrolled_with {
        field("Enrolled with", format!("token {t}"));
    }
    field("Architecture", n.facts.arch.clone());
    field("OS", format!("{} {}", n.facts.os, n.facts.os_release).trim().to_string());
    field("Kernel", n.facts.kernel.clone());
    field("Agent version", n.facts.agent_version.clone());
    for r in &n.facts.runtimes {
        let mut how = format!("{} ({}, {}", r.name, r.version, r.mode);
        if r.precompiled_only {
            how.push_str(", runs only hub-compiled code");
        }
        if !r.fingerprint.is_empty() {
            how.push_str(&format!(", engine {}", r.fingerprint));
        }
        field("Runtime", how + ")");
    }
    field("Key fingerprint", n.key_fingerprint.clone());
    field("Joined", when(Some(n.joined_ms)));
    field("Last seen", when(Some(n.last_seen_ms)));
    field(
        "CPU",
        format!("{} allocated of {} allocatable ({} cores)", n.allocated.cpu, n.facts.allocatable_cpu, n.facts.cpus),
    );
    field(
        "Memory",
        format!(
            "{} allocated of {} allocatable ({} total)",
            n.allocated.memory.human(),
            n.facts.allocatable_memory.human(),
            n.facts.memory.human()
        ),
    );
    field("Desired generation", n.desired_generation.to_string());
    field("Observed generation", n.observed_generation.to_string());
    field("Workloads", if n.workloads.is_empty() { "<none>".into() } else { n.workloads.join(", ") });
    if n.corrupt_files > 0 {
        field(
            "Corrupt files",
            format!("{} failed their check on disk and were replaced (see the agent's log)", n.corrupt_files),
        );
    }
    if !n.warnings.is_empty() {
        s.push_str("Warnings (what the hub did not believe):\n");
        for w in &n.warnings {
            s.push_str(&format!("  {}\n", clean(w)));
        }
    }
    s.push_str(&events_section(&n.events));
    s
}
