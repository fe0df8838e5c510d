//! The embedded MQTT broker (rumqttd), so one binary is enough.
//!
//! rumqttd runs its own runtimes and has no shutdown API, so it gets its own
//! OS threads and lives as long as the process. Through the hooks of our
//! patched copy (`vendor/rumqttd`, see its VENDORED.md) the hub decides, for
//! every connection:
//!
//! - admission: at most `max_connections` sockets, and `per_address` from
//!   one address; a TLS handshake within [`HANDSHAKE_TIMEOUT`];
//! - who it is: the hub itself, an enrolled node with its own credential, or
//!   a device enrolling with a bootstrap token ([`Hub::mqtt_login`]); the
//!   client id is bound to that login, so no one can take over another's
//!   session;
//! - what it may do: every publish and subscription is checked against
//!   [`crate::authz`]; a denied one ends the connection, and so does the
//!   revocation of the credential it logged in with.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_api::wire;
use rumqttd::edge::{BoxFuture, ConnectInfo, Grant, Hooks, Stream};
use rumqttd::protocol::ConnectReturnCode;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::authz::{self, Principal};
use crate::hub::Hub;

/// The user name the hub's own client uses on the embedded broker.
pub const HUB_USER: &str = "edge-hub";

/// 10 s from TCP accept to a usable stream (the TLS handshake); then 10 s
/// more for the MQTT CONNECT (rumqttd's connection timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// 5 min: the longest keep-alive honoured. A client asking for more is held
/// to it, so an idle connection is dropped after 7.5 min of silence.
pub const MAX_KEEP_ALIVE_SECS: u16 = 300;

/// Connection limits of the embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sockets at once, in all.
    pub max_connections: usize,
    /// Sockets at once from one address (a site behind NAT shares one).
    pub per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 10_000, per_address: 1_000 }
    }
}

pub struct Embedded {
    pub addr: SocketAddr,
    pub hub_password: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the embedded MQTT broker did not start listening on {0} within 5 s")]
    NotListening(SocketAddr),
    #[error("could not start the embedded MQTT broker: {0}")]
    Start(String),
}

struct EdgeHooks {
    hub: Arc<Hub>,
    hub_password: String,
    admission: edge_listen::Admission,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// When a refusal was last logged, so a flood of them is logged once a second.
    last_refusal_log: Mutex<Option<Instant>>,
    refused: AtomicU64,
}

impl EdgeHooks {
    fn log_refusal(&self, what: std::fmt::Arguments) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_refusal_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::warn!(refused_so_far = self.refused.load(Ordering::Relaxed), "mqtt: {what}");
        }
    }
}

impl Hooks for EdgeHooks {
    fn admit(&self, peer: SocketAddr) -> Option<Box<dyn Send + Sync>> {
        match self.admission.admit(peer.ip()) {
            Ok(admitted) => Some(Box::new(admitted)),
            Err(refused) => {
                self.log_refusal(format_args!("connection from {peer} refused: {refused}"));
                None
            }
        }
    }

    fn wrap(&self, stream: tokio::net::TcpStream) -> BoxFuture<std::io::Result<Stream>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tls {
                Some(acceptor) => Ok(Box::new(acceptor.accept(stream).await?) as Stream),
                None => Ok(Box::new(stream) as Stream),
            }
        })
    }

    fn handshake_timeout(&self) -> Duration {
        HANDSHAKE_TIMEOUT
    }

    fn max_keep_alive(&self) -> u16 {
        MAX_KEEP_ALIVE_SECS
    }

    fn connect(&self, c: &ConnectInfo) -> Result<Arc<dyn Grant>, ConnectReturnCode> {
        let (Some(user), Some(pass)) = (c.user, c.password) else {
            self.log_refusal(format_args!("{} ({}) connected without user name and password", c.client_id, c.peer));
            return Err(ConnectReturnCode::BadUserNamePassword);
        };
        let principal = match self.hub.mqtt_login(c.client_id, user, pass, &self.hub_password) {
            Ok(p) => p,
            Err(e) => {
                self.log_refusal(format_args!("login of {user:?} as {:?} from {} refused: {e}", c.client_id, c.peer));
                return Err(ConnectReturnCode::NotAuthorized);
            }
        };
        if let Some((topic, retain, len)) = c.will
            && let Err(e) = authz::may_publish(&principal, topic, retain, len)
        {
            self.log_refusal(format_args!("login of {user:?} refused: its last will: {e}"));
            return Err(ConnectReturnCode::NotAuthorized);
        }
        Ok(Arc::new(EdgeGrant {
            hub: self.hub.clone(),
            principal,
            user: user.to_string(),
            credential: pass.to_string(),
        }))
    }
}

struct EdgeGrant {
    hub: Arc<Hub>,
    principal: Principal,
    user: String,
    credential: String,
}

impl EdgeGrant {
    fn denied(&self, e: String) -> String {
        self.hub.metrics.mqtt_denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(user = %self.user, "mqtt: {e}; disconnecting");
        e
    }
}

impl Grant for EdgeGrant {
    fn publish(&self, topic: &str, retain: bool, len: usize) -> Result<(), String> {
        authz::may_publish(&self.principal, topic, retain, len).map_err(|e| self.denied(e))
    }

    fn subscribe(&self, filter: &str) -> Result<(), String> {
        authz::may_subscribe(&self.principal, filter).map_err(|e| self.denied(e))
    }

    fn revoked(&self) -> BoxFuture<()> {
        let hub = self.hub.clone();
        let principal = self.principal.clone();
        let user = self.user.clone();
        let credential = self.credential.clone();
        Box::pin(async move {
            let mut changes = hub.revocations();
            loop {
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !hub.mqtt_still_valid(&principal, &user, &credential) {
                    tracing::info!(user, "mqtt: credential revoked; disconnecting");
                    return;
                }
            }
        })
    }
}

/// Starts the embedded broker on `addr`, answering to `hub`.
pub fn start(
    addr: SocketAddr,
    hub: Arc<Hub>,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<Embedded, BrokerError> {
    // rumqttd only logs bind failures, so check the address first (and learn
    // the port when 0 was asked for).
    let probe = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let addr = probe.local_addr().map_err(|source| BrokerError::Bind { addr, source })?;
    drop(probe);

    let hub_password = edge_api::keys::random_hex(16).map_err(|e| BrokerError::Start(e.to_string()))?;
    let hooks = EdgeHooks {
        hub,
        hub_password: hub_password.clone(),
        admission: edge_listen::Admission::new(limits.max_connections, limits.per_address),
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        last_refusal_log: Mutex::new(None),
        refused: AtomicU64::new(0),
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: wire::MAX_PAYLOAD + 4096,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
        hooks: Some(Arc::new(hooks)),
    };
    let server =
        ServerSettings { name: "edge-mqtt".into(), listen: addr, tls: None, next_connection_delay_ms: 1, connections };
    let config = Config {
        id: 0,
        router: RouterConfig {
            // Admission is limited by the hooks; the router allows a little more.
            max_connections: limits.max_connections + 10,
            max_outgoing_packet_count: 200,
            // Each filter keeps at most two segments: enough for the largest
            // payload, small enough that the hub stays within a few MiB.
            max_segment_size: wire::MAX_PAYLOAD + (64 << 10),
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;

    // Wait until rumqttd listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    while TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_err() {
        if Instant::now() >= deadline {
            return Err(BrokerError::NotListening(addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Embedded { addr, hub_password })
}
