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
use edge_api::wire::{self, Channel, Kind, Presence, Response};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, NetworkOptions, Packet, QoS,
};
use tokio::sync::{mpsc, watch};

use crate::Ctx;
use crate::supervisor::{Cmd, Snapshot};

/// Largest piece of log sent in one message.
const LOG_CHUNK: usize = 32 << 10;

pub mod machine;

pub use machine::verify_desired;
use machine::{Effect, LinkError, LoginKind, Machine, Qos};

struct Out {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
}

impl machine::Node for Ctx {
    fn name(&self) -> &str {
        &self.node
    }
    fn session(&self) -> u64 {
        self.session
    }
    fn key(&self) -> &edge_api::keys::SigningKey {
        &self.key
    }
    fn kem(&self) -> &edge_api::seal::KemKeyPair {
        &self.kem
    }
    fn facts(&self) -> &edge_api::model::NodeFacts {
        &self.facts
    }
    fn hub_key(&self) -> Option<edge_api::keys::PublicKey> {
        Ctx::hub_key(self)
    }
    fn api_url(&self) -> Option<String> {
        Ctx::api_url(self)
    }
    fn join_token(&self) -> Option<edge_api::token::JoinToken> {
        Ctx::join_token(self)
    }
    fn hub_now_ms(&self) -> u64 {
        Ctx::hub_now_ms(self)
    }
}

/// Performs the machine's effects: the network, the disk, the supervisor.
pub struct Session {
    ctx: Arc<Ctx>,
    m: Machine<Ctx>,
    sup: mpsc::UnboundedSender<Cmd>,
    out: mpsc::Sender<Out>,
    fatal: mpsc::UnboundedSender<String>,
    streams: HashMap<String, watch::Sender<tokio::time::Instant>>,
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

impl Login {
    fn kind(&self) -> LoginKind {
        match self {
            Login::Node(_) => LoginKind::Node,
            Login::Bootstrap(_) => LoginKind::Bootstrap,
        }
    }
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    /// Log in again (with a new credential, or back to the bootstrap token).
    Relogin,
}

impl Session {
    /// Performs effects in order; one that fails to write what it must
    /// keep drops the rest (and the machine hears of it). Returns whether
    /// to log in again.
    fn perform(&mut self, effects: Vec<Effect>, client: &AsyncClient) -> bool {
        let mut relogin = false;
        for e in effects {
            if let Err(why) = self.perform_one(e, client, &mut relogin) {
                tracing::error!("{why}");
                self.m.batch_failed();
                break;
            }
        }
        relogin
    }

    fn perform_one(&mut self, e: Effect, client: &AsyncClient, relogin: &mut bool) -> Result<(), String> {
        let ctx = &self.ctx;
        match e {
            Effect::Subscribe(topics) => {
                let filters: Vec<_> =
                    topics.into_iter().map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce)).collect();
                let c = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.subscribe_many(filters).await {
                        tracing::warn!("mqtt subscribe failed: {e}");
                    }
                });
            }
            Effect::Publish(p) => {
                let qos = match p.qos {
                    Qos::AtMostOnce => QoS::AtMostOnce,
                    Qos::AtLeastOnce => QoS::AtLeastOnce,
                };
                if self.out.try_send(Out { topic: p.topic, payload: p.payload, qos, retain: p.retain }).is_err() {
                    tracing::warn!("mqtt outgoing queue full; a message was dropped");
                }
            }
            Effect::Desired { generation, payload, doc } => {
                ctx.state.set_desired(&payload).map_err(|e| format!("cannot persist desired state: {e}"))?;
                self.m.kept(generation, doc.fence());
                tracing::info!(generation, workloads = doc.workloads.len(), "desired state applied");
                let _ = self.sup.send(Cmd::Desired { generation, doc });
            }
            Effect::HubTime(ms) => ctx.set_hub_time(ms),
            Effect::Lease(sent) => {
                ctx.lease.send_if_modified(|l| {
                    let newer = l.is_none_or(|t| sent > t);
                    if newer {
                        *l = Some(sent);
                    }
                    newer
                });
            }
            Effect::Enrolled { hub_key, api_url } => {
                ctx.state.set_enrolled(&hub_key, &api_url).map_err(|e| format!("cannot keep the enrolment: {e}"))?;
                ctx.set_enrolled(hub_key, api_url);
            }
            Effect::Credential(cred) => {
                ctx.state.set_credential(&cred).map_err(|e| format!("cannot keep the credential: {e}"))?;
                ctx.forget_join_token();
            }
            Effect::ClearCredential => {
                // Logging in with the join token is still right if this fails.
                if let Err(e) = ctx.state.clear_credential() {
                    tracing::error!("cannot forget the refused credential: {e}");
                }
            }
            Effect::Relogin => *relogin = true,
            Effect::Fatal(why) => {
                let _ = self.fatal.send(why);
            }
            Effect::OpenLogs { id, instance, tail, follow, lease } => {
                let (lease_tx, lease_rx) = watch::channel(tokio::time::Instant::now() + lease);
                self.streams.retain(|_, s| !s.is_closed());
                self.streams.insert(id.clone(), lease_tx);
                tokio::spawn(stream_logs(ctx.clone(), self.out.clone(), id, instance, tail, follow, lease_rx));
            }
            Effect::RenewLogs { id, lease } => {
                if let Some(s) = self.streams.get(&id) {
                    let _ = s.send(tokio::time::Instant::now() + lease);
                }
            }
            Effect::CancelLogs { id } => {
                self.streams.remove(&id);
            }
        }
        Ok(())
    }
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
    /// That desired state's shortest fence ([`edge_api::wire::NodeDesired::fence`]).
    pub fence: Option<edge_api::model::Millis>,
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
        m: Machine::new(ctx.clone(), cfg.generation, cfg.fence),
        sup,
        out: out_tx,
        fatal,
        streams: HashMap::new(),
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

/// How a connection failed, as the session machine tells failures apart.
pub fn link_error(e: &ConnectionError) -> LinkError {
    match e {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
        ) => LinkError::Refused,
        ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted) => LinkError::ClosedAtLogin,
        _ => LinkError::Other,
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

    let mut hb = tokio::time::interval(s.m.heartbeat());
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut join_retry = tokio::time::interval(machine::JOIN_RETRY);
    join_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    s.m.connecting(login.kind());
    let ended = loop {
        if s.m.take_heartbeat_changed() {
            hb = tokio::time::interval(s.m.heartbeat());
            hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let effects = tokio::select! {
            ev = events.recv() => match ev {
                None => break Ended::Shutdown,
                Some((conn, Ok(Event::Incoming(Packet::ConnAck(_))))) => {
                    tracing::debug!(broker = %cfg.broker, conn, "connack");
                    s.m.on_connack(conn, tokio::time::Instant::now().into_std())
                }
                Some((_, Ok(Event::Incoming(Packet::Publish(p))))) => {
                    // Not marked as seen: a change not yet published still is.
                    let snap = status.borrow().clone();
                    let effects = s.m.on_publish(&p.topic, &p.payload, &snap).unwrap_or_else(|e| {
                        tracing::warn!(topic = %p.topic, "rejected message: {e}");
                        Vec::new()
                    });
                    let relogin = s.perform(effects, &client);
                    // Acknowledged only now: anything it changed is on disk.
                    if let Err(e) = client.try_ack(&p) {
                        tracing::warn!("cannot acknowledge a message: {e}");
                    }
                    if relogin {
                        break Ended::Relogin;
                    }
                    continue;
                }
                Some((_, Ok(_))) => continue,
                Some((_, Err(e))) => {
                    let kind = link_error(&e);
                    let mut effects = s.m.on_link_error(&kind, &format!("{e} (broker {})", cfg.broker));
                    for e in &mut effects {
                        if let Effect::Fatal(why) = e {
                            *why = if cfg.broker.username.is_some() {
                                // The operator's own broker login, not a join token, was refused.
                                format!("the broker at {} refused the user name and password given in --broker", cfg.broker)
                            } else {
                                why.replacen("the broker", &format!("the broker at {}", cfg.broker), 1)
                            };
                        }
                    }
                    effects
                }
            },
            changed = status.changed() => {
                if changed.is_err() { break Ended::Shutdown; }
                let snap = status.borrow_and_update().clone();
                s.m.on_status(&snap)
            }
            _ = hb.tick() => {
                let alive = ctx.supervisor_alive_ms.load(std::sync::atomic::Ordering::Relaxed);
                let stuck_ms = edge_api::time::now_ms().saturating_sub(alive);
                let stuck = stuck_ms > 3 * crate::supervisor::LIVENESS_TICK.as_millis() as u64;
                let observed = status.borrow().observed_generation;
                s.m.on_heartbeat_tick(observed, stuck, std::time::Instant::now())
            },
            _ = join_retry.tick() => s.m.on_join_tick(tokio::time::Instant::now().into_std()),
            _ = shutdown.changed() => {
                let effects = s.m.on_shutdown();
                if !effects.is_empty() {
                    for e in effects {
                        if let Effect::Publish(p) = e {
                            let _ = client.publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload).await;
                        }
                    }
                    // Give the event loop a moment to write it out.
                    let _ = tokio::time::timeout(Duration::from_millis(300), async {
                        while let Some((_, ev)) = events.recv().await {
                            if matches!(ev, Ok(Event::Incoming(Packet::PubAck(_))) | Err(_)) { break; }
                        }
                    }).await;
                }
                break Ended::Shutdown;
            }
        };
        if s.perform(effects, &client) {
            break Ended::Relogin;
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
