//! A per-node rollout across many real agents on this machine: time from
//! apply to done, the hub's CPU time, and the bytes on the agents' MQTT
//! connections (both ways) during it.
//!
//! `cargo build --release --workspace && target/release/bench-rollout [--nodes 100]`

use std::time::{Duration, Instant};

use edge_tests::*;

fn main() {
    let nodes: usize =
        std::env::args().skip_while(|a| a != "--nodes").nth(1).and_then(|v| v.parse().ok()).unwrap_or(100);
    let t = TempDir::new("bench-rollout");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("5s".into()), ..Default::default() });
    let port: u16 = hub.mqtt_url.rsplit(':').next().unwrap().parse().unwrap();
    let agents: Vec<Agent> = (0..nodes)
        .map(|i| Agent::start(t.path(), &format!("n{i:03}"), &hub.mqtt_url, &hub.join, &["--keepalive", "5s"]))
        .collect();
    for i in 0..nodes {
        hub.wait_node_state(&format!("n{i:03}"), "Ready");
    }
    let fleet = |interval: &str| {
        hello_manifest("fleet", &["--forever", "--interval-ms", interval], "always")
            .replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n")
            + "[spec.rollout]\ncanary = 1\nbatch = \"25%\"\nprogress_deadline = \"5m\"\n"
    };
    hub.ctl(&["apply", "-f", manifest(t.path(), "fleet.toml", &fleet("10000")).to_str().unwrap()]);
    hub.ctl(&["rollout", "status", "fleet", "--timeout", "10m"]);
    std::thread::sleep(Duration::from_secs(5));
    let bytes = || -> u64 {
        agents
            .iter()
            .map(|a| {
                let (s, r) = tcp_bytes(port, a.proc.pid());
                s + r
            })
            .sum()
    };
    let (cpu0, b0, t0) = (cpu_time(hub.proc.pid()), bytes(), Instant::now());
    hub.ctl(&["apply", "-f", manifest(t.path(), "fleet.toml", &fleet("9000")).to_str().unwrap()]);
    hub.ctl(&["rollout", "status", "fleet", "--timeout", "10m"]);
    let took = t0.elapsed();
    let (cpu1, b1) = (cpu_time(hub.proc.pid()), bytes());
    let waves = hub.json(&["rollout", "status", "fleet"])["wave"].clone();
    println!(
        "per-node rollout to {nodes} nodes ({waves} waves): {:.1} s; hub CPU {:.2} s; {:.1} KiB on the agents' connections ({:.0} B per node)",
        took.as_secs_f64(),
        (cpu1 - cpu0).as_secs_f64(),
        (b1 - b0) as f64 / 1024.0,
        (b1 - b0) as f64 / nodes as f64
    );
}
