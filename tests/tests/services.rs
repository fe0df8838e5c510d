//! Wasm services behind the agent's proxy: routing, updates under load,
//! limits, key-value persistence, outbound allow-list, bad components.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edge_tests::*;

struct Site {
    t: TempDir,
    hub: Hub,
    agent: Agent,
    proxy: String,
}

fn site(tag: &str, agent_args: &[&str]) -> Site {
    let t = TempDir::new(tag);
    let hub = Hub::start(t.path(), HubOpts::default());
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, agent_args);
    hub.wait_node_state("pi-1", "Ready");
    let proxy = agent.proxy();
    for c in ["hello-http.wasm", "counter.wasm", "hello.wasm"] {
        example(t.path(), c);
    }
    Site { t, hub, agent, proxy }
}

impl Site {
    fn apply(&self, file: &str, toml: &str) {
        let p = self.t.path().join(file);
        std::fs::write(&p, toml).unwrap();
        self.hub.ctl(&["apply", "-f", p.to_str().unwrap()]);
    }
}

#[test]
fn requests_are_routed_by_host_and_path_to_the_right_service() {
    let s = site("routing", &[]);
    s.apply(
        "web.toml",
        &service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], "env = { VERSION = \"web\" }"),
    );
    s.apply("api.toml", &service_manifest("api", "hello-http.wasm", &[], &["/api"], "env = { VERSION = \"api\" }"));
    s.apply(
        "wild.toml",
        &service_manifest("wild", "hello-http.wasm", &["*.example.com"], &["/"], "env = { VERSION = \"wild\" }"),
    );
    for w in ["web", "api", "wild"] {
        s.hub.wait(w, "Running");
    }
    let cases = [
        ("web.local", "/", 200, "from web web on pi-1"),
        ("WEB.LOCAL:8080", "/anything", 200, "from web web"),
        // A host's own routes win over host-less ones (as server blocks do in nginx).
        ("web.local", "/api/v1", 200, "from web web"),
        ("other.local", "/api", 200, "from api api"),
        ("shop.example.com", "/", 200, "from wild wild"),
        ("example.com", "/", 404, "no route for host \"example.com\" and path \"/\" on node pi-1"),
        ("other.local", "/apix", 404, "no route"),
    ];
    for (host, path, status, body) in cases {
        let (st, b) = get(&s.proxy, host, path);
        assert_eq!(st, status, "{host}{path}: {b}");
        assert!(b.contains(body), "{host}{path}: {b:?} lacks {body:?}");
    }
    // Bodies pass through both ways.
    let (st, b) = http(&s.proxy, "POST", "web.local", "/echo", b"ping pong").unwrap();
    assert_eq!((st, b.as_str()), (200, "ping pong"));
}

#[test]
fn updates_under_load_fail_no_request_and_switch_atomically() {
    let s = site("updates", &[]);
    let m = |v: &str| {
        service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], &format!("env = {{ VERSION = \"{v}\" }}"))
    };
    s.apply("web.toml", &m("v1"));
    s.hub.wait("web", "Running");

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures, seen, proxy) = (stop.clone(), failures.clone(), seen.clone(), s.proxy.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + PATIENCE;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 100_000 {
                    n += 1;
                    match http(&proxy, "GET", "web.local", "/", b"") {
                        Ok((200, body)) => {
                            let v = body.split_whitespace().nth(3).unwrap_or("").to_string();
                            let mut seen = seen.lock().unwrap();
                            if seen.last() != Some(&v) {
                                seen.push(v);
                            }
                        }
                        other => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("request failed during an update: {other:?}");
                        }
                    }
                }
                n
            })
        })
        .collect();
    for v in ["v2", "v3", "v4"] {
        std::thread::sleep(Duration::from_millis(300));
        s.apply("web.toml", &m(v));
        s.hub.wait("web", "Running");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = load.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total > 50, "the load ran ({total} requests)");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request failed during three updates of {total}");
    // Each thread saw versions only move forward: a table is swapped whole.
    let seen = seen.lock().unwrap().clone();
    let order: Vec<&str> = ["v1", "v2", "v3", "v4"].iter().copied().filter(|v| seen.iter().any(|s| s == v)).collect();
    assert_eq!(seen.last().map(String::as_str), Some("v4"), "{seen:?}");
    assert!(order.len() >= 2, "{seen:?}");
    let (_, b) = get(&s.proxy, "web.local", "/");
    assert!(b.contains("v4"), "{b}");
}

#[test]
fn limits_stop_a_runaway_request_and_the_service_lives_on() {
    let s = site("limits", &[]);
    s.apply("web.toml", &service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], "cpu_budget = \"200ms\""));
    s.apply("calm.toml", &service_manifest("calm", "hello-http.wasm", &["calm.local"], &["/"], ""));
    s.hub.wait("web", "Running");
    s.hub.wait("calm", "Running");
    let cases = [
        ("/spin", "CpuBudgetExceeded", "CPU budget"),
        ("/alloc?mib=64", "OutOfMemory", "growing memory"),
        ("/recurse", "StackOverflow", "call stack exhausted"),
        ("/trap", "Trap", "unreachable"),
    ];
    for (path, reason, detail) in cases {
        let started = Instant::now();
        let (st, body) = get(&s.proxy, "web.local", path);
        assert_eq!(st, 500, "{path}: {body}");
        assert!(body.contains(reason) && body.contains(detail), "{path}: {body}");
        assert!(started.elapsed() < Duration::from_secs(30), "{path} took {:?}", started.elapsed());
        // The service, and its neighbour, still answer.
        assert_eq!(get(&s.proxy, "web.local", "/").0, 200);
        assert_eq!(get(&s.proxy, "calm.local", "/").0, 200);
    }
    let logs = s.hub.ctl(&["logs", "web"]);
    for (_, reason, _) in cases {
        assert!(logs.contains(&format!("request failed: {reason}")), "logs lack {reason}:\n{logs}");
    }
    assert!(logs.contains("wasm function"), "the backtrace is logged:\n{logs}");
    let w = wait_for("the failures in the status", || {
        s.hub
            .workload("web")
            .filter(|w| w["status"]["replicas"][0]["message"].as_str().is_some_and(|m| m.contains("4 failed")))
    });
    assert_eq!(w["status"]["phase"], "Running");
}

#[test]
fn a_command_over_its_limits_fails_with_the_reason() {
    let s = site("cmdlimits", &[]);
    let cmd = |name: &str, args: &str, extra: &str| {
        format!(
            "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec]\nrestart = \"never\"\n[spec.wasm]\ncomponent = \"hello.wasm\"\nargs = [{args}]\n{extra}\n[spec.resources]\nmemory = \"16Mi\"\n"
        )
    };
    // 300 ms of CPU at a 100m share (10% of a core) takes at least ~3 s.
    let started = Instant::now();
    s.apply(
        "spin.toml",
        &cmd("spin", "\"--spin\"", "cpu_budget = \"300ms\"")
            .replace("memory = \"16Mi\"", "memory = \"16Mi\"\ncpu = \"100m\""),
    );
    s.apply("hog.toml", &cmd("hog", "\"--alloc-mib\", \"64\"", ""));
    s.hub.wait("spin", "Failed");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "a spinning command is throttled to its share ({:?})",
        started.elapsed()
    );
    s.hub.wait("hog", "Failed");
    let reason = |w: &str| s.hub.workload(w).unwrap()["status"]["replicas"][0]["reason"].as_str().unwrap().to_string();
    assert_eq!(reason("spin"), "CpuBudgetExceeded");
    assert_eq!(reason("hog"), "OutOfMemory");
    assert!(s.hub.ctl(&["logs", "hog"]).contains("growing memory"));
}

#[test]
fn concurrency_beyond_max_instances_waits_then_gets_503() {
    let s = site("concurrency", &[]);
    s.apply("web.toml", &service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], "max_instances = 1"));
    s.hub.wait("web", "Running");
    let proxy = s.proxy.clone();
    // Holds the only instance for longer than a request may wait (5 s).
    let holder = std::thread::spawn(move || get(&proxy, "web.local", "/sleep?ms=7000"));
    std::thread::sleep(Duration::from_millis(500));
    let (st, body) = get(&s.proxy, "web.local", "/");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("at its limit of 1 concurrent requests"), "{body}");
    assert_eq!(holder.join().unwrap().0, 200);
    assert_eq!(get(&s.proxy, "web.local", "/").0, 200, "served again once the instance is free");
}

#[test]
fn key_value_data_survives_an_agent_kill_9_and_goes_with_the_workload() {
    let mut s = site("kv", &[]);
    let m = service_manifest("counter", "counter.wasm", &["counter.local"], &["/"], "key_value = true");
    s.apply("counter.toml", &m);
    s.hub.wait("counter", "Running");
    for i in 1..=3 {
        let (st, b) = get(&s.proxy, "counter.local", "/");
        assert_eq!((st, b.trim()), (200, format!("visit {i} on pi-1").as_str()));
    }
    // Acknowledged writes are on disk: kill -9 and start again.
    s.agent.proc.kill9();
    s.agent.start_again();
    s.proxy = s.agent.proxy();
    let (st, b) = wait_for("the counter to serve again", || {
        http(&s.proxy, "GET", "counter.local", "/count", b"").ok().filter(|(st, _)| *st == 200)
    });
    assert_eq!((st, b.trim()), (200, "3 visits so far on pi-1"));
    assert_eq!(get(&s.proxy, "counter.local", "/").1.trim(), "visit 4 on pi-1");
    // Without key_value = true there is no store.
    s.apply("nokv.toml", &service_manifest("nokv", "counter.wasm", &["nokv.local"], &["/"], ""));
    s.hub.wait("nokv", "Running");
    let (st, b) = get(&s.proxy, "nokv.local", "/");
    assert_eq!(st, 500);
    assert!(b.contains("key_value = true"), "{b}");
    // Deleting the workload deletes its data.
    s.hub.ctl(&["delete", "workload", "counter"]);
    s.hub.wait("counter", "Deleted");
    wait_for("the route to go", || (get(&s.proxy, "counter.local", "/").0 == 404).then_some(()));
    s.apply("counter.toml", &m);
    s.hub.wait("counter", "Running");
    assert_eq!(get(&s.proxy, "counter.local", "/").1.trim(), "visit 1 on pi-1");
}

#[test]
fn outbound_requests_go_only_where_the_manifest_allows() {
    let s = site("outbound", &[]);
    let allowed = backend("allowed backend");
    let denied = backend("denied backend");
    s.apply(
        "web.toml",
        &service_manifest(
            "web",
            "hello-http.wasm",
            &["web.local"],
            &["/"],
            &format!("outbound = [\"http://{allowed}\"]"),
        ),
    );
    s.hub.wait("web", "Running");
    let (st, b) = get(&s.proxy, "web.local", &format!("/fetch?url=http://{allowed}/x"));
    assert_eq!((st, b.as_str()), (200, "upstream answered 200\nallowed backend"));
    let (st, b) = get(&s.proxy, "web.local", &format!("/fetch?url=http://{denied}/x"));
    assert_eq!(st, 502, "{b}");
    assert!(b.contains("HttpRequestDenied"), "{b}");
    let logs = s.hub.ctl(&["logs", "web"]);
    assert!(logs.contains(&format!("outbound request to http://{denied} denied")), "{logs}");
}

#[test]
fn a_malformed_component_is_refused_with_a_clear_status() {
    let s = site("malformed", &[]);
    // The component header, then junk.
    std::fs::write(s.t.path().join("junk.wasm"), b"\0asm\x0d\x00\x01\x00this is not a component").unwrap();
    let junk =
        service_manifest("junk", "junk.wasm", &["junk.local"], &["/"], "").replace("[metadata]", "[metadata]\n") + "";
    s.apply("junk.toml", &junk.replace("[spec.wasm]", "[spec]\nrestart = \"never\"\n[spec.wasm]"));
    // A command deployed as a service.
    let cmd = service_manifest("notproxy", "hello.wasm", &["np.local"], &["/"], "");
    s.apply("np.toml", &cmd.replace("[spec.wasm]", "[spec]\nrestart = \"never\"\n[spec.wasm]"));
    s.hub.wait("junk", "Failed");
    s.hub.wait("notproxy", "Failed");
    let status = |w: &str| s.hub.workload(w).unwrap()["status"]["replicas"][0].clone();
    let j = status("junk");
    assert_eq!(j["reason"], "InvalidComponent");
    assert!(j["message"].as_str().unwrap().contains("is not a valid WebAssembly component"), "{j}");
    let n = status("notproxy");
    assert_eq!(n["reason"], "InvalidComponent");
    assert!(n["message"].as_str().unwrap().contains("not a wasi:http/proxy component"), "{n}");
    // Their routes say why instead of a bare 404; the agent serves the rest.
    let (st, b) = get(&s.proxy, "junk.local", "/");
    assert_eq!(st, 503, "{b}");
    assert!(b.contains("workload junk is not ready") && b.contains("InvalidComponent"), "{b}");
    s.apply("web.toml", &service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], ""));
    s.hub.wait("web", "Running");
    assert_eq!(get(&s.proxy, "web.local", "/").0, 200);
}

#[test]
fn static_routes_forward_to_plain_servers() {
    let upstream = backend("plain server");
    let s = site("upstream", &["--route", &format!("db.local/admin=http://{upstream}")]);
    let (st, b) = get(&s.proxy, "db.local", "/admin/users");
    assert_eq!((st, b.as_str()), (200, "plain server"));
    assert_eq!(get(&s.proxy, "db.local", "/").0, 404);
    let _ = &s.agent;
}

#[test]
fn a_service_written_in_c_is_served_like_any_other() {
    let s = site("c", &[]);
    example(s.t.path(), "hello-c.wasm");
    s.apply("c.toml", &service_manifest("hello-c", "hello-c.wasm", &["c.local"], &["/"], ""));
    s.hub.wait("hello-c", "Running");
    let (st, b) = get(&s.proxy, "c.local", "/some/path?x=1");
    assert_eq!((st, b.as_str()), (200, "Hello from C! I am hello-c on pi-1; you asked for /some/path?x=1\n"));
}

#[test]
fn readiness_gates_traffic_and_liveness_restarts_an_unhealthy_service() {
    let s = site("health", &[]);
    let with_health =
        |name: &str, host: &str, health: &str| service_manifest(name, "hello-http.wasm", &[host], &["/"], "") + health;
    // Never ready: /trap fails every time. It runs, but gets no traffic.
    s.apply(
        "shy.toml",
        &with_health(
            "shy",
            "shy.local",
            "[spec.health.readiness]\nhttp = { path = \"/trap\" }\nperiod = \"1s\"\nfailure_threshold = 1\n",
        ),
    );
    // Ready once its probe passes.
    s.apply(
        "fine.toml",
        &with_health("fine", "fine.local", "[spec.health.readiness]\nhttp = { path = \"/\" }\nperiod = \"1s\"\n"),
    );
    s.hub.wait("fine", "Running");
    let fine = wait_for("fine to be ready", || s.hub.workload("fine").filter(|w| w["status"]["ready"] == 1));
    assert_eq!(fine["status"]["replicas"][0]["ready"], true);
    assert_eq!(get(&s.proxy, "fine.local", "/").0, 200);
    let shy = wait_for("shy's probe result", || {
        s.hub
            .workload("shy")
            .filter(|w| w["status"]["replicas"][0]["probe"].as_str().is_some_and(|p| p.contains("/trap")))
    });
    assert_eq!(shy["status"]["phase"], "Running");
    assert_eq!(shy["status"]["ready"], 0, "{shy}");
    assert_eq!(shy["status"]["replicas"][0]["ready"], false);
    let probe = shy["status"]["replicas"][0]["probe"].as_str().unwrap();
    assert!(probe.starts_with("readiness: HTTP GET /trap: answered 500"), "{probe}");
    let (st, body) = get(&s.proxy, "shy.local", "/");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("not ready: readiness: HTTP GET /trap"), "{body}");
    let described = s.hub.ctl(&["describe", "workload", "shy"]);
    assert!(described.contains("READY") && described.contains("readiness: HTTP GET /trap"), "{described}");

    // Failing its liveness probe twice in a row restarts it, with the reason.
    s.apply(
        "sick.toml",
        &with_health(
            "sick",
            "sick.local",
            "[spec.health.liveness]\nhttp = { path = \"/trap\" }\nperiod = \"1s\"\nfailure_threshold = 2\n",
        ),
    );
    let sick = wait_for("sick to be restarted", || {
        s.hub.workload("sick").filter(|w| w["status"]["replicas"][0]["restarts"].as_u64().is_some_and(|r| r >= 1))
    });
    let events = s.hub.ctl(&["describe", "workload", "sick"]);
    assert!(events.contains("Unhealthy") || sick.to_string().contains("Unhealthy"), "{events}\n{sick}");
    assert!(s.hub.ctl(&["logs", "sick"]).contains("unhealthy: liveness: HTTP GET /trap"));
    // The others were left alone.
    assert_eq!(s.hub.workload("fine").unwrap()["status"]["replicas"][0]["restarts"], 0);
    assert_eq!(get(&s.proxy, "fine.local", "/").0, 200);
}

#[test]
fn wasm_components_are_probed_by_running_them_as_commands() {
    let s = site("wasm-command-probes", &[]);
    let ticker =
        |name: &str, health: &str| hello_manifest(name, &["--forever", "--interval-ms", "500"], "always") + health;
    // Ready while its check exits 0.
    s.apply(
        "steady.toml",
        &ticker("steady", "[spec.health.readiness]\ncommand = [\"--exit\", \"0\"]\nperiod = \"1s\"\n"),
    );
    let steady = wait_for("steady to be ready", || s.hub.workload("steady").filter(|w| w["status"]["ready"] == 1));
    let probe = steady["status"]["replicas"][0]["probe"].as_str().unwrap_or_default();
    assert_eq!(probe, "readiness: command [\"--exit\", \"0\"]: passed", "{steady}");
    // Failing twice in a row restarts it, saying why with the last line the
    // check printed; the check's output stays out of the replica's log.
    // (WASI 0.2 exits with success or failure, so code 3 arrives as 1.)
    s.apply(
        "sick.toml",
        &ticker(
            "sick",
            "[spec.health.liveness]\ncommand = [\"--exit\", \"3\"]\nperiod = \"1s\"\nfailure_threshold = 2\n",
        ),
    );
    wait_for("sick to be restarted", || {
        s.hub.workload("sick").filter(|w| w["status"]["replicas"][0]["restarts"].as_u64().is_some_and(|r| r >= 1))
    });
    let logs = s.hub.ctl(&["logs", "sick"]);
    assert!(logs.contains("unhealthy: liveness: command [\"--exit\", \"3\"]: exit 1: exiting with code 3"), "{logs}");
    assert!(!logs.contains("args: [\"--exit\", \"3\"]"), "{logs}");
    // A service whose component is no command: never ready, and it says why.
    s.apply(
        "web.toml",
        &(service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], "")
            + "[spec.health.readiness]\ncommand = [\"--ready\"]\nperiod = \"1s\"\n"),
    );
    let web = wait_for("web's probe result", || {
        s.hub
            .workload("web")
            .filter(|w| w["status"]["replicas"][0]["probe"].as_str().is_some_and(|p| p.contains("--ready")))
    });
    assert_eq!(web["status"]["ready"], 0, "{web}");
    let probe = web["status"]["replicas"][0]["probe"].as_str().unwrap();
    assert!(probe.contains("exports no wasi:cli/run"), "{probe}");
    assert_eq!(s.hub.workload("steady").unwrap()["status"]["replicas"][0]["restarts"], 0);
}

#[test]
fn rollout_history_lists_each_revision_and_undo_returns_to_one() {
    let s = site("revisions", &[]);
    let web = |v: &str| {
        service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], &format!("env = {{ VERSION = \"{v}\" }}"))
    };
    let serves = |v: &str| {
        let want = format!("from web {v} on pi-1");
        wait_for(&format!("web to serve {v}"), || get(&s.proxy, "web.local", "/").1.contains(&want).then_some(()))
    };
    s.apply("web.toml", &web("v1"));
    serves("v1");
    s.apply("web.toml", &web("v2"));
    serves("v2");
    let history = s.hub.ctl(&["rollout", "history", "web"]);
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 2, "{history}");
    assert!(lines[0].starts_with("1 ") && lines[0].ends_with("created"), "{history}");
    assert!(lines[1].starts_with("2 ") && lines[1].ends_with("changed wasm.env"), "{history}");

    let undone = s.hub.ctl(&["rollout", "undo", "web"]);
    assert!(undone.contains("workload/web rolled back to revision 1 (now revision 3)"), "{undone}");
    serves("v1");
    let history = s.hub.ctl(&["rollout", "history", "web"]);
    assert!(history.lines().nth(2).is_some_and(|l| l.starts_with("3 ") && l.ends_with("rolled back to revision 1")));
    s.hub.ctl(&["rollout", "undo", "web", "--to-revision", "2"]);
    serves("v2");
    let json: serde_json::Value =
        serde_json::from_str(&s.hub.ctl(&["rollout", "history", "web", "-o", "json"])).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(4));
    assert_eq!(json[3]["spec"]["wasm"]["env"]["VERSION"], "v2");

    // A revision that is not kept, or a workload that does not exist: said so, nothing changes.
    let out = s.hub.edgectl(&["rollout", "undo", "web", "--to-revision", "9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no revision 9 (kept: 1, 2, 3, 4)"), "{err}");
    let out = s.hub.edgectl(&["rollout", "history", "nope"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("\"nope\" not found"));
    assert_eq!(s.hub.workload("web").unwrap()["metadata"]["generation"], 4);
    serves("v2");
}
