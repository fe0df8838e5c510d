//! What an attacker holding a device (its disk, its credential, a bootstrap
//! token) can and cannot do to the fleet, with the real binaries and the
//! embedded broker. Each test names the attack; each assertion shows it
//! refused or contained.

use std::time::Duration;

use edge_api::wire::{self, Channel, Heartbeat, NodeStatus, Presence};
use edge_tests::rogue::{self, Happened, Rogue};
use edge_tests::*;

fn hub_and_pi(t: &TempDir) -> (Hub, Agent) {
    let hub = Hub::start(t.path(), HubOpts::default());
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    (hub, agent)
}

fn ticker(hub: &Hub, t: &TempDir, name: &str, extra: &str) {
    let m = manifest(
        t.path(),
        &format!("{name}.toml"),
        &(hello_manifest(name, &["--forever", "--interval-ms", "100"], "always") + extra),
    );
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
}

#[test]
fn a_device_enrols_with_a_bootstrap_token_then_logs_in_only_as_itself() {
    let t = TempDir::new("enrol");
    let hub = Hub::start(t.path(), HubOpts::default());
    let token = hub.token(&["--uses", "1", "--ttl", "1h"]);
    let file = t.path().join("join.token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let mut agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, "", &["--join-token-file", file.to_str().unwrap()]);
    hub.wait_node_state("pi-1", "Ready");
    wait_for("the agent to delete its join token", || (!file.exists()).then_some(()));
    let tokens = hub.json(&["token", "list"]);
    let used = tokens.as_array().unwrap().iter().find(|t| token.contains(t["id"].as_str().unwrap())).unwrap();
    assert_eq!(used["uses"], 1);

    // The token was single-use: a second device cannot enrol with it.
    let e = rogue::enrol(&rogue::Broker::of(&hub), &token, "pi-2", rogue::facts(), 0).map(|_| ()).unwrap_err();
    assert!(e.contains("as many nodes as it may"), "{e}");
    // The token is no node credential: logging in as pi-1 with it fails.
    let r = Rogue::connect(&rogue::Broker::of(&hub), "edge-agent-pi-1", "pi-1", token.rsplit('.').next().unwrap());
    assert_eq!(r.refused().as_deref(), Some("NotAuthorized"));
    assert_eq!(hub.node("pi-1").unwrap()["state"], "Ready", "the failed login disturbed nothing");

    // Restarted without any token, the agent logs in with its own credential.
    agent.proc.stop();
    agent.start_again();
    ticker(&hub, &t, "ticker", "");
    hub.wait("ticker", "Running");
    assert!(!agent.proc.log_text().contains("refused"), "{}", agent.proc.log_text());
}

#[test]
fn a_client_that_vanishes_before_its_connack_cannot_stop_the_broker() {
    // Found by the fleet simulator: a connection that ended between its
    // CONNECT and its CONNACK left a dead will handler behind, and the
    // next CONNECT with the same client id panicked the broker for good.
    let t = TempDir::new("vanish");
    let (hub, _pi) = hub_and_pi(&t);
    let broker = rogue::Broker::of(&hub);
    let token: edge_api::token::JoinToken = hub.join.trim().parse().unwrap();
    for _ in 0..40 {
        rogue::connect_and_vanish(&broker, "edge-join-ghost", &token.mqtt_user(), &token.secret);
    }
    let r = Rogue::connect(&broker, "edge-join-ghost", &token.mqtt_user(), &token.secret);
    assert!(r.connected(), "{:?}", r.happened.lock().unwrap());
    // The broker, and the fleet with it, carries on.
    ticker(&hub, &t, "after", "");
    hub.wait("after", "Running");
    let log = hub.proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_rogue_node_is_fenced_to_its_own_topics_and_cannot_take_over_sessions() {
    let t = TempDir::new("fence");
    let (hub, mut agent) = hub_and_pi(&t);
    ticker(&hub, &t, "ticker", "[spec.wasm.env]\nDB_PASSWORD = \"hunter2\"\n");
    hub.wait("ticker", "Running");
    let port = &rogue::Broker::of(&hub);
    let evil = rogue::enrol(port, &hub.join, "evil", rogue::facts(), 0).expect("a token holder may enrol");
    let denied_before = hub.metric("edge_hub_mqtt_denied_total");

    // It may read its own desired state...
    let r = evil.connect(port);
    assert!(r.connected());
    r.subscribe(&wire::topic("evil", Channel::Desired));
    wait_for("its own desired state", || r.latest(&wire::topic("evil", Channel::Desired)));
    // ...but asking for everything, or for another node's, ends its session.
    type Attack = Box<dyn Fn(&Rogue)>;
    let attacks: Vec<(&str, Attack)> = vec![
        ("subscribe #", Box::new(|r: &Rogue| r.subscribe("#"))),
        ("subscribe pi-1's desired state", Box::new(|r: &Rogue| r.subscribe("edge/v1/nodes/pi-1/desired"))),
        ("subscribe all desired states", Box::new(|r: &Rogue| r.subscribe("edge/v1/nodes/+/desired"))),
        (
            "publish pi-1's status",
            Box::new(|r: &Rogue| {
                let st = NodeStatus {
                    node: "pi-1".into(),
                    session: 99,
                    seq: 1,
                    observed_generation: 0,
                    instances: vec![],
                    corrupt_files: 0,
                };
                r.publish("edge/v1/nodes/pi-1/status", serde_json::to_vec(&st).unwrap(), true)
            }),
        ),
        (
            "publish pi-1's heartbeat",
            Box::new(|r: &Rogue| {
                let hb = Heartbeat { session: u64::MAX, seq: 1, observed_generation: 0 };
                r.publish("edge/v1/nodes/pi-1/hb", serde_json::to_vec(&hb).unwrap(), false)
            }),
        ),
        (
            "publish pi-1's presence offline",
            Box::new(|r: &Rogue| {
                let p = Presence { online: false, session: u64::MAX, conn: 0 };
                r.publish("edge/v1/nodes/pi-1/presence", serde_json::to_vec(&p).unwrap(), true)
            }),
        ),
        ("forge a desired state", Box::new(|r: &Rogue| r.publish("edge/v1/nodes/evil/desired", b"{}".to_vec(), true))),
        ("retain 4 MiB on a junk topic", Box::new(|r: &Rogue| r.publish("junk/1", vec![b'x'; 4 << 20], true))),
        ("retain a heartbeat", Box::new(|r: &Rogue| r.publish("edge/v1/nodes/evil/hb", b"{}".to_vec(), true))),
    ];
    for (what, attack) in &attacks {
        let r = evil.connect(port);
        assert!(r.connected(), "{what}: the rogue could log in");
        attack(&r);
        r.wait_cut_off(&format!("the broker to cut off the rogue after: {what}"));
        assert!(r.latest("edge/v1/nodes/pi-1/desired").is_none(), "{what}: it read pi-1's desired state");
    }
    wait_for("the hub to count the denials", || {
        (hub.metric("edge_hub_mqtt_denied_total") >= denied_before + attacks.len() as f64).then_some(())
    });

    // Nor can it take over pi-1's session (which would disconnect it), with
    // its own credential or a join token.
    let r = Rogue::connect(port, "edge-agent-pi-1", "evil", &evil.credential);
    assert_eq!(r.refused().as_deref(), Some("NotAuthorized"), "client id bound to the user");
    let j: edge_api::token::JoinToken = hub.join.parse().unwrap();
    let r = Rogue::connect(port, "edge-agent-pi-1", &j.mqtt_user(), &j.secret);
    assert_eq!(r.refused().as_deref(), Some("NotAuthorized"));
    // Nor log in at all without a password, or as the hub.
    let r = Rogue::connect(port, "edge-hub-x", "edge-hub", &evil.credential);
    assert_eq!(r.refused().as_deref(), Some("NotAuthorized"));

    // pi-1 was never disturbed, and its env never left it.
    let w = hub.workload("ticker").unwrap();
    assert_eq!(
        (w["status"]["phase"].as_str(), w["status"]["replicas"][0]["restarts"].as_u64()),
        (Some("Running"), Some(0))
    );
    assert_eq!(hub.node("pi-1").unwrap()["state"], "Ready");
    assert!(!agent.proc.log_text().contains("reconnected"), "pi-1's session was never taken over");

    // And once pi-1 is gone, nothing the rogue can send keeps it Ready.
    agent.proc.kill9();
    let r = evil.connect(port);
    let hb = Heartbeat { session: u64::MAX, seq: 2, observed_generation: 0 };
    r.publish("edge/v1/nodes/pi-1/hb", evil.seal("pi-1", Channel::Heartbeat, &hb), false);
    hub.wait_node_state("pi-1", "Offline");
}

#[test]
fn what_a_node_says_about_itself_cannot_freeze_the_fleet_or_attract_its_work() {
    let t = TempDir::new("beliefs");
    let (hub, _agent) = hub_and_pi(&t);
    hub.ctl(&["label", "node", "pi-1", "admin.edge/site=plant-1"]);
    let port = &rogue::Broker::of(&hub);

    // Implausible capacity is refused outright.
    let mut huge = rogue::facts();
    huge.memory = edge_api::quantity::Memory(16_000_000 << 40);
    huge.allocatable_memory = huge.memory;
    let e = rogue::enrol(port, &hub.join, "huge", huge, 0).map(|_| ()).unwrap_err();
    assert!(e.contains("implausible memory"), "{e}");
    assert!(hub.node("huge").is_none());

    // A rogue that claims the generation counter's end, plant-1's labels and
    // more memory than pi-1 enrols (it holds a token) but wins nothing.
    let mut claims = rogue::facts();
    claims.memory = edge_api::quantity::Memory(1 << 40);
    claims.allocatable_memory = claims.memory;
    claims.labels.insert("admin.edge/site".into(), "plant-1".into());
    claims.labels.insert("site".into(), "plant-1".into());
    let evil = rogue::enrol(port, &hub.join, "evil", claims, u64::MAX - 1).unwrap();
    let _session = evil.connect(port);
    let n = hub.node("evil").unwrap();
    assert!(n["facts"]["labels"].get("admin.edge/site").is_none(), "{n}");
    let warnings = n["warnings"].to_string();
    assert!(
        warnings.contains("admin.edge/site ignored") && warnings.contains("above any this hub issued"),
        "{warnings}"
    );
    assert!(hub.ctl(&["describe", "node", "evil"]).contains("above any this hub issued"));

    // Work pinned to plant-1 by an admin label goes to pi-1, and every apply
    // and delete still reaches pi-1 (the counter did not follow the rogue).
    ticker(&hub, &t, "pinned", "[spec.placement.node_selector]\n\"admin.edge/site\" = \"plant-1\"\n");
    hub.wait("pinned", "Running");
    assert_eq!(hub.workload("pinned").unwrap()["status"]["replicas"][0]["node"], "pi-1");
    hub.ctl(&["delete", "workload", "pinned"]);
    hub.wait("pinned", "Deleted");
    let issued = hub.node("pi-1").unwrap()["desired_generation"].as_u64().unwrap();
    assert!(issued < u64::MAX / 2, "generations follow the hub, not the rogue: {issued}");
    wait_for("pi-1 to observe the latest generation", || {
        (hub.node("pi-1")?["observed_generation"].as_u64() == Some(issued)).then_some(())
    });
}

#[test]
fn deleting_a_node_revokes_its_credential_at_once() {
    let t = TempDir::new("revoke");
    let hub = Hub::start(t.path(), HubOpts::default());
    let port = &rogue::Broker::of(&hub);
    let evil = rogue::enrol(port, &hub.join, "stolen", rogue::facts(), 0).unwrap();
    let r = evil.connect(port);
    assert!(r.connected());
    hub.ctl(&["delete", "node", "stolen"]);
    r.wait_cut_off("the deleted node's session to be cut");
    assert!(matches!(r.happened.lock().unwrap().last(), Some(Happened::Ended(_))));
    let again = evil.connect(port);
    assert_eq!(again.refused().as_deref(), Some("NotAuthorized"));

    // Revoking the bootstrap token ends enrolment with it, also mid-session.
    let token = hub.token(&[]);
    let j: edge_api::token::JoinToken = token.parse().unwrap();
    let waiting = Rogue::connect(port, "edge-join-later", &j.mqtt_user(), &j.secret);
    assert!(waiting.connected());
    hub.ctl(&["token", "revoke", &j.id]);
    waiting.wait_cut_off("the revoked token's session to be cut");
    let e = rogue::enrol(port, &token, "later", rogue::facts(), 0).map(|_| ()).unwrap_err();
    assert!(e.contains("refused"), "{e}");
}

#[test]
fn tokens_expire_and_roles_limit_what_api_tokens_may_do() {
    let t = TempDir::new("roles");
    let hub = Hub::start(t.path(), HubOpts::default());
    let short = hub.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1200));
    let e = rogue::enrol(&rogue::Broker::of(&hub), &short, "late", rogue::facts(), 0).map(|_| ()).unwrap_err();
    assert!(e.contains("refused"), "{e}");

    let viewer = hub.token(&["--role", "viewer"]);
    let operator = hub.token(&["--role", "operator"]);
    assert!(viewer.starts_with("EA1.") && operator.starts_with("EA1."));
    let m = manifest(t.path(), "h.toml", &hello_manifest("hello", &[], "never"));
    let out = hub.edgectl_as(&viewer, &["apply", "-f", m.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the operator role"), "{out:?}");
    assert!(hub.edgectl_as(&viewer, &["get", "workloads"]).status.success());
    assert!(hub.edgectl_as(&operator, &["apply", "-f", m.to_str().unwrap()]).status.success());
    let out = hub.edgectl_as(&operator, &["token", "create"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the admin role"), "{out:?}");
    let out = hub.edgectl_as(&operator, &["delete", "node", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the admin role"), "{out:?}");

    // Every change is in the audit log: who, what, from where, how it ended.
    let audit = hub.json(&["get", "events", "--audit"]);
    let entries = audit.as_array().unwrap();
    let operator_id = operator.split('.').nth(1).unwrap();
    let viewer_id = viewer.split('.').nth(1).unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["who"] == operator_id && e["action"] == "PUT /v1/workloads/hello" && e["status"] == 201)
    );
    assert!(entries.iter().any(|e| e["who"] == viewer_id && e["status"] == 403));
    assert!(entries.iter().all(|e| e["from"] == "127.0.0.1"), "{audit}");
    // It survives a restart of the hub; revoked tokens stay revoked.
    hub.ctl(&["token", "revoke", viewer_id]);
    let mut hub = hub;
    hub.restart(false);
    assert!(hub.json(&["get", "events", "--audit"]).as_array().unwrap().len() >= entries.len());
    assert!(!hub.edgectl_as(&viewer, &["get", "workloads"]).status.success());
}

#[test]
fn enrolment_can_wait_for_approval() {
    let t = TempDir::new("approve");
    let hub = Hub::start(t.path(), HubOpts::default());
    let token = hub.token(&["--require-approval", "--labels", "admin.edge/site=lab"]);
    let _agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &token, &[]);
    hub.wait_node_state("pi-1", "Pending");
    ticker(&hub, &t, "ticker", "");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hub.workload("ticker").unwrap()["status"]["reason"], "Unschedulable", "no work before approval");
    let out = hub.ctl(&["approve", "node", "pi-1", "--memory", "256Mi"]);
    assert!(out.contains("approved"), "{out}");
    hub.wait("ticker", "Running");
    let n = hub.node("pi-1").unwrap();
    assert_eq!(n["admin_labels"]["admin.edge/site"], "lab");
    assert_eq!(n["capacity"]["memory"], "256Mi");
    assert_eq!(n["facts"]["allocatable_memory"], "256Mi");
}

#[test]
fn an_artifact_fetch_signature_is_accepted_once() {
    let t = TempDir::new("fetchsig");
    let hub = Hub::start(t.path(), HubOpts::default());
    let evil = rogue::enrol(&rogue::Broker::of(&hub), &hub.join, "evil", rogue::facts(), 0).unwrap();
    let m = manifest(t.path(), "h.toml", &hello_manifest("hello", &[], "never"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    let digest = hub.workload("hello").unwrap()["spec"]["wasm"]["component"].as_str().unwrap().to_string();
    let path = format!("/v1/artifacts/{digest}");
    let now = edge_api::time::now_ms();
    let nonce = "00112233445566778899aabbccddeeff";
    let sig = edge_api::hex::encode(&evil.key.sign(&wire::artifact_fetch_message("evil", &path, now, nonce)));
    let auth = format!("Authorization: EdgeNode evil {now}.{nonce} {sig}");
    let fetch = || {
        let out = hub
            .curl()
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-H", &auth, &format!("{}{path}", hub.api_url)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(fetch(), "200");
    assert_eq!(fetch(), "401", "a replayed signature is refused");
}

#[test]
fn terminal_escapes_a_node_reports_are_printed_harmlessly() {
    let t = TempDir::new("escapes");
    let hub = Hub::start(t.path(), HubOpts::default());
    let mut f = rogue::facts();
    f.kernel = "6.1\u{1b}]0;pwned\u{7}\u{1b}[2J".into();
    f.os_release = "Debian\r\u{9b}31m".into();
    let _evil = rogue::enrol(&rogue::Broker::of(&hub), &hub.join, "evil", f, 0).unwrap();
    for args in
        [vec!["get", "nodes", "-o", "wide"], vec!["describe", "node", "evil"], vec!["get", "nodes", "-o", "yaml"]]
    {
        let out = hub.ctl(&args);
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{args:?}: {out:?}");
        assert!(out.contains("pwned"), "the text is shown, escaped: {out}");
    }
}
