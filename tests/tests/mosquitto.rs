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

/// The `<!-- tested: NAME -->` shell block of deploy/mosquitto/README.md.
fn readme_block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- tested: {name} -->\n```sh\n");
    let start = readme.find(&marker).unwrap_or_else(|| panic!("README has no block {name:?}")) + marker.len();
    let len = readme[start..].find("```").expect("the block ends");
    readme[start..start + len].to_string()
}

/// deploy/mosquitto as its README says, step by step, on a Debian layout
/// relocated under the test's directory: the README's commands run verbatim
/// but for that prefix, the port and the broker's name; `systemctl restart
/// mosquitto` is Mosquitto started as root (it drops to the mosquitto user,
/// so the files' owners and modes are tested as they are on a real host).
/// The hub then keeps the logins: per node, per token, removed on delete and
/// on revoke, and stale ones swept when it connects.
#[test]
fn the_dynsec_kit_works_as_its_readme_says_and_the_hub_keeps_every_login() {
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "this test needs root (chown to the mosquitto user); CI runs as root");
    let t = TempDir::new("dynsec-kit");
    let root = t.path().join("root");
    let port = free_port();
    let reloc = |s: &str| {
        let mut s = s.to_string();
        for p in ["/etc/mosquitto", "/var/lib/mosquitto", "/var/log/mosquitto", "/run/mosquitto"] {
            s = s.replace(p, &format!("{}{p}", root.display()));
        }
        s.replace("8883", &port.to_string()).replace("broker.example.com", "localhost")
    };
    // What the Debian package lays out: its mosquitto.conf and the broker's own directories.
    let debian = std::fs::read_to_string("/etc/mosquitto/mosquitto.conf").expect("the mosquitto package");
    std::fs::create_dir_all(root.join("etc/mosquitto/conf.d")).unwrap();
    std::fs::write(root.join("etc/mosquitto/mosquitto.conf"), reloc(&debian)).unwrap();
    for d in ["var/lib/mosquitto", "var/log/mosquitto", "run/mosquitto"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        assert!(Command::new("chown").arg("mosquitto:").arg(root.join(d)).status().unwrap().success());
    }
    // A checkout whose edge.conf names the relocated paths and the port.
    let checkout = t.path().join("checkout");
    std::fs::create_dir_all(checkout.join("deploy/mosquitto")).unwrap();
    for f in ["edge.conf", "make-certs.sh"] {
        let text = std::fs::read_to_string(repo().join("deploy/mosquitto").join(f)).unwrap();
        let to = checkout.join("deploy/mosquitto").join(f);
        std::fs::write(&to, if f == "edge.conf" { reloc(&text) } else { text }).unwrap();
        assert!(Command::new("chmod").arg("0755").arg(&to).status().unwrap().success());
    }
    let readme = std::fs::read_to_string(repo().join("deploy/mosquitto/README.md")).unwrap();
    let sh = |script: &str| {
        let out =
            Command::new("bash").args(["-euo", "pipefail", "-c", script]).current_dir(&checkout).output().unwrap();
        assert!(
            out.status.success(),
            "{script}\nfailed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let password = sh(&format!("{}\necho \"$HUB_PASSWORD\"", reloc(&readme_block(&readme, "setup"))));
    let password = password.lines().last().unwrap().to_string();
    assert_eq!(readme_block(&readme, "start").trim(), "systemctl restart mosquitto");
    let mosq = Proc::spawn(
        "mosquitto",
        Command::new("/usr/sbin/mosquitto").arg("-c").arg(root.join("etc/mosquitto/mosquitto.conf")),
        t.path().join("mosquitto.out"),
    );
    let log = root.join("var/log/mosquitto/mosquitto.log");
    wait_for("mosquitto to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
    sh(&format!("HUB_PASSWORD={password}\n{}", reloc(&readme_block(&readme, "grant"))));

    let ca = root.join("etc/mosquitto/edge/ca.crt");
    let ca_arg = ca.display().to_string();
    let mut hub = Hub::start(
        t.path(),
        HubOpts {
            broker: Some(format!("mqtts://edge-hub:{password}@127.0.0.1:{port}")),
            extra: vec!["--broker-ca".into(), ca_arg.clone(), "--broker-admin".into(), "dynsec".into()],
            ..Default::default()
        },
    );
    let url = format!("mqtts://127.0.0.1:{port}");
    let _pi1 = Agent::start(t.path(), "pi-1", &url, &hub.join, &["--broker-ca", &ca_arg]);
    let n = wait_for("pi-1 to be Ready", || hub.node("pi-1").filter(|n| n["state"] == "Ready"));
    assert_eq!(n["facts"]["arch"], "amd64", "{n}; broker log: {}", std::fs::read_to_string(&log).unwrap_or_default());

    // A workload with a secret runs; the broker carries its desired state
    // but cannot read the secret in it.
    hub.ctl(&["create", "secret", "db", "--from-literal", "password=only-for-pi-1"]);
    let m = hello_manifest("hello", &[], "never")
        .replace("[spec.resources]", "env = { GREETING = { secret = \"db\", key = \"password\" } }\n[spec.resources]");
    hub.ctl(&["apply", "-f", manifest(t.path(), "hello.toml", &m).to_str().unwrap()]);
    hub.wait("hello", "Succeeded");
    assert!(hub.ctl(&["logs", "hello"]).contains("only-for-pi-1 from WebAssembly"));
    let desired = sub_once(port, &ca, "edge-hub", &password, "edge/v1/nodes/pi-1/desired").expect("pi-1's desired");
    assert!(desired.contains("hello") && !desired.contains("only-for-pi-1"), "{desired}");

    // A rogue enrolled with a token of its own is fenced to its own topics.
    let broker = rogue::Broker::tls(port, &ca);
    let token = hub.token(&[]);
    let rogue_node = rogue::enrol(&broker, &token, "rogue", rogue::facts(), 0).expect("the rogue enrols");
    let r = rogue_node.connect(&broker);
    assert!(r.connected(), "{:?}", r.happened.lock().unwrap());
    for f in ["edge/v1/nodes/pi-1/desired", "#", "edge/v1/nodes/+/status", "edge/v1/nodes/rogue/desired"] {
        r.subscribe(f);
    }
    r.publish("edge/v1/nodes/pi-1/presence", b"forged".to_vec(), true);
    r.publish("junk/retained", b"junk".to_vec(), true);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let topics: Vec<String> = r.seen.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
    assert!(topics.iter().all(|t| t == "edge/v1/nodes/rogue/desired"), "the rogue read {topics:?}");
    assert!(sub_once(port, &ca, "edge-hub", &password, "junk/retained").is_none(), "a junk retained message stuck");
    assert_eq!(hub.node("pi-1").unwrap()["state"], "Ready");
    // A device cannot enrol under the hub's broker login, or a bootstrap login's name.
    for name in ["edge-hub", "join-abcdef12"] {
        let e = rogue::enrol(&broker, &token, name, rogue::facts(), 0).map(|_| ()).unwrap_err();
        assert!(e.contains("reserved"), "{name}: {e}");
    }
    assert!(
        sub_once(port, &ca, "edge-hub", &password, "edge/v1/nodes/pi-1/desired").is_some(),
        "the hub's login stands"
    );
    // Its login is bound to its client id: it cannot take pi-1's session.
    let taker = rogue::Rogue::connect(&broker, "edge-agent-pi-1", "rogue", &rogue_node.credential);
    assert!(taker.refused().is_some(), "{:?}", taker.happened.lock().unwrap());

    // Deleted, it is cut off and cannot log in again.
    hub.ctl(&["delete", "node", "rogue"]);
    r.wait_cut_off("the deleted node to be cut off");
    let again = rogue_node.connect(&broker);
    assert!(again.refused().is_some(), "{:?}", again.happened.lock().unwrap());
    // A revoked token no longer opens the broker.
    let id = token.split('.').nth(2).unwrap().to_string();
    hub.ctl(&["token", "revoke", &id]);
    let e = wait_for("the revoked token's login to go", || {
        rogue::enrol(&broker, &token, "late", rogue::facts(), 0).err().filter(|e| e.contains("login refused"))
    });
    assert!(e.contains("refused"), "{e}");

    // A login the hub no longer knows (made while it was away) is swept
    // when it connects; the operator's own logins are left alone.
    hub.kill(false);
    let ctl = |args: &[&str]| {
        let out = Command::new("mosquitto_ctrl")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile", &ca_arg, "-u", "edge-hub", "-P", &password])
            .arg("dynsec")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    ctl(&["createClient", "ghost", "-p", "ghost-password"]);
    ctl(&["createClient", "mine", "-p", "mine-password"]);
    // mosquitto_ctrl cannot set a textname: send the hub's own form.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile", &ca_arg, "-u", "edge-hub", "-P", &password])
        .args(["-t", "$CONTROL/dynamic-security/v1", "-m"])
        .arg(r#"{"commands":[{"command":"setClientId","username":"ghost","clientid":"edge-agent-ghost"},{"command":"deleteClient","username":"ghost"},{"command":"createClient","username":"ghost","password":"ghost-password","textname":"edge node ghost"}]}"#)
        .status()
        .unwrap();
    assert!(out.success());
    let ghost = ctl(&["getClient", "ghost"]);
    assert!(ghost.contains("ghost") && !ghost.contains("not found"), "{ghost}");
    hub.start_again();
    wait_for("the hub to sweep the stale login", || ctl(&["getClient", "ghost"]).contains("not found").then_some(()));
    assert!(ctl(&["getClient", "mine"]).contains("mine"), "the operator's login stays");
    let pi1 = ctl(&["getClient", "pi-1"]);
    assert!(pi1.contains("edge-agent-pi-1") && pi1.contains("edge-node-pi-1"), "a node the hub knows stays: {pi1}");
    drop(mosq);
}
