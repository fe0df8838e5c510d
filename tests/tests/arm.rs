//! The main scenario with ARM agents: an x86-64 hub, and agents built for
//! aarch64 (Cranelift code) and armv7 (Pulley bytecode) running under
//! qemu-user. The agents are built without a compiler (scripts/cross's
//! default): they run only what the hub compiled for their target. Needs the
//! agents built by scripts/cross and binfmt_misc set up for qemu
//! (scripts/test does both).

use std::time::Instant;

use edge_tests::arm::ARCHES;
use edge_tests::*;

fn manifest_for(name: &str, arch: &str, body: &str) -> String {
    format!(
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n{body}\n[spec.placement]\narch = [\"{arch}\"]\n"
    )
}

#[test]
fn arm_agents_under_qemu_run_commands_and_serve_http() {
    for a in &ARCHES {
        a.check_binfmt();
    }
    let t = TempDir::new("arm");
    let hub = Hub::start(t.path(), HubOpts::default());
    let agents: Vec<Agent> = ARCHES.iter().map(|a| a.agent(t.path(), &hub.mqtt_url, &hub.join)).collect();
    for (a, agent) in ARCHES.iter().zip(&agents) {
        let n = hub.wait_node_state(a.node, "Ready");
        assert_eq!(n["facts"]["arch"], a.arch, "{}", a.node);
        assert_eq!(n["facts"]["runtimes"][0]["mode"], a.mode, "{}", a.node);
        assert_eq!(n["facts"]["runtimes"][0]["precompiled_only"], true, "{}", a.node);
        let fp = n["facts"]["runtimes"][0]["fingerprint"].as_str().unwrap_or("").to_string();
        assert!(fp.starts_with("wasmtime-") && fp.contains(&format!("-{}-", a.target)), "{}: {fp}", a.node);
        let _ = agent.proxy();
    }
    example(t.path(), "hello.wasm");
    example(t.path(), "hello-http.wasm");

    for (a, agent) in ARCHES.iter().zip(&agents) {
        // A command, pinned to this architecture.
        let cmd = format!("hello-{}", a.node);
        let file = t.path().join(format!("{cmd}.toml"));
        let body = "[spec]\nrestart = \"never\"\n[spec.wasm]\ncomponent = \"hello.wasm\"\nargs = [\"--ticks\", \"2\", \"--interval-ms\", \"10\", \"--primes\", \"2000\"]\n[spec.resources]\nmemory = \"32Mi\"";
        std::fs::write(&file, manifest_for(&cmd, a.arch, body)).unwrap();
        let started = Instant::now();
        hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
        hub.wait(&cmd, "Succeeded");
        let command_time = started.elapsed();
        let w = hub.workload(&cmd).unwrap();
        assert_eq!(w["status"]["replicas"][0]["node"], a.node);
        let logs = hub.ctl(&["logs", &cmd]);
        assert!(logs.contains(&format!("running on {}", a.node)) && logs.contains("tick 2"), "{logs}");
        // The same answer as everywhere: the engine computes correctly, not just runs.
        assert!(logs.contains("303 primes below 2000"), "{logs}");

        // A wasi:http service, answering through this agent's proxy.
        let svc = format!("web-{}", a.node);
        let file = t.path().join(format!("{svc}.toml"));
        let body = format!(
            "[spec.wasm]\ncomponent = \"hello-http.wasm\"\n[spec.resources]\nmemory = \"16Mi\"\n[spec.http]\nhosts = [\"{svc}.local\"]"
        );
        std::fs::write(&file, manifest_for(&svc, a.arch, &body)).unwrap();
        let started = Instant::now();
        hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
        hub.wait(&svc, "Running");
        let (st, b) = get(&agent.proxy(), &format!("{svc}.local"), "/");
        let service_time = started.elapsed();
        assert_eq!((st, b.trim()), (200, format!("Hello from {svc} v1 on {}", a.node).as_str()));
        let t0 = Instant::now();
        let n = 20;
        for _ in 0..n {
            assert_eq!(get(&agent.proxy(), &format!("{svc}.local"), "/").0, 200);
        }
        // The x86-64 hub compiled both for this target; the agent compiled nothing.
        for w in [&cmd, &svc] {
            let compiled = hub.workload(w).unwrap()["compiled"].clone();
            let ok =
                compiled.as_array().is_some_and(|c| c.iter().any(|c| c["target"] == a.target && c["state"] == "Ready"));
            assert!(ok, "{w}: {compiled}");
        }
        let log = agent.proc.log_text();
        assert!(log.contains("compiled code from the hub") && !log.contains("compiling here"), "{log}");
        eprintln!(
            "{} ({} under qemu): command applied to Succeeded in {:?}; service applied to first answer in {:?}; then {:?} per request",
            a.arch,
            a.mode,
            command_time,
            service_time,
            t0.elapsed() / n
        );
    }

    // A component the hub cannot compile: an agent without a compiler
    // refuses it, and says why.
    std::fs::write(t.path().join("junk.wasm"), b"\0asm\x0d\x00\x01\x00this is not a component").unwrap();
    for a in &ARCHES {
        let name = format!("junk-{}", a.node);
        let file = t.path().join(format!("{name}.toml"));
        let body = "[spec]\nrestart = \"never\"\n[spec.wasm]\ncomponent = \"junk.wasm\"";
        std::fs::write(&file, manifest_for(&name, a.arch, body)).unwrap();
        hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
        hub.wait(&name, "Failed");
        let r = hub.workload(&name).unwrap()["status"]["replicas"][0].clone();
        assert_eq!(r["reason"], "NoCompiler", "{r}");
        let m = r["message"].as_str().unwrap_or("");
        assert!(m.contains("this agent has no compiler") && m.contains("failed"), "{r}");
        hub.ctl(&["delete", "workload", &name]);
    }

    // No node has this architecture: the reason says so.
    let file = t.path().join("nowhere.toml");
    std::fs::write(&file, manifest_for("nowhere", "riscv64", "[spec.wasm]\ncomponent = \"hello.wasm\"")).unwrap();
    hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
    let w = wait_for("the reason", || hub.workload("nowhere").filter(|w| w["status"]["reason"] == "Unschedulable"));
    assert!(w["status"]["message"].as_str().unwrap().contains("architecture not allowed"), "{w}");

    // Delete: the agents stop the services and forget them.
    for a in &ARCHES {
        hub.ctl(&["delete", "workload", &format!("web-{}", a.node), &format!("hello-{}", a.node)]);
    }
    for (a, agent) in ARCHES.iter().zip(&agents) {
        let host = format!("web-{}.local", a.node);
        wait_for("the route to go", || (get(&agent.proxy(), &host, "/").0 == 404).then_some(()));
        assert!(hub.node(a.node).unwrap()["workloads"].as_array().unwrap().is_empty());
    }
}
