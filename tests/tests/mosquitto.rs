//! The same flow against a real external broker (Mosquitto), with password
//! authentication: hub and agents need nothing from the embedded broker.

use std::path::Path;
use std::process::Command;

use edge_tests::*;

#[test]
fn hub_and_agents_work_through_mosquitto() {
    let t = TempDir::new("mosquitto");
    let port = free_port();
    let hub_pass = "hub-password-for-the-test";
    let mut hub = Hub::start(
        t.path(),
        HubOpts { broker: Some(format!("mqtt://edge-hub:{hub_pass}@127.0.0.1:{port}")), ..Default::default() },
    );
    // No broker yet: the hub serves its API (live) but is not ready.
    assert_eq!(hub.api_get("/healthz").0, 200);
    let (code, body) = hub.api_get("/readyz");
    assert!(code == 503 && body.contains("not connected to the MQTT broker"), "{code} {body}");
    // A broker whose logins the operator manages: each device gets its own
    // user in the password file and in its --broker URL; the join token still
    // enrols it with the hub.
    let _mosq = mosquitto(t.path(), port, &[("edge-hub", hub_pass), ("pi-1", "pi-1-password")]);
    wait_for("the hub to be ready", || (hub.api_get("/readyz").0 == 200).then_some(()));
    let url = format!("mqtt://pi-1:pi-1-password@127.0.0.1:{port}");
    let mut agent = Agent::start(t.path(), "pi-1", &url, &hub.join, &["--label", "broker=mosquitto"]);
    hub.wait_node_state("pi-1", "Ready");

    let hello =
        manifest(t.path(), "hello.toml", &hello_manifest("hello", &["--ticks", "2", "--interval-ms", "10"], "never"));
    let ticker =
        manifest(t.path(), "ticker.toml", &hello_manifest("ticker", &["--forever", "--interval-ms", "50"], "always"));
    hub.ctl(&["apply", "-f", hello.to_str().unwrap(), "-f", ticker.to_str().unwrap()]);
    hub.wait("hello", "Succeeded");
    let logs = hub.ctl(&["logs", "hello"]);
    assert!(logs.contains("running on pi-1") && logs.contains("tick 2"), "{logs}");
    hub.wait("ticker", "Running");

    // Mosquitto refuses a wrong password outright; the agent says so and stops.
    let wrong = format!("mqtt://pi-2:wrong@127.0.0.1:{port}");
    let mut bad = Agent::start(t.path(), "pi-2", &wrong, &hub.join, &[]);
    let status = wait_for("the refused agent to exit", || bad.proc.exited());
    assert!(!status.success());
    assert!(bad.proc.log_text().contains("refused the user name and password"), "{}", bad.proc.log_text());

    // An external broker outlives the hub: the hub restarts and finds the
    // nodes' retained status at once; the agents never noticed.
    hub.restart(true);
    hub.wait_node_state("pi-1", "Ready");
    let w = hub.workload("ticker").unwrap();
    assert_eq!(
        (w["status"]["phase"].as_str(), w["status"]["replicas"][0]["restarts"].as_u64()),
        (Some("Running"), Some(0))
    );

    // The agent restarts (kill -9) while the hub is down: the broker still
    // holds its desired state, and its own disk does too.
    hub.kill(true);
    agent.proc.kill9();
    let before = agent.log_file("ticker", 0).lines().count();
    agent.start_again();
    wait_for("the ticker to run again", || (agent.log_file("ticker", 0).lines().count() > before + 3).then_some(()));
    hub.start_again();
    let w = wait_for("the hub to see the restarted replica", || {
        hub.workload("ticker")
            .filter(|w| w["status"]["replicas"][0]["restarts"] == 1 && w["status"]["phase"] == "Running")
    });
    assert_eq!(w["status"]["replicas"][0]["node"], "pi-1");
}

/// What `mosquitto_sub` receives in 2 s on `topic` as `user` (retained
/// messages only, in practice): `None` when nothing came.
fn sub_once(port: u16, ca: &Path, user: &str, pass: &str, topic: &str) -> Option<String> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
        .arg(ca)
        .args(["-u", user, "-P", pass, "-t", topic, "-C", "1", "-W", "2"])
        .output()
        .expect("mosquitto_sub (apt-get install mosquitto-clients; the test command installs it)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The Mosquitto configuration shipped in deploy/mosquitto (TLS, a password
/// per node, per-node ACLs), run as shipped but for its paths and port.
#[test]
fn the_shipped_tls_broker_config_works_and_fences_each_node_to_its_topics() {
    let t = TempDir::new("mosquitto-tls");
    let broker = TlsBroker::prepare(t.path());
    let (port, ca) = (broker.port, broker.ca.clone());
    let hub_pass = "hub-password-for-the-test";
    let ca_arg = ca.display().to_string();
    let hub = Hub::start(
        t.path(),
        HubOpts {
            broker: Some(format!("mqtts://edge-hub:{hub_pass}@127.0.0.1:{port}")),
            extra: vec!["--broker-ca".into(), ca_arg.clone()],
            ..Default::default()
        },
    );
    assert_eq!(hub.mqtt_url, format!("mqtts://127.0.0.1:{port}"), "the hub tells agents to use TLS");
    let (p1, p2) = ("pi-1-password", "pi-2-password");
    let _mosq = broker.start(&[("edge-hub", hub_pass), ("pi-1", p1), ("pi-2", p2)]);

    let url = format!("mqtts://127.0.0.1:{port}");
    let url1 = format!("mqtts://pi-1:{p1}@127.0.0.1:{port}");
    let url2 = format!("mqtts://pi-2:{p2}@127.0.0.1:{port}");
    let _a = Agent::start(t.path(), "pi-1", &url1, &hub.join, &["--broker-ca", &ca_arg, "--label", "n=1"]);
    let _b = Agent::start(t.path(), "pi-2", &url2, &hub.join, &["--broker-ca", &ca_arg, "--label", "n=2"]);
    hub.wait_node_state("pi-1", "Ready");
    hub.wait_node_state("pi-2", "Ready");
    let m = hello_manifest("hello", &["--ticks", "2", "--interval-ms", "10"], "never")
        + "\n[spec.placement]\nnode_selector = { n = \"1\" }\n";
    let file = manifest(t.path(), "hello.toml", &m);
    hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
    hub.wait("hello", "Succeeded");
    // Logs travel hub -> agent (req) -> hub (resp): both directions pass the ACLs.
    let logs = hub.ctl(&["logs", "hello"]);
    assert!(logs.contains("running on pi-1") && logs.contains("tick 2"), "{logs}");

    // Each node reads its own desired state and no other node's.
    let pi1_desired = "edge/v1/nodes/pi-1/desired";
    let own = sub_once(port, &ca, "pi-1", p1, pi1_desired).expect("pi-1 reads its desired state");
    assert!(own.contains("hello"), "{own}");
    assert_eq!(sub_once(port, &ca, "pi-2", p2, pi1_desired), None, "pi-2 read pi-1's desired state");
    assert!(sub_once(port, &ca, "pi-2", p2, "edge/v1/nodes/pi-2/desired").is_some());

    // A node cannot speak for another: its retained presence for pi-1 is dropped.
    let presence = "edge/v1/nodes/pi-1/presence";
    let before = sub_once(port, &ca, "edge-hub", hub_pass, presence).expect("pi-1's presence");
    let forged = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
        .arg(&ca)
        .args(["-u", "pi-2", "-P", p2, "-t", presence, "-r", "-q", "1", "-m", "forged"])
        .status()
        .unwrap();
    assert!(forged.success());
    assert_eq!(sub_once(port, &ca, "edge-hub", hub_pass, presence).as_deref(), Some(before.as_str()));
    assert_eq!(hub.node("pi-1").unwrap()["state"], "Ready");

    // An agent that does not trust the broker's certificate says why.
    let mut untrusting = Agent::start(t.path(), "pi-3", &url, &hub.join, &[]);
    wait_for("the agent to report the certificate", || {
        untrusting.proc.log_text().contains("certificate").then_some(())
    });
    assert!(untrusting.proc.exited().is_none(), "a TLS failure may be passing: the agent keeps retrying");
    // A CA file that is not one is refused at start, naming the file.
    let bogus = t.path().join("not-a-ca.pem");
    std::fs::write(&bogus, "hello").unwrap();
    let mut bad = Agent::start(t.path(), "pi-4", &url, &hub.join, &["--broker-ca", bogus.to_str().unwrap()]);
    let status = wait_for("the agent with a bad CA file to exit", || bad.proc.exited());
    assert!(!status.success());
    let log = bad.proc.log_text();
    assert!(log.contains("not-a-ca.pem") && log.contains("no certificate"), "{log}");
}
