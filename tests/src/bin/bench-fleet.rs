//! Idle control traffic of one agent running ten workloads with health
//! probes, one of them fenced by its lease (`reschedule_after`, so the node
//! sends heartbeats three times per fence and the hub acknowledges each),
//! with production defaults: TLS, heartbeat 60 s, keep-alive 30 s. Probes
//! run on the node; only changes travel.
//!
//! `cargo build --release --workspace && target/release/bench-fleet [--idle-secs N] [--heartbeat 60s] [--keepalive 30s] [--reschedule-after 120s|none]`

use std::time::Duration;

use edge_tests::*;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let idle_secs: u64 = arg("--idle-secs").and_then(|v| v.parse().ok()).unwrap_or(300);
    let heartbeat = arg("--heartbeat").unwrap_or_else(|| "60s".into());
    let keepalive = arg("--keepalive").unwrap_or_else(|| "30s".into());
    let reschedule = arg("--reschedule-after").unwrap_or_else(|| "120s".into());
    let t = TempDir::new("bench-fleet");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some(heartbeat.clone()), ..Default::default() });
    let agent = Agent::start(t.path(), "idle-1", &hub.mqtt_url, &hub.join, &["--keepalive", &keepalive]);
    hub.wait_node_state("idle-1", "Ready");
    std::fs::copy(repo().join("examples/hello-http.wasm"), t.path().join("hello-http.wasm")).unwrap();
    let health = "[spec.health.readiness]\nhttp = { path = \"/\" }\nperiod = \"2s\"\n[spec.health.liveness]\nhttp = { path = \"/\" }\nperiod = \"5s\"\n";
    for i in 0..5 {
        let host = format!("s{i}.local");
        let m = service_manifest(&format!("svc-{i}"), "hello-http.wasm", &[&host], &["/"], "") + health;
        hub.ctl(&["apply", "-f", manifest(t.path(), &format!("svc-{i}.toml"), &m).to_str().unwrap()]);
    }
    for i in 0..4 {
        let m = hello_manifest(&format!("cmd-{i}"), &["--forever", "--interval-ms", "10000"], "always");
        hub.ctl(&["apply", "-f", manifest(t.path(), &format!("cmd-{i}.toml"), &m).to_str().unwrap()]);
    }
    let policy = match reschedule.as_str() {
        "none" => String::new(),
        r => format!("[spec.node_loss]\nreschedule_after = \"{r}\"\nsingleton = true\n"),
    };
    let fenced = hello_manifest("leader", &["--forever", "--interval-ms", "10000"], "always") + &policy;
    hub.ctl(&["apply", "-f", manifest(t.path(), "leader.toml", &fenced).to_str().unwrap()]);
    for w in ["svc-0", "svc-1", "svc-2", "svc-3", "svc-4", "cmd-0", "cmd-1", "cmd-2", "cmd-3", "leader"] {
        hub.wait(w, "Ready");
    }
    // Let the last status changes settle.
    std::thread::sleep(Duration::from_secs(10));
    let port: u16 = hub.mqtt_url.rsplit(':').next().unwrap().parse().unwrap();
    let pid = agent.proc.pid();
    let (s0, r0) = tcp_bytes(port, pid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (s1, r1) = tcp_bytes(port, pid);
    let (sent, received) = ((s1 - s0) as f64 / idle_secs as f64, (r1 - r0) as f64 / idle_secs as f64);
    println!(
        "idle traffic per agent, 10 workloads with probes, reschedule_after {reschedule} on one (TLS, heartbeat {heartbeat}, keep-alive {keepalive}): {sent:.1} B/s sent, {received:.1} B/s received = {:.2} MB/day",
        (sent + received) * 86400.0 / 1e6
    );
}
