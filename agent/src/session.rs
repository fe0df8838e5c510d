//! The agent's MQTT session with the hub.
//!
//! The agent always dials out (it works behind NAT). Until it is enrolled it
//! logs in with its bootstrap token (as `join-<id>`, client id
//! `edge-join-<node>`), sends its signed join and waits for the hub's
//! welcome, which carries its own credential sealed to its X25519 key; it
//! stores that, forgets the token, and from then on logs in as itself
//! (client id `edge-agent-<node>`). On every connection it subscribes to its
//! own topics, announces itself (join, presence, full status), then applies
//! signed desired state: verify, persist and flush, acknowledge, hand to the
//! supervisor. It never acts on a generation older than the one it has, nor
//! on anything the pinned hub key did not sign, and serves each request of
//! the hub once, before it expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edge_api::broker_url::BrokerUrl;
use edge_api::wire::{
    self, Channel, Heartbeat, Join, Kind, NodeDesired, NodeStatus, Presence, Request, Response, Welcome,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, NetworkOptions, Packet, QoS,
};
use tokio::sync::{mpsc, watch};

use crate::Ctx;
use crate::supervisor::{Cmd, Snapshot};

/// Heartbeats before the hub says how often it wants them.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Connections closed by the broker before it accepted the login, in a row,
/// that an agent which never enrolled takes as a refused join token.
const LOGIN_CLOSURES: u32 = 3;

/// How often an agent asks again to join while the hub has not answered.
const JOIN_RETRY: Duration = Duration::from_secs(3);

/// How often an agent waiting for approval asks again.
const PENDING_RETRY: Duration = Duration::from_secs(10);

/// Largest piece of log sent in one message.
const LOG_CHUNK: usize = 32 << 10;

struct Out {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
}

pub struct Session {
    ctx: Arc<Ctx>,
    sup: mpsc::UnboundedSender<Cmd>,
    out: mpsc::Sender<Out>,
    fatal: mpsc::UnboundedSender<String>,
    generation: u64,
    stashed_desired: Option<Vec<u8>>,
    status_seq: u64,
    heartbeat: Duration,
    heartbeat_changed: bool,
    hb_seq: u64,
    streams: HashMap<String, watch::Sender<tokio::time::Instant>>,
    /// Whether the hub accepted this connection's join.
    welcomed: bool,
    /// Whether the hub said enrolment waits for approval.
    pending: bool,
    /// A credential just received: log in again with it.
    relogin: bool,
    /// Request ids already served (each is a nonce), until they expire.
    nonces: edge_api::nonce::NonceCache,
    /// The number of the current connection in this session (see `Presence::conn`).
    conn: Arc<std::sync::atomic::AtomicU64>,
}

/// How the agent logs in to the broker.
#[derive(Clone)]
enum Login {
    /// As itself, with the credential the hub issued.
    Node(String),
    /// With a bootstrap token, to enrol.
    Bootstrap(edge_api::token::JoinToken),
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    /// Log in again (with a new credential, or back to the bootstrap token).
    Relogin,
}

impl Session {
    fn send(&self, topic: String, payload: Vec<u8>, qos: QoS, retain: bool) {
        if self.out.try_send(Out { topic, payload, qos, retain }).is_err() {
            tracing::warn!("mqtt outgoing queue full; a message was dropped");
        }
    }

    fn seal<T: serde::Serialize>(&self, kind: Kind, generation: u64, body: &T) -> Option<Vec<u8>> {
        match wire::seal(kind, &self.ctx.node, generation, body, Some(&self.ctx.key)) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!("cannot encode {kind}: {e}");
                None
            }
        }
    }

    /// Asks to join. Nothing else is sent until the hub's welcome arrives:
    /// brokers need not keep order across topics, and the hub refuses
    /// presence and status from a node it has not registered yet.
    fn join(&mut self, login: &Login) {
        let join = Join {
            node: self.ctx.node.clone(),
            key: self.ctx.key.public(),
            kem: self.ctx.kem.public(),
            token: match login {
                Login::Bootstrap(t) => Some(t.presented()),
                Login::Node(_) => None,
            },
            session: self.ctx.session,
            observed_generation: self.generation,
            facts: self.ctx.facts.clone(),
        };
        if let Some(p) = self.seal(Kind::Join, 0, &join) {
            self.send(wire::topic(&self.ctx.node, Channel::Join), p, QoS::AtLeastOnce, false);
        }
    }

    /// After the welcome: presence (retained) and the full status.
    fn announce(&mut self, snapshot: &Snapshot) {
        let conn = self.conn.load(std::sync::atomic::Ordering::Relaxed);
        let presence = Presence { online: true, session: self.ctx.session, conn };
        if let Some(p) = self.seal(Kind::Presence, 0, &presence) {
            self.send(wire::topic(&self.ctx.node, Channel::Presence), p, QoS::AtLeastOnce, true);
        }
        self.publish_status(snapshot);
    }

    fn publish_status(&mut self, s: &Snapshot) {
        self.status_seq += 1;
        let st = NodeStatus {
            node: self.ctx.node.clone(),
            session: self.ctx.session,
            seq: self.status_seq,
            observed_generation: s.observed_generation,
            instances: s.instances.clone(),
        };
        if let Some(p) = self.seal(Kind::Status, s.observed_generation, &st) {
            self.send(wire::topic(&self.ctx.node, Channel::Status), p, QoS::AtLeastOnce, true);
        }
    }

    fn heartbeat(&mut self, observed: u64) {
        self.hb_seq += 1;
        let hb = Heartbeat { session: self.ctx.session, seq: self.hb_seq, observed_generation: observed };
        // Signed like everything else: only this node can vouch for its liveness.
        if let Some(p) = self.seal(Kind::Heartbeat, observed, &hb) {
            self.send(wire::topic(&self.ctx.node, Channel::Heartbeat), p, QoS::AtMostOnce, false);
        }
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let result = match wire::parse_topic(topic) {
            Some((node, ch)) if node == self.ctx.node => match ch {
                Channel::Desired => self.on_desired(payload),
                Channel::Welcome => self.on_welcome(payload),
                Channel::Request => self.on_request(payload),
                _ => Ok(()),
            },
            _ => Err("not one of this node's topics".to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(topic, "rejected message: {e}");
        }
    }

    fn verify_desired(&self, payload: &[u8]) -> Result<Option<(u64, NodeDesired)>, String> {
        verify_desired(&self.ctx, payload)
    }

    fn on_desired(&mut self, payload: &[u8]) -> Result<(), String> {
        let Some((generation, doc)) = self.verify_desired(payload)? else {
            // Not enrolled yet: keep it until the welcome pins the hub key.
            self.stashed_desired = Some(payload.to_vec());
            return Ok(());
        };
        if generation <= self.generation {
            tracing::debug!(generation, have = self.generation, "desired state is not newer; ignored");
            return Ok(());
        }
        self.ctx.state.set_desired(payload).map_err(|e| format!("cannot persist desired state: {e}"))?;
        self.generation = generation;
        tracing::info!(generation, workloads = doc.workloads.len(), "desired state applied");
        let _ = self.sup.send(Cmd::Desired { generation, doc });
        Ok(())
    }

    fn on_welcome(&mut self, payload: &[u8]) -> Result<(), String> {
        let env = wire::open(payload).map_err(|e| e.to_string())?;
        env.expect(Kind::Welcome).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
        let w: Welcome = env.body().map_err(|e| e.to_string())?;
        if w.node_key != self.ctx.key.public() {
            return Ok(()); // an answer to another agent claiming this name
        }
        let key = match (self.ctx.hub_key(), self.ctx.join_token()) {
            (Some(k), _) => k,
            (None, Some(t)) if t.pins(&w.hub_key) => w.hub_key,
            (None, t) => {
                return Err(format!(
                    "the hub's key ({}) does not match the join token's fingerprint ({}): wrong hub, or a token from another hub",
                    w.hub_key.fingerprint(),
                    t.map(|t| t.fingerprint).unwrap_or_default()
                ));
            }
        };
        env.verify(&key).map_err(|e| e.to_string())?;
        if w.hub_time_ms > 0 {
            self.ctx.set_hub_time(w.hub_time_ms);
        }
        if w.pending {
            if !self.pending {
                tracing::warn!(
                    node = %self.ctx.node,
                    "enrolment waits for approval: run `edgectl approve node {}` on the hub",
                    self.ctx.node
                );
            }
            self.pending = true;
            return Ok(());
        }
        if !w.accepted {
            let why = w.error.unwrap_or_else(|| "no reason given".into());
            if self.ctx.hub_key().is_none() {
                let _ = self.fatal.send(format!("the hub refused to enrol this agent: {why}"));
            }
            return Err(format!("the hub refused this agent: {why}"));
        }
        self.pending = false;
        if let Some(sealed) = &w.credential {
            let info = edge_api::seal::credential_info(&self.ctx.node);
            let cred = self.ctx.kem.open(&info, sealed).map_err(|e| format!("cannot open the credential: {e}"))?;
            let cred = String::from_utf8(cred).map_err(|_| "the credential is not text")?;
            self.ctx.state.set_enrolled(&key, &w.api_url).map_err(|e| e.to_string())?;
            self.ctx.set_enrolled(key, w.api_url.clone());
            self.ctx.state.set_credential(&cred).map_err(|e| format!("cannot keep the credential: {e}"))?;
            self.ctx.forget_join_token();
            tracing::info!(hub = %key.fingerprint(), "enrolled; logging in with this node's own credential");
            self.relogin = true;
            return Ok(());
        }
        if self.ctx.hub_key().is_none() || self.ctx.api_url().as_deref() != Some(w.api_url.as_str()) {
            self.ctx.state.set_enrolled(&key, &w.api_url).map_err(|e| e.to_string())?;
            self.ctx.set_enrolled(key, w.api_url.clone());
            tracing::info!(hub = %key.fingerprint(), api = %w.api_url, "enrolled with the hub");
        }
        let hb = Duration::from_millis(w.heartbeat_ms.clamp(500, 300_000));
        if hb != self.heartbeat {
            self.heartbeat = hb;
            self.heartbeat_changed = true;
        }
        self.welcomed = true;
        if let Some(p) = self.stashed_desired.take() {
            self.on_desired(&p)?;
        }
        Ok(())
    }

    fn on_request(&mut self, payload: &[u8]) -> Result<(), String> {
        let env = wire::open(payload).map_err(|e| e.to_string())?;
        env.expect(Kind::Request).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
        let key = self.ctx.hub_key().ok_or("request before enrolment")?;
        env.verify(&key).map_err(|e| e.to_string())?;
        let now = self.ctx.hub_now_ms();
        match env.body::<Request>().map_err(|e| e.to_string())? {
            Request::Logs { id, workload, replica, tail, follow, lease_ms, expires_ms } => {
                self.nonces.insert(&id, expires_ms, now).map_err(|e| format!("log request {id} refused: {e}"))?;
                let deadline = tokio::time::Instant::now() + Duration::from_millis(lease_ms.min(600_000));
                let (lease_tx, lease_rx) = watch::channel(deadline);
                self.streams.retain(|_, s| !s.is_closed());
                self.streams.insert(id.clone(), lease_tx);
                let ctx = self.ctx.clone();
                let out = self.out.clone();
                tokio::spawn(stream_logs(ctx, out, id, wire::instance_key(&workload, replica), tail, follow, lease_rx));
            }
            Request::Renew { id, lease_ms, expires_ms } => {
                if expires_ms <= now {
                    return Err(format!("renewal of {id} refused: expired"));
                }
                if let Some(s) = self.streams.get(&id) {
                    let _ = s.send(tokio::time::Instant::now() + Duration::from_millis(lease_ms.min(600_000)));
                }
            }
            Request::Cancel { id } => {
                self.streams.remove(&id);
            }
        }
        Ok(())
    }
}

/// Checks a desired-state envelope: kind, sender, the pinned hub key, the
/// node it is for. `None` when no hub key is pinned yet.
pub fn verify_desired(ctx: &Ctx, payload: &[u8]) -> Result<Option<(u64, NodeDesired)>, String> {
    if payload.is_empty() {
        return Err("empty desired-state message ignored (only a signed document can change desired state)".into());
    }
    let env = wire::open(payload).map_err(|e| e.to_string())?;
    env.expect(Kind::Desired).and_then(|e| e.expect_from(wire::HUB)).map_err(|e| e.to_string())?;
    let Some(key) = ctx.hub_key() else { return Ok(None) };
    env.verify(&key).map_err(|e| e.to_string())?;
    let doc: NodeDesired = env.body().map_err(|e| e.to_string())?;
    if doc.node != ctx.node {
        return Err(format!("desired state for node {:?} sent to {:?}", doc.node, ctx.node));
    }
    Ok(Some((env.generation, doc)))
}

async fn stream_logs(
    ctx: Arc<Ctx>,
    out: mpsc::Sender<Out>,
    id: String,
    key: String,
    tail: Option<u64>,
    follow: bool,
    mut lease: watch::Receiver<tokio::time::Instant>,
) {
    let mut seq = 0u64;
    let topic = wire::topic(&ctx.node, Channel::Response);
    let send = |seq: &mut u64, data: String, eof: bool, error: Option<String>| {
        let r = Response { id: id.clone(), seq: *seq, data, eof, error };
        *seq += 1;
        let payload = wire::seal(Kind::Response, &ctx.node, 0, &r, Some(&ctx.key));
        let out = out.clone();
        let topic = topic.clone();
        async move {
            match payload {
                Ok(p) => out.send(Out { topic, payload: p, qos: QoS::AtLeastOnce, retain: false }).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    let path = ctx.logs.path(&key);
    // A replica that has just started may not have written yet: a follower
    // waits for its first line; a one-off read is told there is none yet.
    if !path.exists() && !follow {
        let (w, r) = key.rsplit_once('.').unwrap_or((&key, "0"));
        send(
            &mut seq,
            String::new(),
            true,
            Some(format!("no log for workload {w:?} replica {r} on node {} yet", ctx.node)),
        )
        .await;
        return;
    }
    let mut notify = ctx.logs.watch(&key);
    let (text, mut offset) = match crate::logs::read_tail(&path, tail) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0),
        Err(e) => {
            send(&mut seq, String::new(), true, Some(format!("cannot read the log: {e}"))).await;
            return;
        }
    };
    let mut chunks = chunk(&text);
    if chunks.is_empty() {
        chunks.push(String::new()); // the first answer, so the reader knows the stream is open
    }
    for c in chunks {
        if !send(&mut seq, c, false, None).await {
            return;
        }
    }
    if follow {
        loop {
            let deadline = *lease.borrow_and_update();
            tokio::select! {
                changed = notify.changed() => {
                    if changed.is_err() { break; }
                    match crate::logs::read_from(&path, offset) {
                        Ok((text, next)) => {
                            offset = next;
                            for c in chunk(&text) {
                                if !send(&mut seq, c, false, None).await { return; }
                            }
                        }
                        Err(_) => break,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
                changed = lease.changed() => if changed.is_err() { break },
            }
        }
    }
    send(&mut seq, String::new(), true, None).await;
}

/// Splits text into pieces of at most [`LOG_CHUNK`] bytes on char boundaries.
fn chunk(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(LOG_CHUNK);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

pub struct SessionConfig {
    pub broker: BrokerUrl,
    /// TLS settings for an `mqtts://` broker.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub keepalive: Duration,
    /// The generation of the desired state the agent started with.
    pub generation: u64,
}

pub async fn run(
    ctx: Arc<Ctx>,
    cfg: SessionConfig,
    sup: mpsc::UnboundedSender<Cmd>,
    mut status: watch::Receiver<Snapshot>,
    fatal: mpsc::UnboundedSender<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (out_tx, out_rx) = mpsc::channel::<Out>(1024);
    let mut s = Session {
        ctx: ctx.clone(),
        sup,
        out: out_tx,
        fatal,
        generation: cfg.generation,
        stashed_desired: None,
        status_seq: 0,
        heartbeat: DEFAULT_HEARTBEAT,
        heartbeat_changed: false,
        hb_seq: 0,
        streams: HashMap::new(),
        welcomed: false,
        pending: false,
        relogin: false,
        nonces: edge_api::nonce::NonceCache::with_capacity(4096),
        conn: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    // Shared by the publisher task of each connection in turn.
    let out_rx = Arc::new(tokio::sync::Mutex::new(out_rx));
    loop {
        let login = match (ctx.state.credential(), ctx.join_token()) {
            (Ok(Some(c)), _) => Login::Node(c),
            (_, Some(t)) => Login::Bootstrap(t),
            (Ok(None), None) => {
                let _ = s.fatal.send(
                    "this agent has no credential and no join token: give it one with --join-token-file (`edgectl token create`)"
                        .into(),
                );
                return;
            }
            (Err(e), None) => {
                let _ = s.fatal.send(format!("cannot read this agent's credential: {e}"));
                return;
            }
        };
        match connection(&mut s, &cfg, login, out_rx.clone(), &mut status, &mut shutdown).await {
            Ended::Shutdown => return,
            Ended::Relogin => continue,
        }
    }
}

/// The Last Will of connection `conn`: a pre-signed "offline" that the
/// broker publishes (retained) when the connection dies.
fn will(ctx: &Ctx, conn: u64) -> Option<LastWill> {
    let offline = Presence { online: false, session: ctx.session, conn };
    let will = wire::seal(Kind::Presence, &ctx.node, 0, &offline, Some(&ctx.key)).ok()?;
    Some(LastWill::new(wire::topic(&ctx.node, Channel::Presence), will, QoS::AtLeastOnce, true))
}

/// Polls the MQTT event loop in a task of its own and hands its events over:
/// rumqttc's `poll` must not be dropped while it connects (it would drop the
/// half-open connection, and its will would fire). Each connection attempt
/// gets a new number and its own will; failures back off here.
/// An event of the MQTT event loop, with the number of the connection it came on.
type Polled = (u64, Result<Event, ConnectionError>);

fn poller(
    ctx: Arc<Ctx>,
    mut eventloop: rumqttc::EventLoop,
    with_will: bool,
    conn: Arc<std::sync::atomic::AtomicU64>,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Polled>) {
    use std::sync::atomic::Ordering;
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut failures = 0u32;
        let mut current = conn.fetch_add(1, Ordering::Relaxed) + 1;
        loop {
            if with_will
                && eventloop.network.is_none()
                && let Some(w) = will(&ctx, current)
            {
                eventloop.mqtt_options.set_last_will(w);
            }
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if tx.send((current, ev)).await.is_err() {
                return;
            }
            if failed {
                failures += 1;
                current = conn.fetch_add(1, Ordering::Relaxed) + 1;
                tokio::time::sleep(Duration::from_millis(250 * u64::from(failures.min(20)))).await;
            } else {
                failures = 0;
            }
        }
    });
    (task, rx)
}

/// One login to the broker, until it must be replaced or the agent stops.
async fn connection(
    s: &mut Session,
    cfg: &SessionConfig,
    login: Login,
    out_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Out>>>,
    status: &mut watch::Receiver<Snapshot>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let ctx = s.ctx.clone();
    let client_id = match &login {
        Login::Node(_) => format!("edge-agent-{}", ctx.node),
        Login::Bootstrap(_) => format!("edge-join-{}", ctx.node),
    };
    let mut opts = MqttOptions::new(client_id, cfg.broker.host.clone(), cfg.broker.port);
    opts.set_keep_alive(cfg.keepalive);
    opts.set_clean_session(true);
    opts.set_manual_acks(true);
    let max = wire::MAX_PAYLOAD + (64 << 10);
    opts.set_max_packet_size(max, max);
    match (&cfg.broker.username, &login) {
        (Some(u), _) => opts.set_credentials(u.clone(), cfg.broker.password.clone().unwrap_or_default()),
        (None, Login::Node(c)) => opts.set_credentials(ctx.node.clone(), c.clone()),
        (None, Login::Bootstrap(t)) => opts.set_credentials(t.mqtt_user(), t.secret.clone()),
    };
    if let Some(tls) = &cfg.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);
    // A device that is still enrolling may only send its join: no will.
    let (poll_task, mut events) = poller(ctx.clone(), eventloop, matches!(login, Login::Node(_)), s.conn.clone());

    // Publishing runs apart from polling: a full request channel must never
    // stop the event loop that drains it.
    let publisher = client.clone();
    let pub_task = tokio::spawn(async move {
        let mut out_rx = out_rx.lock().await;
        while let Some(o) = out_rx.recv().await {
            if let Err(e) = publisher.publish(o.topic, o.qos, o.retain, o.payload).await {
                tracing::warn!("mqtt publish failed: {e}");
            }
        }
    });

    let mut connected = false;
    let mut failures = 0u32;
    let mut closed_at_login = 0u32;
    let mut hb = tokio::time::interval(s.heartbeat);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut join_retry = tokio::time::interval(JOIN_RETRY);
    join_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_join = tokio::time::Instant::now();
    s.welcomed = false;
    s.relogin = false;
    let ended = loop {
        if s.heartbeat_changed {
            s.heartbeat_changed = false;
            hb = tokio::time::interval(s.heartbeat);
            hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        if s.relogin {
            break Ended::Relogin;
        }
        tokio::select! {
            ev = events.recv() => match ev {
                None => break Ended::Shutdown,
                Some((_, Ok(Event::Incoming(Packet::ConnAck(_))))) => {
                    connected = true;
                    closed_at_login = 0;
                    if failures > 0 {
                        tracing::info!(broker = %cfg.broker, "reconnected");
                    } else {
                        tracing::info!(broker = %cfg.broker, "connected");
                    }
                    failures = 0;
                    // rumqttc does not re-subscribe after a reconnect.
                    let c = client.clone();
                    let node = ctx.node.clone();
                    let channels: &[Channel] = match login {
                        Login::Node(_) => &[Channel::Desired, Channel::Welcome, Channel::Request],
                        Login::Bootstrap(_) => &[Channel::Welcome],
                    };
                    let filters: Vec<_> = channels
                        .iter()
                        .map(|ch| rumqttc::SubscribeFilter::new(wire::topic(&node, *ch), QoS::AtLeastOnce))
                        .collect();
                    tokio::spawn(async move {
                        if let Err(e) = c.subscribe_many(filters).await {
                            tracing::warn!("mqtt subscribe failed: {e}");
                        }
                    });
                    s.welcomed = false;
                    s.join(&login);
                    last_join = tokio::time::Instant::now();
                }
                Some((_, Ok(Event::Incoming(Packet::Publish(p))))) => {
                    let was_welcomed = s.welcomed;
                    s.on_publish(&p.topic, &p.payload);
                    if s.welcomed && !was_welcomed {
                        let snap = status.borrow_and_update().clone();
                        s.announce(&snap);
                    }
                    // Acknowledged only now: anything it changed is on disk.
                    if let Err(e) = client.try_ack(&p) {
                        tracing::warn!("cannot acknowledge a message: {e}");
                    }
                }
                Some((_, Ok(_))) => {}
                Some((_, Err(e))) => {
                    connected = false;
                    s.welcomed = false;
                    failures += 1;
                    let refused = matches!(
                        e,
                        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword)
                    );
                    // Brokers without a refusal code just close the connection
                    // before any CONNACK; several such closures in a row mean the same.
                    if matches!(e, ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)) {
                        closed_at_login += 1;
                    } else {
                        closed_at_login = 0;
                    }
                    let refused = refused || closed_at_login >= LOGIN_CLOSURES;
                    match &login {
                        Login::Node(_) if refused => {
                            if ctx.join_token().is_some() {
                                tracing::warn!("the broker refused this node's credential; enrolling again with the join token");
                                if let Err(e) = ctx.state.clear_credential() {
                                    tracing::error!("cannot forget the refused credential: {e}");
                                }
                                break Ended::Relogin;
                            }
                            if failures == 1 || failures.is_multiple_of(30) {
                                tracing::error!(
                                    "the broker refuses this node's credential (was the node deleted from the hub?); running from local state. To enrol again, restart with a new join token"
                                );
                            }
                        }
                        Login::Bootstrap(_) if refused && ctx.hub_key().is_none() => {
                            let _ = s.fatal.send(if cfg.broker.username.is_some() {
                                format!("the broker at {} refused the user name and password given in --broker", cfg.broker)
                            } else {
                                format!(
                                    "the broker at {} refused the join token (unknown, expired or revoked): check --join-token-file, or make a new one with `edgectl token create`",
                                    cfg.broker
                                )
                            });
                        }
                        _ => {}
                    }
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(broker = %cfg.broker, "mqtt connection failed ({failures}x): {e}; running from local state");
                    }
                }
            },
            changed = status.changed() => {
                if changed.is_err() { break Ended::Shutdown; }
                if connected && s.welcomed {
                    let snap = status.borrow_and_update().clone();
                    s.publish_status(&snap);
                }
            }
            _ = hb.tick() => if connected && s.welcomed {
                // Heartbeats vouch for the whole agent, not just this task:
                // none while the reconcile loop is stuck.
                let alive = ctx.supervisor_alive_ms.load(std::sync::atomic::Ordering::Relaxed);
                let stuck_ms = edge_api::time::now_ms().saturating_sub(alive);
                if stuck_ms <= 3 * crate::supervisor::LIVENESS_TICK.as_millis() as u64 {
                    let observed = status.borrow().observed_generation;
                    s.heartbeat(observed);
                } else {
                    tracing::error!(stuck_ms, "the reconcile loop is stuck; withholding heartbeats");
                }
            },
            // The hub may not have been listening (restarting, say): ask again.
            _ = join_retry.tick() => {
                let wait = if s.pending { PENDING_RETRY } else { JOIN_RETRY };
                if connected && !s.welcomed && last_join.elapsed() >= wait {
                    s.join(&login);
                    last_join = tokio::time::Instant::now();
                }
            },
            _ = shutdown.changed() => {
                if connected && matches!(login, Login::Node(_)) {
                    let conn = s.conn.load(std::sync::atomic::Ordering::Relaxed);
                    let offline = Presence { online: false, session: ctx.session, conn };
                    if let Some(p) = s.seal(Kind::Presence, 0, &offline) {
                        let _ = client.publish(wire::topic(&ctx.node, Channel::Presence), QoS::AtLeastOnce, true, p).await;
                        // Give the event loop a moment to write it out.
                        let _ = tokio::time::timeout(Duration::from_millis(300), async {
                            while let Some((_, ev)) = events.recv().await {
                                if matches!(ev, Ok(Event::Incoming(Packet::PubAck(_))) | Err(_)) { break; }
                            }
                        }).await;
                    }
                }
                break Ended::Shutdown;
            }
        }
    };
    pub_task.abort();
    let _ = pub_task.await;
    let _ = client.try_disconnect();
    // Let the disconnect go out before the next login replaces this one.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Some((_, ev)) = events.recv().await {
            if ev.is_err() {
                break;
            }
        }
    })
    .await;
    poll_task.abort();
    ended
}
