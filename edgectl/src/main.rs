//! edgectl: the command line for an edge hub, in the manner of kubectl.

mod admin;
mod apply;
mod client;
mod config;
mod describe;
mod output;
mod rollout;
mod secret;
mod up;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use edge_api::manifest::Document;
use edge_api::model::{NodeView, Runtime, SecretView, WorkloadView};
use edge_api::time::{age, now_ms, rfc3339};
use hyper::Method;

use crate::client::Hub;
use crate::describe::{describe_node, describe_workload};
use crate::output::{Format, clean, table, yaml};

/// Control an edge hub: deploy WebAssembly workloads onto your devices.
#[derive(Parser)]
#[command(name = "edgectl", version)]
struct Cli {
    /// The hub's API URL (default: from the config file, else http://127.0.0.1:7443).
    #[arg(long, global = true, env = "EDGE_HUB")]
    hub: Option<String>,
    /// An API token (prefer --token-file or the config file: a command line is visible to every user).
    #[arg(long, global = true, env = "EDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding an API token (the hub writes an admin token to DATA_DIR/admin.token).
    #[arg(long, global = true, env = "EDGE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) the hub's TLS certificate is signed by (the
    /// hub's own: DATA_DIR/tls/ca.crt, or `edge-hub token ca`).
    #[arg(long, global = true, env = "EDGE_CA")]
    ca: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update workloads and secrets from manifests (TOML or JSON; a directory applies all in it; - reads stdin).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Wait until every replica runs (or ran) the new generation.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "60s", value_parser = edge_api::time::parse_duration)]
        timeout: Duration,
    },
    /// List nodes, workloads, secrets, tokens or events: `get nodes`, `get workload/NAME`, `get events --audit`.
    Get {
        kind: String,
        name: Option<String>,
        /// With `get events`: the audit log of changes (who, what, when, from where).
        #[arg(long)]
        audit: bool,
        /// With `get events`: only those about one object (workload/NAME or node/NAME).
        #[arg(long = "for", value_name = "KIND/NAME")]
        for_object: Option<String>,
        /// With `get events` or `get nodes`: keep printing changes as they happen.
        #[arg(short = 'w', long)]
        watch: bool,
        /// With `get nodes`: only nodes whose labels match (kubectl's syntax:
        /// `role=gw,site in (a,b),!legacy`); the hub filters.
        #[arg(short = 'l', long = "selector")]
        selector: Option<String>,
        /// With `get nodes`: fetch the list this many at a time (0: at once).
        #[arg(long, default_value_t = 500)]
        chunk_size: usize,
    },
    /// Bootstrap (join) and API tokens: `token create`, `token list`, `token revoke ID...`.
    Token {
        #[command(subcommand)]
        action: admin::TokenAction,
    },
    /// Let a node that waits for approval in (and set what it may offer): `approve node NAME`.
    Approve {
        kind: String,
        name: Option<String>,
        /// The most memory the node may offer workloads, whatever it reports.
        #[arg(long)]
        memory: Option<edge_api::quantity::Memory>,
        /// The most CPU the node may offer workloads, whatever it reports.
        #[arg(long)]
        cpu: Option<edge_api::quantity::Cpu>,
    },
    /// Set (key=value) or remove (key-) a node's admin labels; only these may
    /// use the admin.edge/ prefix: `label node NAME admin.edge/site=plant-1`.
    Label {
        kind: String,
        name: String,
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Set (key=value:Effect) or remove (key[:Effect]-) a node's taints; effects:
    /// NoSchedule, PreferNoSchedule, NoExecute: `taint node NAME dedicated=gw:NoSchedule`.
    Taint {
        kind: String,
        name: String,
        #[arg(required = true, allow_hyphen_values = true)]
        taints: Vec<String>,
    },
    /// Mark a node unschedulable: no new replicas are placed on it (those it has stay).
    Cordon { node: String },
    /// Let the scheduler place replicas on a cordoned node again.
    Uncordon { node: String },
    /// Cordon a node and move its replicas to other nodes (per-node workloads stay).
    Drain { node: String },
    /// Show one node, workload or secret in detail (never a secret's values).
    Describe { kind: String, name: Option<String> },
    /// Create a secret from values or files: `create secret NAME --from-literal KEY=VALUE --from-file [KEY=]PATH`
    /// (values stay out of manifests and shell history with --from-file).
    Create {
        kind: String,
        name: String,
        /// KEY=VALUE; repeatable.
        #[arg(long = "from-literal")]
        literals: Vec<String>,
        /// [KEY=]PATH: the file's contents (UTF-8), under its file name unless KEY is given; repeatable.
        #[arg(long = "from-file")]
        files: Vec<String>,
    },
    /// Delete workloads, secrets or nodes by name (`delete workload NAME...`) or by manifest (`-f`).
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
    },
    /// Print a workload's log (stdout and stderr of its component).
    Logs {
        workload: String,
        /// Which replica.
        #[arg(short = 'r', long, default_value_t = 0)]
        replica: u32,
        /// Keep printing new output.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u64>,
        /// Prefix each line with its time.
        #[arg(long)]
        timestamps: bool,
    },
    /// Wait for a workload condition: Running, Succeeded, Failed, Finished, Ready, Started, Scheduled or Deleted.
    Wait {
        kind: String,
        name: Option<String>,
        #[arg(long = "for")]
        condition: String,
        #[arg(long, default_value = "60s", value_parser = edge_api::time::parse_duration)]
        timeout: Duration,
    },
    /// Start a hub and a local agent on this machine and deploy the hello example.
    Up {
        /// Where hub and agent keep their data (default: ~/.local/share/edge).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        api_addr: Option<std::net::SocketAddr>,
        #[arg(long)]
        mqtt_addr: Option<std::net::SocketAddr>,
        /// Where the local agent's HTTP proxy listens (default 127.0.0.1:8080, or a free port).
        #[arg(long)]
        proxy_addr: Option<std::net::SocketAddr>,
        /// The local agent's node name.
        #[arg(long, default_value = "local")]
        name: String,
        /// Do not deploy the hello example.
        #[arg(long)]
        no_example: bool,
    },
    /// Publish a component to an OCI registry, as wkg and wasm-tools lay it out.
    Push {
        /// The component file.
        file: PathBuf,
        /// Where: oci://registry/repository:tag.
        reference: String,
        /// Use plain HTTP for this registry (loopback registries always do).
        #[arg(long)]
        insecure: bool,
    },
    /// A workload's revisions and rollouts: `rollout history|undo|status|pause|resume NAME`.
    Rollout {
        #[command(subcommand)]
        action: rollout::RolloutAction,
    },
    /// Print the versions of edgectl and of the hub.
    Version,
    /// Where edgectl finds its hub: `config set-hub URL [--ca FILE] [--token-file FILE]`.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Point edgectl at a hub, pinning the CA its certificate is signed by
    /// (`--ca`: DATA_DIR/tls/ca.crt on the hub, or `edge-hub token ca`) and
    /// keeping the token of `--token-file`.
    SetHub { url: String },
    /// Print the configuration in use (never the token).
    View,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Node,
    Workload,
    Token,
    Event,
    Secret,
}

/// Accepts kubectl's spellings: `nodes`, `node`, `no`; `workloads`, `workload`, `wl`; and `kind/name`.
fn parse_target(kind: &str, name: Option<String>) -> anyhow::Result<(Kind, Option<String>)> {
    let (k, inline) = match kind.split_once('/') {
        Some((k, n)) => (k, Some(n.to_string())),
        None => (kind, None),
    };
    let kind = match k {
        "node" | "nodes" | "no" => Kind::Node,
        "workload" | "workloads" | "wl" => Kind::Workload,
        "token" | "tokens" => Kind::Token,
        "event" | "events" | "ev" => Kind::Event,
        "secret" | "secrets" => Kind::Secret,
        other => bail!("unknown resource type {other:?}: use nodes, workloads, secrets, tokens or events"),
    };
    if inline.is_some() && name.is_some() {
        bail!("give the name once: either {kind:?}/NAME or {kind:?} NAME");
    }
    Ok((kind, inline.or(name)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let text = format!("{e:#}");
        eprintln!("error: {text}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    if let Command::Up { data_dir, api_addr, mqtt_addr, proxy_addr, name, no_example } = cli.command {
        edge_api::names::check_node_name(&name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
        return up::up(up::UpArgs { data_dir, api_addr, mqtt_addr, proxy_addr, name, no_example }).await;
    }
    if let Command::Push { file, reference, insecure } = &cli.command {
        let r: edge_oci::Reference = reference.parse()?;
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        apply::check_component(&bytes, &file.display().to_string())?;
        let insecure = if *insecure { vec![r.registry.clone()] } else { vec![] };
        let client = edge_oci::Client::new(insecure)?;
        eprintln!("pushing {} ({}) to {r}", file.display(), edge_api::quantity::Memory(bytes.len() as u64).human());
        let digest = client.push_component(&r, bytes.into()).await?;
        let pinned = edge_oci::Reference { digest: Some(digest), ..r };
        match out {
            Format::Json => println!("{}", serde_json::json!({"reference": pinned.to_string(), "digest": digest})),
            _ => println!("{pinned}"),
        }
        return Ok(());
    }
    if let Command::Config { action } = &cli.command {
        match action {
            ConfigAction::SetHub { url } => {
                let p = config::set_hub(url, cli.ca.as_deref(), cli.token_file.as_deref())?;
                println!("edgectl now uses the hub at {url} (config in {})", p.display());
            }
            ConfigAction::View => {
                let c = config::load()?;
                println!("hub: {}", c.hub.as_deref().unwrap_or("(none: https://127.0.0.1:7443)"));
                println!(
                    "ca: {}",
                    c.ca.map(|p| p.display().to_string()).unwrap_or_else(|| "(the system's roots)".into())
                );
                println!("token: {}", if c.token.is_some() { "(set)" } else { "(none)" });
            }
        }
        return Ok(());
    }
    let target = config::resolve(cli.hub, cli.token, cli.token_file, cli.ca)?;
    let hub = Hub::new(&target.hub, &target.token, target.ca.as_deref())?;
    match cli.command {
        Command::Up { .. } | Command::Push { .. } | Command::Config { .. } => unreachable!("handled above"),
        Command::Version => {
            println!("edgectl {}", env!("CARGO_PKG_VERSION"));
            let v: serde_json::Value = hub.get("/v1/version").await?;
            println!(
                "hub {} at {} (api {}, key {})",
                v["version"].as_str().unwrap_or("?"),
                hub.base(),
                v["api_version"].as_str().unwrap_or("?"),
                v["hub_key_fingerprint"].as_str().unwrap_or("?")
            );
        }
        Command::Apply { files, wait, timeout } => {
            let mut failed = 0;
            let mut loaded = Vec::new();
            for f in apply::expand(&files)? {
                match apply::load(&f) {
                    Ok(l) => loaded.push(l),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        failed += 1;
                    }
                }
            }
            // Secrets first: the workloads that use them are checked against them.
            loaded.sort_by_key(|l| !matches!(l.doc, Document::Secret(_)));
            for l in loaded {
                let result = async {
                    let apply::Loaded { source, dir, doc } = l;
                    let workload = match doc {
                        Document::Secret(s) => {
                            let verdict =
                                secret::apply(&hub, &s).await.map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
                            println!("secret/{} {verdict}", s.metadata.name);
                            return anyhow::Ok(());
                        }
                        Document::Workload(w) => *w,
                    };
                    let quiet = out != Format::Table && out != Format::Wide;
                    let (name, verdict) =
                        apply::apply_one(&hub, apply::LoadedWorkload { source, dir, workload }, quiet).await?;
                    println!("workload/{name} {verdict}");
                    if wait {
                        let v = apply::wait_for(&hub, &name, "Started", timeout).await?;
                        println!("workload/{name} {}", v["status"]["phase"].as_str().unwrap_or("?"));
                    }
                    anyhow::Ok(())
                }
                .await;
                if let Err(e) = result {
                    eprintln!("error: {e:#}");
                    failed += 1;
                }
            }
            if failed > 0 {
                std::process::exit(1);
            }
        }
        Command::Create { kind, name, literals, files } => {
            let (kind, _) = parse_target(&kind, None)?;
            if kind != Kind::Secret {
                bail!(
                    "create makes secrets (`create secret NAME --from-literal KEY=VALUE`); workloads come from `apply -f`"
                );
            }
            let s = secret::from_sources(&name, &literals, &files)?;
            println!("secret/{name} {}", secret::apply(&hub, &s).await?);
        }
        Command::Get { kind, name, audit, for_object, watch, selector, chunk_size } => {
            let (kind, name) = parse_target(&kind, name)?;
            if (audit || for_object.is_some()) && kind != Kind::Event {
                bail!("--audit and --for go with `get events`");
            }
            if watch && !(kind == Kind::Event || (kind == Kind::Node && name.is_none())) {
                bail!("--watch goes with `get events` and `get nodes`");
            }
            if selector.is_some() && !(kind == Kind::Node && name.is_none()) {
                bail!("-l/--selector goes with `get nodes`");
            }
            let selector = match selector {
                None => None,
                Some(s) => {
                    Some(edge_api::placement::Selector::parse(&s).map_err(|e| anyhow::anyhow!("-l {s:?}: {e}"))?)
                }
            };
            let for_object = match for_object {
                None => None,
                Some(o) => match parse_target(&o, None)? {
                    (Kind::Workload, Some(n)) => Some(format!("workload/{n}")),
                    (Kind::Node, Some(n)) => Some(format!("node/{n}")),
                    _ => bail!("--for {o:?}: expected workload/NAME or node/NAME"),
                },
            };
            match (kind, name) {
                (Kind::Token, _) => admin::token(&hub, admin::TokenAction::List, out).await?,
                (Kind::Event, _) => admin::events(&hub, audit, for_object.as_deref(), watch, out).await?,
                (Kind::Node, None) => {
                    if watch {
                        admin::watch_nodes(&hub, selector.as_ref(), chunk_size, out).await?;
                    } else {
                        let nodes = admin::list_nodes(&hub, selector.as_ref(), chunk_size).await?;
                        print_nodes(&nodes, out, true, selector.is_some())?
                    }
                }
                (Kind::Node, Some(n)) => {
                    print_nodes(&[hub.get::<NodeView>(&format!("/v1/nodes/{n}")).await?], out, false, false)?
                }
                (Kind::Workload, None) => {
                    print_workloads(&hub.get::<Vec<WorkloadView>>("/v1/workloads").await?, out, true)?
                }
                (Kind::Workload, Some(n)) => {
                    print_workloads(&[hub.get::<WorkloadView>(&format!("/v1/workloads/{n}")).await?], out, false)?
                }
                (Kind::Secret, None) => secret::print(&hub.get::<Vec<SecretView>>("/v1/secrets").await?, out)?,
                (Kind::Secret, Some(n)) => {
                    let one = hub.get::<SecretView>(&format!("/v1/secrets/{n}")).await?;
                    match out {
                        Format::Json => println!("{}", serde_json::to_string_pretty(&one)?),
                        Format::Yaml => print!("{}", yaml(&serde_json::to_value(&one)?)),
                        _ => secret::print(&[one], out)?,
                    }
                }
            }
        }
        Command::Describe { kind, name } => {
            let (kind, name) = parse_target(&kind, name)?;
            let name = name.context("describe needs a name, e.g. `edgectl describe workload hello`")?;
            match kind {
                Kind::Node => print!("{}", describe_node(&hub.get(&format!("/v1/nodes/{name}")).await?)),
                Kind::Workload => print!("{}", describe_workload(&hub.get(&format!("/v1/workloads/{name}")).await?)),
                Kind::Secret => print!("{}", secret::describe(&hub.get(&format!("/v1/secrets/{name}")).await?)),
                Kind::Token | Kind::Event => bail!("describe works on nodes, workloads and secrets"),
            }
        }
        Command::Delete { kind, names, files } => {
            let mut targets: Vec<(Kind, String)> = Vec::new();
            for f in apply::expand(&files)? {
                let l = apply::load(&f)?;
                let kind = if matches!(l.doc, Document::Secret(_)) { Kind::Secret } else { Kind::Workload };
                targets.push((kind, l.doc.name().to_string()));
            }
            if let Some(k) = kind {
                let (k, inline) = parse_target(&k, None)?;
                targets.extend(inline.into_iter().chain(names).map(|n| (k, n)));
            }
            if targets.is_empty() {
                bail!("nothing to delete: give `workload NAME...`, `node NAME` or -f FILE");
            }
            let mut failed = 0;
            for (k, n) in targets {
                let (path, label) = match k {
                    Kind::Node => (format!("/v1/nodes/{n}"), "node"),
                    Kind::Workload => (format!("/v1/workloads/{n}"), "workload"),
                    Kind::Token => (format!("/v1/tokens/{n}"), "token"),
                    Kind::Secret => (format!("/v1/secrets/{n}"), "secret"),
                    Kind::Event => bail!("events cannot be deleted"),
                };
                match hub.json::<serde_json::Value>(Method::DELETE, &path, None).await {
                    Ok(_) => println!("{label}/{n} deleted"),
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
        Command::Logs { workload, replica, follow, tail, timestamps } => {
            let mut path = format!("/v1/workloads/{workload}/logs?replica={replica}");
            if follow {
                path.push_str("&follow=true");
            }
            if let Some(n) = tail {
                path.push_str(&format!("&tail={n}"));
            }
            let mut partial = String::new();
            let print = |chunk: &[u8], partial: &mut String| {
                partial.push_str(&String::from_utf8_lossy(chunk));
                while let Some(pos) = partial.find('\n') {
                    let line: String = partial.drain(..=pos).collect();
                    if let Some(t) = log_text(line.trim_end_matches('\n'), timestamps) {
                        println!("{}", clean(&t));
                    }
                }
            };
            let stream = hub.stream(&path, |c| print(c, &mut partial));
            tokio::select! {
                r = stream => r?,
                _ = shutdown_signal() => {}
            }
            if !partial.is_empty() {
                println!("{}", clean(&partial));
            }
        }
        Command::Token { action } => admin::token(&hub, action, out).await?,
        Command::Rollout { action } => rollout::rollout(&hub, action, out).await?,
        Command::Approve { kind, name, memory, cpu } => {
            let (kind, name) = parse_target(&kind, name)?;
            let name = name.context("approve needs a node name: `edgectl approve node NAME`")?;
            if kind != Kind::Node {
                bail!("only nodes are approved");
            }
            let n = admin::approve(&hub, &name, memory, cpu).await?;
            println!("node/{} approved ({})", n.name, n.state);
        }
        Command::Label { kind, name, labels } => {
            let (kind, _) = parse_target(&kind, None)?;
            if kind != Kind::Node {
                bail!("labels are set on nodes here (workload labels are in their manifests)");
            }
            let n = admin::label(&hub, &name, &labels).await?;
            println!("node/{} labeled ({})", n.name, self::labels(&n.admin_labels));
        }
        Command::Taint { kind, name, taints } => {
            let (kind, _) = parse_target(&kind, None)?;
            if kind != Kind::Node {
                bail!("taints are set on nodes (a workload tolerates them in spec.placement.tolerations)");
            }
            let n = admin::taint(&hub, &name, &taints).await?;
            let now: Vec<String> = n.taints.iter().map(ToString::to_string).collect();
            println!("node/{} tainted ({})", n.name, if now.is_empty() { "no taints".into() } else { now.join(", ") });
        }
        Command::Cordon { node } => {
            let n = admin::cordon(&hub, &node, true).await?;
            println!("node/{} cordoned", n.name);
        }
        Command::Uncordon { node } => {
            let n = admin::cordon(&hub, &node, false).await?;
            println!("node/{} uncordoned", n.name);
        }
        Command::Drain { node } => {
            let d = admin::drain(&hub, &node).await?;
            if let Some(w) = &d.warning {
                eprintln!("warning: {w}");
            }
            for w in &d.stayed {
                eprintln!("ignoring per-node workload {w} (it runs on every node it selects)");
            }
            for m in &d.moved {
                match (&m.to, &m.waiting) {
                    (Some(to), _) => println!("workload/{} replica {} moved to node {to}", m.workload, m.replica),
                    (None, why) => println!(
                        "workload/{} replica {} evicted, waiting for a node: {}",
                        m.workload,
                        m.replica,
                        why.as_deref().unwrap_or("none fits")
                    ),
                }
            }
            println!("node/{} drained", d.node);
        }
        Command::Wait { kind, name, condition, timeout } => {
            let (kind, name) = parse_target(&kind, name)?;
            if kind != Kind::Workload {
                bail!("only workloads can be waited for");
            }
            let name = name.context("wait needs a workload name")?;
            let v = apply::wait_for(&hub, &name, &condition, timeout).await?;
            if condition == "Deleted" {
                println!("workload/{name} deleted");
            } else {
                println!(
                    "workload/{name} condition met: {condition} (phase {})",
                    v["status"]["phase"].as_str().unwrap_or("?")
                );
            }
        }
    }
    Ok(())
}

/// The text of a stored log line (`<time> <stream> <text>`), as `logs` shows it.
pub fn log_text(line: &str, timestamps: bool) -> Option<String> {
    if line.is_empty() {
        return None;
    }
    let mut parts = line.splitn(3, ' ');
    let (Some(ts), Some(stream), text) = (parts.next(), parts.next(), parts.next().unwrap_or("")) else {
        return Some(line.to_string());
    };
    let text = if stream == "edge" { format!("[edge] {text}") } else { text.to_string() };
    Some(if timestamps { format!("{ts} {text}") } else { text })
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

fn print_json_or_yaml<T: serde::Serialize>(v: &T, out: Format) -> anyhow::Result<bool> {
    match out {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", yaml(&serde_json::to_value(v)?)),
        _ => return Ok(false),
    }
    Ok(true)
}

fn print_nodes(nodes: &[NodeView], out: Format, list: bool, filtered: bool) -> anyhow::Result<()> {
    let handled = if list { print_json_or_yaml(&nodes, out)? } else { print_json_or_yaml(&nodes[0], out)? };
    if handled {
        return Ok(());
    }
    if out == Format::Name {
        for n in nodes {
            println!("node/{}", n.name);
        }
        return Ok(());
    }
    if nodes.is_empty() && filtered {
        eprintln!("No nodes match the selector.");
        return Ok(());
    }
    if nodes.is_empty() {
        eprintln!(
            "No nodes have joined yet. Make a join token (edgectl token create > join.token) and start an agent with: edge-agent run --broker mqtt://HUB:1883 --join-token-file join.token"
        );
        return Ok(());
    }
    let wide = out == Format::Wide;
    let rows: Vec<Vec<String>> = nodes.iter().map(|n| node_row(n, wide)).collect();
    print!("{}", table(&node_headers(wide), &rows));
    Ok(())
}

pub fn node_headers(wide: bool) -> Vec<&'static str> {
    let mut headers = vec!["NAME", "STATUS", "ARCH", "WASM", "WORKLOADS", "AGE"];
    if wide {
        headers.extend(["CPU", "MEMORY", "OS-IMAGE", "KERNEL", "VERSION", "LABELS"]);
    }
    headers
}

/// A node's row of `get nodes` (`wide`: with capacity, OS and labels).
pub fn node_row(n: &NodeView, wide: bool) -> Vec<String> {
    let mode = n.facts.runtimes.iter().find(|r| r.name == "wasm").map(|r| r.mode.clone()).unwrap_or_else(|| "-".into());
    let mut r = vec![
        n.name.clone(),
        if n.unschedulable { format!("{},SchedulingDisabled", n.state) } else { n.state.to_string() },
        n.facts.arch.clone(),
        mode,
        n.workloads.len().to_string(),
        age(now_ms().saturating_sub(n.joined_ms)),
    ];
    if wide {
        r.push(format!("{}/{}", n.allocated.cpu, n.facts.allocatable_cpu));
        r.push(format!("{}/{}", n.allocated.memory.human(), n.facts.allocatable_memory.human()));
        r.push(if n.facts.os_release.is_empty() { n.facts.os.clone() } else { n.facts.os_release.clone() });
        r.push(n.facts.kernel.clone());
        r.push(n.facts.agent_version.clone());
        r.push(labels(&n.facts.labels));
    }
    r
}

pub fn labels(l: &edge_api::model::Labels) -> String {
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn print_workloads(ws: &[WorkloadView], out: Format, list: bool) -> anyhow::Result<()> {
    let handled = if list { print_json_or_yaml(&ws, out)? } else { print_json_or_yaml(&ws[0], out)? };
    if handled {
        return Ok(());
    }
    if out == Format::Name {
        for w in ws {
            println!("workload/{}", w.workload.metadata.name);
        }
        return Ok(());
    }
    if ws.is_empty() {
        eprintln!("No workloads. Deploy one with: edgectl apply -f examples/hello.toml");
        return Ok(());
    }
    let now = now_ms();
    let wide = out == Format::Wide;
    let mut headers = vec!["NAME", "READY", "PHASE", "RESTARTS", "NODE", "AGE"];
    if wide {
        headers.extend(["RUNTIME", "GENERATION", "COMPONENT", "REASON"]);
    }
    let rows: Vec<Vec<String>> = ws
        .iter()
        .map(|v| {
            let w = &v.workload;
            let mut nodes: Vec<&str> = v.status.replicas.iter().filter_map(|r| r.node.as_deref()).collect();
            nodes.dedup();
            let restarts: u32 = v.status.replicas.iter().map(|r| r.restarts).sum();
            let mut r = vec![
                w.metadata.name.clone(),
                format!("{}/{}", v.status.ready, v.status.replicas.len()),
                v.status.phase.to_string(),
                restarts.to_string(),
                if nodes.is_empty() { "<none>".into() } else { nodes.join(",") },
                age(now.saturating_sub(w.metadata.created_ms)),
            ];
            if wide {
                let observed = v.status.replicas.iter().map(|r| r.observed_generation).min().unwrap_or(0);
                let component = match &w.spec.runtime {
                    Runtime::Wasm(wasm) => match wasm.component.digest() {
                        Some(d) => format!("sha256:{}", d.short()),
                        None => wasm.component.to_string(),
                    },
                    Runtime::Container(c) => c.source.clone().unwrap_or_else(|| c.image.to_string()),
                };
                r.push(w.spec.runtime.name().into());
                r.push(format!("{observed}/{}", w.metadata.generation));
                r.push(component);
                r.push(v.status.reason.as_ref().map_or_else(|| "-".into(), |r| r.to_string()));
            }
            r
        })
        .collect();
    print!("{}", table(&headers, &rows));
    Ok(())
}

pub fn when(ms: Option<u64>) -> String {
    match ms {
        Some(ms) if ms > 0 => format!("{} ({} ago)", rfc3339(ms), age(now_ms().saturating_sub(ms))),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_accept_kubectl_spellings() {
        assert_eq!(parse_target("no", None).unwrap(), (Kind::Node, None));
        assert_eq!(parse_target("wl", Some("a".into())).unwrap(), (Kind::Workload, Some("a".into())));
        assert_eq!(parse_target("workload/a", None).unwrap(), (Kind::Workload, Some("a".into())));
        assert!(parse_target("pods", None).is_err());
        assert!(parse_target("workload/a", Some("b".into())).is_err());
    }

    #[test]
    fn log_lines_lose_their_prefix_unless_asked() {
        let l = "2026-11-26T19:09:04.340Z stdout tick 1";
        assert_eq!(log_text(l, false).as_deref(), Some("tick 1"));
        assert_eq!(log_text(l, true).as_deref(), Some("2026-11-26T19:09:04.340Z tick 1"));
        assert_eq!(log_text("t edge exited with code 0", false).as_deref(), Some("[edge] exited with code 0"));
    }
}
