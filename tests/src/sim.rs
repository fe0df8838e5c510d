//! Simulated nodes: many in one process, each with its own identity and MQTT
//! connection, speaking the real protocol through the agent's own session
//! state machine (`edge_agent::session::machine`): enrolment with a join
//! token, signed joins, status and compact heartbeats, leases. A simulated
//! node "applies" a desired state after a delay by reporting every replica
//! it was given Running and ready; it runs nothing. The hub cannot tell it
//! from an agent, which is the point: it sizes a hub, and `edge-sim` lets
//! users size theirs.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::session::machine::{Effect, LoginKind, Machine, Node, Qos};
use edge_agent::supervisor::Snapshot;
use edge_api::broker_url::BrokerUrl;
use edge_api::keys::{PublicKey, SigningKey};
use edge_api::model::{InstanceStatus, NodeFacts, Phase, RuntimeInfo};
use edge_api::quantity::{Cpu, Memory};
use edge_api::seal::KemKeyPair;
use edge_api::token::JoinToken;
use edge_api::wire::{self, Channel, Kind, NodeDesired, Presence};
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

/// One simulated node's identity and what it has learnt of the hub.
pub struct SimNode {
    name: String,
    session: u64,
    key: SigningKey,
    kem: KemKeyPair,
    facts: NodeFacts,
    hub_key: Mutex<Option<PublicKey>>,
    api_url: Mutex<Option<String>>,
    join: Mutex<Option<JoinToken>>,
    credential: Mutex<Option<String>>,
    hub_offset_ms: AtomicI64,
    /// Whether its link fails now and then ([`Unrest::flap`]).
    flaps: bool,
}

impl SimNode {
    pub fn new(name: &str, join: JoinToken, labels: &[(String, String)]) -> Self {
        SimNode {
            name: name.to_string(),
            session: edge_api::time::now_ms(),
            key: SigningKey::generate().expect("signing key"),
            kem: KemKeyPair::generate().expect("sealing key"),
            facts: NodeFacts {
                arch: "amd64".into(),
                os: "linux".into(),
                os_release: "edge-sim".into(),
                kernel: String::new(),
                cpus: 4,
                memory: Memory::mib(4096),
                allocatable_memory: Memory::mib(3968),
                allocatable_cpu: Cpu(4000),
                labels: labels.iter().cloned().collect(),
                runtimes: vec![RuntimeInfo {
                    name: "wasm".into(),
                    version: "sim".into(),
                    mode: "simulated".into(),
                    ..Default::default()
                }],
                agent_version: "edge-sim".into(),
                wasm_instances: None,
            },
            hub_key: Mutex::new(None),
            api_url: Mutex::new(None),
            join: Mutex::new(Some(join)),
            credential: Mutex::new(None),
            hub_offset_ms: AtomicI64::new(0),
            flaps: false,
        }
    }

    /// The node's link fails now and then, as [`SimConfig::unrest`] says.
    pub fn flapping(mut self, flaps: bool) -> Self {
        self.flaps = flaps;
        self
    }
}

fn get<T: Clone>(m: &Mutex<T>) -> T {
    m.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set<T>(m: &Mutex<T>, v: T) {
    *m.lock().unwrap_or_else(|p| p.into_inner()) = v;
}

impl Node for SimNode {
    fn name(&self) -> &str {
        &self.name
    }
    fn session(&self) -> u64 {
        self.session
    }
    fn key(&self) -> &SigningKey {
        &self.key
    }
    fn kem(&self) -> &KemKeyPair {
        &self.kem
    }
    fn facts(&self) -> &NodeFacts {
        &self.facts
    }
    fn hub_key(&self) -> Option<PublicKey> {
        get(&self.hub_key)
    }
    fn api_url(&self) -> Option<String> {
        get(&self.api_url)
    }
    fn join_token(&self) -> Option<JoinToken> {
        get(&self.join)
    }
    fn hub_now_ms(&self) -> u64 {
        let offset = self.hub_offset_ms.load(Ordering::Relaxed);
        (edge_api::time::now_ms() as i64).saturating_add(offset).max(0) as u64
    }
}

/// How the simulated nodes reach the broker and behave.
pub struct SimConfig {
    pub broker: BrokerUrl,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub keepalive: Duration,
    /// How long "applying" a desired state takes.
    pub apply_delay: Duration,
    /// Links that fail and nodes that come and go.
    pub unrest: Unrest,
}

/// What goes wrong in a real fleet, simulated: links that drop (a
/// flapping node), and devices that die and are replaced (churn).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unrest {
    /// The share of nodes, in percent, whose link drops now and then.
    pub flap_percent: u32,
    /// How often such a link drops (each node at its own moments, within
    /// a half and one and a half times this), and for how long.
    pub flap: Option<Flap>,
    /// Nodes per minute that vanish (their link drops and they never come
    /// back) and are replaced by a new node with an identity of its own.
    pub churn_per_minute: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct Flap {
    pub every: Duration,
    pub down: Duration,
}

/// How a node's run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    Stay,
    /// Says goodbye, as an agent that is stopped does.
    Goodbye,
    /// Drops its link and never returns, as a device that dies.
    Vanish,
}

/// A small generator for the simulator's choices (which node churns,
/// when a link drops), seeded per use.
struct Rng(u64);

impl Rng {
    fn seeded(seed: &str) -> Rng {
        let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        Rng(h | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// Somewhere between a half and one and a half times `d`.
    fn around(&mut self, d: Duration) -> Duration {
        d / 2 + Duration::from_millis(self.below(d.as_millis().max(1) as u64))
    }
}

/// What the simulated fleet did, summed over its nodes.
#[derive(Default)]
pub struct SimStats {
    pub connections: AtomicU64,
    pub desired: AtomicU64,
    pub heartbeats: AtomicU64,
    pub leases: AtomicU64,
    pub link_errors: AtomicU64,
    pub rejected: AtomicU64,
    /// Links dropped by flapping nodes.
    pub flaps: AtomicU64,
    /// (node that vanished, node that replaced it), in order.
    pub churned: Mutex<Vec<(String, String)>>,
    /// Nodes that applied a desired state; see [`SimStats::applied`].
    applied_nodes: AtomicU64,
}

impl SimStats {
    /// Nodes that applied at least one desired state.
    pub fn applied(&self) -> u64 {
        self.applied_nodes.load(Ordering::Relaxed)
    }
}

/// The status a node that applied `doc` reports: every replica Running
/// and ready, at the revision it was given.
fn applied(doc: &NodeDesired, generation: u64, started_ms: u64) -> Snapshot {
    let instances = doc
        .workloads
        .iter()
        .map(|a| InstanceStatus {
            workload: a.workload.clone(),
            replica: a.replica,
            uid: a.uid.clone(),
            generation: a.generation,
            phase: Phase::Running,
            restarts: 0,
            exit_code: None,
            reason: None,
            message: None,
            started_ms: Some(started_ms),
            finished_ms: None,
            ready: Some(true),
            probe: None,
        })
        .collect();
    Snapshot { observed_generation: generation, instances, corrupt_files: 0 }
}

enum Ended {
    Relogin,
    Stop,
    /// The link dropped: back after this long.
    Flap(Duration),
}

/// Runs one simulated node until `stop` says to leave (or the hub refuses
/// it for good).
pub async fn run_node(node: Arc<SimNode>, cfg: Arc<SimConfig>, stats: Arc<SimStats>, mut stop: watch::Receiver<Leave>) {
    let mut m = Machine::new(node.clone(), 0, None);
    let mut rng = Rng::seeded(&node.name);
    let flap = cfg.unrest.flap.filter(|_| node.flaps);
    let mut snapshot = Snapshot::default();
    let mut ever_applied = false;
    let mut conn = 0u64;
    loop {
        let (login, user, password) = match (get(&node.credential), get(&node.join)) {
            (Some(c), _) => (LoginKind::Node, node.name.clone(), c),
            (None, Some(t)) => (LoginKind::Bootstrap, t.mqtt_user(), t.secret.clone()),
            (None, None) => return,
        };
        let client_id = match login {
            LoginKind::Node => format!("edge-agent-{}", node.name),
            LoginKind::Bootstrap => format!("edge-join-{}", node.name),
        };
        let mut opts = MqttOptions::new(client_id, cfg.broker.host.clone(), cfg.broker.port);
        opts.set_keep_alive(cfg.keepalive);
        opts.set_clean_session(true);
        let max = wire::MAX_PAYLOAD + (64 << 10);
        opts.set_max_packet_size(max, max);
        opts.set_credentials(user, password);
        if let Some(tls) = &cfg.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        if login == LoginKind::Node {
            conn += 1;
            let offline = Presence { online: false, session: node.session, conn };
            if let Ok(will) = wire::seal(Kind::Presence, &node.name, 0, &offline, Some(&node.key)) {
                let topic = wire::topic(&node.name, Channel::Presence);
                opts.set_last_will(LastWill::new(topic, will, QoS::AtLeastOnce, true));
            }
        }
        let (client, eventloop) = AsyncClient::new(opts, 64);
        // Polled in a task of its own: a poll dropped mid-connect (by the
        // select below) would drop the half-open connection.
        let (poll_task, mut events) = poller(eventloop);
        let (applied_tx, mut applied_rx) = mpsc::unbounded_channel::<(u64, NodeDesired)>();
        m.connecting(login);
        let mut hb = tokio::time::interval(m.heartbeat());
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut join_retry = tokio::time::interval(edge_agent::session::machine::JOIN_RETRY);
        join_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drop_link = async {
            match flap {
                Some(f) => tokio::time::sleep(rng.around(f.every)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(drop_link);
        let ended = loop {
            if m.take_heartbeat_changed() {
                hb = tokio::time::interval(m.heartbeat());
                hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            let effects = tokio::select! {
                ev = events.recv() => match ev {
                    None => break Ended::Relogin,
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        stats.connections.fetch_add(1, Ordering::Relaxed);
                        m.on_connack(conn, Instant::now())
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => m.on_publish(&p.topic, &p.payload, &snapshot).unwrap_or_else(|_| {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        Vec::new()
                    }),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        stats.link_errors.fetch_add(1, Ordering::Relaxed);
                        m.on_link_error(&edge_agent::session::link_error(&e), &e.to_string())
                    }
                },
                _ = hb.tick() => {
                    let e = m.on_heartbeat_tick(snapshot.observed_generation, false, Instant::now());
                    if !e.is_empty() {
                        stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    e
                }
                _ = join_retry.tick() => m.on_join_tick(Instant::now()),
                _ = &mut drop_link => {
                    stats.flaps.fetch_add(1, Ordering::Relaxed);
                    break Ended::Flap(flap.map_or(Duration::ZERO, |f| f.down));
                }
                Some((generation, doc)) = applied_rx.recv() => {
                    // Applies finish out of order: an older one changes nothing.
                    if generation <= snapshot.observed_generation {
                        continue;
                    }
                    snapshot = applied(&doc, generation, edge_api::time::now_ms());
                    m.kept(generation, doc.fence());
                    if !ever_applied {
                        ever_applied = true;
                        stats.applied_nodes.fetch_add(1, Ordering::Relaxed);
                    }
                    m.on_status(&snapshot)
                }
                _ = stop.changed() => {
                    if *stop.borrow() == Leave::Vanish {
                        // (No goodbye: the broker tells the hub the link is gone.)
                        poll_task.abort();
                        return;
                    }
                    for e in m.on_shutdown() {
                        if let Effect::Publish(p) = e {
                            let _ = client.try_publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload);
                        }
                    }
                    let _ = client.try_disconnect();
                    // Let the goodbye go out.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Some(Ok(_)) = events.recv().await {}
                    })
                    .await;
                    break Ended::Stop;
                }
            };
            let mut relogin = false;
            for e in effects {
                match e {
                    Effect::Subscribe(topics) => {
                        let filters = topics.into_iter().map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
                        let _ = client.try_subscribe_many(filters);
                    }
                    Effect::Publish(p) => {
                        let qos = match p.qos {
                            Qos::AtMostOnce => QoS::AtMostOnce,
                            Qos::AtLeastOnce => QoS::AtLeastOnce,
                        };
                        let _ = client.try_publish(p.topic, qos, p.retain, p.payload);
                    }
                    Effect::Desired { generation, doc, .. } => {
                        stats.desired.fetch_add(1, Ordering::Relaxed);
                        let (tx, delay) = (applied_tx.clone(), cfg.apply_delay);
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send((generation, doc));
                        });
                    }
                    Effect::HubTime(ms) => {
                        node.hub_offset_ms.store(ms as i64 - edge_api::time::now_ms() as i64, Ordering::Relaxed)
                    }
                    Effect::Lease(_) => {
                        stats.leases.fetch_add(1, Ordering::Relaxed);
                    }
                    Effect::Enrolled { hub_key, api_url } => {
                        set(&node.hub_key, Some(hub_key));
                        set(&node.api_url, Some(api_url));
                    }
                    Effect::Credential(c) => {
                        set(&node.credential, Some(c));
                        set(&node.join, None);
                    }
                    Effect::ClearCredential => set(&node.credential, None),
                    Effect::Relogin => relogin = true,
                    Effect::Fatal(why) => {
                        eprintln!("edge-sim: {}: {why}", node.name);
                        return;
                    }
                    Effect::OpenLogs { .. } | Effect::RenewLogs { .. } | Effect::CancelLogs { .. } => {}
                }
            }
            if relogin {
                break Ended::Relogin;
            }
        };
        match ended {
            Ended::Stop => {
                let _ = client.try_disconnect();
                poll_task.abort();
                return;
            }
            Ended::Relogin => {
                let _ = client.try_disconnect();
                poll_task.abort();
            }
            Ended::Flap(down) => {
                // Dropped, not closed: the broker sees the link fail.
                poll_task.abort();
                drop(client);
                tokio::select! {
                    _ = tokio::time::sleep(down) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Polls a connection's event loop and hands its events over; failures
/// back off here (rumqttc reconnects on the next poll).
fn poller(
    mut eventloop: rumqttc::EventLoop,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Result<Event, ConnectionError>>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).await.is_err() {
                return;
            }
            if failed {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(250 * u64::from(failures.min(20)))).await;
            } else {
                failures = 0;
            }
        }
    });
    (task, rx)
}

/// A simulated fleet: `count` nodes named `<prefix>-00000`…, started
/// `per_second` at a time (a fleet coming online, not a thundering herd).
/// With churn ([`Unrest::churn_per_minute`]), nodes vanish and new ones,
/// named `<prefix>-r00000`…, take their place.
pub struct Fleet {
    pub stats: Arc<SimStats>,
    nodes: Arc<Mutex<Vec<Member>>>,
    churn: Option<tokio::task::JoinHandle<()>>,
}

/// Whether the `i`th node of a fleet (replacements count on from its
/// size) is one of the `percent` whose links drop: spread over the fleet,
/// so a fleet of any size has about that share.
pub fn flaps(i: usize, percent: u32) -> bool {
    (i * 37) % 100 < percent as usize
}

/// One node of a fleet: how to tell it to leave, and its task.
struct Member {
    name: String,
    leave: watch::Sender<Leave>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts one node of a fleet.
fn spawn(
    name: String,
    join: &JoinToken,
    labels: &[(String, String)],
    flaps: bool,
    cfg: &Arc<SimConfig>,
    stats: &Arc<SimStats>,
) -> Member {
    let node = Arc::new(SimNode::new(&name, join.clone(), labels).flapping(flaps));
    let (leave, rx) = watch::channel(Leave::Stay);
    let task = tokio::spawn(run_node(node, cfg.clone(), stats.clone(), rx));
    Member { name, leave, task }
}

impl Fleet {
    pub async fn start(
        cfg: SimConfig,
        join: &JoinToken,
        prefix: &str,
        count: usize,
        labels: &[(String, String)],
        per_second: usize,
    ) -> Fleet {
        let unrest = cfg.unrest;
        let (cfg, stats) = (Arc::new(cfg), Arc::new(SimStats::default()));
        let nodes = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let pause = Duration::from_secs(1) / per_second.max(1) as u32;
        let flapping = move |i: usize| unrest.flap.is_some() && flaps(i, unrest.flap_percent);
        for i in 0..count {
            let member = spawn(format!("{prefix}-{i:05}"), join, labels, flapping(i), &cfg, &stats);
            nodes.lock().unwrap().push(member);
            tokio::time::sleep(pause).await;
        }
        let churn = (unrest.churn_per_minute > 0).then(|| {
            let (nodes, stats, cfg) = (nodes.clone(), stats.clone(), cfg.clone());
            let (join, labels, prefix) = (join.clone(), labels.to_vec(), prefix.to_string());
            let every = Duration::from_secs(60) / unrest.churn_per_minute;
            tokio::spawn(async move {
                let mut rng = Rng::seeded(&prefix);
                for n in 0usize.. {
                    tokio::time::sleep(every).await;
                    let mut nodes = nodes.lock().unwrap();
                    let i = rng.below(nodes.len() as u64) as usize;
                    let gone = &nodes[i];
                    let _ = gone.leave.send(Leave::Vanish);
                    let name = format!("{prefix}-r{n:05}");
                    stats.churned.lock().unwrap().push((gone.name.clone(), name.clone()));
                    let member = spawn(name, &join, &labels, flapping(count + n), &cfg, &stats);
                    // (Its task ends by itself: nothing to wait for.)
                    nodes[i] = member;
                }
            })
        });
        Fleet { stats, nodes, churn }
    }

    /// Stops the churn, says goodbye for every node and waits for them.
    pub async fn stop(self) {
        if let Some(c) = self.churn {
            c.abort();
        }
        let members: Vec<Member> = std::mem::take(&mut *self.nodes.lock().unwrap());
        for m in &members {
            let _ = m.leave.send(Leave::Goodbye);
        }
        for m in members {
            let _ = m.task.await;
        }
    }
}

/// A simulated fleet driven from blocking code (tests, benches), on a
/// runtime of its own; dropped, every node says goodbye.
pub struct Running {
    rt: tokio::runtime::Runtime,
    fleet: Option<Fleet>,
}

impl Running {
    /// `count` nodes named `<prefix>-00000`… against the hub whose broker
    /// is `broker`, enrolling with the join token `join`.
    pub fn start(broker: &str, join: &str, prefix: &str, count: usize) -> Running {
        Self::start_at(broker, join, prefix, count, 200)
    }

    /// [`Running::start`], enrolling at most `rate` nodes per second.
    pub fn start_at(broker: &str, join: &str, prefix: &str, count: usize, rate: usize) -> Running {
        Self::start_with(broker, join, prefix, count, rate, Unrest::default())
    }

    /// [`Running::start_at`], with links that fail and nodes that come and go.
    pub fn start_with(broker: &str, join: &str, prefix: &str, count: usize, rate: usize, unrest: Unrest) -> Running {
        let broker: BrokerUrl = broker.parse().expect("broker URL");
        let token: JoinToken = join.trim().parse().expect("join token");
        let tls = edge_agent::broker_tls(&broker, None, Some(&token.fingerprint)).expect("TLS to the broker");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let cfg = SimConfig {
            broker,
            tls,
            keepalive: Duration::from_secs(30),
            apply_delay: Duration::from_millis(100),
            unrest,
        };
        let fleet = rt.block_on(Fleet::start(cfg, &token, prefix, count, &[], rate));
        Running { rt, fleet: Some(fleet) }
    }

    pub fn stats(&self) -> &SimStats {
        &self.fleet.as_ref().expect("running").stats
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(f) = self.fleet.take() {
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), f.stop()).await });
        }
    }
}
