//! Fleet orchestration with the real binaries: per-node workloads, taints,
//! cordons and drains.

use std::time::Duration;

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

/// `rollout status` to its end: (exit status, stdout, stderr).
fn rollout_status(hub: &Hub, name: &str) -> (bool, String, String) {
    let out = hub.edgectl(&["rollout", "status", name, "--timeout", "120s"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The revisions the hub gave the workload's replicas, in replica order.
fn revisions(hub: &Hub, name: &str) -> Vec<u64> {
    let w = hub.workload(name).unwrap();
    w["status"]["replicas"].as_array().unwrap().iter().map(|r| r["revision"].as_u64().unwrap()).collect()
}

#[test]
fn a_per_node_service_rolls_out_in_waves_and_a_failing_canary_rolls_back_alone() {
    let t = TempDir::new("waves");
    let hub = Hub::start(t.path(), HubOpts::default());
    std::fs::copy(repo().join("examples/hello-http.wasm"), t.path().join("hello-http.wasm")).unwrap();
    let _agents: Vec<Agent> =
        (1..=4).map(|i| Agent::start(t.path(), &format!("gw-{i}"), &hub.mqtt_url, &hub.join, &[])).collect();
    for i in 1..=4 {
        hub.wait_node_state(&format!("gw-{i}"), "Ready");
    }
    let policy = "canary = 1\nbatch = \"50%\"\nmin_ready = \"1s\"\nprogress_deadline = \"8s\"\nauto_rollback = true\n";
    let apply = |v: &str, ready: &str| {
        let m = manifest(t.path(), "gw.toml", &per_node_service(v, ready, policy));
        hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    };
    apply("v1", "/");
    let (ok, out, err) = rollout_status(&hub, "gw");
    assert!(ok && out.contains("revision 1 rolled out"), "{out}{err}");

    // v2 is good: a canary, then two waves of half.
    apply("v2", "/");
    let (ok, out, err) = rollout_status(&hub, "gw");
    assert!(ok && out.contains("revision 2 rolled out"), "{out}{err}");
    assert_eq!(revisions(&hub, "gw"), [2, 2, 2, 2]);
    let events = hub.ctl(&["get", "events", "--for", "workload/gw"]);
    let waves: Vec<&str> = events.lines().filter(|l| l.contains("WaveStarted")).collect();
    assert_eq!(waves.len(), 3, "{events}");
    assert!(waves[0].contains("wave 1 of revision 2: gw-1") && waves[1].contains("gw-2, gw-3"), "{events}");

    // v3 never gets ready: the canary fails it, alone, and the fleet goes back to v2.
    apply("v3", "/trap");
    let (ok, out, err) = rollout_status(&hub, "gw");
    assert!(!ok, "rollout status exits non-zero on a rollback: {out}");
    assert!(err.contains("rolled back"), "{err}");
    assert!(out.contains("revision 3 failed: wave 1 was not ready within 8s (replica 0 on gw-1"), "{out}");
    let w = hub.workload("gw").unwrap();
    assert_eq!(w["metadata"]["generation"], 4, "the rollback is a revision of its own");
    assert!(revisions(&hub, "gw").iter().all(|r| *r == 2), "{:?}", revisions(&hub, "gw"));
    let events = hub.ctl(&["get", "events", "--for", "workload/gw"]);
    assert_eq!(events.lines().filter(|l| l.contains("WaveStarted") && l.contains("revision 3")).count(), 1, "{events}");
    assert!(events.contains("RolledBack"), "{events}");
    let history = hub.ctl(&["rollout", "history", "gw"]);
    assert!(history.lines().last().unwrap().contains("rolled back to revision 2 automatically"), "{history}");
    hub.wait("gw", "Ready");

    // Paused, no new wave starts; resumed, it completes.
    apply("v5", "/");
    hub.ctl(&["rollout", "pause", "gw"]);
    let paused = wait_for("the canary to be ready", || {
        let v = hub.json(&["get", "workload", "gw"]);
        (v["status"]["ready"] == 1).then_some(v)
    });
    assert_eq!(paused["status"]["replicas"].as_array().unwrap().len(), 4);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(revisions(&hub, "gw").iter().filter(|r| **r == 5).count(), 1, "no wave after the canary while paused");
    let (ok, out, _) = {
        let o = hub.edgectl(&["rollout", "status", "gw", "--watch=false"]);
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), ())
    };
    assert!(ok && out.contains("paused"), "{out}");
    hub.ctl(&["rollout", "resume", "gw"]);
    let (ok, out, err) = rollout_status(&hub, "gw");
    assert!(ok && out.contains("revision 5 rolled out"), "{out}{err}");
}

/// Bytes in a replica's log on its agent's disk.
fn log_len(agent: &Agent, workload: &str, replica: u32) -> usize {
    agent.log_file(workload, replica).len()
}

#[test]
fn a_singleton_cut_off_with_its_node_is_fenced_before_it_runs_elsewhere_and_never_twice() {
    let t = TempDir::new("fence");
    let hub = Hub::start(t.path(), HubOpts::default());
    let (scheme, broker) = hub.mqtt_url.split_once("://").unwrap();
    let link = Link::to(broker);
    let via_link = format!("{scheme}://{}", link.addr);
    let a = Agent::start(t.path(), "site-a", &via_link, &hub.join, &[]);
    hub.wait_node_state("site-a", "Ready");
    let singleton = hello_manifest("leader", &["--forever", "--interval-ms", "50"], "always")
        + "[spec.node_loss]\nreschedule_after = \"5s\"\nsingleton = true\n";
    let m = manifest(t.path(), "leader.toml", &singleton);
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    let m = manifest(t.path(), "bystander.toml", &hello_manifest("bystander", &["--forever"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("leader", "Running");
    hub.wait("bystander", "Running");
    let b = Agent::start(t.path(), "site-b", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("site-b", "Ready");
    assert_eq!(hub.workload("leader").unwrap()["status"]["replicas"][0]["node"], "site-a");
    wait_for("the leader to log on site-a", || (log_len(&a, "leader", 0) > 0).then_some(()));

    // Cut site-a off. Sample, every 100 ms, each side's own record of its
    // copy (its log, which grows every 50 ms while it runs): site-a's last
    // sign of life must come before site-b's first.
    link.cut();
    let cut_at = std::time::Instant::now();
    let (mut last_a, mut last_b) = (log_len(&a, "leader", 0), log_len(&b, "leader", 0));
    let (mut a_last, mut b_first) = (None, None);
    while cut_at.elapsed() < Duration::from_secs(30)
        && b_first.is_none_or(|t: Duration| cut_at.elapsed() < t + Duration::from_secs(2))
    {
        std::thread::sleep(Duration::from_millis(100));
        let (now_a, now_b) = (log_len(&a, "leader", 0), log_len(&b, "leader", 0));
        if now_a != last_a {
            a_last = Some(cut_at.elapsed());
        }
        if now_b != last_b && b_first.is_none() {
            b_first = Some(cut_at.elapsed());
        }
        (last_a, last_b) = (now_a, now_b);
    }
    let a_last = a_last.unwrap_or_default();
    let b_first = b_first.expect("site-b took over");
    assert!(a_last < b_first, "two copies: site-a still ran at {a_last:?}, site-b started at {b_first:?}");
    let w = hub.workload("leader").unwrap();
    assert_eq!(w["status"]["replicas"][0]["node"], "site-b", "{w}");
    let events = hub.ctl(&["get", "events", "--for", "workload/leader"]);
    assert!(events.contains("Rescheduled") && events.contains("not heard from"), "{events}");

    // Heal: site-a hears it lost the replica and forgets it; its other
    // workload ran on all along, never restarted.
    let restarts = |h: &Hub| h.workload("bystander").unwrap()["status"]["replicas"][0]["restarts"].clone();
    link.heal();
    hub.wait_node_state("site-a", "Ready");
    wait_applied(&hub, "site-a");
    let quiet = log_len(&a, "leader", 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(log_len(&a, "leader", 0), quiet, "the old copy stays stopped");
    assert_eq!(restarts(&hub), 0);
    assert_eq!(hub.workload("bystander").unwrap()["status"]["replicas"][0]["node"], "site-a");
    assert!(log_len(&b, "leader", 0) > 0);
    eprintln!("site-a's copy last ran {a_last:?} after the cut; site-b's first ran after {b_first:?}");
}

#[test]
fn a_simulated_fleet_enrols_and_takes_a_per_node_rollout_in_waves() {
    // Simulated nodes speak the real protocol (the agent's own session
    // machine) and run nothing: a fleet larger than this machine holds agents.
    const NODES: usize = 60;
    let t = TempDir::new("sim-fleet");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("2s".into()), ..Default::default() });
    let fleet = sim::Running::start(&hub.mqtt_url, &hub.join, "sim", NODES);
    wait_for("every simulated node to be Ready", || {
        let nodes = hub.json(&["get", "nodes"]);
        let ready = nodes.as_array()?.iter().filter(|n| n["state"] == "Ready").count();
        (ready == NODES).then_some(())
    });
    let fleet_wl = |interval: &str| {
        hello_manifest("fleet", &["--forever", "--interval-ms", interval], "always")
            .replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n")
            + "[spec.rollout]\ncanary = 1\nbatch = \"50%\"\nprogress_deadline = \"2m\"\n"
    };
    hub.ctl(&["apply", "-f", manifest(t.path(), "fleet.toml", &fleet_wl("10000")).to_str().unwrap()]);
    let (ok, out, err) = rollout_status(&hub, "fleet");
    assert!(ok, "{out}{err}");
    assert_eq!(nodes_of(&hub, "fleet").len(), NODES);
    hub.ctl(&["apply", "-f", manifest(t.path(), "fleet.toml", &fleet_wl("9000")).to_str().unwrap()]);
    let (ok, out, err) = rollout_status(&hub, "fleet");
    assert!(ok, "{out}{err}");
    let events = hub.ctl(&["get", "events", "--for", "workload/fleet"]);
    let waves = events.lines().filter(|l| l.contains("WaveStarted")).count();
    assert_eq!(waves, 3, "a canary, then two batches of half: {events}");
    assert!(revisions(&hub, "fleet").iter().all(|r| *r == 2), "every node at the new revision");
    let s = fleet.stats();
    assert_eq!(s.applied(), NODES as u64);
    assert_eq!(s.rejected.load(std::sync::atomic::Ordering::Relaxed), 0, "the nodes refused nothing the hub sent");
}

#[test]
fn a_fleet_with_flapping_links_and_churn_keeps_its_replicas_and_takes_in_new_nodes() {
    const NODES: usize = 20;
    let t = TempDir::new("sim-unrest");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("2s".into()), ..Default::default() });
    let flap = sim::Flap { every: Duration::from_secs(4), down: Duration::from_secs(2) };
    let unrest = sim::Unrest { flap_percent: 50, flap: Some(flap), churn_per_minute: 20 };
    let fleet = sim::Running::start_with(&hub.mqtt_url, &hub.join, "sim", NODES, 200, unrest);
    let everywhere =
        hello_manifest("everywhere", &["--forever"], "always").replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n");
    let many = hello_manifest("many", &["--forever"], "always").replace("[spec]\n", "[spec]\nreplicas = 10\n");
    for (name, m) in [("everywhere", everywhere), ("many", many)] {
        hub.ctl(&["apply", "-f", manifest(t.path(), &format!("{name}.toml"), &m).to_str().unwrap()]);
    }
    let before = wait_for("the counted workload's replicas to be placed", || {
        let r = replicas(&hub, "many");
        (r.len() == 10 && r.iter().all(|(_, n)| !n.is_empty())).then_some(r)
    });
    // Links drop and come back, nodes vanish and new ones join.
    let churned = || fleet.stats().churned.lock().unwrap().clone();
    let flaps = || fleet.stats().flaps.load(std::sync::atomic::Ordering::Relaxed);
    wait_for("three nodes replaced and ten links dropped", || (churned().len() >= 3 && flaps() >= 10).then_some(()));
    let churned = churned();
    // (Taken now: later ones may not have joined yet.)
    let gone: std::collections::BTreeSet<&str> = churned.iter().map(|(g, _)| g.as_str()).collect();
    let new: Vec<&str> = churned.iter().map(|(_, n)| n.as_str()).filter(|n| !gone.contains(n)).collect();
    // A new node joins and gets the per-node workload.
    for n in &new {
        wait_for(&format!("replacement {n} to run the per-node workload"), || {
            nodes_of(&hub, "everywhere").iter().any(|x| x == n).then_some(())
        });
    }
    // A vanished node is offline, and keeps what it had: nothing moves for
    // readiness (no reschedule_after), flapping or gone.
    // (Original ones: a replacement may vanish before it ever joined.)
    for g in gone.iter().filter(|g| !g.contains("-r")) {
        hub.wait_node_state(g, "Offline");
    }
    assert_eq!(replicas(&hub, "many"), before, "the counted replicas stay where they were");
    // The hub saw a flapping node that never left go and come back.
    let flapper = (0..NODES)
        .filter(|i| sim::flaps(*i, 50))
        .map(|i| format!("sim-{i:05}"))
        .find(|n| !gone.contains(n.as_str()))
        .expect("a flapping node that stayed");
    wait_for(&format!("{flapper} to be seen offline and back"), || {
        let events = hub.ctl(&["get", "events", "--for", &format!("node/{flapper}")]);
        (events.contains("NodeOffline") && events.contains("NodeReady")).then_some(())
    });
    assert_eq!(fleet.stats().rejected.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn nodes_are_listed_by_selector_a_page_at_a_time_and_watched() {
    const NODES: usize = 25;
    let t = TempDir::new("list-nodes");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("2s".into()), ..Default::default() });
    let _fleet = sim::Running::start(&hub.mqtt_url, &hub.join, "sim", NODES);
    wait_for("every simulated node to be Ready", || {
        let ready = hub.json(&["get", "nodes"]).as_array()?.iter().filter(|n| n["state"] == "Ready").count();
        (ready == NODES).then_some(())
    });
    let names = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["get", "nodes", "-o", "name"];
        a.extend(args);
        hub.ctl(&a).lines().map(|l| l.trim_start_matches("node/").to_string()).collect()
    };
    // Every third node is a gateway; the fifth is also a legacy one.
    let gateways: Vec<String> = (0..NODES).step_by(3).map(|i| format!("sim-{i:05}")).collect();
    for g in &gateways {
        hub.ctl(&["label", "node", g, "role=gw"]);
    }
    hub.ctl(&["label", "node", &gateways[4], "legacy=yes"]);
    assert_eq!(names(&["-l", "role=gw"]), gateways);
    // Fetched two at a time, the same list.
    assert_eq!(names(&["-l", "role=gw", "--chunk-size", "2"]), gateways);
    assert_eq!(names(&["--chunk-size", "4"]).len(), NODES);
    let modern: Vec<String> = gateways.iter().filter(|g| **g != gateways[4]).cloned().collect();
    assert_eq!(names(&["-l", "role in (gw, db), !legacy", "--chunk-size", "3"]), modern);
    assert!(names(&["-l", "role=nothing"]).is_empty());

    // The API itself: a page, and where the next starts.
    let get = |path: &str| {
        let out = hub
            .curl()
            .args(["-D", "-", "-H", &format!("authorization: Bearer {}", hub.token)])
            .arg(format!("{}{path}", hub.api_url))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let page = get("/v1/nodes?labelSelector=role%3Dgw&limit=4");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains(&format!("x-edge-continue: {}", gateways[3])), "{page}");
    let last = get(&format!("/v1/nodes?labelSelector=role%3Dgw&limit=4&continue={}", gateways[7]));
    assert!(!last.contains("x-edge-continue"), "the last page says no more: {last}");
    assert!(last.contains(&gateways[8]) && !last.contains(&gateways[7]), "{last}");
    // Bad input is named, not ignored.
    for (path, says) in [
        ("/v1/nodes?labelSelector=role+in+gw", "labelSelector"),
        ("/v1/nodes?limit=0", "limit=0"),
        ("/v1/nodes?limit=many", "limit"),
        ("/v1/nodes?continue=..%2Fetc", "continue"),
    ] {
        let r = get(path);
        assert!(r.starts_with("HTTP/1.1 400") && r.contains(says), "{path}: {r}");
    }
    let bad = hub.edgectl(&["get", "nodes", "-l", "role in gw"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("-l \"role in gw\""),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // --watch: the gateways, then each change to one as it happens.
    let out = t.path().join("watch.out");
    let mut watch = Proc::spawn(
        "edgectl get nodes -w",
        hub.edgectl_cmd(&hub.token).args(["get", "nodes", "-w", "-l", "role=gw"]),
        out.clone(),
    );
    let text = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_for("the list", || (text().lines().filter(|l| l.starts_with("sim-")).count() == gateways.len()).then_some(()));
    hub.ctl(&["label", "node", "sim-00001", "role=gw"]);
    wait_for("the newly labelled node", || text().lines().any(|l| l.starts_with("sim-00001 ")).then_some(()));
    hub.ctl(&["delete", "node", &gateways[1]]);
    wait_for("the deleted node", || {
        text().lines().any(|l| l.starts_with(&gateways[1]) && l.contains("Deleted")).then_some(())
    });
    // A node relabelled out of the selection is not shown.
    hub.ctl(&["label", "node", "sim-00002", "role=db"]);
    hub.ctl(&["label", "node", "sim-00004", "role=gw"]);
    wait_for("the other newly labelled node", || text().lines().any(|l| l.starts_with("sim-00004 ")).then_some(()));
    assert!(!text().contains("sim-00002"), "{}", text());
    watch.kill9();
}

/// The CI-sized run of what `bench-hub` measures at full size: a thousand
/// simulated nodes (each its own identity and MQTT connection, on the
/// agents' protocol) join, take a per-node workload and a counted one, and
/// the hub converges within bounds of memory and of what it sends.
#[test]
fn a_thousand_simulated_nodes_join_and_converge_within_bounds() {
    const NODES: usize = 1000;
    let t = TempDir::new("sim-1000");
    let admit = (NODES + 100).to_string();
    let extra: Vec<String> =
        ["--mqtt-max-connections", &admit, "--mqtt-max-connections-per-address", &admit].map(String::from).to_vec();
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("30s".into()), extra, ..Default::default() });
    let fleet = sim::Running::start_at(&hub.mqtt_url, &hub.join, "sim", NODES, 200);
    let ready = || {
        let nodes = hub.json(&["get", "nodes", "--chunk-size", "250"]);
        nodes.as_array().map_or(0, |l| l.iter().filter(|n| n["state"] == "Ready").count())
    };
    // (Slow machines: joins are signed and sealed; allow minutes, not seconds.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while ready() < NODES {
        assert!(std::time::Instant::now() < deadline, "{} of {NODES} nodes Ready after 5 minutes", ready());
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let everywhere =
        hello_manifest("everywhere", &["--forever"], "always").replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n");
    let many = hello_manifest("many", &["--forever"], "always").replace("[spec]\n", "[spec]\nreplicas = 2500\n");
    for (name, m) in [("everywhere", everywhere), ("many", many)] {
        let f = manifest(t.path(), &format!("{name}.toml"), &m);
        hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let placed = |name: &str| {
            hub.workload(name).and_then(|w| {
                w["status"]["replicas"]
                    .as_array()
                    .map(|r| r.iter().filter(|r| r["node"].is_string() && r["phase"] == "Running").count())
            })
        };
        if placed("everywhere") == Some(NODES)
            && placed("many") == Some(2500)
            && fleet.stats().applied() == NODES as u64
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not converged after 5 minutes: everywhere {:?}, many {:?}, {} nodes applied",
            placed("everywhere"),
            placed("many"),
            fleet.stats().applied()
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // Spread: no node holds more than its share of the counted workload plus one.
    let w = hub.workload("many").unwrap();
    let mut per_node = std::collections::BTreeMap::new();
    for r in w["status"]["replicas"].as_array().unwrap() {
        *per_node.entry(r["node"].as_str().unwrap().to_string()).or_insert(0usize) += 1;
    }
    assert!(per_node.values().all(|c| *c <= 3), "spread evenly (2500 over 1000 nodes): {per_node:?}");
    // Bounds: memory.
    let rss_mib = rss_kib(hub.proc.pid()) / 1024;
    assert!(rss_mib < 400, "hub RSS {rss_mib} MiB with 1000 nodes and 3500 replicas (embedded broker included)");
    // Nothing was sent twice over: each node got few desired states.
    let desired = fleet.stats().desired.load(std::sync::atomic::Ordering::Relaxed);
    assert!(desired <= 4 * NODES as u64, "{desired} desired states for {NODES} nodes and two applies");
}
