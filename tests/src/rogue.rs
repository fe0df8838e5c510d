//! A rogue MQTT client for attack tests: it speaks the real wire protocol
//! (it can enrol with a bootstrap token like any device, and then sign as
//! its own node) and records what the broker did to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_api::keys::SigningKey;
use edge_api::model::NodeFacts;
use edge_api::seal::KemKeyPair;
use edge_api::token::JoinToken;
use edge_api::wire::{self, Channel, Join, Kind, Welcome};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};

use crate::{Hub, PATIENCE, wait_for};

/// Where a rogue dials: a hub's broker, over TLS when the hub speaks it
/// (trusting the hub's CA, as any client may).
#[derive(Clone)]
pub struct Broker {
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Broker {
    pub fn of(hub: &Hub) -> Broker {
        match hub.mqtt_url.starts_with("mqtts://") {
            true => Broker::tls(hub.mqtt_port(), hub.ca.as_ref().expect("a TLS hub names its CA")),
            false => Broker { port: hub.mqtt_port(), tls: None },
        }
    }

    /// A TLS broker on loopback whose certificate `ca` signed.
    pub fn tls(port: u16, ca: &std::path::Path) -> Broker {
        let pem = std::fs::read(ca).expect("the broker's CA");
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.expect("PEM")).expect("a CA certificate");
        }
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        Broker { port, tls: Some(tls) }
    }
}

/// An MQTT 3.1.1 CONNECT with a user name and password, clean session.
pub fn connect_packet(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    let field = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]); // level 4; user, password, clean session; keep-alive 30 s
    for s in [client_id, user, pass] {
        field(&mut body, s);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

/// Sends a CONNECT and vanishes at once (a reset, not a goodbye), before
/// the broker's CONNACK can be written: a client that crashed, or one
/// that means harm.
pub fn connect_and_vanish(broker: &Broker, client_id: &str, user: &str, pass: &str) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let Ok(tcp) = std::net::TcpStream::connect(("127.0.0.1", broker.port)) else { return };
    let packet = connect_packet(client_id, user, pass);
    let tcp = match &broker.tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let conn = rustls::ClientConnection::new(tls.clone(), name).expect("TLS client");
            let mut s = rustls::StreamOwned::new(conn, tcp);
            if s.write_all(&packet).and_then(|_| s.flush()).is_err() {
                return;
            }
            s.sock
        }
        None => {
            let mut tcp = tcp;
            if tcp.write_all(&packet).is_err() {
                return;
            }
            tcp
        }
    };
    // SO_LINGER 0: closing sends a reset.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// What happened to the rogue's connection, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    Connected,
    /// The broker refused the login, with the CONNACK code.
    Refused(String),
    /// The connection ended (the broker cut it, or it failed).
    Ended(String),
}

/// Every message a client received: (topic, payload).
pub type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

pub struct Rogue {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    /// Every message received: (topic, payload).
    pub seen: Seen,
    pub happened: Arc<Mutex<Vec<Happened>>>,
}

impl Rogue {
    /// Connects once (no reconnecting) and waits for the broker's answer.
    pub fn connect(broker: &Broker, client_id: &str, user: &str, pass: &str) -> Rogue {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", broker.port);
        if let Some(tls) = &broker.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        opts.set_credentials(user, pass);
        opts.set_max_packet_size(8 << 20, 8 << 20);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let seen: Seen = Default::default();
        let happened: Arc<Mutex<Vec<Happened>>> = Default::default();
        let (s, h) = (seen.clone(), happened.clone());
        rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => h.lock().unwrap().push(Happened::Connected),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        s.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()))
                    }
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        h.lock().unwrap().push(Happened::Refused(format!("{code:?}")));
                        return;
                    }
                    Err(e) => {
                        h.lock().unwrap().push(Happened::Ended(e.to_string()));
                        return;
                    }
                }
            }
        });
        let r = Rogue { rt, client, seen, happened };
        wait_for("the broker to answer the rogue", || (!r.happened.lock().unwrap().is_empty()).then_some(()));
        r
    }

    pub fn connected(&self) -> bool {
        self.happened.lock().unwrap().last() == Some(&Happened::Connected)
    }

    pub fn refused(&self) -> Option<String> {
        self.happened.lock().unwrap().iter().find_map(|h| match h {
            Happened::Refused(c) => Some(c.clone()),
            _ => None,
        })
    }

    /// Waits until the broker ends the connection.
    pub fn wait_cut_off(&self, what: &str) {
        wait_for(what, || {
            matches!(self.happened.lock().unwrap().last(), Some(Happened::Ended(_) | Happened::Refused(_)))
                .then_some(())
        });
    }

    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let c = self.client.clone();
        let t = topic.to_string();
        self.rt.block_on(async move {
            let _ = c.publish(t, QoS::AtLeastOnce, retain, payload).await;
        });
    }

    pub fn subscribe(&self, filter: &str) {
        let c = self.client.clone();
        let f = filter.to_string();
        self.rt.block_on(async move {
            let _ = c.subscribe(f, QoS::AtLeastOnce).await;
        });
    }

    /// The newest message on `topic`, if any came.
    pub fn latest(&self, topic: &str) -> Option<Vec<u8>> {
        self.seen.lock().unwrap().iter().rev().find(|(t, _)| t == topic).map(|(_, p)| p.clone())
    }
}

/// A node enrolled by the rogue through the real protocol.
pub struct Enrolled {
    pub name: String,
    pub key: SigningKey,
    pub kem: KemKeyPair,
    pub credential: String,
}

/// The facts of a small, honest-looking device.
pub fn facts() -> NodeFacts {
    serde_json::from_value(serde_json::json!({
        "arch": "amd64", "os": "linux", "cpus": 2,
        "memory": "1Gi", "allocatable_memory": "896Mi", "allocatable_cpu": "2",
        "runtimes": [{"name": "wasm", "version": "rogue", "mode": "cranelift"}],
    }))
    .expect("facts")
}

/// Sends a join for `name` (signed with `key`) over a bootstrap session and
/// returns the hub's welcome.
pub fn join(broker: &Broker, token: &JoinToken, join: &Join, key: &SigningKey) -> Result<Welcome, String> {
    let r = Rogue::connect(broker, &format!("edge-join-{}", join.node), &token.mqtt_user(), &token.secret);
    if let Some(code) = r.refused() {
        return Err(format!("bootstrap login refused: {code}"));
    }
    let welcome_topic = wire::topic(&join.node, Channel::Welcome);
    r.subscribe(&welcome_topic);
    std::thread::sleep(Duration::from_millis(100));
    r.publish(
        &wire::topic(&join.node, Channel::Join),
        wire::seal(Kind::Join, &join.node, 0, join, Some(key)).unwrap(),
        false,
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(p) = r.latest(&welcome_topic) {
            return wire::open(&p).map_err(|e| e.to_string())?.body().map_err(|e| e.to_string());
        }
        if std::time::Instant::now() > deadline {
            return Err("no welcome".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Enrols `name` with `token`, reporting `facts` and `observed` generation.
pub fn enrol(broker: &Broker, token: &str, name: &str, facts: NodeFacts, observed: u64) -> Result<Enrolled, String> {
    let token: JoinToken = token.parse().map_err(|e: edge_api::token::TokenError| e.to_string())?;
    let key = SigningKey::generate().unwrap();
    let kem = KemKeyPair::generate().unwrap();
    let j = Join {
        node: name.into(),
        key: key.public(),
        kem: kem.public(),
        token: Some(token.presented()),
        session: 1,
        observed_generation: observed,
        facts,
    };
    let w = join(broker, &token, &j, &key)?;
    if !w.accepted {
        return Err(w.error.unwrap_or_else(|| if w.pending { "pending".into() } else { "refused".into() }));
    }
    let sealed = w.credential.ok_or("no credential in the welcome")?;
    let cred = kem.open(&edge_api::seal::credential_info(name), &sealed).map_err(|e| e.to_string())?;
    Ok(Enrolled { name: name.into(), key, kem, credential: String::from_utf8(cred).unwrap() })
}

impl Enrolled {
    /// Logs in as this node.
    pub fn connect(&self, broker: &Broker) -> Rogue {
        Rogue::connect(broker, &format!("edge-agent-{}", self.name), &self.name, &self.credential)
    }

    /// A message on `channel` of `node`, signed as this node.
    pub fn seal<T: serde::Serialize>(&self, node: &str, channel: Channel, body: &T) -> Vec<u8> {
        wire::seal(channel.kind(), node, 0, body, Some(&self.key)).unwrap()
    }
}
