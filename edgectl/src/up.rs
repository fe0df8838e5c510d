//! `edgectl up`: a hub and a local agent on this machine, with the bundled
//! hello example deployed, in one command. It stays in the foreground;
//! Ctrl-C stops both.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edge_api::digest::Digest;
use edge_api::manifest::{self, Origin};
use edge_api::model::{ArtifactRef, NodeState, NodeView, Runtime};
use tokio::process::{Child, Command};

use crate::client::Hub;
use crate::config::{self, FileConfig};

/// The hello component and its manifest, built into edgectl so `up` needs no files.
const HELLO_WASM: &[u8] = include_bytes!("../../examples/hello.wasm");
const HELLO_TOML: &str = include_str!("../../examples/hello.toml");

pub struct UpArgs {
    pub data_dir: Option<PathBuf>,
    pub api_addr: Option<SocketAddr>,
    pub mqtt_addr: Option<SocketAddr>,
    pub proxy_addr: Option<SocketAddr>,
    pub name: String,
    pub no_example: bool,
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("cannot tell where to keep data: pass --data-dir")?;
    Ok(base.join("edge"))
}

/// The preferred address if free, else any free port on loopback.
fn pick(preferred: &str, what: &str) -> SocketAddr {
    let addr: SocketAddr = preferred.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    if TcpListener::bind(addr).is_ok() {
        addr
    } else {
        eprintln!("  {preferred} is in use; the {what} takes a free port instead");
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate edgectl itself")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{name} was not found next to edgectl (looked for {}); build the workspace first: cargo build --release",
            p.display()
        );
    }
    Ok(p)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

async fn stop(children: &mut [(&str, Child)]) {
    for (_, c) in children.iter_mut() {
        terminate(c);
    }
    for (name, c) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), c.wait()).await.is_err() {
            eprintln!("{name} did not stop in 5s; killing it");
            let _ = c.kill().await;
        }
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let dir = match args.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let hub_dir = dir.join("hub");
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let hub_bin = sibling("edge-hub")?;
    let agent_bin = sibling("edge-agent")?;
    let api_addr = args.api_addr.unwrap_or_else(|| pick("127.0.0.1:7443", "API"));
    let mqtt_addr = args.mqtt_addr.unwrap_or_else(|| pick("127.0.0.1:1883", "MQTT broker"));
    let proxy_addr = args.proxy_addr.unwrap_or_else(|| pick("127.0.0.1:8080", "agent's proxy"));

    let hub_json = hub_dir.join("hub.json");
    let _ = std::fs::remove_file(&hub_json);
    let hub_log = dir.join("hub.log");
    eprintln!("starting the hub (data in {})", hub_dir.display());
    let mut hub_child = Command::new(&hub_bin)
        .args(["serve", "--heartbeat", "2s", "--data-dir"])
        .arg(&hub_dir)
        .arg("--api-addr")
        .arg(api_addr.to_string())
        .arg("--mqtt-addr")
        .arg(mqtt_addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&hub_log).with_context(|| format!("cannot write {}", hub_log.display()))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", hub_bin.display()))?;
    let pid = hub_child.id().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let endpoints: serde_json::Value = loop {
        if let Some(status) = hub_child.try_wait()? {
            bail!("the hub exited ({status}):\n{}", tail(&hub_log, 10));
        }
        if let Ok(text) = std::fs::read_to_string(&hub_json)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["pid"].as_u64() == Some(u64::from(pid))
        {
            break v;
        }
        if Instant::now() > deadline {
            bail!("the hub did not start within 30s:\n{}", tail(&hub_log, 10));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let api_url = endpoints["api_url"].as_str().unwrap_or_default().to_string();
    let mqtt_url = endpoints["mqtt_url"].as_str().unwrap_or_default().to_string();
    let token = std::fs::read_to_string(hub_dir.join("admin.token"))?.trim().to_string();
    let join = std::fs::read_to_string(hub_dir.join("join.token"))?.trim().to_string();
    eprintln!("  API {api_url}, MQTT {mqtt_url}");
    let ca = endpoints["ca"].as_str().map(PathBuf::from);
    let cfg_path =
        config::save(&FileConfig { hub: Some(api_url.clone()), token: Some(token.clone()), ca: ca.clone() })?;

    let agent_log = dir.join("agent.log");
    eprintln!("starting the agent {:?} (data in {})", args.name, agent_dir.display());
    let agent_child = Command::new(&agent_bin)
        .args(["run", "--keepalive", "2s", "--data-dir"])
        .arg(&agent_dir)
        .arg("--broker")
        .arg(&mqtt_url)
        .env("EDGE_JOIN_TOKEN", &join)
        .arg("--name")
        .arg(&args.name)
        .arg("--proxy-addr")
        .arg(proxy_addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).with_context(|| format!("cannot write {}", agent_log.display()))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", agent_bin.display()))?;
    let mut children = vec![("edge-hub", hub_child), ("edge-agent", agent_child)];

    let hub = Hub::new(&api_url, &token, ca.as_deref())?;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (name, c) in children.iter_mut() {
                if let Some(status) = c.try_wait()? {
                    let log = if *name == "edge-hub" { &hub_log } else { &agent_log };
                    bail!("{name} exited ({status}):\n{}", tail(log, 10));
                }
            }
            let nodes: Vec<NodeView> = hub.get("/v1/nodes").await?;
            if nodes.iter().any(|n| n.name == args.name && n.state == NodeState::Ready) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the agent did not join within 30s:\n{}", tail(&agent_log, 10));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("  node {:?} joined and is Ready", args.name);
        if !args.no_example {
            deploy_hello(&hub).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        stop(&mut children).await;
        return Err(e);
    }

    let proxy_url = std::fs::read_to_string(agent_dir.join("agent.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["proxy_addr"].as_str().map(|a| format!("http://{a}")))
        .unwrap_or_else(|| format!("http://{proxy_addr}"));
    println!();
    println!("edge is up. HTTP services answer at {proxy_url}. Try:");
    println!("  edgectl get nodes");
    println!("  edgectl get workloads -o wide");
    println!("  edgectl apply -f examples/ticker.toml && edgectl logs ticker -f");
    println!("  edgectl apply -f examples/hello-http.toml && curl -H 'Host: hello.local' {proxy_url}/");
    println!();
    println!("edgectl is configured in {}; hub and agent logs are in {}.", cfg_path.display(), dir.display());
    println!("Press Ctrl-C to stop.");

    let exited = async {
        loop {
            for (name, c) in children.iter_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return format!("{name} exited ({status})");
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let reason = tokio::select! {
        r = exited => Some(r),
        _ = crate::shutdown_signal() => None,
    };
    eprintln!("stopping");
    stop(&mut children).await;
    match reason {
        Some(r) => bail!("{r}; see the logs in {}", dir.display()),
        None => Ok(()),
    }
}

async fn deploy_hello(hub: &Hub) -> anyhow::Result<()> {
    let mut w = manifest::parse_toml(HELLO_TOML, Origin::File).map_err(|e| anyhow::anyhow!("bundled example: {e}"))?;
    let digest = Digest::of(HELLO_WASM);
    if !hub.has_artifact(&digest.to_string()).await? {
        crate::apply::upload(hub, digest, HELLO_WASM.to_vec()).await?;
    }
    if let Runtime::Wasm(wasm) = &mut w.spec.runtime {
        wasm.component = ArtifactRef::Digest(digest);
    }
    let name = w.metadata.name.clone();
    let body = serde_json::to_vec(&w)?;
    let resp: serde_json::Value =
        hub.json(hyper::Method::PUT, &format!("/v1/workloads/{name}"), Some(("application/json", body.into()))).await?;
    eprintln!("deploying the example: workload/{name} {}", resp["result"].as_str().unwrap_or("applied"));
    let v = crate::apply::wait_for(hub, &name, "Finished", Duration::from_secs(60)).await?;
    eprintln!("  workload/{name} {}", v["status"]["phase"].as_str().unwrap_or("?"));
    let mut out = String::new();
    hub.stream(&format!("/v1/workloads/{name}/logs"), |b| out.push_str(&String::from_utf8_lossy(b))).await?;
    for line in out.lines() {
        if let Some(text) = crate::log_text(line, false) {
            println!("  | {text}");
        }
    }
    Ok(())
}
