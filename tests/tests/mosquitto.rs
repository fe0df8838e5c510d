//! The same flow against a real external broker (Mosquitto), with password
//! authentication: hub and agents need nothing from the embedded broker.

use std::path::Path;
use std::process::Command;

use edge_tests::*;

fn mosquitto(dir: &Path, port: u16, users: &[(&str, &str)]) -> Proc {
    let mosq = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is not installed: apt-get install mosquitto (the test command installs it)");
    let passwd = dir.join("mosquitto.passwd");
    for (i, (user, pass)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let ok = cmd.arg("-b").arg(&passwd).args([user, pass]).status().expect("mosquitto_passwd").success();
        assert!(ok, "mosquitto_passwd failed");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nlog_dest stderr\n{}",
            passwd.display(),
            if root { "user root\n" } else { "" }
        ),
    )
    .unwrap();
    let p = Proc::spawn("mosquitto", Command::new(mosq).arg("-c").arg(&conf), dir.join("mosquitto.log"));
    wait_for("mosquitto to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
    p
}

#[test]
fn hub_and_agents_work_through_mosquitto() {
    let t = TempDir::new("mosquitto");
    let port = free_port();
    let hub_pass = "hub-password-for-the-test";
    let mut hub = Hub::start(
        t.path(),
        HubOpts { broker: Some(format!("mqtt://edge-hub:{hub_pass}@127.0.0.1:{port}")), ..Default::default() },
    );
    // Agents log in with their node name and the join token, as on the embedded broker.
    let _mosq = mosquitto(t.path(), port, &[("edge-hub", hub_pass), ("pi-1", &hub.join)]);
    let url = format!("mqtt://127.0.0.1:{port}");
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
    let fingerprint = hub.join.split('.').nth(1).unwrap();
    let wrong = format!("EJ1.{fingerprint}.{}", "0".repeat(32));
    let mut bad = Agent::start(t.path(), "pi-2", &url, &wrong, &[]);
    let status = wait_for("the refused agent to exit", || bad.proc.exited());
    assert!(!status.success());
    assert!(bad.proc.log_text().contains("refused this agent's credentials"), "{}", bad.proc.log_text());

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
