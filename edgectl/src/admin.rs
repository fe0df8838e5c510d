//! Administration: tokens, node approval and admin labels, events and the
//! audit log.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use edge_api::model::{AuditEntry, Labels, ListedEvent, NodeView, Resources, Role, TokenInfo, TokenRequest};
use edge_api::placement::Selector;
use edge_api::quantity::{Cpu, Memory};
use edge_api::time::{age, now_ms};
use hyper::Method;

use crate::client::Hub;
use crate::output::{Format, clean, table, yaml};

#[derive(clap::Subcommand)]
pub enum TokenAction {
    /// Make a join token for devices (default) or, with --role, an API token.
    /// The token is printed once; the hub keeps only its hash.
    Create {
        /// An API token with this role: viewer, operator or admin.
        #[arg(long)]
        role: Option<String>,
        /// How long it is valid (e.g. 24h); default: until revoked.
        #[arg(long, value_parser = edge_api::time::parse_duration)]
        ttl: Option<Duration>,
        /// How many nodes a join token may enrol.
        #[arg(long)]
        uses: Option<u32>,
        /// Labels every node enrolled with it gets, k=v,... (admin.edge/ labels allowed).
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// Nodes enrolled with it wait for `edgectl approve node`.
        #[arg(long)]
        require_approval: bool,
        /// The most memory a node enrolled with it may offer, whatever it reports.
        #[arg(long)]
        max_memory: Option<Memory>,
        /// The most CPU a node enrolled with it may offer, whatever it reports.
        #[arg(long)]
        max_cpu: Option<Cpu>,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke tokens at once: no more API calls, enrolments or bootstrap logins with them.
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn parse_labels(items: &[String]) -> anyhow::Result<Labels> {
    let mut out = Labels::new();
    for l in items {
        let (k, v) = l.split_once('=').with_context(|| format!("label {l:?} is not key=value"))?;
        edge_api::names::check_label_key(k).map_err(anyhow::Error::msg)?;
        edge_api::names::check_label_value(v).map_err(anyhow::Error::msg)?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn print_or<T: serde::Serialize>(v: &T, out: Format, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match out {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", yaml(&serde_json::to_value(v)?)),
        _ => print!("{}", table()),
    }
    Ok(())
}

fn expiry(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(e) if e <= now_ms() => "expired".into(),
        Some(e) => format!("in {}", age(e - now_ms())),
    }
}

pub fn tokens_table(tokens: &[TokenInfo]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.kind.to_string(),
                t.role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                match t.max_uses {
                    Some(m) => format!("{}/{m}", t.uses),
                    None => t.uses.to_string(),
                },
                expiry(t.expires_ms),
                if t.revoked_ms.is_some() { "revoked".into() } else { "active".into() },
                crate::labels(&t.labels),
                t.description.clone(),
            ]
        })
        .collect();
    table(&["ID", "KIND", "ROLE", "USES", "EXPIRES", "STATE", "LABELS", "DESCRIPTION"], &rows)
}

pub async fn token(hub: &Hub, action: TokenAction, out: Format) -> anyhow::Result<()> {
    match action {
        TokenAction::Create { role, ttl, uses, labels, require_approval, max_memory, max_cpu, description } => {
            let role = match role.as_deref() {
                None => None,
                Some(r) => Some(
                    Role::parse(r)
                        .with_context(|| format!("unknown role {r:?} (expected one of: {})", Role::NAMES.join(", ")))?,
                ),
            };
            let capacity = match (max_memory, max_cpu) {
                (None, None) => None,
                (m, c) => Some(Resources {
                    memory: m.unwrap_or(edge_api::model::NodeFacts::MAX_MEMORY),
                    cpu: c.unwrap_or(Cpu(u64::from(edge_api::model::NodeFacts::MAX_CPUS) * 1000)),
                }),
            };
            let req = TokenRequest {
                role,
                description: description.unwrap_or_default(),
                ttl: ttl.map(|d| edge_api::model::Millis(d.as_millis() as u64)),
                max_uses: uses,
                labels: parse_labels(&labels)?,
                require_approval,
                capacity,
            };
            let body = Bytes::from(serde_json::to_vec(&req)?);
            let v: serde_json::Value = hub.json(Method::POST, "/v1/tokens", Some(("application/json", body))).await?;
            match out {
                Format::Json | Format::Yaml => print_or(&v, out, String::new)?,
                _ => {
                    println!("{}", v["token"].as_str().unwrap_or_default());
                    eprintln!(
                        "token {} created; this is the only time its secret is shown",
                        v["info"]["id"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        TokenAction::List => {
            let tokens: Vec<TokenInfo> = hub.get("/v1/tokens").await?;
            print_or(&tokens, out, || tokens_table(&tokens))?;
        }
        TokenAction::Revoke { ids } => {
            let mut failed = 0;
            for id in ids {
                match hub.json::<TokenInfo>(Method::DELETE, &format!("/v1/tokens/{id}"), None).await {
                    Ok(_) => println!("token/{id} revoked"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

pub async fn approve(hub: &Hub, node: &str, memory: Option<Memory>, cpu: Option<Cpu>) -> anyhow::Result<NodeView> {
    let body = match (memory, cpu) {
        (None, None) => serde_json::json!({}),
        (m, c) => {
            let current: NodeView = hub.get(&format!("/v1/nodes/{node}")).await?;
            let cap = current
                .capacity
                .unwrap_or(Resources { memory: current.facts.allocatable_memory, cpu: current.facts.allocatable_cpu });
            serde_json::json!({"capacity": Resources { memory: m.unwrap_or(cap.memory), cpu: c.unwrap_or(cap.cpu) }})
        }
    };
    let body = Bytes::from(serde_json::to_vec(&body)?);
    Ok(hub.json(Method::POST, &format!("/v1/nodes/{node}/approve"), Some(("application/json", body))).await?)
}

/// `k=v` sets a label, `k-` removes it (as kubectl label does).
pub fn label_changes(items: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, Option<String>>> {
    if items.is_empty() {
        bail!("give labels to set (key=value) or remove (key-)");
    }
    let mut changes = std::collections::BTreeMap::new();
    for l in items {
        match l.split_once('=') {
            Some((k, v)) => changes.insert(k.to_string(), Some(v.to_string())),
            None => match l.strip_suffix('-') {
                Some(k) => changes.insert(k.to_string(), None),
                None => bail!("label {l:?} is neither key=value nor key-"),
            },
        };
    }
    Ok(changes)
}

pub async fn label(hub: &Hub, node: &str, items: &[String]) -> anyhow::Result<NodeView> {
    let body = Bytes::from(serde_json::to_vec(&label_changes(items)?)?);
    Ok(hub.json(Method::PATCH, &format!("/v1/nodes/{node}/labels"), Some(("application/json", body))).await?)
}

pub async fn taint(hub: &Hub, node: &str, changes: &[String]) -> anyhow::Result<NodeView> {
    let body = Bytes::from(serde_json::to_vec(changes)?);
    Ok(hub.json(Method::PATCH, &format!("/v1/nodes/{node}/taints"), Some(("application/json", body))).await?)
}

pub async fn cordon(hub: &Hub, node: &str, cordon: bool) -> anyhow::Result<NodeView> {
    let verb = if cordon { "cordon" } else { "uncordon" };
    Ok(hub.json(Method::POST, &format!("/v1/nodes/{node}/{verb}"), None).await?)
}

pub async fn drain(hub: &Hub, node: &str) -> anyhow::Result<edge_api::model::Drained> {
    Ok(hub.json(Method::POST, &format!("/v1/nodes/{node}/drain"), None).await?)
}

/// `%`-encodes what is not unreserved in a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every node `selector` matches, fetched `chunk` at a time (0: at once);
/// the hub filters.
pub async fn list_nodes(hub: &Hub, selector: Option<&Selector>, chunk: usize) -> anyhow::Result<Vec<NodeView>> {
    let mut query = Vec::new();
    if let Some(s) = selector {
        query.push(format!("labelSelector={}", encode(&s.to_string())));
    }
    if chunk > 0 {
        query.push(format!("limit={chunk}"));
    }
    let mut all = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut q = query.clone();
        if let Some(n) = &next {
            q.push(format!("continue={}", encode(n)));
        }
        let (page, more): (Vec<NodeView>, _) = hub.get_page(&format!("/v1/nodes?{}", q.join("&"))).await?;
        all.extend(page);
        match more {
            Some(n) if Some(&n) != next.as_ref() => next = Some(n),
            _ => return Ok(all),
        }
    }
}

/// `get nodes --watch`: the nodes, then each change to one (its state,
/// labels, enrolment, removal) as it happens.
pub async fn watch_nodes(hub: &Hub, selector: Option<&Selector>, chunk: usize, out: Format) -> anyhow::Result<()> {
    // Where the changes start, taken before the list: none falls between.
    let newest: Vec<ListedEvent> = hub.get("/v1/events?wait_ms=0&for=node").await?;
    let mut cursor = newest.last().map_or(0, |l| l.seq);
    let nodes = list_nodes(hub, selector, chunk).await?;
    let json = matches!(out, Format::Json | Format::Yaml);
    let width = nodes.iter().map(|n| n.name.len()).max().unwrap_or(0).max(16);
    let row = |cells: &[String]| {
        let cells: Vec<String> = cells.iter().map(|c| clean(c).into_owned()).collect();
        format!("{:<width$} {:<28} {:<7} {:<10} {:<9} {}", cells[0], cells[1], cells[2], cells[3], cells[4], cells[5])
    };
    if !json {
        println!("{}", row(&crate::node_headers(false).iter().map(|h| h.to_string()).collect::<Vec<_>>()));
    }
    let print = |n: &NodeView| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(n)?);
        } else {
            println!("{}", row(&crate::node_row(n, false)));
        }
        Ok(())
    };
    for n in &nodes {
        print(n)?;
    }
    loop {
        let events: Vec<ListedEvent> = hub.get(&format!("/v1/events?wait_ms=30000&for=node&after={cursor}")).await?;
        let mut changed: Vec<&str> = Vec::new();
        for l in &events {
            if let Some(name) = l.object.strip_prefix("node/")
                && !changed.contains(&name)
            {
                changed.push(name);
            }
        }
        for name in changed {
            match hub.get::<NodeView>(&format!("/v1/nodes/{name}")).await {
                Ok(n) if selector.is_none_or(|s| s.matches(&n.facts.labels)) => print(&n)?,
                Ok(_) => {}
                Err(e) if e.status() == Some(404) && !json => {
                    let gone = [name.to_string(), "Deleted".into(), "-".into(), "-".into(), "-".into(), "-".into()];
                    println!("{}", row(&gone));
                }
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(l) = events.last() {
            cursor = l.seq;
        }
    }
}

pub async fn events(hub: &Hub, audit: bool, object: Option<&str>, watch: bool, out: Format) -> anyhow::Result<()> {
    let now = now_ms();
    if audit && (watch || object.is_some()) {
        bail!("--audit lists every change; --for and --watch go with events");
    }
    if audit {
        let entries: Vec<AuditEntry> = hub.get("/v1/audit").await?;
        return print_or(&entries, out, || {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        edge_api::time::rfc3339(e.ts_ms),
                        e.who.clone(),
                        e.role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                        e.from.clone(),
                        e.action.clone(),
                        e.status.to_string(),
                    ]
                })
                .collect();
            table(&["TIME", "WHO", "ROLE", "FROM", "ACTION", "STATUS"], &rows)
        });
    }
    let filter = object.map(|o| format!("&for={o}")).unwrap_or_default();
    let mut events: Vec<ListedEvent> = hub.get(&format!("/v1/events?wait_ms=0{filter}")).await?;
    if !watch {
        return print_or(&events, out, || {
            table(&EVENT_HEADERS, &events.iter().map(|l| event_row(l, now)).collect::<Vec<_>>())
        });
    }
    // Watch: print as they come, with fixed column widths.
    let (mut first, mut cursor) = (true, String::new());
    loop {
        for l in &events {
            match out {
                Format::Json | Format::Yaml => println!("{}", serde_json::to_string(l)?),
                _ => {
                    if first {
                        println!("{}", watch_row(&EVENT_HEADERS.map(String::from)));
                        first = false;
                    }
                    println!("{}", watch_row(&event_row(l, now_ms())));
                }
            }
        }
        if first && !matches!(out, Format::Json | Format::Yaml) {
            println!("{}", watch_row(&EVENT_HEADERS.map(String::from)));
            first = false;
        }
        if let Some(l) = events.last() {
            cursor = format!("&after={}", l.seq);
        }
        events = hub.get(&format!("/v1/events?wait_ms=30000{filter}{cursor}")).await?;
    }
}

const EVENT_HEADERS: [&str; 5] = ["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"];

fn event_row(l: &ListedEvent, now: u64) -> Vec<String> {
    vec![
        crate::output::event_age(&l.event, now),
        if l.event.warning { "Warning".into() } else { "Normal".into() },
        l.event.reason.clone(),
        l.object.clone(),
        l.event.message.clone(),
    ]
}

fn watch_row(r: &[String]) -> String {
    let cells: Vec<String> = r.iter().map(|c| clean(&c.replace(['\t', '\n'], " ")).into_owned()).collect();
    format!("{:<8} {:<8} {:<20} {:<28} {}", cells[0], cells[1], cells[2], cells[3], cells[4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_changes_follow_kubectl() {
        let c = label_changes(&["admin.edge/site=plant-1".into(), "old-".into()]).unwrap();
        assert_eq!(c.get("admin.edge/site"), Some(&Some("plant-1".to_string())));
        assert_eq!(c.get("old"), Some(&None));
        assert!(label_changes(&["nope".into()]).is_err());
        assert!(label_changes(&[]).is_err());
        assert!(parse_labels(&["a=b".into(), "bad key=c".into()]).is_err());
    }
}
