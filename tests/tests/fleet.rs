//! Fleet orchestration with the real binaries: per-node workloads, taints,
//! cordons and drains.

use edge_tests::*;

/// `(replica, node)` of each of a workload's replicas, as the hub shows them.
fn replicas(hub: &Hub, name: &str) -> Vec<(u64, String)> {
    let w = hub.workload(name).expect("the workload exists");
    w["status"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["replica"].as_u64().unwrap(), r["node"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn nodes_of(hub: &Hub, name: &str) -> Vec<String> {
    let mut n: Vec<String> = replicas(hub, name).into_iter().map(|(_, n)| n).collect();
    n.sort();
    n
}

/// Waits until the node has applied the desired state the hub holds for it now.
fn wait_applied(hub: &Hub, node: &str) {
    wait_for(&format!("node {node} to apply its desired state"), || {
        let n = hub.node(node)?;
        (n["observed_generation"] == n["desired_generation"]).then_some(())
    });
}

#[test]
fn a_per_node_workload_follows_matching_nodes_and_drain_moves_only_counted_replicas() {
    let t = TempDir::new("fleet");
    let mut hub = Hub::start(t.path(), HubOpts::default());
    let _a = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &["--label", "role=gw"]);
    let _b = Agent::start(t.path(), "pi-2", &hub.mqtt_url, &hub.join, &["--label", "role=gw"]);
    hub.wait_node_state("pi-1", "Ready");
    hub.wait_node_state("pi-2", "Ready");
    let collector = hello_manifest("collector", &["--forever"], "always")
        .replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n")
        + "[spec.placement]\nnode_selector = \"role in (gw, edge)\"\n";
    let m = manifest(t.path(), "collector.toml", &collector);
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("collector", "Ready");
    assert_eq!(nodes_of(&hub, "collector"), ["pi-1", "pi-2"]);

    // A node that joins later and matches gets one.
    let _c = Agent::start(t.path(), "pi-3", &hub.mqtt_url, &hub.join, &["--label", "role=edge"]);
    hub.wait_node_state("pi-3", "Ready");
    wait_for("pi-3 to get the collector", || (nodes_of(&hub, "collector").len() == 3).then_some(()));
    hub.wait("collector", "Ready");
    let listed = hub.ctl(&["get", "workloads"]);
    assert!(listed.lines().any(|l| l.starts_with("collector") && l.contains(" 3/3 ")), "{listed}");

    // One that stops matching (the admin's label wins over the node's own) loses it.
    hub.ctl(&["label", "node", "pi-3", "role=db"]);
    assert_eq!(nodes_of(&hub, "collector"), ["pi-1", "pi-2"]);
    wait_applied(&hub, "pi-3");
    let pi3 = hub.node("pi-3").unwrap();
    assert_eq!(pi3["workloads"], serde_json::json!([]), "{pi3}");

    // A counted workload, then drain the node it runs on.
    let web = hello_manifest("web", &["--forever"], "always");
    let m = manifest(t.path(), "web.toml", &web);
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("web", "Ready");
    let from = replicas(&hub, "web")[0].1.clone();
    let out = hub.ctl(&["drain", &from]);
    assert!(
        out.contains("workload/web replica 0 moved to node ") && out.contains(&format!("node/{from} drained")),
        "{out}"
    );
    let to = replicas(&hub, "web")[0].1.clone();
    assert_ne!(to, from);
    hub.wait("web", "Ready");
    if from != "pi-3" {
        assert!(nodes_of(&hub, "collector").contains(&from), "the per-node workload stays on a drained node");
    }
    let nodes = hub.ctl(&["get", "nodes"]);
    assert!(nodes.lines().any(|l| l.starts_with(&from) && l.contains("Ready,SchedulingDisabled")), "{nodes}");
    hub.ctl(&["uncordon", &from]);
    assert_eq!(hub.node(&from).unwrap()["unschedulable"], serde_json::Value::Null);

    // A NoExecute taint moves the collector off pi-2; a toleration brings it back.
    let out = hub.ctl(&["taint", "node", "pi-2", "maintenance=now:NoExecute"]);
    assert!(out.contains("maintenance=now:NoExecute"), "{out}");
    assert!(!nodes_of(&hub, "collector").contains(&"pi-2".to_string()));
    let tolerant = collector.clone() + "tolerations = [{ key = \"maintenance\", operator = \"Exists\" }]\n";
    let m = manifest(t.path(), "collector.toml", &tolerant);
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    assert!(nodes_of(&hub, "collector").contains(&"pi-2".to_string()));
    hub.wait("collector", "Ready");

    // Bad input is named and changes nothing.
    let before = hub.node("pi-2").unwrap()["taints"].clone();
    let out = hub.edgectl(&["taint", "node", "pi-2", "a=b:Sometimes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown effect \"Sometimes\""), "{err}");
    assert_eq!(hub.node("pi-2").unwrap()["taints"], before);
    let bad = collector.replace("role in (gw, edge)", "role in gw");
    let m = manifest(t.path(), "bad.toml", &bad);
    let out = hub.edgectl(&["apply", "-f", m.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec.placement.node_selector"), "{err}");

    // Events are kept across a hub restart, and can be followed.
    hub.restart(false);
    hub.wait_node_state("pi-2", "Ready");
    let events = hub.ctl(&["get", "events", "--for", "workload/web"]);
    assert!(events.contains("Evicted") && events.contains("drained"), "{events}");
    assert!(!events.contains("collector"), "only the workload asked for: {events}");
    let described = hub.ctl(&["describe", "node", &from]);
    assert!(described.contains("Drained") && described.contains("Uncordoned"), "{described}");
    let mut watch = hub
        .edgectl_cmd(&hub.token)
        .args(["get", "events", "-w", "--for", "node/pi-2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("edgectl get events -w");
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // What happened before is listed first; then what happens now.
    let seen = |what: &str| {
        let deadline = std::time::Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(what) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    };
    assert!(seen("Tainted"), "the earlier taint is listed");
    hub.ctl(&["cordon", "pi-2"]);
    let cordoned = seen("Cordoned");
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(cordoned, "a new event reaches a watcher");
}
