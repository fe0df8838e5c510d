//! The hub's cost per change as the fleet grows: `--nodes` simulated nodes
//! (edge-sim's, on the real protocol) join, then `--workloads` workloads
//! are applied one after another over one kept-alive API connection. It
//! reports, per block of applies, the latency of an apply (p50/p99), the
//! hub's resident memory and CPU, and at the end the memory per workload
//! and whether every replica was placed and every node applied its state.
//!
//! With `--connections N`, N clients apply at once (each its share, on its
//! own connection): what group commit gives when changes come together.
//!
//! The nodes enrol at `--join-rate` per second; all connect from
//! 127.0.0.1, so the hub's broker is told to admit that many from one
//! address.
//!
//! With `--mosquitto`, the hub and the nodes use a Mosquitto (the
//! production setup for large fleets) instead of the embedded broker, and
//! its memory and CPU are reported too. With `--restart` (and
//! `--mosquitto`), the hub is killed (kill -9) at the end and started
//! again: how long until every node's desired state is published again,
//! and every node Ready.
//!
//! `cargo build --release --workspace && target/release/bench-hub [--nodes 100] [--workloads 4000] [--replicas 1] [--block 1000] [--connections 1] [--join-rate 200] [--heartbeat 30s] [--mosquitto] [--restart]`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edge_tests::*;

fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One kept-alive plain HTTP/1.1 connection to the hub's API.
struct Api {
    conn: BufReader<TcpStream>,
    token: String,
}

impl Api {
    fn open(addr: &str, token: &str) -> Api {
        let s = TcpStream::connect(addr).expect("connect to the hub");
        s.set_nodelay(true).ok();
        Api { conn: BufReader::new(s), token: token.to_string() }
    }

    /// A request; answers (status, body).
    fn call(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.token,
            body.len()
        );
        let w = self.conn.get_mut();
        w.write_all(head.as_bytes()).unwrap();
        w.write_all(body).unwrap();
        w.flush().unwrap();
        let mut status = String::new();
        self.conn.read_line(&mut status).unwrap();
        let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("an HTTP status");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.conn.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        self.conn.read_exact(&mut body).unwrap();
        (code, body)
    }
}

impl Api {
    /// Applies `template` as workload `w<i>`; answers how long it took.
    fn apply_copy(&mut self, template: &mut serde_json::Value, i: usize) -> Duration {
        let name = format!("w{i}");
        template["metadata"] = serde_json::json!({"name": name});
        let body = serde_json::to_vec(&template).unwrap();
        let t0 = Instant::now();
        let (code, answer) = self.call("PUT", &format!("/v1/workloads/{name}"), &body);
        let took = t0.elapsed();
        assert!(code == 201 || code == 200, "apply {name}: {code} {}", String::from_utf8_lossy(&answer));
        took
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn switch(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Nodes the hub sees Ready.
fn ready_nodes(api: &mut Api) -> usize {
    let (code, body) = api.call("GET", "/v1/nodes", b"");
    assert_eq!(code, 200);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    list.iter().filter(|n| n["state"] == "Ready").count()
}

fn main() {
    let _ = edge_listen::raise_open_files_limit();
    let nodes = flag("--nodes", 100);
    let workloads = flag("--workloads", 4000);
    let replicas = flag("--replicas", 1);
    let block = flag("--block", 1000).max(1);
    let connections = flag("--connections", 1).max(1);
    let t = TempDir::new("bench-hub");
    let join_rate = flag("--join-rate", 200);
    let admit = (nodes + 100).to_string();
    let extra: Vec<String> =
        ["--insecure-plaintext", "--mqtt-max-connections", &admit, "--mqtt-max-connections-per-address", &admit]
            .iter()
            .map(|s| s.to_string())
            .collect();
    // Production's heartbeat, not the tests' quick one.
    let heartbeat = std::env::args().skip_while(|a| a != "--heartbeat").nth(1).unwrap_or_else(|| "30s".into());
    let mosquitto = switch("--mosquitto").then(|| {
        let port = free_port();
        // Anonymous: the measurement is of the broker's load, not its logins.
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nmax_keepalive 600"
        );
        (run_mosquitto(t.path(), port, &conf), port)
    });
    let broker = mosquitto.as_ref().map(|(_, port)| format!("mqtt://127.0.0.1:{port}"));
    let mut hub = Hub::start(
        t.path(),
        HubOpts { extra, heartbeat: Some(heartbeat), broker: broker.clone(), ..Default::default() },
    );
    let pid = hub.proc.pid();
    let broker_pid = mosquitto.as_ref().map(|(p, _)| p.pid());
    let started = Instant::now();
    let cpu0 = cpu_time(pid);
    let broker_cpu0 = broker_pid.map(cpu_time);
    let agents_broker = broker.clone().unwrap_or_else(|| hub.mqtt_url.clone());
    let fleet = edge_tests::sim::Running::start_at(&agents_broker, &hub.join, "sim", nodes, join_rate);
    let mut api = Api::open(&hub.api_addr(), &hub.token);
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let ready = ready_nodes(&mut api);
        if ready == nodes {
            break;
        }
        assert!(Instant::now() < deadline, "{ready}/{nodes} nodes Ready after 15 minutes");
        std::thread::sleep(Duration::from_millis(500));
    }
    let broker_line = |cpu_from: Option<Duration>| match (broker_pid, cpu_from) {
        (Some(b), Some(c0)) => format!(
            "; Mosquitto RSS {:.1} MiB, CPU {:.1}s",
            rss_kib(b) as f64 / 1024.0,
            (cpu_time(b) - c0).as_secs_f64()
        ),
        _ => String::new(),
    };
    println!(
        "{nodes} simulated nodes Ready in {:.1}s (joining at {join_rate}/s); hub{} RSS {:.1} MiB, CPU {:.1}s{}",
        started.elapsed().as_secs_f64(),
        if broker_pid.is_some() { "" } else { " (with its broker)" },
        rss_kib(pid) as f64 / 1024.0,
        (cpu_time(pid) - cpu0).as_secs_f64(),
        broker_line(broker_cpu0)
    );
    // Steady state: heartbeats and leases only.
    let (cpu1, idle) = (cpu_time(pid), Duration::from_secs(20));
    let broker_cpu1 = broker_pid.map(cpu_time);
    std::thread::sleep(idle);
    println!(
        "steady state: hub CPU {:.1}% of one core over {}s{}",
        (cpu_time(pid) - cpu1).as_secs_f64() * 100.0 / idle.as_secs_f64(),
        idle.as_secs(),
        match (broker_pid, broker_cpu1) {
            (Some(b), Some(c1)) =>
                format!("; Mosquitto {:.1}%", (cpu_time(b) - c1).as_secs_f64() * 100.0 / idle.as_secs_f64()),
            _ => String::new(),
        }
    );
    // (The hub closed the idle connection meanwhile.)
    let mut api = Api::open(&hub.api_addr(), &hub.token);

    // The first workload through edgectl (it uploads the component); the
    // rest as copies of it, over the API.
    std::fs::copy(repo().join("examples/hello.wasm"), t.path().join("hello.wasm")).unwrap();
    let m = manifest(t.path(), "w0.toml", &hello_manifest("w0", &["--ticks", "1"], "never"));
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    let (code, body) = api.call("GET", "/v1/workloads/w0", b"");
    assert_eq!(code, 200);
    let mut template: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for k in ["status", "events", "compiled"] {
        template.as_object_mut().unwrap().remove(k);
    }
    template["spec"]["replicas"] = serde_json::json!(replicas);
    template["spec"]["resources"] = serde_json::json!({"memory": "1Mi", "cpu": "1m"});
    let base_kib = rss_kib(pid);
    let base_cpu = cpu_time(pid);
    if connections > 1 {
        let all = Instant::now();
        let lat: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..connections)
                .map(|c| {
                    let mut template = template.clone();
                    let (addr, token) = (hub.api_addr(), hub.token.clone());
                    s.spawn(move || {
                        let mut api = Api::open(&addr, &token);
                        let mut lat = Vec::new();
                        for i in (1..=workloads).filter(|i| i % connections == c) {
                            lat.push(api.apply_copy(&mut template, i));
                        }
                        lat
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let took = all.elapsed();
        let mut lat = lat;
        lat.sort();
        let at = |q: f64| ms(lat[((lat.len() as f64 - 1.0) * q) as usize]);
        println!(
            "{workloads} applies from {connections} clients at once in {:.1}s ({:.0}/s): p50 {:.2} ms, p99 {:.2} ms; hub RSS {:.1} MiB, CPU {:.1}s",
            took.as_secs_f64(),
            workloads as f64 / took.as_secs_f64(),
            at(0.5),
            at(0.99),
            rss_kib(pid) as f64 / 1024.0,
            (cpu_time(pid) - base_cpu).as_secs_f64()
        );
        drop(fleet);
        return;
    }
    println!("applying {workloads} workloads of {replicas} replica(s) each, one after another:");
    println!("  {:>7}  {:>9}  {:>9}  {:>9}  {:>9}", "applied", "p50 ms", "p99 ms", "RSS MiB", "CPU s");
    let mut lat = Vec::with_capacity(block);
    let all = Instant::now();
    for i in 1..=workloads {
        lat.push(api.apply_copy(&mut template, i));
        if i % block == 0 || i == workloads {
            lat.sort();
            let at = |q: f64| ms(lat[((lat.len() as f64 - 1.0) * q) as usize]);
            println!(
                "  {i:>7}  {:>9.2}  {:>9.2}  {:>9.1}  {:>9.1}",
                at(0.5),
                at(0.99),
                rss_kib(pid) as f64 / 1024.0,
                (cpu_time(pid) - base_cpu).as_secs_f64()
            );
            lat.clear();
        }
    }
    let took = all.elapsed();
    let per = (rss_kib(pid).saturating_sub(base_kib)) as f64 * 1024.0 / workloads as f64;
    println!(
        "{workloads} applies in {:.1}s ({:.0}/s); hub RSS grew {:.1} KB per workload",
        took.as_secs_f64(),
        workloads as f64 / took.as_secs_f64(),
        per / 1000.0
    );
    // Every replica placed, and the fleet told.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, body) = api.call("GET", "/v1/workloads", b"");
        let list: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        let placed: usize = list
            .iter()
            .flat_map(|w| w["status"]["replicas"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["node"].is_string())
            .count();
        if placed >= (workloads) * replicas {
            println!("all {} replicas placed; {} nodes applied a desired state", placed, fleet.stats().applied());
            break;
        }
        if Instant::now() > deadline {
            println!("after 5 minutes: {placed} of {} replicas placed", workloads * replicas);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !switch("--restart") {
        return;
    }
    let Some((_, port)) = mosquitto else {
        println!("--restart measures through a Mosquitto: add --mosquitto");
        return;
    };
    // What reaches the broker live (not retained copies): a topic per line.
    let mut sub = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-R", "-F", "%t"])
        .args(["-t", "edge/v1/nodes/+/desired"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (mosquitto-clients)");
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let out = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut seen = std::collections::HashSet::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if seen.insert(line) && seen.len() == nodes {
                let _ = tx.send(Instant::now());
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    hub.restart(true);
    let restarted = killed.elapsed();
    let all = rx.recv_timeout(Duration::from_secs(300)).map(|at| at.duration_since(killed));
    let mut api = Api::open(&hub.api_addr(), &hub.token);
    let ready_by = loop {
        if ready_nodes(&mut api) == nodes || killed.elapsed() > Duration::from_secs(300) {
            break killed.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "hub killed and started again: serving after {:.1}s; every node's desired state published again after {}; every node Ready after {:.1}s",
        restarted.as_secs_f64(),
        all.map(|d| format!("{:.1}s", d.as_secs_f64())).unwrap_or_else(|_| "(not within 5 minutes)".into()),
        ready_by.as_secs_f64()
    );
    let _ = sub.kill();
    let _ = sub.wait();
}
