//! The embedded MQTT broker (rumqttd), so one binary is enough.
//!
//! Agents authenticate with the join token as their password; the hub with a
//! secret made at start-up. rumqttd has no shutdown API and runs its own
//! runtimes, so it gets its own OS threads and lives as long as the process.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use edge_api::token::JoinToken;
use edge_api::wire;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The user name the hub's own client uses on the embedded broker.
pub const HUB_USER: &str = "edge-hub";

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

pub fn start(addr: SocketAddr, join: JoinToken) -> Result<Embedded, BrokerError> {
    // rumqttd only logs bind failures, so check the address first (and learn
    // the port when 0 was asked for).
    let probe = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let addr = probe.local_addr().map_err(|source| BrokerError::Bind { addr, source })?;
    drop(probe);

    let hub_password = edge_api::keys::random_hex(16).map_err(|e| BrokerError::Start(e.to_string()))?;
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: wire::MAX_PAYLOAD + 4096,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let secret = hub_password.clone();
    connections.set_auth_handler(move |_client_id: String, user: String, pass: String| {
        let ok = if user == HUB_USER {
            edge_api::hex::ct_eq(pass.as_bytes(), secret.as_bytes())
        } else {
            join.matches(&pass)
        };
        if !ok {
            tracing::warn!(user, "mqtt connection refused: bad credentials");
        }
        async move { ok }
    });
    let server =
        ServerSettings { name: "edge-mqtt".into(), listen: addr, tls: None, next_connection_delay_ms: 1, connections };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
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

    // Wait until rumqttd accepts our own credentials: a full CONNECT/CONNACK
    // exchange proves both that it listens and that authentication works.
    let deadline = Instant::now() + Duration::from_secs(5);
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    loop {
        match handshake(target, HUB_USER, &hub_password) {
            Ok(0) => break,
            Ok(code) => {
                return Err(BrokerError::Start(format!("the broker refused the hub's own login (code {code})")));
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return Err(BrokerError::NotListening(addr)),
        }
    }
    Ok(Embedded { addr, hub_password })
}

/// One MQTT 3.1.1 CONNECT (clean session, user name and password), the
/// CONNACK return code, then DISCONNECT.
fn handshake(addr: SocketAddr, user: &str, pass: &str) -> std::io::Result<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    };
    let mut body = Vec::new();
    field(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 10]); // level 4; user, password, clean; keep-alive 10 s
    field(&mut body, b"edge-hub-probe");
    field(&mut body, user.as_bytes());
    field(&mut body, pass.as_bytes());
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    s.write_all(&packet)?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)?;
    if ack[0] != 0x20 || ack[1] != 2 {
        return Err(std::io::Error::other("not a CONNACK"));
    }
    let _ = s.write_all(&[0xE0, 0]);
    Ok(ack[3])
}
