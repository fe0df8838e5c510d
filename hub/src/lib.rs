//! The edge hub: API server, store, scheduler, controllers, artifact store
//! and (optionally) the embedded MQTT broker. See ARCHITECTURE.md.

pub mod access;
pub mod api;
pub mod artifacts;
pub mod authz;
pub mod broker;
pub mod broker_admin;
pub mod bus;
pub mod controller;
pub mod durability;
pub mod enrol;
pub mod error;
pub mod etcd;
pub mod events;
pub mod ha;
pub mod hub;
pub mod ingest;
pub mod listener;
pub mod liveness;
pub mod logstreams;
pub mod metrics;
mod node_admin;
pub mod placing;
pub mod precompile;
pub mod revisions;
pub mod rollout;
pub mod rollouts;
pub mod scheduler;
pub mod secret_admin;
pub mod secrets;
pub mod store;
mod tick;
pub mod tls;
pub mod tokens;
pub mod tracked;
pub mod views;
mod workload_admin;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edge_api::broker_url::BrokerUrl;
use edge_api::keys::SigningKey;
use edge_api::model::TokenKind;
use edge_api::token::{ApiToken, JoinToken};
use tokio::sync::watch;

/// Facts of a test node: `mem_mib` of memory, all of it allocatable, 4 CPUs, Wasm.
#[cfg(test)]
pub(crate) fn test_facts(arch: &str, mem_mib: u64, labels: &[(&str, &str)]) -> edge_api::model::NodeFacts {
    use edge_api::quantity::{Cpu, Memory};
    edge_api::model::NodeFacts {
        arch: arch.into(),
        os: "linux".into(),
        os_release: String::new(),
        kernel: String::new(),
        cpus: 4,
        memory: Memory::mib(mem_mib),
        allocatable_memory: Memory::mib(mem_mib),
        allocatable_cpu: Cpu(4000),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        runtimes: vec![edge_api::model::RuntimeInfo {
            name: "wasm".into(),
            version: "test".into(),
            mode: "cranelift".into(),
            ..Default::default()
        }],
        agent_version: String::new(),
        wasm_instances: None,
    }
}

/// 512 MiB: larger than any component we expect; bounds what an upload can fill.
pub const MAX_ARTIFACT_BYTES: u64 = 512 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    /// Where the embedded broker listens; ignored with `broker`.
    pub mqtt_addr: SocketAddr,
    /// An external broker to use instead of the embedded one.
    pub broker: Option<BrokerUrl>,
    /// The URL agents use to reach the API (artifact downloads).
    pub advertise_url: Option<String>,
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// Registries (`host:port`) to pull from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// CA certificates (PEM) for an `mqtts://` external broker.
    pub broker_ca: Option<PathBuf>,
    /// Every enrolment waits for `edgectl approve node`.
    pub require_approval: bool,
    /// Revisions kept per workload (`edgectl rollout history|undo`).
    pub revision_history: usize,
    /// Components compiled at once for nodes' targets.
    pub compile_jobs: usize,
    /// Connection limits of the embedded broker.
    pub mqtt_limits: broker::Limits,
    /// Limits of the API's listener.
    pub api_limits: edge_listen::Limits,
    /// How the API and the embedded broker speak TLS.
    pub tls: TlsSettings,
    /// Where the key that encrypts secrets at rest is (default
    /// `DATA_DIR/secrets.key`); keep it off the disk the state is copied from.
    pub secrets_key_file: Option<PathBuf>,
    /// Whether the hub manages the external broker's logins and ACLs
    /// (Mosquitto's dynamic-security plugin), or the operator does.
    pub broker_admin: BrokerAdminKind,
    /// Containers may use the node's network (`network = "host"`).
    pub allow_host_network: bool,
    /// Where uploaded components and compiled code are kept (default
    /// `DATA_DIR/artifacts`); with several hubs, a directory they share.
    pub artifacts_dir: Option<PathBuf>,
    /// Several hubs over etcd instead of one over its own store.
    pub ha: Option<HaSettings>,
}

/// A hub of several over one etcd (see [`ha`]).
#[derive(Debug, Clone)]
pub struct HaSettings {
    pub etcd: etcd::EtcdOptions,
    /// The leader's etcd lease: how soon another hub takes over when it dies.
    pub lease: Duration,
    /// The URL other hubs forward API requests to while this one leads
    /// (default: the API's address).
    pub peer_url: Option<String>,
}

/// Who keeps an external broker's logins in step with the hub.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerAdminKind {
    /// The operator (password file and ACL file), or nobody needs to (the embedded broker).
    #[default]
    None,
    /// The hub, over Mosquitto's dynamic-security plugin: a login and a role per node and token.
    Dynsec,
}

/// TLS for the API and the embedded broker: on by default, with the hub's
/// own CA (see [`tls`]).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// Plain HTTP and MQTT (only sensible on loopback or a private network).
    pub insecure_plaintext: bool,
    /// The operator's certificate chain and key instead of the hub's own.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// More names (or addresses) the hub's certificate is for.
    pub names: Vec<String>,
}

/// What a started hub tells its caller (and writes to `DATA_DIR/hub.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub api_url: String,
    /// The CA certificate that signs the API's (and embedded broker's)
    /// certificate, for `edgectl --ca`; absent with plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The broker agents should dial (without credentials).
    pub mqtt_url: String,
    pub embedded_broker: bool,
    pub hub_key_fingerprint: String,
    pub pid: u32,
}

pub(crate) fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn read_or_create(path: &Path, make: impl FnOnce() -> anyhow::Result<Vec<u8>>) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let b = make()?;
            write_private(path, &b)?;
            Ok(b)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Loads (or on first start creates) the hub key and the two tokens made at
/// first start: `join.token` (a bootstrap token for devices, valid until
/// revoked) and `admin.token` (an admin API token). The hub keeps only their
/// hashes; the files are for the operator (0600 in a 0700 directory).
fn identity(dir: &Path) -> anyhow::Result<(SigningKey, JoinToken, ApiToken)> {
    let pkcs8 = read_or_create(&dir.join("hub.key"), || Ok(SigningKey::generate()?.pkcs8().to_vec()))?;
    let key = SigningKey::from_pkcs8(&pkcs8).with_context(|| format!("{}", dir.join("hub.key").display()))?;
    let join_path = dir.join("join.token");
    let join = read_or_create(&join_path, || Ok(format!("{}\n", JoinToken::generate(&key.public())?).into_bytes()))?;
    let join: JoinToken = match String::from_utf8_lossy(&join).parse::<JoinToken>() {
        Ok(t) if t.pins(&key.public()) => t,
        Ok(_) => anyhow::bail!(
            "{} does not belong to {}: remove it to have a new one made",
            join_path.display(),
            dir.join("hub.key").display()
        ),
        Err(_) => {
            // Written by an older hub, in a format agents no longer accept.
            let t = JoinToken::generate(&key.public())?;
            write_private(&join_path, format!("{t}\n").as_bytes())?;
            tracing::warn!(path = %join_path.display(), "replaced a join token of an older format");
            t
        }
    };
    let admin_path = dir.join("admin.token");
    let admin = read_or_create(&admin_path, || Ok(format!("{}\n", ApiToken::generate()?).into_bytes()))?;
    let admin: ApiToken = match String::from_utf8_lossy(&admin).parse::<ApiToken>() {
        Ok(t) => t,
        Err(_) => {
            let t = ApiToken::generate()?;
            write_private(&admin_path, format!("{t}\n").as_bytes())?;
            tracing::warn!(path = %admin_path.display(), "replaced an admin token of an older format");
            t
        }
    };
    Ok((key, join, admin))
}

/// The files every hub of a cluster shares: its identity.
pub const IDENTITY_FILES: [&str; 4] = ["hub.key", "secrets.key", "join.token", "admin.token"];

/// `edge-hub init`: makes a hub's identity in `dir` (hub key, secrets key,
/// join and admin tokens) without starting it, or, `from` another
/// directory, copies one (every hub of a cluster has the same). Returns the
/// hub key's fingerprint.
pub fn init(dir: &Path, from: Option<&Path>) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    make_private(dir)?;
    if let Some(src) = from {
        // All read before any is written: an incomplete identity copies nothing.
        let mut files = Vec::new();
        for f in IDENTITY_FILES {
            let bytes = std::fs::read(src.join(f)).with_context(|| {
                format!("cannot read {}: an identity has all of {IDENTITY_FILES:?}", src.join(f).display())
            })?;
            files.push((f, bytes));
        }
        for (f, bytes) in files {
            write_private(&dir.join(f), &bytes)?;
        }
    }
    let (key, _, _) = identity(dir)?;
    secrets::SecretKeys::load_or_create(&dir.join("secrets.key"), 0)?;
    Ok(key.public().fingerprint())
}

/// Makes the data directory private to the hub: directories 0700, files
/// 0600 (also those an older hub or a wider umask left readable).
fn make_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = if meta.is_dir() { 0o700 } else { 0o600 };
    if meta.permissions().mode() & 0o777 != mode {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => {}
            // A volume's root that the hub does not own (a Kubernetes
            // emptyDir or claim, shared with the pod's group): what the hub
            // writes in it is still its own (umask 077).
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && meta.is_dir() => {
                tracing::warn!(dir = %dir.display(), "cannot restrict the directory to the hub (not its owner)");
            }
            Err(e) => return Err(e).with_context(|| format!("cannot restrict {}", dir.display())),
        }
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            make_private(&e?.path())?;
        }
    }
    Ok(())
}

/// The host of an `http(s)://host[:port]/…` URL.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_string())
}

fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()) } else { addr }
}

/// The broker URL agents are given: without the hub's credentials.
fn public_broker(url: &BrokerUrl) -> String {
    let mut public = url.clone();
    public.username = None;
    public.password = None;
    public.to_string()
}

/// Runs the hub until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    make_private(dir)?;
    let ident = identity(dir)?;
    let Some(ha) = config.ha.clone() else {
        let store = store::SledStore::open(&dir.join("state"))?;
        let listener = bind_api(&config).await?;
        return serve(config, ident, listener, Arc::new(store), None, shutdown).await;
    };
    if config.broker.is_none() {
        anyhow::bail!("hubs sharing etcd need an external broker they all reach: give --broker");
    }
    if config.advertise_url.is_none() {
        tracing::warn!(
            "agents fetch artifacts from the URL of whichever hub led when their state was written: \
             give --advertise-url the address in front of all hubs (a load balancer, a Service)"
        );
    }
    let fingerprint = ident.0.public().fingerprint();
    let secrets_key_file = config.secrets_key_file.clone().unwrap_or_else(|| dir.join("secrets.key"));
    let etcd = etcd::Etcd::connect(&ha.etcd)?;
    let recorded = ha::recorded_identity(&etcd)?;
    if recorded.is_none() {
        // The first hub of a cluster makes the secrets key, as a lone hub does.
        secrets::SecretKeys::load_or_create(&secrets_key_file, 0)?;
    }
    let secrets_key = std::fs::read(&secrets_key_file).with_context(|| {
        format!(
            "hubs sharing etcd share their secrets key too, and {} cannot be read: \
             `edge-hub init --data-dir DIR --from FIRST_HUB_DIR` copies a cluster's identity",
            secrets_key_file.display()
        )
    })?;
    // Which identity this is: the hub key and (a digest of) the secrets key.
    let identity = format!("{fingerprint} {}", edge_api::digest::Digest::of(secrets_key.trim_ascii()).hex());
    ha::check_identity(&etcd, recorded.as_deref(), &identity)?;
    let listener = bind_api(&config).await?;
    let hub_tls = api_tls(&config, &ident.0)?;
    let scheme = if hub_tls.is_some() { "https" } else { "http" };
    let me = ha
        .peer_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", connectable(listener.local_addr().expect("bound"))));
    let fence = Arc::new(etcd::Fence::new(etcd.key("leader")));
    let (leader_tx, leader_rx) = watch::channel(None);
    let (won_tx, won_rx) = tokio::sync::oneshot::channel();
    ha::campaign(etcd.clone(), fence.clone(), ha.lease, me.clone(), leader_tx, won_tx);
    // A follower's endpoints are those of the hub cluster (it forwards).
    let broker = config.broker.as_ref().map(public_broker).unwrap_or_default();
    let endpoints = Endpoints {
        api_url: format!("{scheme}://{}", connectable(listener.local_addr()?)),
        ca: hub_tls.as_ref().map(|t| t.ca_path.clone()),
        mqtt_url: broker,
        embedded_broker: false,
        hub_key_fingerprint: fingerprint.clone(),
        pid: std::process::id(),
    };
    write_private(&dir.join("hub.json"), &serde_json::to_vec_pretty(&endpoints)?)?;
    tracing::info!(store = %ha.etcd.url, peer_url = %me, "edge-hub follows; it leads when elected");
    tokio::pin!(shutdown);
    let client_tls = edge_oci::pinned::client_config(&fingerprint, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let server_tls = hub_tls.as_ref().map(|t| t.server.clone());
    let mut won = false;
    let listener = {
        let until = async {
            tokio::select! {
                r = won_rx => won = r.is_ok(),
                _ = &mut shutdown => {}
            }
        };
        let key = Arc::new(SigningKey::from_pkcs8(ident.0.pkcs8())?);
        ha::follow(listener, leader_rx, config.api_limits, server_tls, client_tls, key, until).await
    };
    if !won {
        ha::resign(&etcd, &fence);
        return Ok(());
    }
    ha::claim_identity(&etcd, &fence, &identity)?;
    let store = {
        let (etcd, fence) = (etcd.clone(), fence.clone());
        let ops = ha.etcd.max_txn_ops;
        tokio::task::spawn_blocking(move || etcd::EtcdStore::open(etcd, fence, ops)).await??
    };
    let served = serve(config, ident, listener, Arc::new(store), Some(fence.clone()), shutdown).await;
    ha::resign(&etcd, &fence);
    served
}

async fn bind_api(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("cannot listen for the API on {}", config.api_addr))
}

/// The API's TLS (and the embedded broker's): the operator's certificate
/// or one of the hub's own CA; `None` with plain text.
fn api_tls(config: &Config, key: &SigningKey) -> anyhow::Result<Option<tls::HubTls>> {
    match (&config.tls.cert, &config.tls.key) {
        _ if config.tls.insecure_plaintext => {
            let embedded = config.broker.is_none();
            for (what, addr, served) in [("API", config.api_addr, true), ("MQTT", config.mqtt_addr, embedded)] {
                if served && !addr.ip().is_loopback() {
                    tracing::warn!(
                        "the {what} listens on {addr} in plain text (--insecure-plaintext): tokens and credentials cross the network readable"
                    );
                }
            }
            Ok(None)
        }
        (Some(_), None) | (None, Some(_)) => anyhow::bail!("--tls-cert and --tls-key go together"),
        (cert, tls_key) => {
            let mut names = config.tls.names.clone();
            for addr in [config.api_addr, config.mqtt_addr] {
                if !addr.ip().is_unspecified() {
                    names.push(addr.ip().to_string());
                }
            }
            if let Some(host) = config.advertise_url.as_deref().and_then(url_host) {
                names.push(host);
            }
            if let Some(host) = config.ha.as_ref().and_then(|h| h.peer_url.as_deref()).and_then(url_host) {
                names.push(host);
            }
            let given = cert.as_deref().zip(tls_key.as_deref());
            let pkcs8 = key.pkcs8().to_vec();
            let fingerprint = key.public().fingerprint();
            Ok(Some(tls::load_or_create(
                &config.data_dir.join("tls"),
                &pkcs8,
                &fingerprint,
                &tls::default_names(&names),
                given,
            )?))
        }
    }
}

/// Serves as the one hub (or the leader of several) on `listener`, with
/// `store`, until `shutdown`.
async fn serve(
    config: Config,
    (key, join, admin): (SigningKey, JoinToken, ApiToken),
    listener: tokio::net::TcpListener,
    store: Arc<dyn store::Store>,
    fence: Option<Arc<etcd::Fence>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    let artifacts_dir = config.artifacts_dir.clone().unwrap_or_else(|| dir.join("artifacts"));
    let artifacts = artifacts::ArtifactStore::open(&artifacts_dir)?;
    make_private(dir)?;
    let api_addr = connectable(listener.local_addr()?);
    if config.api_addr.ip().is_unspecified() && config.advertise_url.is_none() {
        tracing::warn!("the API listens on all interfaces; pass --advertise-url so remote agents can fetch artifacts");
    }
    let hub_tls = api_tls(&config, &key)?;
    let scheme = if hub_tls.is_some() { "https" } else { "http" };
    let api_url = config.advertise_url.clone().unwrap_or_else(|| format!("{scheme}://{api_addr}"));

    let tls = match (&config.broker, &config.broker_ca) {
        (Some(url), ca) if url.tls => Some(Arc::new(
            edge_oci::tls_client_config_file(ca.as_deref()).map_err(|e| anyhow::anyhow!("broker TLS: {e}"))?,
        )),
        (_, Some(ca)) => anyhow::bail!("--broker-ca {} needs an mqtts:// --broker", ca.display()),
        _ => None,
    };
    let secrets_key_file = config.secrets_key_file.clone().unwrap_or_else(|| dir.join("secrets.key"));
    let secret_keys =
        secrets::SecretKeys::load_or_create(&secrets_key_file, store.load(store::Collection::Secrets)?.len())?;
    let (hub, outbox) = hub::Hub::new(hub::HubParts {
        insecure_registries: config.insecure_registries.clone(),
        store,
        key,
        api_url: api_url.clone(),
        heartbeat: config.heartbeat,
        artifacts,
        require_approval: config.require_approval,
        broker_admin: match config.broker_admin {
            BrokerAdminKind::None => Box::new(broker_admin::Unmanaged),
            BrokerAdminKind::Dynsec if config.broker.is_none() => {
                anyhow::bail!("--broker-admin dynsec manages an external broker: give --broker too")
            }
            BrokerAdminKind::Dynsec => Box::new(broker_admin::Dynsec::default()),
        },
        secret_keys,
        allow_host_network: config.allow_host_network,
        reserved_logins: vec![
            config.broker.as_ref().and_then(|b| b.username.clone()).unwrap_or_else(|| broker::HUB_USER.to_string()),
        ],
        revision_history: config.revision_history,
        compile_jobs: config.compile_jobs,
    })?;
    hub.ensure_bootstrap_token(&join.id, &join.secret, TokenKind::Join, "made at first start: DATA_DIR/join.token")
        .map_err(|e| anyhow::anyhow!("cannot record the join token: {e}"))?;
    hub.ensure_bootstrap_token(&admin.id, &admin.secret, TokenKind::Api, "made at first start: DATA_DIR/admin.token")
        .map_err(|e| anyhow::anyhow!("cannot record the admin token: {e}"))?;

    let (bus_url, agent_url, embedded) = match &config.broker {
        Some(url) => (url.clone(), public_broker(url), false),
        None => {
            let server_tls = hub_tls.as_ref().map(|t| t.server.clone());
            let e = broker::start(config.mqtt_addr, hub.clone(), config.mqtt_limits, server_tls)?;
            let addr = connectable(e.addr);
            let tls_on = hub_tls.is_some();
            let url = BrokerUrl {
                tls: tls_on,
                host: addr.ip().to_string(),
                port: addr.port(),
                username: Some(broker::HUB_USER.to_string()),
                password: Some(e.hub_password),
            };
            (url, format!("{}://{addr}", if tls_on { "mqtts" } else { "mqtt" }), true)
        }
    };
    // The hub's own session with its embedded broker trusts the hub's CA.
    let tls = match (&config.broker, &hub_tls) {
        (None, Some(t)) => Some(t.client.clone()),
        _ => tls,
    };

    let endpoints = Endpoints {
        api_url: format!("{scheme}://{api_addr}"),
        ca: hub_tls.as_ref().map(|t| t.ca_path.clone()),
        mqtt_url: agent_url.clone(),
        embedded_broker: embedded,
        hub_key_fingerprint: hub.public_key().fingerprint(),
        pid: std::process::id(),
    };
    write_private(&dir.join("hub.json"), &serde_json::to_vec_pretty(&endpoints)?)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let client_id = format!("edge-hub-{}", edge_api::keys::random_hex(4)?);
    let bus = tokio::spawn(bus::run(hub.clone(), bus_url, tls, client_id, outbox, fence, stop_rx.clone()));
    let api_tls = hub_tls.as_ref().map(|t| t.server.clone());
    let api = tokio::spawn(api::serve(listener, hub.clone(), config.api_limits, api_tls, stop_rx.clone()));
    let ticker = {
        let hub = hub.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = every.tick() => hub.tick(),
                    _ = stop.changed() => break,
                }
            }
        })
    };

    tracing::info!(
        api = %endpoints.api_url,
        mqtt = %agent_url,
        embedded_broker = embedded,
        "edge-hub is running; admin token in {}, join token in {}",
        dir.join("admin.token").display(),
        dir.join("join.token").display()
    );

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = api.await;
        let _ = bus.await;
        let _ = ticker.await;
    })
    .await;
    Ok(())
}
