//! A per-node rollout across many nodes on this machine: time from apply
//! to done, the hub's CPU time, and the bytes on the nodes' MQTT
//! connections (both ways) during it. The nodes are real agents, or with
//! `--sim` simulated ones (`edge_tests::sim`: the real protocol, nothing
//! run), which lets one machine hold hundreds.
//!
//! `cargo build --release --workspace && target/release/bench-rollout [--nodes 100] [--sim]`

use std::time::{Duration, Instant};

use edge_tests::*;

fn main() {
    let nodes: usize =
        std::env::args().skip_while(|a| a != "--nodes").nth(1).and_then(|v| v.parse().ok()).unwrap_or(100);
    let simulated = std::env::args().any(|a| a == "--sim");
    let t = TempDir::new("bench-rollout");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("5s".into()), ..Default::default() });
    let port: u16 = hub.mqtt_url.rsplit(':').next().unwrap().parse().unwrap();
    let (agents, sim): (Vec<Agent>, Option<sim::Running>) = if simulated {
        (Vec::new(), Some(sim::Running::start(&hub.mqtt_url, &hub.join, "n", nodes)))
    } else {
        let agents = (0..nodes)
            .map(|i| Agent::start(t.path(), &format!("n{i:03}"), &hub.mqtt_url, &hub.join, &["--keepalive", "5s"]))
            .collect();
        (agents, None)
    };
    // Many agents joining at once on a small machine take a while.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let ready =
            hub.json(&["get", "nodes"]).as_array().map_or(0, |n| n.iter().filter(|n| n["state"] == "Ready").count());
        if ready == nodes {
            break;
        }
        assert!(Instant::now() < deadline, "only {ready} of {nodes} nodes Ready after 15 minutes");
        std::thread::sleep(Duration::from_secs(2));
    }
    let fleet = |interval: &str| {
        hello_manifest("fleet", &["--forever", "--interval-ms", interval], "always")
            .replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n")
            + "[spec.rollout]\ncanary = 1\nbatch = \"25%\"\nprogress_deadline = \"5m\"\n"
    };
    hub.ctl(&["apply", "-f", manifest(t.path(), "fleet.toml", &fleet("10000")).to_str().unwrap()]);
    hub.ctl(&["rollout", "status", "fleet", "--timeout", "10m"]);
    std::thread::sleep(Duration::from_secs(5));
    // Every node's side of its connection to the broker (one `ss` for all).
    let pids: std::collections::BTreeSet<String> = if simulated {
        [format!("pid={},", std::process::id())].into()
    } else {
        agents.iter().map(|a| format!("pid={},", a.proc.pid())).collect()
    };
    let bytes = || -> u64 {
        let out = std::process::Command::new("ss").args(["-tinpH", "state", "established"]).output().expect("ss");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // A socket's line, then its info on lines that start with blanks.
        let mut sockets: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            match sockets.last_mut() {
                Some((_, info)) if line.starts_with([' ', '\t']) => info.push_str(line),
                _ => sockets.push((line.to_string(), String::new())),
            }
        }
        let mut total = 0;
        for (l, info) in &sockets {
            let peer = l.split_whitespace().nth(3).unwrap_or("");
            let agent = l
                .split("users:")
                .nth(1)
                .and_then(|u| u.split("pid=").nth(1))
                .map(|p| format!("pid={}", p.split(',').next().unwrap_or("")) + ",");
            if peer.ends_with(&format!(":{port}")) && agent.is_some_and(|p| pids.contains(&p)) {
                let field = |name: &str| {
                    info.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                total += field("bytes_acked:") + field("bytes_received:");
            }
        }
        total
    };
    let (cpu0, b0, t0) = (cpu_time(hub.proc.pid()), bytes(), Instant::now());
    hub.ctl(&["apply", "-f", manifest(t.path(), "fleet.toml", &fleet("9000")).to_str().unwrap()]);
    hub.ctl(&["rollout", "status", "fleet", "--timeout", "10m"]);
    let took = t0.elapsed();
    let (cpu1, b1) = (cpu_time(hub.proc.pid()), bytes());
    let view = hub.json(&["rollout", "status", "fleet"]);
    let waves = view["wave"].clone();
    let ready =
        hub.json(&["get", "nodes"]).as_array().map_or(0, |n| n.iter().filter(|n| n["state"] == "Ready").count());
    println!("{ready} of {nodes} nodes Ready; {}", view["message"]);
    assert_eq!(ready, nodes, "nodes fell out during the measurement (files kept)");
    println!(
        "per-node rollout to {nodes} {} nodes ({waves} waves): {:.1} s; hub CPU {:.2} s; {:.1} KiB on the nodes' connections, both ways ({:.0} B per node)",
        if simulated { "simulated" } else { "agent" },
        took.as_secs_f64(),
        (cpu1 - cpu0).as_secs_f64(),
        (b1 - b0) as f64 / 1024.0,
        (b1 - b0) as f64 / nodes as f64
    );
    drop(sim);
}
