use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edge_api::broker_url::BrokerUrl;

/// The edge hub: schedules WebAssembly and container workloads onto agents over MQTT.
#[derive(Parser)]
#[command(name = "edge-hub", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub: API server, scheduler and (unless --broker is given) an embedded MQTT broker.
    Serve(Box<ServeArgs>),
    /// Make a hub's identity (hub key, secrets key, join and admin tokens)
    /// without starting it; with --from, copy one: every hub sharing an etcd
    /// has the same.
    Init {
        /// The hub's data directory.
        #[arg(long, env = "EDGE_HUB_DATA_DIR", default_value = "/var/lib/edge-hub")]
        data_dir: PathBuf,
        /// A directory holding a cluster's identity (a first hub's data
        /// directory, or a mounted Kubernetes Secret).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Print a token of a hub's data directory: `join` (for agents) or
    /// `admin` (for edgectl); or `ca`, the CA certificate of its TLS.
    Token {
        /// Which token.
        #[arg(value_enum, default_value = "join")]
        kind: TokenKind,
        /// The hub's data directory.
        #[arg(long, env = "EDGE_HUB_DATA_DIR", default_value = "/var/lib/edge-hub")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where the hub keeps its state, keys and tokens.
    #[arg(long, env = "EDGE_HUB_DATA_DIR", default_value = "/var/lib/edge-hub")]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "EDGE_HUB_API_ADDR", default_value = "127.0.0.1:7443")]
    api_addr: SocketAddr,
    /// Address of the embedded MQTT broker.
    #[arg(long, env = "EDGE_HUB_MQTT_ADDR", default_value = "127.0.0.1:1883")]
    mqtt_addr: SocketAddr,
    /// Use this external broker instead of the embedded one: mqtt[s]://[user:pass@]host[:port].
    #[arg(long, env = "EDGE_HUB_BROKER")]
    broker: Option<BrokerUrl>,
    /// CA certificates (PEM) that sign an mqtts:// broker's certificate; default: the system's.
    #[arg(long, env = "EDGE_HUB_BROKER_CA")]
    broker_ca: Option<PathBuf>,
    /// The URL agents use to reach this hub's API (for artifact downloads).
    #[arg(long, env = "EDGE_HUB_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// How often agents send heartbeats; a node is NotReady after three are missed.
    /// (A dead agent is Offline sooner, by its MQTT keep-alive; a node running
    /// replicas with `[spec.node_loss]` sends them as often as its lease needs.)
    #[arg(long, env = "EDGE_HUB_HEARTBEAT", default_value = "60s", value_parser = edge_api::time::parse_duration)]
    heartbeat: Duration,
    /// A registry (host:port) to pull oci:// components from over plain HTTP; repeatable.
    /// Registries on loopback always are.
    #[arg(long = "insecure-registry", env = "EDGE_HUB_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// Every node that enrols waits for `edgectl approve node NAME` (tokens
    /// can also ask for it one by one: `edgectl token create --require-approval`).
    #[arg(long, env = "EDGE_HUB_REQUIRE_APPROVAL")]
    require_approval: bool,
    /// Revisions of each workload kept for `edgectl rollout history|undo`.
    #[arg(long, env = "EDGE_HUB_REVISION_HISTORY", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    revision_history: u32,
    /// Components compiled at once for nodes' targets (each compile uses
    /// one core and, for a large component, some hundreds of MB); 0: the
    /// hub compiles nothing and agents compile for themselves.
    #[arg(long, env = "EDGE_HUB_COMPILE_JOBS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=64))]
    compile_jobs: u32,
    /// Connections the embedded broker accepts at once.
    #[arg(long, env = "EDGE_HUB_MQTT_MAX_CONNECTIONS", default_value_t = 10_000)]
    mqtt_max_connections: usize,
    /// Connections the embedded broker accepts at once from one address
    /// (devices behind one NAT share an address).
    #[arg(long, env = "EDGE_HUB_MQTT_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1_000)]
    mqtt_max_connections_per_address: usize,
    /// Serve the API and the embedded broker in plain text (HTTP, MQTT)
    /// instead of TLS. Only for loopback or a trusted private network.
    #[arg(long, env = "EDGE_HUB_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// A certificate chain (PEM) for the API and the embedded broker,
    /// instead of one signed by the hub's own CA; needs --tls-key.
    #[arg(long, env = "EDGE_HUB_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "EDGE_HUB_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Another name or address the hub's own certificate is for (it always
    /// covers localhost, the loopback addresses, the host name, the listen
    /// addresses and the --advertise-url host); repeatable.
    #[arg(long = "tls-san", env = "EDGE_HUB_TLS_SANS", value_delimiter = ',')]
    tls_sans: Vec<String>,
    /// API connections open at once.
    #[arg(long, env = "EDGE_HUB_API_MAX_CONNECTIONS", default_value_t = edge_hub::api::DEFAULT_LIMITS.max_connections)]
    api_max_connections: usize,
    /// API connections open at once from one address.
    #[arg(long, env = "EDGE_HUB_API_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = edge_hub::api::DEFAULT_LIMITS.per_address)]
    api_max_connections_per_address: usize,
    /// The key that encrypts secrets at rest (made at first start, 0600;
    /// default DATA_DIR/secrets.key). Keep it where backups of the data
    /// directory do not go.
    #[arg(long, env = "EDGE_HUB_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Who keeps the external --broker's logins in step with the hub: `none`
    /// (the operator), or `dynsec` (the hub, over Mosquitto's
    /// dynamic-security plugin; its --broker login needs the admin role).
    #[arg(long, env = "EDGE_HUB_BROKER_ADMIN", value_enum, default_value = "none")]
    broker_admin: edge_hub::BrokerAdminKind,
    /// Let container workloads ask for their node's network (`network =
    /// "host"`): they then reach whatever listens on the node, loopback
    /// included. Off by default.
    #[arg(long, env = "EDGE_HUB_ALLOW_HOST_NETWORK")]
    allow_host_network: bool,
    /// Where uploaded components and compiled code are kept; with several
    /// hubs (--store etcd://…), a directory they all share. Default DATA_DIR/artifacts.
    #[arg(long, env = "EDGE_HUB_ARTIFACTS_DIR")]
    artifacts_dir: Option<PathBuf>,
    /// Keep the state in etcd, shared by several hubs of which one leads
    /// and the others forward the API to it: etcd://host:port[,host:port…]
    /// (etcds:// for TLS). Default: the hub's own store in DATA_DIR/state.
    #[arg(long, env = "EDGE_HUB_STORE")]
    store: Option<edge_hub::etcd::EtcdUrl>,
    /// The prefix of every key this hub cluster keeps in etcd.
    #[arg(long, env = "EDGE_HUB_ETCD_PREFIX", default_value = "/edge-hub/")]
    etcd_prefix: String,
    /// CA certificates (PEM) of the etcd servers (as `etcdctl --cacert`).
    #[arg(long, env = "EDGE_HUB_ETCD_CACERT")]
    etcd_cacert: Option<PathBuf>,
    /// A client certificate (PEM) for etcd (as `etcdctl --cert`); needs --etcd-key.
    #[arg(long, env = "EDGE_HUB_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "EDGE_HUB_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// `user:password` for etcd's authentication (as `etcdctl --user`).
    #[arg(long, env = "EDGE_HUB_ETCD_USER", hide_env_values = true)]
    etcd_user: Option<String>,
    /// Operations etcd accepts in one transaction (its --max-txn-ops).
    #[arg(long, env = "EDGE_HUB_ETCD_MAX_TXN_OPS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    etcd_max_txn_ops: u32,
    /// The leader's etcd lease: a hub that dies is replaced about this
    /// long after (at least 2s).
    #[arg(long, env = "EDGE_HUB_LEADER_LEASE", default_value = "3s", value_parser = parse_lease)]
    leader_lease: Duration,
    /// The URL the other hubs forward API requests to while this one leads
    /// (default: http(s)://API_ADDR).
    #[arg(long, env = "EDGE_HUB_PEER_URL")]
    peer_url: Option<String>,
}

fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = edge_api::time::parse_duration(s)?;
    if d < Duration::from_secs(2) || d > Duration::from_secs(60) || d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: the leader lease is whole seconds from 2s to 60s"));
    }
    Ok(d)
}

impl From<ServeArgs> for edge_hub::Config {
    fn from(a: ServeArgs) -> Self {
        edge_hub::Config {
            data_dir: a.data_dir,
            api_addr: a.api_addr,
            mqtt_addr: a.mqtt_addr,
            broker: a.broker,
            broker_ca: a.broker_ca,
            advertise_url: a.advertise_url,
            heartbeat: a.heartbeat,
            insecure_registries: a.insecure_registries,
            require_approval: a.require_approval,
            revision_history: a.revision_history as usize,
            compile_jobs: a.compile_jobs as usize,
            tls: edge_hub::TlsSettings {
                insecure_plaintext: a.insecure_plaintext,
                cert: a.tls_cert,
                key: a.tls_key,
                names: a.tls_sans,
            },
            api_limits: edge_listen::Limits {
                max_connections: a.api_max_connections,
                per_address: a.api_max_connections_per_address,
                ..edge_hub::api::DEFAULT_LIMITS
            },
            secrets_key_file: a.secrets_key_file,
            broker_admin: a.broker_admin,
            allow_host_network: a.allow_host_network,
            artifacts_dir: a.artifacts_dir,
            ha: a.store.map(|url| edge_hub::HaSettings {
                etcd: edge_hub::etcd::EtcdOptions {
                    url,
                    prefix: a.etcd_prefix,
                    ca: a.etcd_cacert,
                    cert: a.etcd_cert,
                    key: a.etcd_key,
                    user: a.etcd_user,
                    max_txn_ops: a.etcd_max_txn_ops as usize,
                },
                lease: a.leader_lease,
                peer_url: a.peer_url,
            }),
            mqtt_limits: edge_hub::broker::Limits {
                max_connections: a.mqtt_max_connections,
                per_address: a.mqtt_max_connections_per_address,
            },
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TokenKind {
    Join,
    Admin,
    Ca,
}

fn main() {
    // Everything the hub writes (state, keys, tokens, artifacts) is its own.
    // SAFETY: umask(2) only sets this process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    // Let the connection limits, not the file table, decide who is served.
    let _ = edge_listen::raise_open_files_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let config = edge_hub::Config::from(*args);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(edge_hub::run(config, shutdown_signal())))
        }
        Command::Init { data_dir, from } => edge_hub::init(&data_dir, from.as_deref()).map(|fp| {
            println!("hub key {fp}: identity in {}", data_dir.display());
        }),
        Command::Token { kind, data_dir } => {
            let file = data_dir.join(match kind {
                TokenKind::Join => "join.token",
                TokenKind::Admin => "admin.token",
                TokenKind::Ca => "tls/ca.crt",
            });
            match std::fs::read_to_string(&file) {
                Ok(t) => {
                    println!("{}", t.trim());
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
                    "{} does not exist: has a hub run with --data-dir {}?",
                    file.display(),
                    data_dir.display()
                )),
                Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", file.display())),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("edge-hub: {e:#}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
