use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edge_api::broker_url::BrokerUrl;
use edge_api::model::Labels;
use edge_api::quantity::{Cpu, Memory};
use edge_api::token::JoinToken;

/// The edge agent: runs WebAssembly workloads a hub assigns to this device.
#[derive(Parser)]
#[command(name = "edge-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Join the hub (first start) and run what it assigns, also while it is unreachable.
    Run {
        /// Where the agent keeps its identity, state, artifacts and logs.
        #[arg(long, env = "EDGE_AGENT_DATA_DIR", default_value = "/var/lib/edge-agent")]
        data_dir: PathBuf,
        /// The MQTT broker: mqtt[s]://[user:pass@]host[:port] (mqtts: TLS, port 8883).
        #[arg(long, env = "EDGE_AGENT_BROKER")]
        broker: BrokerUrl,
        /// CA certificates (PEM) that sign an mqtts:// broker's certificate; default: the system's.
        #[arg(long, env = "EDGE_AGENT_BROKER_CA")]
        broker_ca: Option<PathBuf>,
        /// A file holding a join token (`edgectl token create`), needed to enrol;
        /// removed once the agent has its own credential.
        #[arg(long, env = "EDGE_JOIN_TOKEN_FILE", conflicts_with = "join_token")]
        join_token_file: Option<PathBuf>,
        /// A join token, from the environment (a command line is visible to
        /// every user of the device: prefer --join-token-file).
        #[arg(long, env = "EDGE_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<JoinToken>,
        /// This node's name (default: the host name).
        #[arg(long, env = "EDGE_AGENT_NAME")]
        name: Option<String>,
        /// A label for scheduling, key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// MQTT keep-alive; the broker declares a silent agent offline after 1.5 times this.
        #[arg(long, env = "EDGE_AGENT_KEEPALIVE", default_value = "30s", value_parser = edge_api::time::parse_duration)]
        keepalive: Duration,
        /// Memory kept for the system, not offered to workloads.
        #[arg(long, default_value = "128Mi")]
        reserve_memory: Memory,
        /// CPU kept for the system, not offered to workloads.
        #[arg(long, default_value = "0")]
        reserve_cpu: Cpu,
        /// Where the built-in HTTP proxy listens for requests to services.
        #[arg(long, env = "EDGE_AGENT_PROXY_ADDR", default_value = "0.0.0.0:8080")]
        proxy_addr: std::net::SocketAddr,
        /// Proxy connections open at once.
        #[arg(long, env = "EDGE_AGENT_PROXY_MAX_CONNECTIONS", default_value_t = edge_agent::proxy::DEFAULT_LIMITS.max_connections)]
        proxy_max_connections: usize,
        /// Proxy connections open at once from one address.
        #[arg(long, env = "EDGE_AGENT_PROXY_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = edge_agent::proxy::DEFAULT_LIMITS.per_address)]
        proxy_max_connections_per_address: usize,
        /// A route to a plain HTTP server: HOST[/PATH]=http://ADDR; repeatable.
        #[arg(long = "route")]
        routes: Vec<String>,
        /// Instances the Wasm pooling allocator holds: auto (from memory and
        /// address space), or a number; 0 allocates on demand.
        #[arg(long, env = "EDGE_AGENT_WASM_POOL_SLOTS", default_value = "auto", value_parser = parse_pool)]
        wasm_pool_slots: edge_agent::wasm::PoolSize,
        /// A registry (host:port) to pull container images from over plain
        /// HTTP; repeatable. Registries on loopback always are.
        /// Where secret files and container bundles go: a tmpfs, so secrets
        /// never reach the device's storage (default /run/edge-agent as root,
        /// else $XDG_RUNTIME_DIR/edge-agent). One per agent.
        #[arg(long, env = "EDGE_AGENT_RUN_DIR")]
        run_dir: Option<PathBuf>,
        /// The addresses of the node's container bridge (edge0), from which
        /// each bridged container gets one.
        #[arg(long, env = "EDGE_AGENT_CONTAINER_SUBNET", default_value = "10.89.0.0/16")]
        container_subnet: String,
        #[arg(long = "insecure-registry", env = "EDGE_AGENT_INSECURE_REGISTRIES", value_delimiter = ',')]
        insecure_registries: Vec<String>,
    },
    /// Compile a component for this device (run by the agent itself, in a
    /// child process with a memory limit, when the hub has no compiled code).
    #[command(hide = true)]
    Compile {
        #[arg(long)]
        component: PathBuf,
        /// The digest the component must hash to.
        #[arg(long)]
        digest: String,
        #[arg(long)]
        output: PathBuf,
    },
}

fn parse_pool(s: &str) -> Result<edge_agent::wasm::PoolSize, String> {
    match s {
        "auto" => Ok(edge_agent::wasm::PoolSize::Auto),
        n => n
            .parse()
            .map(edge_agent::wasm::PoolSize::Slots)
            .map_err(|_| format!("{s:?} is not auto or a number of slots")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    edge_api::names::check_label_key(k)?;
    edge_api::names::check_label_value(v)?;
    Ok((k.to_string(), v.to_string()))
}

fn main() {
    // Let the connection limits, not the file table, decide who is served.
    let _ = edge_listen::raise_open_files_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile { component, digest, output } => {
            std::process::exit(edge_agent::wasm::compiled::compile_main(&component, &digest, &output))
        }
        Command::Run {
            data_dir,
            broker,
            join_token,
            join_token_file,
            name,
            labels,
            keepalive,
            reserve_memory,
            reserve_cpu,
            proxy_addr,
            proxy_max_connections,
            proxy_max_connections_per_address,
            routes,
            wasm_pool_slots,
            broker_ca,
            run_dir,
            container_subnet,
            insecure_registries,
        } => {
            let join_token = match (&join_token_file, join_token) {
                (Some(f), _) => match std::fs::read_to_string(f) {
                    Ok(text) => match text.parse::<JoinToken>() {
                        Ok(t) => Some(t),
                        Err(e) => {
                            eprintln!("edge-agent: --join-token-file {}: {e}", f.display());
                            std::process::exit(2);
                        }
                    },
                    // Removed after enrolment: the agent uses its own credential now.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        eprintln!("edge-agent: cannot read --join-token-file {}: {e}", f.display());
                        std::process::exit(2);
                    }
                },
                (None, t) => t,
            };
            if keepalive < Duration::from_secs(1) {
                eprintln!("edge-agent: --keepalive must be at least 1s");
                std::process::exit(2);
            }
            let config = edge_agent::Config {
                data_dir,
                broker,
                join_token,
                join_token_file,
                name,
                labels: labels.into_iter().collect::<Labels>(),
                keepalive,
                reserve_memory,
                reserve_cpu,
                proxy_addr,
                proxy_limits: edge_listen::Limits {
                    max_connections: proxy_max_connections,
                    per_address: proxy_max_connections_per_address,
                    ..edge_agent::proxy::DEFAULT_LIMITS
                },
                routes,
                wasm_pool: wasm_pool_slots,
                broker_ca,
                insecure_registries,
                run_dir,
                container_subnet,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(edge_agent::run(config, shutdown_signal())))
        }
    };
    if let Err(e) = result {
        eprintln!("edge-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
