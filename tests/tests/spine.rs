//! The main path, end to end, with the real binaries and the embedded broker:
//! join, apply, run, logs, delete; durability of hub and agent; bad input.

use std::time::Duration;

use edge_tests::*;

fn hub_and_agent(t: &TempDir, name: &str, extra: &[&str]) -> (Hub, Agent) {
    let hub = Hub::start(t.path(), HubOpts::default());
    let agent = Agent::start(t.path(), name, &hub.mqtt_url, &hub.join, extra);
    hub.wait_node_state(name, "Ready");
    (hub, agent)
}

#[test]
fn agent_joins_and_reports_its_facts() {
    let t = TempDir::new("join");
    let (hub, _agent) = hub_and_agent(&t, "pi-1", &["--label", "site=plant-1", "--label", "zone=a"]);
    let nodes = hub.json(&["get", "nodes"]);
    let n = &nodes[0];
    assert_eq!(n["name"], "pi-1");
    assert_eq!(n["state"], "Ready");
    assert_eq!(n["facts"]["arch"], "amd64");
    assert_eq!(n["facts"]["os"], "linux");
    assert!(n["facts"]["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(n["facts"]["labels"]["site"], "plant-1");
    assert_eq!(n["facts"]["runtimes"][0]["name"], "wasm");
    assert_eq!(n["facts"]["runtimes"][0]["mode"], "cranelift");
    let table = hub.ctl(&["get", "nodes"]);
    assert!(table.starts_with("NAME") && table.contains("pi-1") && table.contains("Ready"), "{table}");
}

#[test]
fn a_wasm_command_runs_to_completion_with_its_logs() {
    let t = TempDir::new("run");
    let (hub, agent) = hub_and_agent(&t, "pi-1", &[]);
    let m = manifest(
        t.path(),
        "hello.toml",
        &hello_manifest("hello", &["--ticks", "3", "--interval-ms", "10"], "on-failure"),
    );
    let out = hub.edgectl(&["apply", "-f", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "workload/hello created");
    assert!(String::from_utf8_lossy(&out.stderr).contains("uploading hello.wasm"), "first apply uploads the component");

    hub.wait("hello", "Succeeded");
    let w = hub.workload("hello").unwrap();
    assert_eq!(w["status"]["phase"], "Succeeded");
    assert_eq!(w["status"]["replicas"][0]["node"], "pi-1");
    assert_eq!(w["status"]["replicas"][0]["exit_code"], 0);
    assert_eq!(w["status"]["replicas"][0]["restarts"], 0);

    let logs = hub.ctl(&["logs", "hello"]);
    assert!(logs.contains("Hello from WebAssembly! I am hello, running on pi-1."), "{logs}");
    assert!(logs.contains("tick 3"), "{logs}");
    let tail = hub.ctl(&["logs", "hello", "--tail", "2"]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(agent.log_file("hello", 0).contains("stdout tick 1"), "the agent keeps the log on its disk");

    // Applying the same manifest again changes nothing and uploads nothing.
    let out = hub.edgectl(&["apply", "-f", m.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "workload/hello unchanged");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("uploading"));
    let describe = hub.ctl(&["describe", "workload", "hello"]);
    for want in ["Name:         hello", "Phase:        Succeeded", "Scheduled", "Completed"] {
        assert!(describe.contains(want), "describe lacks {want:?}:\n{describe}");
    }
}

#[test]
fn a_failing_command_is_reported_with_its_exit_code_and_restarted_by_policy() {
    let t = TempDir::new("fail");
    let (hub, _agent) = hub_and_agent(&t, "pi-1", &[]);
    let never = manifest(t.path(), "never.toml", &hello_manifest("once", &["--exit", "3"], "never"));
    let retry = manifest(t.path(), "retry.toml", &hello_manifest("retry", &["--exit", "4"], "on-failure"));
    hub.ctl(&["apply", "-f", never.to_str().unwrap(), "-f", retry.to_str().unwrap()]);

    hub.wait("once", "Failed");
    let w = hub.workload("once").unwrap();
    let r = &w["status"]["replicas"][0];
    // Rust's std on wasm32-wasip2 exits through `wasi:cli/exit.exit(result)`,
    // which carries only success or failure: the host sees 1 for any failure.
    assert_eq!((r["exit_code"].as_i64(), r["reason"].as_str()), (Some(1), Some("Error")), "{r}");

    // on-failure: it is run again, with a growing back-off, and the restarts are counted.
    let w = wait_for("retry to restart twice", || {
        hub.workload("retry").filter(|w| w["status"]["replicas"][0]["restarts"].as_u64() >= Some(2))
    });
    let r = &w["status"]["replicas"][0];
    assert_ne!(w["status"]["phase"], "Succeeded");
    let events = hub.ctl(&["describe", "workload", "retry"]);
    assert!(events.contains("BackOff") && events.contains("exited with code 1"), "{events}");
    assert!(r["restarts"].as_u64().unwrap() >= 2);
}

#[test]
fn deleting_a_workload_stops_it_and_frees_the_node() {
    let t = TempDir::new("delete");
    let (hub, agent) = hub_and_agent(&t, "pi-1", &[]);
    let m = manifest(t.path(), "t.toml", &hello_manifest("ticker", &["--forever", "--interval-ms", "50"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("ticker", "Running");
    assert_eq!(hub.node("pi-1").unwrap()["workloads"][0], "ticker");
    assert_eq!(hub.ctl(&["delete", "workload", "ticker"]).trim(), "workload/ticker deleted");
    assert!(hub.workload("ticker").is_none());
    // The agent stops the run and forgets the replica, log included.
    wait_for("the agent to forget the replica", || (!agent.dir.join("logs/ticker.0.log").exists()).then_some(()));
    let n = hub.node("pi-1").unwrap();
    assert_eq!(n["workloads"].as_array().unwrap().len(), 0);
    assert_eq!(n["allocated"]["memory"], "0");
    let out = hub.edgectl(&["delete", "workload", "ticker"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workload \"ticker\" not found"));
}

#[test]
fn the_agent_restarts_its_workloads_from_disk_after_kill_9_with_the_hub_down() {
    let t = TempDir::new("offline");
    let (mut hub, mut agent) = hub_and_agent(&t, "pi-1", &[]);
    let m = manifest(t.path(), "t.toml", &hello_manifest("ticker", &["--forever", "--interval-ms", "50"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("ticker", "Running");

    agent.proc.kill9();
    hub.kill(false);
    let before = agent.log_file("ticker", 0).lines().count();
    agent.start_again();
    // No hub, no broker: the agent runs what it was told from its own state.
    wait_for("ticks from the restarted replica", || {
        (agent.log_file("ticker", 0).lines().count() > before + 3).then_some(())
    });
    let log = agent.proc.log_text();
    assert!(log.contains("running the desired state kept on disk"), "{log}");
    assert_eq!(
        log.matches("compiled code from the hub").count(),
        1,
        "the restarted agent loads the compiled component from its cache: {log}"
    );
    assert!(!log.contains("compiling here"), "{log}");

    // When the hub comes back, the agent reconnects and reports; nothing is duplicated.
    hub.start_again();
    hub.wait_node_state("pi-1", "Ready");
    let w = wait_for("ticker to be reported running again", || {
        hub.workload("ticker")
            .filter(|w| w["status"]["phase"] == "Running" && w["status"]["replicas"][0]["restarts"] == 1)
    });
    assert_eq!(w["status"]["replicas"].as_array().unwrap().len(), 1);
}

#[test]
fn a_run_cut_short_by_a_crash_runs_again_or_is_reported_interrupted_as_its_manifest_says() {
    let t = TempDir::new("interrupted");
    let (hub, mut agent) = hub_and_agent(&t, "pi-1", &[]);
    let long = ["--forever", "--interval-ms", "50"];
    let once = hello_manifest("once", &long, "on-failure").replace("[spec]\n", "[spec]\nrerun_interrupted = false\n");
    let again = hello_manifest("again", &long, "on-failure");
    let (a, b) = (manifest(t.path(), "once.toml", &once), manifest(t.path(), "again.toml", &again));
    hub.ctl(&["apply", "-f", a.to_str().unwrap(), "-f", b.to_str().unwrap()]);
    hub.wait("once", "Running");
    hub.wait("again", "Running");

    agent.proc.kill9();
    agent.start_again();
    let once = wait_for("once to be reported interrupted", || {
        hub.workload("once").filter(|w| w["status"]["phase"] == "Failed")
    });
    assert_eq!(once["status"]["replicas"][0]["reason"], "Interrupted", "{once}");
    wait_for("again to run again", || {
        hub.workload("again")
            .filter(|w| w["status"]["phase"] == "Running" && w["status"]["replicas"][0]["restarts"] == 1)
    });
    // And it stays that way: the interrupted run is not retried later.
    let before = agent.log_file("once", 0).lines().count();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(agent.log_file("once", 0).lines().count(), before, "the interrupted run did not run again");
    assert_eq!(hub.workload("once").unwrap()["status"]["phase"], "Failed");
}

#[test]
fn the_hub_loses_nothing_it_accepted_across_a_kill_9() {
    let t = TempDir::new("hubrestart");
    let (mut hub, _agent) = hub_and_agent(&t, "pi-1", &[]);
    let a = manifest(t.path(), "a.toml", &hello_manifest("a", &["--forever"], "always"));
    let b = manifest(t.path(), "b.toml", &hello_manifest("b", &[], "on-failure"));
    hub.ctl(&["apply", "-f", a.to_str().unwrap(), "-f", b.to_str().unwrap()]);
    // An update makes generation 2.
    std::fs::write(&a, hello_manifest("a", &["--forever", "--interval-ms", "200"], "always")).unwrap();
    hub.ctl(&["apply", "-f", a.to_str().unwrap()]);
    let before = hub.json(&["get", "workloads"]);
    let node_before = hub.node("pi-1").unwrap();

    hub.restart(true);
    let after = hub.json(&["get", "workloads"]);
    let meta = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.as_array().unwrap().iter().map(|w| w["metadata"].clone()).collect()
    };
    assert_eq!(meta(&after), meta(&before), "workloads, uids and generations survive");
    assert_eq!(after[0]["metadata"]["generation"], 2);
    let node_after = hub.node("pi-1").expect("the node is remembered");
    assert_eq!(node_after["key_fingerprint"], node_before["key_fingerprint"]);
    assert_eq!(node_after["desired_generation"], node_before["desired_generation"]);
    // The artifact is still in the store: re-applying uploads nothing.
    let out = hub.edgectl(&["apply", "-f", b.to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("uploading"));
    hub.wait_node_state("pi-1", "Ready");
    hub.wait("a", "Running");
}

#[test]
fn a_bad_manifest_is_refused_with_every_problem_and_changes_nothing() {
    let t = TempDir::new("badmanifest");
    let (hub, _agent) = hub_and_agent(&t, "pi-1", &[]);
    let good = manifest(t.path(), "good.toml", &hello_manifest("good", &[], "never"));
    hub.ctl(&["apply", "-f", good.to_str().unwrap()]);
    hub.wait("good", "Succeeded");
    let before = hub.json(&["get", "workloads"]);

    let bad = manifest(
        t.path(),
        "bad.toml",
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"good\"\n[spec]\nreplicas = -1\nrestart = \"sometimes\"\n[spec.wasm]\ncomponent = \"hello.wasm\"\nargz = []\n[spec.resources]\nmemory = \"64MB\"\n",
    );
    let out = hub.edgectl(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "spec.replicas",
        "spec.restart",
        "spec.wasm.argz",
        "did you mean `args`?",
        "spec.resources.memory",
        "4 problems",
    ] {
        assert!(err.contains(want), "error lacks {want:?}: {err}");
    }
    let syntax = manifest(t.path(), "syntax.toml", "api_version = \"edge/v1\"\n[metadata\n");
    let err = String::from_utf8_lossy(&hub.edgectl(&["apply", "-f", syntax.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("not valid TOML") && err.contains("line 2"), "{err}");
    let core = t.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\x00\x00\x00").unwrap();
    let m = manifest(t.path(), "core.toml", &hello_manifest("core", &[], "never").replace("hello.wasm", "core.wasm"));
    let err = String::from_utf8_lossy(&hub.edgectl(&["apply", "-f", m.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("core WebAssembly module, not a component"), "{err}");

    // Straight to the API, past edgectl's checks: the hub validates too.
    let out = hub
        .curl()
        .args(["-X", "PUT", "-H", &format!("Authorization: Bearer {}", hub.token)])
        .args(["-d", r#"{"api_version":"edge/v1","kind":"Workload","metadata":{"name":"good"},"spec":{"wasm":{"component":"hello.wasm"}}}"#])
        .arg(format!("{}/v1/workloads/good", hub.api_url))
        .output()
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"]["code"], "Invalid");
    assert!(body["error"]["details"][0].as_str().unwrap().contains("local path"), "{body}");

    assert_eq!(hub.json(&["get", "workloads"]), before, "nothing changed");
}

#[test]
fn an_unknown_artifact_digest_is_refused() {
    let t = TempDir::new("digest");
    let (hub, _agent) = hub_and_agent(&t, "pi-1", &[]);
    let m = manifest(
        t.path(),
        "m.toml",
        &hello_manifest("ghost", &[], "never")
            .replace("\"hello.wasm\"", "\"sha256:0000000000000000000000000000000000000000000000000000000000000000\""),
    );
    let out = hub.edgectl(&["apply", "-f", m.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not in the hub's artifact store"), "{err}");
    assert!(hub.workload("ghost").is_none());
    // An upload whose bytes do not match the digest it claims is refused too.
    let out = hub
        .curl()
        .args([
            "-X",
            "PUT",
            "-H",
            &format!("Authorization: Bearer {}", hub.token),
            "--data-binary",
            "not the right bytes",
        ])
        .arg(format!("{}/v1/artifacts/sha256:{}", hub.api_url, "1".repeat(64)))
        .output()
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"]["code"], "DigestMismatch", "{body}");
}

#[test]
fn wrong_tokens_are_refused() {
    let t = TempDir::new("tokens");
    let hub = Hub::start(t.path(), HubOpts::default());
    let out = hub.edgectl_as("not-the-token", &["get", "nodes"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: missing, wrong, expired or revoked API token"), "{err}");

    // A join token with the right hub fingerprint and id but the wrong secret.
    let parts: Vec<&str> = hub.join.split('.').collect();
    let forged = format!("EJ1.{}.{}.{}", parts[1], parts[2], "0".repeat(32));
    let mut bad = Agent::start(t.path(), "intruder", &hub.mqtt_url, &forged, &[]);
    let status = wait_for("the refused agent to exit", || bad.proc.exited());
    assert!(!status.success());
    assert!(bad.proc.log_text().contains("refused the join token"), "{}", bad.proc.log_text());
    let nodes = hub.json(&["get", "nodes"]);
    assert_eq!(nodes.as_array().unwrap().len(), 0, "the intruder never joined");

    let out = std::process::Command::new(bin("edge-agent"))
        .args(["run", "--broker", &hub.mqtt_url, "--join-token", "garbage", "--data-dir"])
        .arg(t.path().join("x"))
        .arg("--run-dir")
        .arg(t.path().join("x-run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed join token"));
}

#[test]
fn a_dead_agent_is_offline_at_once_and_a_hung_one_within_seconds() {
    let t = TempDir::new("liveness");
    let (hub, mut agent) = hub_and_agent(&t, "pi-1", &[]);
    let m = manifest(t.path(), "t.toml", &hello_manifest("ticker", &["--forever"], "always"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("ticker", "Running");
    // Hung: SIGSTOP. Keep-alive is 1 s, so the broker gives up after 1.5 s
    // and delivers the last will; heartbeats stop too.
    agent.proc.signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    let n = wait_for("the hung node to leave Ready", || hub.node("pi-1").filter(|n| n["state"] != "Ready"));
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(n["state"] == "Offline" || n["state"] == "NotReady");
    agent.proc.signal(libc::SIGCONT);
    hub.wait_node_state("pi-1", "Ready");

    // Dead: kill -9 closes its connection; the broker publishes the last will.
    agent.proc.kill9();
    hub.wait_node_state("pi-1", "Offline");
    // Its workload is not said to run: what it last reported is history.
    let w = wait_for("ticker to be Unknown", || hub.workload("ticker").filter(|w| w["status"]["phase"] == "Unknown"));
    let r = &w["status"]["replicas"][0];
    assert_eq!((r["phase"].as_str(), r["reason"].as_str()), (Some("Unknown"), Some("NodeOffline")), "{w}");
    assert_eq!(r["message"], "node pi-1 is Offline; last reported: Running", "{w}");
    assert_eq!(w["status"]["ready"], 0);
}

#[test]
fn unschedulable_workloads_wait_for_a_fitting_node() {
    let t = TempDir::new("sched");
    let (hub, _a) = hub_and_agent(&t, "pi-1", &["--label", "site=a"]);
    let m = manifest(
        t.path(),
        "m.toml",
        &format!("{}[spec.placement]\nnode_selector = {{ site = \"b\" }}\n", hello_manifest("picky", &[], "never")),
    );
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    // (A node slowed down enough to miss heartbeats would say "not ready" for a while.)
    let w = wait_for("the reason to be reported", || {
        hub.workload("picky").filter(|w| {
            w["status"]["message"] == "0/1 nodes are available: 1 node did not match spec.placement.node_selector"
        })
    });
    assert_eq!(
        (w["status"]["phase"].as_str(), w["status"]["reason"].as_str()),
        (Some("Pending"), Some("Unschedulable"))
    );
    let _b = Agent::start(t.path(), "pi-2", &hub.mqtt_url, &hub.join, &["--label", "site=b"]);
    hub.wait("picky", "Succeeded");
    assert_eq!(hub.workload("picky").unwrap()["status"]["replicas"][0]["node"], "pi-2");
}

#[test]
fn replicas_spread_over_nodes() {
    let t = TempDir::new("spread");
    let (hub, _a) = hub_and_agent(&t, "pi-1", &[]);
    let _b = Agent::start(t.path(), "pi-2", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-2", "Ready");
    let m = manifest(
        t.path(),
        "m.toml",
        &hello_manifest("pair", &["--forever"], "always").replace("[spec]\n", "[spec]\nreplicas = 2\n"),
    );
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("pair", "Ready");
    let w = hub.workload("pair").unwrap();
    let mut nodes: Vec<&str> =
        w["status"]["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_str().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["pi-1", "pi-2"]);
    // Ready means running; its first line may still be on its way.
    wait_for("replica 1's first log line", || {
        let out = hub.edgectl(&["logs", "pair", "--replica", "1"]);
        String::from_utf8_lossy(&out.stdout).contains("running on pi-").then_some(())
    });
}
