//! What a hostile or broken MQTT client can and cannot do: every malformed,
//! forged, replayed or unknown-version message is refused and changes nothing.
//!
//! The embedded broker would not even deliver these (it fences every client
//! to its own topics; see rogue.rs). This test runs on a broker that lets
//! anyone publish anywhere, to prove that hub and agent refuse forgeries on
//! their own, whatever the broker does.

use std::time::Duration;

use edge_api::keys::SigningKey;
use edge_api::wire::{self, Channel, Kind, NodeDesired, NodeStatus, Presence};
use edge_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Every message a client received: (topic, payload).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A client of a broker without ACLs.
struct Rogue {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    seen: Seen,
}

impl Rogue {
    fn connect(port: u16) -> Rogue {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut opts = MqttOptions::new("rogue", "127.0.0.1", port);
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let seen: Seen = Default::default();
        let s = seen.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        s.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()))
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        rx.recv_timeout(PATIENCE).expect("rogue client connects");
        Rogue { rt, client, seen }
    }

    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let c = self.client.clone();
        let t = topic.to_string();
        self.rt.block_on(async move { c.publish(t, QoS::AtLeastOnce, retain, payload).await.unwrap() });
        // Let the event loop write it out.
        std::thread::sleep(Duration::from_millis(50));
    }

    fn subscribe(&self, topic: &str) {
        let c = self.client.clone();
        let t = topic.to_string();
        self.rt.block_on(async move { c.subscribe(t, QoS::AtLeastOnce).await.unwrap() });
    }

    /// The latest payload seen on `topic` that satisfies `f`.
    fn latest(&self, topic: &str, f: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(20));
        self.seen.lock().unwrap().iter().rev().find(|(t, p)| t == topic && f(p)).map(|(_, p)| p.clone())
    }
}

#[test]
fn malformed_forged_and_replayed_messages_change_nothing() {
    let t = TempDir::new("rogue");
    let port = free_port();
    let _mosq =
        run_mosquitto(t.path(), port, &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false"));
    let url = format!("mqtt://127.0.0.1:{port}");
    let hub = Hub::start(t.path(), HubOpts { broker: Some(url.clone()), ..Default::default() });
    let agent = Agent::start(t.path(), "pi-1", &url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    let m = manifest(t.path(), "t.toml", &hello_manifest("ticker", &["--forever", "--interval-ms", "50"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("ticker", "Running");

    let rogue = Rogue::connect(port);
    let desired = wire::topic("pi-1", Channel::Desired);
    rogue.subscribe(&desired);
    let genuine = wait_for("the retained desired state", || rogue.latest(&desired, |p| !p.is_empty()));
    let genuine_gen = wire::open(&genuine).unwrap().generation;

    let other = SigningKey::generate().unwrap();
    let empty = NodeDesired { node: "pi-1".into(), workloads: vec![] };
    let forged = wire::seal(Kind::Desired, wire::HUB, genuine_gen + 100, &empty, Some(&other)).unwrap();
    let unsigned = wire::seal(Kind::Desired, wire::HUB, genuine_gen + 100, &empty, None).unwrap();
    let newer = br#"{"v":2,"kind":"desired","from":"hub","gen":999,"body":{},"sig":"00"}"#.to_vec();
    let rejected_before = hub.metric("edge_hub_mqtt_messages_rejected_total");

    // At the agent: junk, an unknown version, a forgery, an unsigned copy, an empty payload.
    for (payload, retain) in
        [(b"\xff not json".to_vec(), true), (newer, true), (forged, true), (unsigned, true), (Vec::new(), true)]
    {
        rogue.publish(&desired, payload, retain);
    }
    // At the hub: junk status, a forged status, a forged offline, a bad join, junk heartbeat.
    let status = NodeStatus {
        node: "pi-1".into(),
        session: 999,
        seq: 1,
        observed_generation: 0,
        instances: vec![],
        corrupt_files: 0,
    };
    rogue.publish(&wire::topic("pi-1", Channel::Status), b"{".to_vec(), false);
    rogue.publish(
        &wire::topic("pi-1", Channel::Status),
        wire::seal(Kind::Status, "pi-1", 0, &status, Some(&other)).unwrap(),
        false,
    );
    rogue.publish(
        &wire::topic("pi-1", Channel::Presence),
        wire::seal(Kind::Presence, "pi-1", 0, &Presence { online: false, session: 999, conn: 0 }, Some(&other))
            .unwrap(),
        false,
    );
    rogue.publish(&wire::topic("ghost", Channel::Join), b"[]".to_vec(), false);
    rogue.publish(&wire::topic("pi-1", Channel::Heartbeat), b"null".to_vec(), false);

    // The hub refused every one of those, saying why.
    wait_for("the hub to count the rejections", || {
        (hub.metric("edge_hub_mqtt_messages_rejected_total") >= rejected_before + 5.0).then_some(())
    });
    let hub_log = hub.proc.log_text();
    for why in [
        "status message from \"pi-1\" has an invalid signature",
        "presence message from \"pi-1\" has an invalid signature",
        "not a JSON envelope",
    ] {
        assert!(hub_log.contains(why), "hub log lacks {why:?}");
    }
    // The agent refused its five, saying why, and kept its workload running.
    wait_for("the agent to log its refusals", || {
        let log = agent.proc.log_text();
        let all = [
            "not a JSON envelope",
            "unsupported envelope version 2",
            "has an invalid signature",
            "is not signed",
            "empty desired-state message ignored",
        ];
        all.iter().all(|w| log.contains(w)).then_some(())
    });
    let w = hub.workload("ticker").unwrap();
    assert_eq!(w["status"]["phase"], "Running");
    assert_eq!(w["status"]["replicas"][0]["restarts"], 0, "the workload was never disturbed");
    assert_eq!(hub.node("pi-1").unwrap()["state"], "Ready", "a forged offline did not count");
    assert!(hub.node("ghost").is_none());
    // The hub put its own desired state back on the broker.
    wait_for("the genuine desired state to be restored", || {
        rogue.latest(&desired, |p| p == genuine.as_slice()).filter(|_| {
            rogue.seen.lock().unwrap().iter().rev().find(|(t, _)| *t == desired).is_some_and(|(_, p)| *p == genuine)
        })
    });

    // A replay of a genuine but older document is ignored: apply something new, then replay the old one.
    let m2 = manifest(t.path(), "b.toml", &hello_manifest("second", &["--forever"], "always"));
    hub.ctl(&["apply", "-f", m2.to_str().unwrap()]);
    hub.wait("second", "Running");
    rogue.publish(&desired, genuine.clone(), false);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hub.workload("second").unwrap()["status"]["phase"], "Running", "the old generation did not win");
    assert!(agent.log_text_contains("desired state is not newer"), "{}", agent.proc.log_text());
}

#[test]
fn deleting_a_node_stops_its_work_and_a_returning_agent_converges() {
    let t = TempDir::new("delnode");
    let hub = Hub::start(t.path(), HubOpts::default());
    let mut agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    let m = manifest(t.path(), "t.toml", &hello_manifest("ticker", &["--forever", "--interval-ms", "50"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("ticker", "Running");

    assert_eq!(hub.ctl(&["delete", "node", "pi-1"]).trim(), "node/pi-1 deleted");
    // The agent got a last, empty desired state and stopped the replica.
    wait_for("the agent to drop the replica", || (!agent.dir.join("logs/ticker.0.log").exists()).then_some(()));
    let w = hub.workload("ticker").unwrap();
    assert_eq!(w["status"]["reason"], "Unschedulable");

    // The agent comes back (restart): it joins again and gets the work back.
    agent.proc.stop();
    agent.start_again();
    hub.wait("ticker", "Running");
    assert_eq!(hub.workload("ticker").unwrap()["status"]["replicas"][0]["node"], "pi-1");
}

#[test]
fn logs_follow_streams_new_output_until_stopped() {
    let t = TempDir::new("follow");
    let hub = Hub::start(t.path(), HubOpts::default());
    let _agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    let m = manifest(t.path(), "t.toml", &hello_manifest("ticker", &["--forever", "--interval-ms", "100"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("ticker", "Running");
    let out = t.path().join("follow.out");
    let mut follow = Proc::spawn(
        "edgectl logs -f",
        hub.edgectl_cmd(&hub.token).args(["logs", "ticker", "-f", "--tail", "1"]),
        out.clone(),
    );
    let ticks = |text: &str| text.lines().filter(|l| l.starts_with("tick ")).count();
    wait_for("five new ticks through the follow stream", || (ticks(&follow.log_text()) >= 5).then_some(()));
    let text = follow.log_text();
    let numbers: Vec<u64> = text.lines().filter_map(|l| l.strip_prefix("tick ")?.parse().ok()).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "ticks arrive in order, once each: {numbers:?}");
    follow.stop();
}

trait LogText {
    fn log_text_contains(&self, s: &str) -> bool;
}
impl LogText for Agent {
    fn log_text_contains(&self, s: &str) -> bool {
        self.proc.log_text().contains(s)
    }
}
