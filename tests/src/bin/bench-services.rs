//! Benchmarks of Wasm services behind the agent's proxy, each against a
//! peer in the same run (build with `--release`; needs `wrk`, and the
//! wasmtime CLI 48 for the first):
//!
//! 1. proxy → component vs `wasmtime serve`, same component, same load;
//! 2. proxy overhead for a plain HTTP backend vs connecting directly;
//! 3. density: many deployed services on one agent, RSS per workload.
//!
//! `target/release/bench-services [--wasmtime PATH] [--secs N] [--density N] [--max-instances N] [--only NAME]`

use std::process::Command;
use std::time::{Duration, Instant};

use edge_tests::*;

struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn us(s: &str) -> f64 {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v,
        "ms" => v * 1000.0,
        "s" => v * 1e6,
        _ => f64::NAN,
    }
}

/// Runs wrk and parses requests/s, p50, p99 and errors.
fn wrk(url: &str, host: &str, conns: u32, secs: u64) -> Load {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency", "-H", &format!("Host: {host}"), url])
        .output()
        .expect("wrk is not installed: apt-get install wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()));
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let p50 = field("50%").map(|v| us(&v)).unwrap_or(f64::NAN);
    let p99 = field("99%").map(|v| us(&v)).unwrap_or(f64::NAN);
    let non2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let socket = text
        .lines()
        .find(|l| l.contains("Socket errors"))
        .map(|l| l.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum::<u64>());
    Load { rps, p50_us: p50, p99_us: p99, errors: non2xx + socket.unwrap_or(0) }
}

fn report(name: &str, l: &Load) {
    println!(
        "  {name:<34} {:>9.0} req/s   p50 {:>8.1} µs   p99 {:>9.1} µs   errors {}",
        l.rps, l.p50_us, l.p99_us, l.errors
    );
}

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let secs: u64 = arg("--secs").and_then(|v| v.parse().ok()).unwrap_or(10);
    let density: usize = arg("--density").and_then(|v| v.parse().ok()).unwrap_or(1000);
    // The example's own is 32: as many as wrk's connections.
    let max_instances: u32 = arg("--max-instances").and_then(|v| v.parse().ok()).unwrap_or(256);
    let only = arg("--only");
    let wasmtime = arg("--wasmtime").unwrap_or_else(|| "/opt/wasmtime-48/bin/wasmtime".into());
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);

    let t = TempDir::new("bench-services");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("15s".into()), ..Default::default() });
    let upstream = backend("ok");
    let agent = Agent::start(
        t.path(),
        "bench-1",
        &hub.mqtt_url,
        &hub.join,
        &["--keepalive", "5s", "--route", &format!("plain.local=http://{upstream}")],
    );
    hub.wait_node_state("bench-1", "Ready");
    let proxy = agent.proxy();
    example(t.path(), "hello-http.wasm");
    let component = t.path().join("hello-http.wasm");

    if run("serve") {
        println!("1. the hello-http component: agent proxy vs wasmtime serve (wrk -t2 -c32 -d{secs}s, same machine)");
        let m = t.path().join("bench.toml");
        std::fs::write(
            &m,
            service_manifest(
                "bench",
                "hello-http.wasm",
                &["bench.local"],
                &["/"],
                &format!("max_instances = {max_instances}\ncpu_budget = \"1s\""),
            )
            .replace("cpu = \"50m\"", "cpu = \"1\""),
        )
        .unwrap();
        hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
        hub.wait("bench", "Running");
        // The peer in its default configuration, and with its pooling allocator.
        let mut peers = Vec::new();
        for (label, opts) in
            [("wasmtime serve", vec![]), ("wasmtime serve -O pooling-allocator", vec!["-O", "pooling-allocator=y"])]
        {
            let port = free_port();
            let mut serve = Proc::spawn(
                label,
                Command::new(&wasmtime)
                    .args(["serve", "-Scli", "--addr", &format!("127.0.0.1:{port}")])
                    .args(&opts)
                    .arg(&component),
                t.path().join(format!("wasmtime-serve-{port}.log")),
            );
            let addr = format!("127.0.0.1:{port}");
            wait_for("wasmtime serve to answer", || {
                if let Some(s) = serve.exited() {
                    panic!("wasmtime serve exited ({s}): {}", serve.log_text());
                }
                http(&addr, "GET", "x", "/", b"").ok().filter(|(s, _)| *s == 200).map(|_| ())
            });
            peers.push((label, serve, addr));
        }
        // Warm everyone, then measure in turn so all see the same machine.
        wrk(&format!("http://{proxy}/"), "bench.local", 32, 2);
        for (_, _, addr) in &peers {
            wrk(&format!("http://{addr}/"), "bench.local", 32, 2);
        }
        let ours = wrk(&format!("http://{proxy}/"), "bench.local", 32, secs);
        report("edge-agent proxy → component", &ours);
        for (label, serve, addr) in &mut peers {
            let theirs = wrk(&format!("http://{addr}/"), "bench.local", 32, secs);
            report(label, &theirs);
            println!(
                "    ratio edge/{label}: throughput {:.2}, p50 latency {:.2} (lower is better), p99 latency {:.2}",
                ours.rps / theirs.rps,
                ours.p50_us / theirs.p50_us,
                ours.p99_us / theirs.p99_us
            );
            serve.kill9();
        }
        hub.ctl(&["delete", "workload", "bench"]);
    }

    if run("overhead") {
        let rounds = 5;
        println!(
            "2. proxy overhead for a plain HTTP backend (wrk -t1 -c1, one request at a time; {rounds} alternating rounds of {}s)",
            secs.div_ceil(2)
        );
        // nginx, if installed, as the reference reverse proxy (upstream keep-alive on).
        let nginx_port = free_port();
        let nginx = std::path::Path::new("/usr/sbin/nginx").exists().then(|| {
            let dir = t.path().join("nginx");
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "worker_processes 1;\ndaemon off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  upstream b {{ server {upstream}; keepalive 16; }}\n  server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
                    d = dir.display()
                ),
            )
            .unwrap();
            let p = Proc::spawn("nginx", Command::new("/usr/sbin/nginx").arg("-c").arg(&conf), dir.join("out.log"));
            let addr = format!("127.0.0.1:{nginx_port}");
            wait_for("nginx to answer", || http(&addr, "GET", "x", "/", b"").ok().filter(|(s, _)| *s == 200).map(|_| ()));
            p
        });
        let p50 = |url: &str, host: &str, secs: u64| -> f64 {
            let out = Command::new("wrk")
                .args(["-t1", "-c1", &format!("-d{secs}s"), "--latency", "-H", &format!("Host: {host}"), url])
                .output()
                .expect("wrk");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.trim().strip_prefix("50%").map(us))
                .unwrap_or(f64::NAN)
        };
        let direct_url = format!("http://{upstream}/");
        let proxy_url = format!("http://{proxy}/");
        let nginx_url = format!("http://127.0.0.1:{nginx_port}/");
        p50(&direct_url, "plain.local", 1);
        p50(&proxy_url, "plain.local", 1);
        let (mut ours, mut theirs, mut base) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let d = p50(&direct_url, "plain.local", secs.div_ceil(2));
            let e = p50(&proxy_url, "plain.local", secs.div_ceil(2));
            base.push(d);
            ours.push(e - d);
            if nginx.is_some() {
                theirs.push(p50(&nginx_url, "plain.local", secs.div_ceil(2)) - d);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            v[v.len() / 2]
        };
        println!("  direct to the backend: p50 {:.1} µs (median of rounds)", median(&mut base));
        println!(
            "  added by the agent's proxy at p50: {:.1} µs (median; rounds {:?})",
            median(&mut ours.clone()),
            ours
        );
        if !theirs.is_empty() {
            println!(
                "  added by nginx at p50:             {:.1} µs (median; rounds {:?})",
                median(&mut theirs.clone()),
                theirs
            );
        }
        drop(nginx);
    }

    if run("density") && density > 0 {
        println!("3. density: {density} hello-http services on one agent");
        let before = rss_kib(agent.proc.pid());
        let started = Instant::now();
        for i in 0..density {
            let m = t.path().join("d.json");
            let manifest = serde_json::json!({
                "api_version": "edge/v1", "kind": "Workload",
                "metadata": {"name": format!("d{i}")},
                "spec": {
                    "wasm": {"component": "hello-http.wasm", "max_instances": 4},
                    "resources": {"memory": "4Mi", "cpu": "1m"},
                    "http": {"hosts": [format!("d{i}.local")]},
                },
            });
            std::fs::write(&m, manifest.to_string()).unwrap();
            hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
        }
        let applied = started.elapsed();
        wait_for("every service to run", || {
            let ws = hub.json(&["get", "workloads"]);
            let running = ws.as_array().unwrap().iter().filter(|w| w["status"]["phase"] == "Running").count();
            (running >= density).then_some(())
        });
        let all = started.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let after = rss_kib(agent.proc.pid());
        let mut ok = 0;
        for i in (0..density).step_by((density / 20).max(1)) {
            if get(&proxy, &format!("d{i}.local"), "/").0 == 200 {
                ok += 1;
            }
        }
        println!("  applied in {:.1} s, all Running after {:.1} s", applied.as_secs_f64(), all.as_secs_f64());
        println!(
            "  agent RSS {:.1} MiB before, {:.1} MiB after: {:.1} KiB per deployed service; {ok} of {} sampled services answered",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after.saturating_sub(before)) as f64 / density as f64,
            density.div_ceil((density / 20).max(1))
        );
        println!("  hub RSS {:.1} MiB", rss_kib(hub.proc.pid()) as f64 / 1024.0);
    }
}
