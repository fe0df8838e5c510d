//! Table tests of the session machine, with a fake node.

use super::*;
use std::sync::{Arc, Mutex};

use edge_api::quantity::{Cpu, Memory};

/// A node whose enrolment changes only as the test performs effects.
struct FakeNode {
    key: SigningKey,
    kem: KemKeyPair,
    facts: NodeFacts,
    hub_key: Mutex<Option<PublicKey>>,
    api_url: Mutex<Option<String>>,
    join: Mutex<Option<JoinToken>>,
}

impl Node for FakeNode {
    fn name(&self) -> &str {
        "pi"
    }
    fn session(&self) -> u64 {
        7
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
        *self.hub_key.lock().unwrap()
    }
    fn api_url(&self) -> Option<String> {
        self.api_url.lock().unwrap().clone()
    }
    fn join_token(&self) -> Option<JoinToken> {
        self.join.lock().unwrap().clone()
    }
    fn hub_now_ms(&self) -> u64 {
        1_000_000
    }
}

struct World {
    hub: SigningKey,
    node: Arc<FakeNode>,
    m: Machine<FakeNode>,
    now: Instant,
}

fn world(enrolled: bool) -> World {
    let hub = SigningKey::generate().unwrap();
    let facts = NodeFacts {
        arch: "arm64".into(),
        os: "linux".into(),
        os_release: String::new(),
        kernel: String::new(),
        cpus: 4,
        memory: Memory::mib(1024),
        allocatable_memory: Memory::mib(1024),
        allocatable_cpu: Cpu(4000),
        labels: Default::default(),
        runtimes: vec![],
        agent_version: String::new(),
        wasm_instances: None,
    };
    let node = Arc::new(FakeNode {
        key: SigningKey::generate().unwrap(),
        kem: KemKeyPair::generate().unwrap(),
        facts,
        hub_key: Mutex::new(enrolled.then(|| hub.public())),
        api_url: Mutex::new(enrolled.then(|| "https://hub:8443".to_string())),
        join: Mutex::new((!enrolled).then(|| JoinToken::generate(&hub.public()).unwrap())),
    });
    let m = Machine::new(node.clone(), 0, None);
    World { hub, node, m, now: Instant::now() }
}

impl World {
    /// Performs what the driver would of the effects that change the node.
    fn perform(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Enrolled { hub_key, api_url } => {
                    *self.node.hub_key.lock().unwrap() = Some(*hub_key);
                    *self.node.api_url.lock().unwrap() = Some(api_url.clone());
                }
                Effect::Credential(_) => *self.node.join.lock().unwrap() = None,
                Effect::Desired { generation, doc, .. } => self.m.kept(*generation, doc.fence()),
                _ => {}
            }
        }
    }

    fn welcome(&self, pending: bool, credential: Option<&str>) -> Vec<u8> {
        let w = Welcome {
            node: "pi".into(),
            node_key: self.node.key.public(),
            accepted: !pending,
            pending,
            error: None,
            hub_key: self.hub.public(),
            api_url: "https://hub:8443".into(),
            heartbeat_ms: 2_000,
            hub_time_ms: 5,
            credential: credential.map(|c| {
                edge_api::seal::seal(&self.node.kem.public(), &edge_api::seal::credential_info("pi"), c.as_bytes())
                    .unwrap()
            }),
        };
        wire::seal(Kind::Welcome, wire::HUB, 0, &w, Some(&self.hub)).unwrap()
    }

    fn desired(&self, generation: u64, signer: &SigningKey) -> Vec<u8> {
        let doc = NodeDesired { node: "pi".into(), workloads: vec![] };
        wire::seal(Kind::Desired, wire::HUB, generation, &doc, Some(signer)).unwrap()
    }

    fn request(&self, r: &Request) -> Vec<u8> {
        wire::seal(Kind::Request, wire::HUB, 0, r, Some(&self.hub)).unwrap()
    }

    fn publish(&mut self, channel: Channel, payload: &[u8]) -> Result<Vec<Effect>, String> {
        let snap = Snapshot { observed_generation: 0, instances: vec![], corrupt_files: 0 };
        let r = self.m.on_publish(&wire::topic("pi", channel), payload, &snap);
        if let Ok(e) = &r {
            self.perform(e);
        }
        r
    }
}

/// Effects in a few words, for tables: `pub:<channel>`, `desired:<gen>`…
fn words(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Subscribe(t) => format!("sub:{}", t.len()),
            Effect::Publish(p) => format!("pub:{}", p.topic.rsplit('/').next().unwrap()),
            Effect::Desired { generation, .. } => format!("desired:{generation}"),
            Effect::HubTime(_) => "time".into(),
            Effect::Enrolled { .. } => "enrolled".into(),
            Effect::Credential(c) => format!("credential:{c}"),
            Effect::ClearCredential => "clear".into(),
            Effect::Relogin => "relogin".into(),
            Effect::Fatal(_) => "fatal".into(),
            Effect::OpenLogs { id, .. } => format!("open:{id}"),
            Effect::RenewLogs { id, .. } => format!("renew:{id}"),
            Effect::CancelLogs { id } => format!("cancel:{id}"),
            Effect::Lease(_) => "lease".into(),
        })
        .collect()
}

#[test]
fn a_device_enrols_with_its_token_then_logs_in_as_itself() {
    let mut w = world(false);
    w.m.connecting(LoginKind::Bootstrap);
    let e = w.m.on_connack(1, w.now);
    assert_eq!(words(&e), ["sub:1", "pub:join"], "an enrolling device hears only its welcome");
    let Effect::Publish(join) = &e[1] else { unreachable!() };
    let join: Join = wire::open(&join.payload).unwrap().body().unwrap();
    assert!(join.token.is_some(), "the join carries the token");
    // A desired state before the welcome waits; nothing is sent before it.
    assert!(words(&w.publish(Channel::Desired, &w.desired(3, &w.hub)).unwrap()).is_empty());
    assert!(w.m.on_heartbeat_tick(0, false, w.now).is_empty());
    // The welcome brings the credential, sealed to this node: keep it, log in again.
    let e = w.publish(Channel::Welcome, &w.welcome(false, Some("s3cret"))).unwrap();
    assert_eq!(words(&e), ["time", "enrolled", "credential:s3cret", "relogin"]);

    // As itself: its three channels, a join without a token, then the
    // welcome announces it and applies what waited.
    w.m.connecting(LoginKind::Node);
    let e = w.m.on_connack(2, w.now);
    assert_eq!(words(&e), ["sub:3", "pub:join"]);
    let Effect::Publish(join) = &e[1] else { unreachable!() };
    assert!(wire::open(&join.payload).unwrap().body::<Join>().unwrap().token.is_none());
    let e = w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap();
    assert_eq!(words(&e), ["time", "pub:presence", "pub:status", "desired:3"]);
    assert_eq!(w.m.heartbeat(), Duration::from_millis(2_000));
    assert!(w.m.take_heartbeat_changed() && !w.m.take_heartbeat_changed());
    let Effect::Publish(p) = &e[1] else { unreachable!() };
    assert!(p.retain);
    let presence: Presence = wire::open(&p.payload).unwrap().body().unwrap();
    assert_eq!((presence.online, presence.session, presence.conn), (true, 7, 2));
    // A second welcome (an answered retry) announces nothing again.
    assert_eq!(words(&w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap()), ["time"]);
}

#[test]
fn only_newer_desired_states_signed_by_the_pinned_hub_are_taken() {
    let mut w = world(true);
    w.m.connecting(LoginKind::Node);
    w.m.on_connack(1, w.now);
    let forger = SigningKey::generate().unwrap();
    type Want = Result<Vec<&'static str>, &'static str>;
    let cases: Vec<(Vec<u8>, Want)> = vec![
        (w.desired(5, &w.hub), Ok(vec!["desired:5"])),
        (w.desired(5, &w.hub), Ok(vec![])),
        (w.desired(4, &w.hub), Ok(vec![])),
        (w.desired(9, &forger), Err("invalid signature")),
        (Vec::new(), Err("empty desired-state message ignored")),
        (b"{".to_vec(), Err("not a JSON envelope")),
        (w.desired(6, &w.hub), Ok(vec!["desired:6"])),
    ];
    for (payload, want) in cases {
        let got = w.publish(Channel::Desired, &payload).map(|e| words(&e));
        match (&got, &want) {
            (Ok(g), Ok(want)) => assert_eq!(g, want),
            (Err(g), Err(want)) => assert!(g.contains(want), "{g}"),
            _ => panic!("got {got:?}, want {want:?}"),
        }
    }
    // Not kept (the disk failed): the same generation is taken again.
    let e = w.m.on_publish(&wire::topic("pi", Channel::Desired), &w.desired(8, &w.hub), &Snapshot::default());
    assert_eq!(words(&e.unwrap()), ["desired:8"]);
    assert_eq!(words(&w.publish(Channel::Desired, &w.desired(8, &w.hub)).unwrap()), ["desired:8"]);
    // Another node's topic is refused.
    let snap = Snapshot::default();
    let other = w.m.on_publish(&wire::topic("pi-2", Channel::Desired), &w.desired(9, &w.hub), &snap);
    assert_eq!(other.unwrap_err(), "not one of this node's topics");
}

#[test]
fn a_request_of_the_hub_is_served_once_and_only_in_time() {
    let mut w = world(true);
    let logs = |id: &str, expires_ms: u64| Request::Logs {
        id: id.into(),
        workload: "web".into(),
        replica: 1,
        tail: Some(10),
        follow: true,
        lease_ms: 3_600_000,
        expires_ms,
    };
    let e = w.publish(Channel::Request, &w.request(&logs("a1", 2_000_000))).unwrap();
    assert_eq!(
        e,
        [Effect::OpenLogs {
            id: "a1".into(),
            instance: "web.1".into(),
            tail: Some(10),
            follow: true,
            lease: MAX_LEASE
        }]
    );
    let replay = w.publish(Channel::Request, &w.request(&logs("a1", 2_000_000))).unwrap_err();
    assert!(replay.contains("log request a1 refused"), "{replay}");
    let late = w.publish(Channel::Request, &w.request(&logs("b2", 999_999))).unwrap_err();
    assert!(late.contains("expired"), "{late}");
    let renew = |expires_ms| Request::Renew { id: "a1".into(), lease_ms: 30_000, expires_ms };
    assert_eq!(words(&w.publish(Channel::Request, &w.request(&renew(2_000_000))).unwrap()), ["renew:a1"]);
    assert!(w.publish(Channel::Request, &w.request(&renew(1))).unwrap_err().contains("expired"));
    let cancel = Request::Cancel { id: "a1".into() };
    assert_eq!(words(&w.publish(Channel::Request, &w.request(&cancel)).unwrap()), ["cancel:a1"]);
    let forged = wire::seal(Kind::Request, wire::HUB, 0, &logs("c3", 2_000_000), Some(&w.node.key)).unwrap();
    assert!(w.publish(Channel::Request, &forged).unwrap_err().contains("invalid signature"));
}

#[test]
fn refused_logins_fall_back_to_the_token_or_end_an_unenrolled_agent() {
    use LinkError::*;
    // (enrolled, login, errors in a row, effects after the last)
    let cases: &[(bool, LoginKind, &[LinkError], &[&str])] = &[
        (true, LoginKind::Node, &[Other], &[]),
        (true, LoginKind::Node, &[Refused], &[]), // no token to fall back to: run from local state
        // A hub just started may still be registering its tokens with the broker.
        (false, LoginKind::Bootstrap, &[Refused], &[]),
        (false, LoginKind::Bootstrap, &[Refused, Refused, Refused], &["fatal"]),
        (false, LoginKind::Bootstrap, &[Refused, Other, Refused], &[]),
        (false, LoginKind::Bootstrap, &[ClosedAtLogin, ClosedAtLogin], &[]),
        (false, LoginKind::Bootstrap, &[ClosedAtLogin, ClosedAtLogin, ClosedAtLogin], &["fatal"]),
        (false, LoginKind::Bootstrap, &[ClosedAtLogin, Other, ClosedAtLogin], &[]),
    ];
    for (enrolled, login, errors, want) in cases {
        let mut w = world(*enrolled);
        w.m.connecting(*login);
        let mut last = vec![];
        for e in *errors {
            last = w.m.on_link_error(e, "test");
        }
        assert_eq!(words(&last), *want, "{login:?} {errors:?}");
    }
    // An enrolled node given a join token again re-enrols when its credential is refused.
    let mut w = world(true);
    *w.node.join.lock().unwrap() = Some(JoinToken::generate(&w.hub.public()).unwrap());
    w.m.connecting(LoginKind::Node);
    assert_eq!(words(&w.m.on_link_error(&Refused, "refused")), ["clear", "relogin"]);
}

#[test]
fn heartbeats_and_join_retries_follow_the_connection() {
    let mut w = world(true);
    w.m.connecting(LoginKind::Node);
    assert!(w.m.on_heartbeat_tick(1, false, w.now).is_empty(), "not connected");
    assert!(w.m.on_join_tick(w.now).is_empty(), "not connected");
    w.m.on_connack(1, w.now);
    assert!(w.m.on_heartbeat_tick(1, false, w.now).is_empty(), "not welcomed");
    assert!(w.m.on_status(&Snapshot::default()).is_empty(), "no status before the welcome");
    assert!(w.m.on_join_tick(w.now + Duration::from_secs(1)).is_empty(), "asked a second ago");
    assert_eq!(words(&w.m.on_join_tick(w.now + JOIN_RETRY)), ["pub:join"]);
    // Waiting for approval asks less often.
    w.publish(Channel::Welcome, &w.welcome(true, None)).unwrap();
    let t = w.now + JOIN_RETRY * 2;
    assert!(w.m.on_join_tick(t).is_empty());
    assert_eq!(words(&w.m.on_join_tick(w.now + JOIN_RETRY + PENDING_RETRY)), ["pub:join"]);
    w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap();
    let seqs: Vec<u64> = (0..3)
        .map(|_| {
            let e = w.m.on_heartbeat_tick(4, false, w.now);
            let Effect::Publish(p) = &e[0] else { unreachable!() };
            assert_eq!(p.qos, Qos::AtMostOnce);
            let key = w.node.key.public();
            edge_api::frame::Frame::open(&p.payload, edge_api::frame::FrameKind::Heartbeat, "pi", &key).unwrap().seq
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(w.m.on_heartbeat_tick(4, true, w.now).is_empty(), "withheld while the reconcile loop is stuck");
    assert!(w.m.on_join_tick(w.now + PENDING_RETRY * 9).is_empty(), "welcomed: no more joins");
    assert_eq!(words(&w.m.on_status(&Snapshot::default())), ["pub:status"]);
    assert_eq!(words(&w.m.on_shutdown()), ["pub:presence"]);
    w.m.on_link_error(&LinkError::Other, "gone");
    assert!(w.m.on_status(&Snapshot::default()).is_empty(), "no status while disconnected");
    assert!(w.m.on_shutdown().is_empty());
}

#[test]
fn the_hubs_acknowledgement_of_a_heartbeat_gives_a_lease_from_when_it_was_sent() {
    let mut w = world(true);
    w.m.connecting(LoginKind::Node);
    w.m.on_connack(1, w.now);
    w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap();
    let (t1, t2) = (w.now + Duration::from_secs(1), w.now + Duration::from_secs(2));
    w.m.on_heartbeat_tick(1, false, t1);
    w.m.on_heartbeat_tick(1, false, t2);
    let lease = |node: &str, session: u64, seq: u64| Request::Lease { node: node.into(), session, seq };
    let session = w.node.session();
    assert_eq!(w.publish(Channel::Request, &w.request(&lease("pi", session, 1))).unwrap(), [Effect::Lease(t1)]);
    assert_eq!(w.publish(Channel::Request, &w.request(&lease("pi", session, 2))).unwrap(), [Effect::Lease(t2)]);
    for (bad, says) in [
        (lease("pi", session, 9), "does not remember sending"),
        (lease("pi", session + 1, 1), "not this agent's"),
        (lease("pi-2", session, 1), "not this agent's"),
    ] {
        let e = w.publish(Channel::Request, &w.request(&bad)).unwrap_err();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
    // Only the hub's signature counts.
    let mut forged = w.request(&lease("pi", session, 2));
    let n = forged.len();
    forged[n - 3] ^= 1;
    assert!(w.publish(Channel::Request, &forged).is_err());
}

#[test]
fn heartbeats_and_leases_travel_as_compact_frames_bound_to_the_node() {
    use edge_api::frame::{Frame, FrameKind, LEN};
    let mut w = world(true);
    w.m.connecting(LoginKind::Node);
    w.m.on_connack(1, w.now);
    w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap();
    let t1 = w.now + Duration::from_secs(1);
    let e = w.m.on_heartbeat_tick(4, false, t1);
    let [Effect::Publish(p)] = &e[..] else { panic!("{e:?}") };
    assert_eq!(
        (p.topic.as_str(), p.payload.len(), p.qos, p.retain),
        ("edge/v1/nodes/pi/hb", LEN, Qos::AtMostOnce, false)
    );
    let session = w.node.session();
    let hb = Frame::open(&p.payload, FrameKind::Heartbeat, "pi", &w.node.key.public()).unwrap();
    assert_eq!(hb, Frame::heartbeat(session, 1, 4));

    assert_eq!(w.publish(Channel::Request, &Frame::lease(session, 1).seal("pi", &w.hub)).unwrap(), [Effect::Lease(t1)]);
    let forger = SigningKey::generate().unwrap();
    for (bad, says) in [
        (Frame::lease(session, 1).seal("pi", &forger), "invalid signature"),
        (Frame::lease(session, 1).seal("pi-2", &w.hub), "invalid signature"),
        (Frame::heartbeat(session, 1, 0).seal("pi", &w.hub), "expected a Lease"),
        (Frame::lease(session + 1, 1).seal("pi", &w.hub), "not this agent's"),
        (Frame::lease(session, 2).seal("pi", &w.hub), "does not remember sending"),
        (Frame::lease(session, 1).seal("pi", &w.hub)[..40].to_vec(), "40 bytes"),
    ] {
        let e = w.publish(Channel::Request, &bad).unwrap_err();
        assert!(e.contains(says), "{says}: {e}");
    }
}

#[test]
fn a_node_holding_fenced_replicas_sends_heartbeats_often_enough_to_renew_its_lease() {
    use edge_api::model::Millis;
    let mut w = world(true);
    w.m.connecting(LoginKind::Node);
    w.m.on_connack(1, w.now);
    w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap();
    assert_eq!(w.m.heartbeat(), Duration::from_millis(2_000));
    w.m.take_heartbeat_changed();
    // A fence of 3.25 s (reschedule_after = 5s): three renewals per fence.
    w.m.kept(5, Some(Millis(3_250)));
    assert_eq!(w.m.heartbeat(), Duration::from_millis(1_083));
    assert!(w.m.take_heartbeat_changed());
    // An older document changes nothing; one without fenced replicas
    // returns to the hub's pace, which a welcome may change.
    w.m.kept(4, None);
    assert_eq!(w.m.heartbeat(), Duration::from_millis(1_083));
    w.m.kept(6, None);
    assert_eq!(w.m.heartbeat(), Duration::from_millis(2_000));
    // An agent restarting with fenced replicas on disk keeps their pace
    // before the hub's welcome.
    assert_eq!(Machine::new(w.node.clone(), 6, Some(Millis(3_250))).heartbeat(), Duration::from_millis(1_083));
    assert_eq!(Machine::new(w.node.clone(), 6, None).heartbeat(), DEFAULT_HEARTBEAT);
}

#[test]
fn a_welcome_pins_the_key_before_what_waited_for_it_and_is_undone_if_it_could_not_be_kept() {
    let mut w = world(false);
    w.m.connecting(LoginKind::Node);
    w.m.on_connack(1, w.now);
    assert!(w.publish(Channel::Desired, &w.desired(4, &w.hub)).unwrap().is_empty(), "stashed");
    let snap = Snapshot::default();
    let topic = wire::topic("pi", Channel::Welcome);
    // The enrolment could not be kept: the welcome did not happen.
    let e = w.m.on_publish(&topic, &w.welcome(false, None), &snap).unwrap();
    assert_eq!(words(&e), ["time", "enrolled", "pub:presence", "pub:status", "desired:4"]);
    w.m.batch_failed();
    assert!(!w.m.welcomed());
    assert_eq!(words(&w.m.on_join_tick(w.now + JOIN_RETRY)), ["pub:join"], "it asks again");
    // The next welcome brings it all, in the same order: the key first.
    let e = w.publish(Channel::Welcome, &w.welcome(false, None)).unwrap();
    assert_eq!(words(&e), ["time", "enrolled", "pub:presence", "pub:status", "desired:4"]);
    assert!(w.m.welcomed());
    // A later input's failure does not undo that welcome.
    let e = w.publish(Channel::Desired, &w.desired(5, &w.hub)).unwrap();
    w.m.batch_failed();
    assert_eq!(words(&e), ["desired:5"]);
    assert!(w.m.welcomed());
}

#[test]
fn a_welcome_from_another_hub_or_for_another_key_changes_nothing() {
    let mut w = world(false);
    w.m.connecting(LoginKind::Bootstrap);
    w.m.on_connack(1, w.now);
    let impostor = world(false);
    let mut foreign = impostor.welcome(false, Some("x"));
    // Signed by a hub the token does not pin.
    foreign = {
        let mut wl: Welcome = wire::open(&foreign).unwrap().body().unwrap();
        wl.node_key = w.node.key.public();
        wire::seal(Kind::Welcome, wire::HUB, 0, &wl, Some(&impostor.hub)).unwrap()
    };
    let e = w.publish(Channel::Welcome, &foreign).unwrap_err();
    assert!(e.contains("does not match the join token's fingerprint"), "{e}");
    // Meant for another process claiming this name: ignored.
    let mut wl: Welcome = wire::open(&w.welcome(false, Some("x"))).unwrap().body().unwrap();
    wl.node_key = impostor.node.key.public();
    let other = wire::seal(Kind::Welcome, wire::HUB, 0, &wl, Some(&w.hub)).unwrap();
    assert!(w.publish(Channel::Welcome, &other).unwrap().is_empty());
    assert!(!w.m.welcomed());
}
