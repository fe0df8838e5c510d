//! Tests of `Hub`: the mutation path, message handling, leases and views.

use super::*;
use crate::authz::Principal;
use crate::store::MemStore;
use edge_api::model::NodeFacts;
use edge_api::model::{Role, TokenRequest};
use edge_api::seal::KemKeyPair;
use edge_api::token::{ApiToken, JoinToken};

pub(crate) struct Fixture {
    pub(crate) hub: Arc<Hub>,
    pub(crate) outbox: mpsc::UnboundedReceiver<Outgoing>,
    pub(crate) store: Arc<MemStore>,
    join: JoinToken,
    admin: ApiToken,
    _dir: std::path::PathBuf,
}

pub(crate) fn fixture() -> Fixture {
    fixture_with(Arc::new(MemStore::default()))
}

fn fixture_with(store: Arc<MemStore>) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "edge-hub-unit-{}-{}",
        std::process::id(),
        edge_api::keys::random_hex(4).unwrap()
    ));
    let key = SigningKey::generate().unwrap();
    let join = JoinToken::generate(&key.public()).unwrap();
    let admin = ApiToken::generate().unwrap();
    let (hub, outbox) = Hub::new(HubParts {
        insecure_registries: vec![],
        store: store.clone(),
        key,
        api_url: "http://hub".into(),
        heartbeat: Duration::from_secs(5),
        artifacts: ArtifactStore::open(&dir).unwrap(),
        require_approval: false,
        broker_admin: Box::new(crate::broker_admin::Unmanaged),
        secret_keys: SecretKeys::random(),
        allow_host_network: false,
        reserved_logins: vec!["edge-hub".into()],
        revision_history: 3,
        compile_jobs: 1,
    })
    .unwrap();
    hub.ensure_bootstrap_token(&join.id, &join.secret, TokenKind::Join, "t").unwrap();
    hub.ensure_bootstrap_token(&admin.id, &admin.secret, TokenKind::Api, "t").unwrap();
    Fixture { hub, outbox, store, join, admin, _dir: dir }
}

pub(crate) fn facts() -> NodeFacts {
    crate::test_facts("arm64", 1024, &[])
}

fn join_msg(node: &str, key: &SigningKey, kem: &KemKeyPair, token: Option<&JoinToken>, session: u64) -> Vec<u8> {
    let j = Join {
        node: node.into(),
        key: key.public(),
        kem: kem.public(),
        token: token.map(|t| t.presented()),
        session,
        observed_generation: 0,
        facts: facts(),
    };
    wire::seal(Kind::Join, node, 0, &j, Some(key)).unwrap()
}

fn welcome(f: &mut Fixture, node: &str) -> Welcome {
    while let Ok(o) = f.outbox.try_recv() {
        if o.topic == wire::topic(node, Channel::Welcome) {
            return wire::open(&o.payload).unwrap().body().unwrap();
        }
    }
    panic!("no welcome for {node}");
}

fn status(node: &str, key: &SigningKey, session: u64, seq: u64) -> Vec<u8> {
    let st =
        NodeStatus { node: node.into(), session, seq, observed_generation: 0, instances: vec![], corrupt_files: 0 };
    wire::seal(Kind::Status, node, 0, &st, Some(key)).unwrap()
}

/// Enrols `node` and returns its keys and the credential from its welcome.
pub(crate) fn enrol(f: &mut Fixture, node: &str) -> (SigningKey, KemKeyPair, String) {
    let key = SigningKey::generate().unwrap();
    let kem = KemKeyPair::generate().unwrap();
    let token = f.join.clone();
    f.hub.on_message(&wire::topic(node, Channel::Join), &join_msg(node, &key, &kem, Some(&token), 1));
    let w = welcome(f, node);
    assert!(w.accepted, "{w:?}");
    let sealed = w.credential.expect("a credential in the first welcome");
    let cred = String::from_utf8(kem.open(&edge_api::seal::credential_info(node), &sealed).unwrap()).unwrap();
    (key, kem, cred)
}

#[test]
fn a_join_with_a_valid_token_enrols_the_node_with_a_credential_only_it_can_open() {
    let mut f = fixture();
    let (key, kem, cred) = enrol(&mut f, "pi");
    assert_eq!(f.hub.node_view("pi").unwrap().state, NodeState::Ready);
    assert_eq!(f.hub.node_view("pi").unwrap().enrolled_with.as_deref(), Some(f.join.id.as_str()));
    assert_eq!(f.hub.mqtt_login("edge-agent-pi", "pi", &cred, "hubpw"), Ok(Principal::Node("pi".into())));
    // Joining again with its own key and no token: welcomed, no new credential.
    f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &kem, None, 2));
    let w = welcome(&mut f, "pi");
    assert!(w.accepted && w.credential.is_none(), "{w:?}");
    assert!(f.hub.mqtt_login("edge-agent-pi", "pi", &cred, "hubpw").is_ok(), "the credential still works");
}

#[test]
fn a_join_retried_before_its_welcome_arrived_gets_the_same_credential() {
    let mut f = fixture();
    let key = SigningKey::generate().unwrap();
    let kem = KemKeyPair::generate().unwrap();
    let token = f.join.clone();
    let mut creds = Vec::new();
    for session in [1, 1, 2] {
        f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &kem, Some(&token), session));
        let w = welcome(&mut f, "pi");
        let sealed = w.credential.expect("a credential");
        creds.push(String::from_utf8(kem.open(&edge_api::seal::credential_info("pi"), &sealed).unwrap()).unwrap());
    }
    assert!(creds.windows(2).all(|c| c[0] == c[1]), "one credential, given again");
    assert!(f.hub.mqtt_login("edge-agent-pi", "pi", &creds[0], "hubpw").is_ok(), "and it works");
}

#[test]
fn a_join_with_a_wrong_secret_no_token_or_a_taken_name_is_refused() {
    let mut f = fixture();
    let key = SigningKey::generate().unwrap();
    let kem = KemKeyPair::generate().unwrap();
    let wrong = JoinToken { secret: "notthesecretatallnotthesecret123".into(), ..f.join.clone() };
    f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &kem, Some(&wrong), 1));
    let w = welcome(&mut f, "pi");
    assert!(!w.accepted && w.error.as_deref().unwrap().contains("invalid join token"), "{w:?}");
    f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &key, &kem, None, 1));
    let w = welcome(&mut f, "pi");
    assert!(!w.accepted && w.error.as_deref().unwrap().contains("not enrolled"), "{w:?}");
    assert!(f.hub.node_view("pi").is_none());

    let (key, _, _) = enrol(&mut f, "pi");
    let impostor = SigningKey::generate().unwrap();
    let token = f.join.clone();
    f.hub.on_message(&wire::topic("pi", Channel::Join), &join_msg("pi", &impostor, &kem, Some(&token), 2));
    let w = welcome(&mut f, "pi");
    assert!(!w.accepted && w.error.as_deref().unwrap().contains("already taken"));
    assert_eq!(f.hub.node_key("pi"), Some(key.public()), "the first agent keeps its name");
}

#[test]
fn broker_logins_are_checked_and_bound_to_their_client_id() {
    let mut f = fixture();
    let (_, _, cred) = enrol(&mut f, "pi");
    let user = f.join.mqtt_user();
    let secret = f.join.secret.clone();
    let h = &f.hub;
    assert_eq!(h.mqtt_login("edge-hub-x", crate::broker::HUB_USER, "hubpw", "hubpw"), Ok(Principal::Hub));
    assert!(h.mqtt_login("edge-hub-x", crate::broker::HUB_USER, "nope", "hubpw").is_err());
    assert_eq!(h.mqtt_login("edge-join-pi-2", &user, &secret, "hubpw"), Ok(Principal::Joiner("pi-2".into())));
    assert!(h.mqtt_login("edge-agent-pi-2", &user, &secret, "hubpw").is_err(), "a joiner's client id is edge-join-*");
    assert!(h.mqtt_login("edge-join-pi-2", &user, "wrong", "hubpw").is_err());
    assert!(h.mqtt_login("edge-agent-pi", "pi", "wrong", "hubpw").is_err());
    assert!(h.mqtt_login("edge-agent-other", "pi", &cred, "hubpw").is_err(), "no session takeover");
    assert!(h.mqtt_login("edge-agent-ghost", "ghost", &cred, "hubpw").is_err());

    // Revoking the token and deleting the node end those logins.
    let joiner = Principal::Joiner("pi-2".into());
    assert!(h.mqtt_still_valid(&joiner, &user, &secret));
    h.revoke_token(&f.join.id).unwrap();
    assert!(h.mqtt_login("edge-join-pi-2", &user, &secret, "hubpw").unwrap_err().contains("revoked"));
    assert!(!h.mqtt_still_valid(&joiner, &user, &secret));
    let node = Principal::Node("pi".into());
    assert!(h.mqtt_still_valid(&node, "pi", &cred));
    h.delete_node("pi").unwrap();
    assert!(h.mqtt_login("edge-agent-pi", "pi", &cred, "hubpw").is_err(), "no new logins at once");
    assert!(h.mqtt_still_valid(&node, "pi", &cred), "the open session gets its last document first");
    lock(&h.inner).deleting.insert("pi".into(), Instant::now());
    assert!(!h.mqtt_still_valid(&node, "pi", &cred), "then it is cut off");
}

#[test]
fn api_tokens_carry_roles_and_stop_working_when_revoked() {
    let f = fixture();
    assert_eq!(f.hub.authenticate(&f.admin.to_string()).map(|(_, r)| r), Some(Role::Admin));
    let (viewer, info) =
        f.hub.create_token(TokenRequest { role: Some(Role::Viewer), ..Default::default() }, "admin").unwrap();
    assert_eq!(f.hub.authenticate(&viewer), Some((info.id.clone(), Role::Viewer)));
    assert!(f.hub.authenticate(&f.join.to_string()).is_none(), "a join token is no API token");
    assert!(f.hub.authenticate("EA1.abcdefgh.wrongwrongwrongwrong").is_none());
    f.hub.revoke_token(&info.id).unwrap();
    assert!(f.hub.authenticate(&viewer).is_none());
    let stored = f.store.load(Collection::Tokens).unwrap();
    assert!(!stored.iter().any(|(_, v)| String::from_utf8_lossy(v).contains(viewer.rsplit('.').next().unwrap())));
    let e = f.hub.create_token(TokenRequest { max_uses: Some(0), ..Default::default() }, "admin").unwrap_err();
    assert!(matches!(e, HubError::Invalid { .. }), "{e:?}");
}

#[test]
fn heartbeats_must_be_signed_and_are_not_replayed() {
    let mut f = fixture();
    let (key, _, _) = enrol(&mut f, "pi");
    let rejected = || f.hub.metrics.rejected.load(Ordering::Relaxed);
    let topic = wire::topic("pi", Channel::Heartbeat);
    let hb = Heartbeat { session: u64::MAX, seq: 1, observed_generation: 0 };
    f.hub.on_message(&topic, &wire::seal(Kind::Heartbeat, "pi", 0, &hb, None).unwrap());
    assert_eq!(rejected(), 1, "unsigned");
    let other = SigningKey::generate().unwrap();
    f.hub.on_message(&topic, &wire::seal(Kind::Heartbeat, "pi", 0, &hb, Some(&other)).unwrap());
    assert_eq!(rejected(), 2, "signed by another key");
    assert_eq!(lock(&f.hub.inner).live["pi"].session, 1, "no forged session advanced");
    let genuine =
        wire::seal(Kind::Heartbeat, "pi", 0, &Heartbeat { session: 1, seq: 5, observed_generation: 0 }, Some(&key))
            .unwrap();
    f.hub.on_message(&topic, &genuine);
    assert_eq!(lock(&f.hub.inner).live["pi"].heartbeat_order, (1, 5));
    let older =
        wire::seal(Kind::Heartbeat, "pi", 0, &Heartbeat { session: 1, seq: 4, observed_generation: 9 }, Some(&key))
            .unwrap();
    f.hub.on_message(&topic, &older);
    assert_eq!(lock(&f.hub.inner).live["pi"].observed_generation, 0, "an older heartbeat changes nothing");
}

#[test]
fn status_is_ordered_by_session_then_sequence() {
    let mut f = fixture();
    let (key, _, _) = enrol(&mut f, "pi");
    let topic = wire::topic("pi", Channel::Status);
    let rejected = || f.hub.metrics.rejected.load(Ordering::Relaxed);
    f.hub.on_message(&topic, &status("pi", &key, 1, 7));
    assert_eq!(rejected(), 0);
    f.hub.on_message(&topic, &status("pi", &key, 1, 6));
    assert_eq!(rejected(), 1, "an older sequence in the same session is stale");
    // A restarted agent (new session) starts its sequence again: accepted.
    let p = Presence { online: true, session: 2, conn: 1 };
    f.hub.on_message(
        &wire::topic("pi", Channel::Presence),
        &wire::seal(Kind::Presence, "pi", 0, &p, Some(&key)).unwrap(),
    );
    f.hub.on_message(&topic, &status("pi", &key, 2, 1));
    assert_eq!(rejected(), 1, "seq 1 of a new session is newer");
    f.hub.on_message(&topic, &status("pi", &key, 1, 99));
    assert_eq!(rejected(), 2, "anything from an older session is stale");
}

#[test]
fn artifact_fetch_signatures_are_accepted_once_and_only_near_the_hubs_clock() {
    let mut f = fixture();
    let (key, _, _) = enrol(&mut f, "pi");
    let path = "/v1/artifacts/sha256:00";
    let sign =
        |t: u64, nonce: &str| edge_api::hex::encode(&key.sign(&wire::artifact_fetch_message("pi", path, t, nonce)));
    let now = now_ms();
    let nonce = "0123456789abcdef";
    let stamp = format!("{now}.{nonce}");
    assert_eq!(f.hub.verify_node_fetch("pi", path, &stamp, &sign(now, nonce)), Ok(()));
    assert!(f.hub.verify_node_fetch("pi", path, &stamp, &sign(now, nonce)).unwrap_err().contains("already used"));
    let old = now - 10 * 60_000;
    let e = f.hub.verify_node_fetch("pi", path, &format!("{old}.{nonce}1"), &sign(old, &format!("{nonce}1")));
    assert!(e.unwrap_err().contains("away from the hub's clock"));
    let e = f.hub.verify_node_fetch(
        "pi",
        "/v1/artifacts/other",
        &format!("{now}.{nonce}2"),
        &sign(now, &format!("{nonce}2")),
    );
    assert!(e.unwrap_err().contains("bad signature"), "signed for another path");
}

/// A workload of the hello example's shape, its component uploaded.
pub(crate) fn workload(f: &Fixture, name: &str) -> Workload {
    let digest = Digest::of(b"component");
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
        let mut up = f.hub.artifacts.begin(digest, 1 << 20).await.unwrap();
        up.write(b"component").await.unwrap();
        up.finish().await.unwrap();
    });
    let toml = format!(
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec.wasm]\ncomponent = \"{digest}\"\n"
    );
    edge_api::manifest::parse_toml(&toml, edge_api::manifest::Origin::Api).unwrap()
}

#[test]
fn work_refused_while_a_node_restarts_is_placed_when_it_is_back_even_between_ticks() {
    let mut f = fixture();
    let (key, _, _) = enrol(&mut f, "pi");
    f.hub.tick();
    assert_eq!(f.hub.node_view("pi").unwrap().state, NodeState::Ready);
    let presence = |online: bool, session: u64| {
        let p = Presence { online, session, conn: 1 };
        wire::seal(Kind::Presence, "pi", 0, &p, Some(&key)).unwrap()
    };
    // The agent restarts: offline, the workload arrives, online again, all before a tick.
    f.hub.on_message(&wire::topic("pi", Channel::Presence), &presence(false, 1));
    f.hub.apply_workload(workload(&f, "w"), "admin").unwrap();
    assert_eq!(f.hub.workload_view("w", false).unwrap().status.reason, Some(edge_api::model::Reason::Unschedulable));
    f.hub.on_message(&wire::topic("pi", Channel::Presence), &presence(true, 2));
    f.hub.tick();
    assert_eq!(f.hub.node_view("pi").unwrap().state, NodeState::Ready, "it looks as it did at the last tick");
    let v = f.hub.workload_view("w", false).unwrap();
    assert_eq!(v.status.replicas[0].node.as_deref(), Some("pi"), "{v:?}");
}

#[test]
fn every_spec_change_is_a_revision_that_can_be_returned_to() {
    let f = fixture();
    let with_env = |v: &str| {
        let mut w = workload(&f, "w");
        if let edge_api::model::Runtime::Wasm(s) = &mut w.spec.runtime {
            s.env.insert("VERSION".into(), edge_api::model::EnvValue::Text(v.into()));
        }
        w
    };
    assert_eq!(f.hub.apply_workload(with_env("v1"), "alice").unwrap().0, "created");
    assert_eq!(f.hub.apply_workload(with_env("v1"), "bob").unwrap().0, "unchanged");
    f.hub.apply_workload(with_env("v2"), "bob").unwrap();
    let mut three = with_env("v2");
    three.spec.replicas = edge_api::model::Replicas::Count(2);
    f.hub.apply_workload(three, "carol").unwrap();
    let revs = f.hub.revisions("w").unwrap();
    let summary: Vec<(u64, &str, &str)> = revs.iter().map(|r| (r.revision, r.by.as_str(), r.change.as_str())).collect();
    assert_eq!(summary, [(1, "alice", "created"), (2, "bob", "changed wasm.env"), (3, "carol", "changed replicas")]);
    // Undo returns to the one before, as a new revision; the oldest goes (3 kept).
    let (to, result, view) = f.hub.undo_workload("w", None, "dave").unwrap();
    assert_eq!((to, result, view.workload.metadata.generation), (2, "configured", 4));
    assert_eq!(view.workload.spec.replicas, edge_api::model::Replicas::Count(1));
    let revs = f.hub.revisions("w").unwrap();
    assert_eq!(revs.iter().map(|r| r.revision).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!((revs[2].by.as_str(), revs[2].change.as_str()), ("dave", "rolled back to revision 2"));
    // To a named revision; to the spec it has already; to one not kept.
    assert_eq!(f.hub.undo_workload("w", Some(3), "dave").unwrap().0, 3);
    assert_eq!(f.hub.undo_workload("w", Some(5), "dave").unwrap().1, "unchanged");
    let e = f.hub.undo_workload("w", Some(1), "dave").unwrap_err();
    assert_eq!(e.to_string(), "workload \"w\" has no revision 1 (kept: 3, 4, 5)");
    assert!(matches!(f.hub.undo_workload("nope", None, "dave"), Err(HubError::NotFound(_))));
    // A workload from before revisions were kept gets its old spec as one.
    let mut legacy = workload(&f, "old");
    f.hub.apply_workload(legacy.clone(), "alice").unwrap();
    f.hub
        .mutate(|d, _| {
            d.revisions.retain(|(w, _), _| w != "old");
            Ok(())
        })
        .unwrap();
    legacy.spec.replicas = edge_api::model::Replicas::Count(2);
    f.hub.apply_workload(legacy, "bob").unwrap();
    let revs: Vec<(u64, String)> = f.hub.revisions("old").unwrap().into_iter().map(|r| (r.revision, r.by)).collect();
    assert_eq!(revs, [(1, "-".to_string()), (2, "bob".to_string())]);
    assert_eq!(
        f.hub.undo_workload("old", None, "carol").unwrap().2.workload.spec.replicas,
        edge_api::model::Replicas::Count(1)
    );
    // They survive a restart and go with the workload.
    let again = Hub::new(HubParts {
        insecure_registries: vec![],
        store: f.store.clone(),
        key: SigningKey::generate().unwrap(),
        api_url: "http://hub".into(),
        heartbeat: Duration::from_secs(5),
        artifacts: ArtifactStore::open(&f._dir).unwrap(),
        require_approval: false,
        broker_admin: Box::new(crate::broker_admin::Unmanaged),
        secret_keys: SecretKeys::random(),
        allow_host_network: false,
        reserved_logins: vec![],
        revision_history: 3,
        compile_jobs: 1,
    })
    .unwrap()
    .0;
    assert_eq!(again.revisions("w").unwrap().len(), 3);
    f.hub.delete_workload("w").unwrap();
    let left: Vec<String> = f.store.load(Collection::Revisions).unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(!left.is_empty() && left.iter().all(|k| k.starts_with("old/")), "{left:?}");
}

#[test]
fn leases_go_only_to_fenced_nodes_in_the_form_of_their_heartbeat_and_set_their_pace() {
    use edge_api::frame::{Frame, FrameKind};
    let mut f = fixture();
    let (key, _, _) = enrol(&mut f, "pi");
    let json = |seq: u64, observed_generation: u64| {
        let hb = Heartbeat { session: 1, seq, observed_generation };
        wire::seal(Kind::Heartbeat, "pi", 0, &hb, Some(&key)).unwrap()
    };
    let compact = |seq: u64, generation: u64| Frame::heartbeat(1, seq, generation).seal("pi", &key);
    // The leases sent: (seq, compact).
    let hub_key = f.hub.key.public();
    let acks = |f: &mut Fixture| {
        let mut got = Vec::new();
        while let Ok(o) = f.outbox.try_recv() {
            if o.topic != wire::topic("pi", Channel::Request) {
                continue;
            }
            if o.lossy {
                let l = Frame::open(&o.payload, FrameKind::Lease, "pi", &hub_key).unwrap();
                assert_eq!(l.session, 1);
                got.push((l.seq, true));
            } else {
                let r: Request = wire::open(&o.payload).unwrap().body().unwrap();
                let Request::Lease { node, session: 1, seq } = r else { panic!("{r:?}") };
                assert_eq!(node, "pi");
                got.push((seq, false));
            }
        }
        got
    };
    let pace = |f: &Fixture| {
        let inner = lock(&f.hub.inner);
        (inner.live["pi"].interval, inner.live["pi"].asked.map(|a| a.0))
    };
    f.hub.apply_workload(workload(&f, "web"), "admin").unwrap();
    let applied = |f: &Fixture| f.hub.node_view("pi").unwrap().desired_generation;
    f.hub.on_message(&wire::topic("pi", Channel::Heartbeat), &compact(1, applied(&f)));
    assert_eq!(acks(&mut f), [], "no fenced replica on the node: no lease traffic");
    assert_eq!(pace(&f), (Some(Duration::from_secs(5)), None), "the hub's pace");
    // The shortest policy is no longer bound to the hub's heartbeat:
    // the node is asked to renew three times per fence.
    let mut w = workload(&f, "db");
    w.spec.node_loss.reschedule_after = Some(edge_api::model::Millis(5_000));
    f.hub.apply_workload(w, "admin").unwrap();
    assert_eq!(pace(&f), (Some(Duration::from_secs(5)), Some(Duration::from_millis(1_083))));
    f.hub.on_message(&wire::topic("pi", Channel::Heartbeat), &compact(2, applied(&f) - 1));
    assert_eq!(acks(&mut f), [], "not before the node applied its desired state");
    f.hub.on_message(&wire::topic("pi", Channel::Heartbeat), &compact(3, applied(&f)));
    f.hub.on_message(&wire::topic("pi", Channel::Heartbeat), &compact(3, applied(&f)));
    assert_eq!(acks(&mut f), [(3, true)], "each heartbeat acknowledged once; a replay is not");
    assert_eq!(pace(&f), (Some(Duration::from_millis(1_083)), None));
    // An agent of an earlier release: JSON in, JSON out.
    f.hub.on_message(&wire::topic("pi", Channel::Heartbeat), &json(4, applied(&f)));
    assert_eq!(acks(&mut f), [(4, false)]);
    f.hub.delete_workload("db").unwrap();
    assert_eq!(pace(&f), (Some(Duration::from_secs(5)), None), "back to the hub's pace at once");
}

#[test]
fn placements_kept_before_revisions_are_written_back_with_one_at_start() {
    let mut f = fixture();
    enrol(&mut f, "pi");
    f.hub.apply_workload(workload(&f, "web"), "admin").unwrap();
    // As an older hub kept it: the node's name alone.
    let store = f.store.clone();
    let mut batch = crate::store::Batch::default();
    batch.put(Collection::Placements, "web/0", br#""pi""#.to_vec());
    store.commit(batch).unwrap();
    drop(f);
    let f = fixture_with(store);
    let kept = f.store.dump();
    let placed: controller::Placed = serde_json::from_slice(&kept["p/web/0"]).unwrap();
    assert_eq!((placed.node.as_str(), placed.revision), ("pi", 1), "{:?}", String::from_utf8_lossy(&kept["p/web/0"]));
}

#[test]
fn a_failed_store_write_changes_nothing() {
    let mut f = fixture();
    enrol(&mut f, "pi");
    while f.outbox.try_recv().is_ok() {}
    f.store.fail_writes.store(true, Ordering::SeqCst);
    let e = f.hub.delete_node("pi").unwrap_err();
    assert!(matches!(e, HubError::StoreUnavailable(_)), "{e:?}");
    assert!(f.hub.node_view("pi").is_some(), "the node is still there");
    assert!(f.outbox.try_recv().is_err(), "nothing was published");
}
