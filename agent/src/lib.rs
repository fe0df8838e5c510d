//! The edge agent: joins a hub over MQTT and runs what it is told, from its
//! own durable state when the hub or the link is gone. See ARCHITECTURE.md.

pub mod cni;
pub mod container;
pub mod facts;
pub mod fetch;
pub mod health;
pub mod keyvalue;
pub mod logs;
pub mod plan;
pub mod probe;
pub mod proxy;
pub mod secrets;
pub mod session;
pub mod state;
pub mod supervisor;
pub mod wasm;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use edge_api::broker_url::BrokerUrl;
use edge_api::keys::{PublicKey, SigningKey};
use edge_api::model::{Labels, NodeFacts};
use edge_api::quantity::{Cpu, Memory};
use edge_api::seal::KemKeyPair;
use edge_api::token::JoinToken;
use tokio::sync::{mpsc, watch};

/// What every part of the agent shares.
pub struct Ctx {
    pub node: String,
    pub key: SigningKey,
    /// What the hub seals this node's credential and secrets to.
    pub kem: KemKeyPair,
    /// The bootstrap token, until the node has its own credential (or when
    /// the operator gave one again, to re-enrol if the credential is refused).
    join: RwLock<Option<JoinToken>>,
    /// A file the bootstrap token was read from, removed once enrolled.
    pub join_token_file: Option<PathBuf>,
    /// The hub's clock minus ours (ms), learnt from the last welcome: the
    /// expiry of the hub's requests and the time of our signatures are
    /// judged in the hub's time, whatever this device's clock says.
    hub_offset_ms: std::sync::atomic::AtomicI64,
    pub session: u64,
    pub facts: NodeFacts,
    pub state: state::State,
    pub logs: logs::Logs,
    pub wasm: wasm::WasmRuntime,
    pub containers: container::Containers,
    pub fetcher: fetch::Fetcher,
    enrolment: RwLock<(Option<PublicKey>, Option<String>)>,
    /// When the reconcile loop last went round (wall-clock ms); heartbeats
    /// are withheld while it is stuck, so the hub sees the node NotReady.
    pub supervisor_alive_ms: std::sync::atomic::AtomicU64,
    pub proxy: Arc<proxy::Proxy>,
    /// Routes given with `--route`, to plain servers.
    pub static_routes: Vec<proxy::Route>,
    /// Set by key-value writes; the flusher syncs the database within 200 ms.
    pub kv_dirty: Arc<std::sync::atomic::AtomicBool>,
    /// Secret files and container bundles: what must not outlive a boot.
    pub run_dir: secrets::RunDir,
    /// When the agent sent the newest heartbeat the hub acknowledged (its
    /// lease, see `edge_api::lease`); none yet since it started.
    pub lease: tokio::sync::watch::Sender<Option<std::time::Instant>>,
    /// Held while the agent runs: one agent per run directory.
    _run_lock: std::fs::File,
}

impl Ctx {
    pub fn join_token(&self) -> Option<JoinToken> {
        self.join.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the bootstrap token (the node has its own credential now).
    pub fn forget_join_token(&self) {
        *self.join.write().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(f) = &self.join_token_file {
            match std::fs::remove_file(f) {
                Ok(()) => tracing::info!(file = %f.display(), "enrolled: removed the join token file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.display(), "enrolled, but cannot remove the join token file ({e}); remove it")
                }
            }
        }
    }

    pub fn set_hub_time(&self, hub_ms: u64) {
        let offset = hub_ms as i64 - edge_api::time::now_ms() as i64;
        self.hub_offset_ms.store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    /// Now, by the hub's clock (as of the last welcome).
    pub fn hub_now_ms(&self) -> u64 {
        let offset = self.hub_offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        (edge_api::time::now_ms() as i64).saturating_add(offset).max(0) as u64
    }

    pub fn hub_key(&self) -> Option<PublicKey> {
        self.enrolment.read().unwrap_or_else(|p| p.into_inner()).0
    }
    pub fn api_url(&self) -> Option<String> {
        self.enrolment.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }
    pub fn set_enrolled(&self, key: PublicKey, api_url: String) {
        *self.enrolment.write().unwrap_or_else(|p| p.into_inner()) = (Some(key), Some(api_url));
    }

    /// A workload's key-value namespace on this node.
    pub fn key_value(&self, workload: &str) -> anyhow::Result<keyvalue::Namespace> {
        Ok(keyvalue::Namespace::open(self.state.db(), workload, self.kv_dirty.clone())?)
    }
}

/// Compiled code comes from the hub, fetched with this node's signature.
impl wasm::Supplier for Ctx {
    fn hub_key(&self) -> Option<PublicKey> {
        Ctx::hub_key(self)
    }

    fn node_key(&self) -> &SigningKey {
        &self.key
    }

    fn precompiled<'a>(
        &'a self,
        component: edge_api::digest::Digest,
        fingerprint: &'a str,
        dest: &'a std::path::Path,
    ) -> wasm::PrecompiledFuture<'a> {
        Box::pin(async move {
            let link = fetch::HubLink {
                api_url: self.api_url()?,
                node: &self.node,
                key: &self.key,
                hub_now_ms: self.hub_now_ms(),
            };
            Some(self.fetcher.fetch_precompiled(&link, component, fingerprint, dest).await)
        })
    }
}

/// Where a running agent can be reached (written to `DATA_DIR/agent.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub node: String,
    pub proxy_addr: String,
    pub pid: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub broker: BrokerUrl,
    pub join_token: Option<JoinToken>,
    /// Where `join_token` was read from; removed once enrolled.
    pub join_token_file: Option<PathBuf>,
    pub name: Option<String>,
    pub labels: Labels,
    pub keepalive: Duration,
    pub reserve_memory: Memory,
    pub reserve_cpu: Cpu,
    /// The built-in proxy's listen address.
    pub proxy_addr: std::net::SocketAddr,
    /// The proxy's listener limits.
    pub proxy_limits: edge_listen::Limits,
    /// `HOST[/PATH]=http://ADDR` routes to plain servers.
    pub routes: Vec<String>,
    /// Instance slots of the pooling allocator.
    pub wasm_pool: wasm::PoolSize,
    /// CA certificates (PEM) for an `mqtts://` broker; default: the system's.
    pub broker_ca: Option<PathBuf>,
    /// Registries (`host:port`) container images are pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Where secret files and container bundles go (a tmpfs); default
    /// `/run/edge-agent` as root, else `$XDG_RUNTIME_DIR/edge-agent`.
    pub run_dir: Option<PathBuf>,
    /// The addresses of the node's container bridge (CIDR).
    pub container_subnet: String,
}

/// The run directory when none is given: on a tmpfs, so secrets never
/// reach the device's storage. systemd's `$RUNTIME_DIRECTORY` when the
/// unit has one; else `/run/edge-agent` for the default data
/// directory; another data directory gets its own (`edge-agent-<hash>`), so
/// agents side by side never share one.
pub fn default_run_dir(data_dir: &std::path::Path) -> PathBuf {
    // systemd's RuntimeDirectory= (see deploy/systemd): made for us, on /run.
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let name = if data_dir == std::path::Path::new(DEFAULT_DATA_DIR) {
        "edge-agent".to_string()
    } else {
        let abs = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let h = ring::digest::digest(&ring::digest::SHA256, abs.as_os_str().as_encoded_bytes());
        format!("edge-agent-{}", edge_api::hex::encode(&h.as_ref()[..4]))
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run").join(name);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join(name),
        _ => {
            tracing::warn!("no XDG_RUNTIME_DIR: secret files go under the data directory; pass --run-dir (a tmpfs)");
            data_dir.join("run")
        }
    }
}

/// Where an agent keeps its state unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/edge-agent";

/// How the agent trusts the hub's TLS (its API, its embedded broker): a
/// chain ending at the CA whose key is the pinned hub key (`fingerprint`,
/// from the join token or the enrolment), or else one of `ca`'s
/// certificates (`--broker-ca`) or the system's roots.
pub fn hub_tls(fingerprint: Option<&str>, ca: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    // A CA file is read now, so a bad one is reported at start; the
    // system's roots only when a server other than the hub needs them.
    let given = match ca {
        Some(ca) => Some(edge_oci::roots_file(ca).map_err(|e| anyhow::anyhow!("--broker-ca: {e}"))?),
        None => None,
    };
    match fingerprint {
        Some(fp) => {
            let load: edge_oci::pinned::LoadRoots = match given {
                Some(roots) => Box::new(move || Ok(roots.clone())),
                None => Box::new(|| edge_oci::roots(None)),
            };
            edge_oci::pinned::client_config(fp, Some(load)).map_err(|e| anyhow::anyhow!("TLS: {e}"))
        }
        None => Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(match given {
                Some(roots) => roots,
                None => edge_oci::roots(None).map_err(|e| anyhow::anyhow!("TLS: {e}"))?,
            })
            .with_no_client_auth()),
    }
}

/// TLS settings for an `mqtts://` broker, or `None` for plain MQTT.
pub fn broker_tls(
    url: &BrokerUrl,
    ca: Option<&std::path::Path>,
    fingerprint: Option<&str>,
) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if !url.tls {
        if let Some(ca) = ca {
            anyhow::bail!("--broker-ca {} is given, but the broker URL {url} is not mqtts://", ca.display());
        }
        return Ok(None);
    }
    Ok(Some(Arc::new(hub_tls(fingerprint, ca)?)))
}

/// Runs the agent until `shutdown` resolves or it hits an error it cannot
/// recover from (such as a refused first enrolment).
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    if let Some(ca) = &config.broker_ca
        && !config.broker.tls
    {
        anyhow::bail!("--broker-ca {} is given, but the broker URL {} is not mqtts://", ca.display(), config.broker);
    }
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let state = state::State::open(dir)?;

    let name = match (&config.name, state.node_name()?) {
        (Some(n), Some(stored)) if *n != stored => anyhow::bail!(
            "{} belongs to node {stored:?}, not {n:?}: use --name {stored} or another --data-dir",
            dir.display()
        ),
        (Some(n), _) => n.clone(),
        (None, Some(stored)) => stored,
        (None, None) => facts::hostname(),
    };
    edge_api::names::check_node_name(&name).map_err(|e| anyhow::anyhow!("node name {e}; pass --name"))?;
    if state.node_name()?.is_none() {
        state.set_node_name(&name)?;
    }
    let credential = state.credential()?;
    let join = match (&config.join_token, state.join_token()?) {
        (Some(t), _) => {
            if credential.is_none() {
                state.set_join_token(t)?;
            }
            Some(t.clone())
        }
        (None, t) => t,
    };
    if join.is_none() && credential.is_none() {
        anyhow::bail!(
            "this agent has not joined a hub yet: give it a join token with --join-token-file FILE or EDGE_JOIN_TOKEN (`edgectl token create` makes one)"
        );
    }
    let key = state.node_key()?;
    let kem = state.kem_key()?;
    let session = state.next_session()?;
    let hub_key = state.hub_key()?;
    if let (Some(k), Some(join)) = (&hub_key, &join)
        && !join.pins(k)
    {
        anyhow::bail!(
            "the join token is for hub {} but this agent is enrolled with hub {}: use another --data-dir to join a different hub",
            join.fingerprint,
            k.fingerprint()
        );
    }
    let api_url = state.api_url()?;
    let records = state.instances()?;
    // The hub is trusted by its key: pinned at enrolment, or by the join token before.
    let fingerprint = hub_key.map(|k| k.fingerprint()).or_else(|| join.as_ref().map(|j| j.fingerprint.clone()));
    let tls = broker_tls(&config.broker, config.broker_ca.as_deref(), fingerprint.as_deref())?;
    let api_tls = hub_tls(fingerprint.as_deref(), None)?;

    let mut static_routes = Vec::new();
    for r in &config.routes {
        let (host, prefix, upstream) = proxy::parse_static_route(r).map_err(|e| anyhow::anyhow!("--route {e}"))?;
        static_routes.push(proxy::Route {
            host,
            prefix,
            backend: proxy::Backend::Upstream(upstream),
            owner: "static".into(),
        });
    }
    let listener = tokio::net::TcpListener::bind(config.proxy_addr)
        .await
        .with_context(|| format!("cannot listen for the proxy on {}", config.proxy_addr))?;
    let proxy_addr = listener.local_addr()?;
    let run_path = config.run_dir.clone().unwrap_or_else(|| default_run_dir(dir));
    let (run_dir, run_lock) = secrets::RunDir::open(&run_path)?;
    let bridge = cni::BridgeConfig::detect(&config.container_subnet);
    let containers = container::Containers::new(dir, &run_path, &name, config.insecure_registries.clone(), bridge)
        .context("cannot open the container directory")?;
    containers.remove_stale();
    let mut facts = facts::gather(config.labels.clone(), config.reserve_memory, config.reserve_cpu);
    facts.runtimes.extend(containers.info());
    facts.wasm_instances = wasm::planned_slots(config.wasm_pool, facts.memory.0);
    let node_memory = facts.memory.0;
    let ctx = Arc::new(Ctx {
        node: name.clone(),
        key,
        kem,
        join: RwLock::new(join),
        join_token_file: config.join_token_file.clone(),
        hub_offset_ms: std::sync::atomic::AtomicI64::new(0),
        session,
        facts,
        state,
        logs: logs::Logs::open(&dir.join("logs")).context("cannot open the log directory")?,
        wasm: wasm::WasmRuntime::new(&dir.join("cache"), node_memory, config.wasm_pool),
        containers,
        fetcher: fetch::Fetcher::new(&dir.join("artifacts"), api_tls).context("cannot open the artifact directory")?,
        enrolment: RwLock::new((hub_key, api_url)),
        supervisor_alive_ms: std::sync::atomic::AtomicU64::new(edge_api::time::now_ms()),
        proxy: proxy::Proxy::new(&name),
        static_routes,
        kv_dirty: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        run_dir,
        lease: tokio::sync::watch::Sender::new(None),
        _run_lock: run_lock,
    });
    let endpoints = Endpoints { node: name.clone(), proxy_addr: proxy_addr.to_string(), pid: std::process::id() };
    let tmp = dir.join("agent.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)
        .and_then(|_| std::fs::rename(&tmp, dir.join("agent.json")))
        .with_context(|| format!("cannot write {}", dir.join("agent.json").display()))?;
    tracing::info!(node = %name, session, arch = %ctx.facts.arch, wasm = wasm::execution_mode(), proxy = %proxy_addr, "edge-agent starting");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (status_tx, status_rx) = watch::channel(supervisor::Snapshot::default());
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    // The desired state kept on disk, verified again: what the agent runs
    // until the hub says otherwise (also when there is no hub).
    let initial = match ctx.state.desired() {
        Ok(Some(d)) => match session::verify_desired(&*ctx, &d) {
            Ok(Some((generation, doc))) => {
                tracing::info!(generation, workloads = doc.workloads.len(), "running the desired state kept on disk");
                Some((generation, doc))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("ignoring the desired state on disk: {e}");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!("cannot read the desired state on disk: {e}");
            None
        }
    };
    let generation = initial.as_ref().map(|(g, _)| *g).unwrap_or(0);
    let fence = initial.as_ref().and_then(|(_, doc)| doc.fence());
    let sup = supervisor::Supervisor::new(ctx.clone(), records, initial, cmd_tx.clone(), status_tx);
    let sup_task = tokio::spawn(sup.run(cmd_rx, stop_rx.clone()));
    let session_cfg =
        session::SessionConfig { broker: config.broker.clone(), tls, keepalive: config.keepalive, generation, fence };
    let session_task =
        tokio::spawn(session::run(ctx.clone(), session_cfg, cmd_tx, status_rx, fatal_tx, stop_rx.clone()));

    let proxy_task = tokio::spawn(proxy::serve(listener, ctx.proxy.clone(), config.proxy_limits, stop_rx.clone()));
    let flusher = {
        let ctx = ctx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            // Group commit for key-value writes not already flushed by the HTTP path.
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if ctx.kv_dirty.swap(false, std::sync::atomic::Ordering::Relaxed)
                            && let Err(e) = ctx.state.db().flush_async().await
                        {
                            tracing::error!("cannot flush key-value writes: {e}");
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            let _ = ctx.state.db().flush_async().await;
        })
    };
    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(msg) = fatal_rx.recv() => Err(anyhow::anyhow!(msg)),
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = session_task.await;
        let _ = sup_task.await;
        let _ = proxy_task.await;
        let _ = flusher.await;
    })
    .await;
    ctx.run_dir.close();
    result
}
