//! The edge hub: API server, store, scheduler, controllers, artifact store
//! and (optionally) the embedded MQTT broker. See ARCHITECTURE.md.

pub mod api;
pub mod artifacts;
pub mod broker;
pub mod bus;
pub mod controller;
pub mod hub;
pub mod metrics;
pub mod scheduler;
pub mod store;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edge_api::broker_url::BrokerUrl;
use edge_api::keys::SigningKey;
use edge_api::token::JoinToken;
use tokio::sync::watch;

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
}

/// What a started hub tells its caller (and writes to `DATA_DIR/hub.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    pub api_url: String,
    /// The broker agents should dial (without credentials).
    pub mqtt_url: String,
    pub embedded_broker: bool,
    pub hub_key_fingerprint: String,
    pub pid: u32,
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
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

/// Loads (or on first start creates) the hub key, join token and admin token.
fn identity(dir: &Path) -> anyhow::Result<(SigningKey, JoinToken, String)> {
    let pkcs8 = read_or_create(&dir.join("hub.key"), || Ok(SigningKey::generate()?.pkcs8().to_vec()))?;
    let key = SigningKey::from_pkcs8(&pkcs8).with_context(|| format!("{}", dir.join("hub.key").display()))?;
    let join_path = dir.join("join.token");
    let join = read_or_create(&join_path, || {
        Ok(format!("{}\n", JoinToken::new(&key.public(), edge_api::keys::random_hex(16)?)).into_bytes())
    })?;
    let join: JoinToken =
        String::from_utf8_lossy(&join).parse().with_context(|| format!("{} is corrupt", join_path.display()))?;
    anyhow::ensure!(
        join.pins(&key.public()),
        "{} does not belong to {}: remove it to have a new one made",
        join_path.display(),
        dir.join("hub.key").display()
    );
    let admin =
        read_or_create(&dir.join("admin.token"), || Ok(format!("{}\n", edge_api::keys::random_hex(24)?).into_bytes()))?;
    let admin = String::from_utf8_lossy(&admin).trim().to_string();
    anyhow::ensure!(!admin.is_empty(), "{} is empty", dir.join("admin.token").display());
    Ok((key, join, admin))
}

fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()) } else { addr }
}

/// Runs the hub until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let (key, join, admin) = identity(dir)?;
    let store = store::SledStore::open(&dir.join("state"))?;
    let artifacts = artifacts::ArtifactStore::open(&dir.join("artifacts"))?;

    let listener = tokio::net::TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("cannot listen for the API on {}", config.api_addr))?;
    let api_addr = connectable(listener.local_addr()?);
    if config.api_addr.ip().is_unspecified() && config.advertise_url.is_none() {
        tracing::warn!("the API listens on all interfaces; pass --advertise-url so remote agents can fetch artifacts");
    }
    let api_url = config.advertise_url.clone().unwrap_or_else(|| format!("http://{api_addr}"));

    let tls = match (&config.broker, &config.broker_ca) {
        (Some(url), ca) if url.tls => Some(Arc::new(
            edge_oci::tls_client_config_file(ca.as_deref()).map_err(|e| anyhow::anyhow!("broker TLS: {e}"))?,
        )),
        (_, Some(ca)) => anyhow::bail!("--broker-ca {} needs an mqtts:// --broker", ca.display()),
        _ => None,
    };
    let (bus_url, agent_url, embedded) = match &config.broker {
        Some(url) => {
            let mut public = url.clone();
            public.username = None;
            public.password = None;
            (url.clone(), public.to_string(), false)
        }
        None => {
            let e = broker::start(config.mqtt_addr, join.clone())?;
            let addr = connectable(e.addr);
            let url = BrokerUrl {
                tls: false,
                host: addr.ip().to_string(),
                port: addr.port(),
                username: Some(broker::HUB_USER.to_string()),
                password: Some(e.hub_password),
            };
            (url, format!("mqtt://{addr}"), true)
        }
    };

    let (hub, outbox) = hub::Hub::new(hub::HubParts {
        insecure_registries: config.insecure_registries.clone(),
        store: Arc::new(store),
        key,
        join,
        admin_token: admin,
        api_url: api_url.clone(),
        heartbeat: config.heartbeat,
        artifacts,
    })?;

    let endpoints = Endpoints {
        api_url: format!("http://{api_addr}"),
        mqtt_url: agent_url.clone(),
        embedded_broker: embedded,
        hub_key_fingerprint: hub.public_key().fingerprint(),
        pid: std::process::id(),
    };
    write_private(&dir.join("hub.json"), &serde_json::to_vec_pretty(&endpoints)?)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let client_id = format!("edge-hub-{}", edge_api::keys::random_hex(4)?);
    let bus = tokio::spawn(bus::run(hub.clone(), bus_url, tls, client_id, outbox, stop_rx.clone()));
    let api = tokio::spawn(api::serve(listener, hub.clone(), stop_rx.clone()));
    let ticker = {
        let hub = hub.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut ready = Vec::new();
            let mut every = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = every.tick() => hub.tick(&mut ready),
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
