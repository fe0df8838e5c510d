//! Measures the spine with the binaries next to this one (build with
//! `--release` for real numbers):
//!
//! - agent resident memory idle (no workloads) and with workloads;
//! - idle control traffic of one agent (bytes on its MQTT connection);
//! - latency from applying a workload (component cached on the agent) to
//!   the hub reporting it Running, through the API and through `edgectl`;
//! - bytes the agent writes per reconcile (flash wear).
//!
//! `cargo build --release --workspace && target/release/bench-spine [--idle-secs N]`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edge_tests::*;

fn http(method: &str, base: &str, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).expect("connect to the hub");
    s.set_nodelay(true).ok();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn io_field(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn manifest_json(name: &str, digest: &str, env: &str) -> String {
    format!(
        r#"{{"api_version":"edge/v1","kind":"Workload","metadata":{{"name":"{name}"}},"spec":{{"restart":"always","wasm":{{"component":"{digest}","args":["--forever","--interval-ms","1000"],"env":{{"ITER":"{env}"}}}},"resources":{{"memory":"16Mi","cpu":"10m"}}}}}}"#
    )
}

fn main() {
    let idle_secs: u64 =
        std::env::args().skip_while(|a| a != "--idle-secs").nth(1).and_then(|v| v.parse().ok()).unwrap_or(30);
    let t = TempDir::new("bench");
    // Production defaults: heartbeat 15 s, keep-alive 5 s.
    // Plain HTTP: this measures the spine, and writes raw requests (TLS vs
    // plain is bench-api's).
    let hub = Hub::start(
        t.path(),
        HubOpts { heartbeat: Some("15s".into()), extra: vec!["--insecure-plaintext".into()], ..Default::default() },
    );
    let agent = Agent::start(t.path(), "bench-1", &hub.mqtt_url, &hub.join, &["--keepalive", "5s"]);
    hub.wait_node_state("bench-1", "Ready");
    let apid = agent.proc.pid();
    let broker_port: u16 = hub.mqtt_url.rsplit(':').next().unwrap().parse().unwrap();
    for b in ["edge-hub", "edge-agent", "edgectl"] {
        let size = std::fs::metadata(bin(b)).map(|m| m.len()).unwrap_or(0);
        println!("binary {b}: {:.1} MiB", size as f64 / (1 << 20) as f64);
    }

    std::thread::sleep(Duration::from_secs(2));
    println!("agent RSS, joined, no workloads: {:.1} MiB", rss_kib(apid) as f64 / 1024.0);
    println!("hub RSS, one node, no workloads: {:.1} MiB", rss_kib(hub.proc.pid()) as f64 / 1024.0);

    // Idle control traffic: nothing deployed, only keep-alives and heartbeats.
    let (s0, r0) = tcp_bytes(broker_port, apid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (s1, r1) = tcp_bytes(broker_port, apid);
    let per_s = ((s1 - s0) + (r1 - r0)) as f64 / idle_secs as f64;
    println!(
        "idle MQTT traffic per agent (heartbeat 15s, keep-alive 5s; MQTT bytes on TCP, both directions): {:.0} B/s sent {:.0} B/s received = {:.1} MB/day",
        (s1 - s0) as f64 / idle_secs as f64,
        (r1 - r0) as f64 / idle_secs as f64,
        per_s * 86400.0 / 1e6
    );

    let wasm = std::fs::read(repo().join("examples/hello.wasm")).unwrap();
    let digest = edge_api::digest::Digest::of(&wasm).to_string();
    let (st, body) = http("PUT", &hub.api_url, &format!("/v1/artifacts/{digest}"), &hub.token, &wasm);
    assert!(st == 200 || st == 201, "upload: {st} {body}");

    // Warm up: the first run compiles the component.
    let put = |name: &str, env: &str| {
        let (st, body) = http(
            "PUT",
            &hub.api_url,
            &format!("/v1/workloads/{name}"),
            &hub.token,
            manifest_json(name, &digest, env).as_bytes(),
        );
        assert!(st == 200 || st == 201, "apply: {st} {body}");
    };
    let wait_running = |name: &str| {
        let (st, body) = http(
            "GET",
            &hub.api_url,
            &format!("/v1/workloads/{name}/wait?for=Running&timeout_ms=30000"),
            &hub.token,
            b"",
        );
        assert_eq!(st, 200, "wait: {body}");
    };
    let started = Instant::now();
    put("bench", "0");
    wait_running("bench");
    println!("first apply to Running, compiling the component: {:.0} ms", started.elapsed().as_secs_f64() * 1000.0);
    std::thread::sleep(Duration::from_millis(500));
    println!("agent RSS, one workload running: {:.1} MiB", rss_kib(apid) as f64 / 1024.0);

    // Update: a new generation of a running workload (stop, start).
    let (w0, b0) = (io_field(apid, "wchar"), io_field(apid, "write_bytes"));
    let mut update = Vec::new();
    let n = 40;
    for i in 1..=n {
        let t0 = Instant::now();
        put("bench", &i.to_string());
        wait_running("bench");
        update.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let (w1, b1) = (io_field(apid, "wchar"), io_field(apid, "write_bytes"));
    println!("apply (update) to Running via API: {}", percentiles(update));
    println!(
        "agent writes per update reconcile: {} B through write(2) (includes logs), {} B to the block device",
        (w1 - w0) / n,
        (b1 - b0) / n
    );

    // Create: a new workload whose component is already cached.
    let mut create = Vec::new();
    for i in 0..20 {
        let name = format!("c{i}");
        let t0 = Instant::now();
        put(&name, "x");
        wait_running(&name);
        create.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    println!("apply (new workload) to Running via API: {}", percentiles(create));
    println!("agent RSS, 21 workloads running: {:.1} MiB", rss_kib(apid) as f64 / 1024.0);

    // The same through edgectl (process start, TOML parse, HEAD, PUT, wait).
    std::fs::copy(repo().join("examples/hello.wasm"), t.path().join("hello.wasm")).unwrap();
    let mut ctl = Vec::new();
    for i in 0..15 {
        let toml = format!("{}[spec.wasm.env]\nITER = \"{i}\"\n", hello_manifest("ctl", &["--forever"], "always"));
        let m = manifest(t.path(), "m.toml", &toml);
        let t0 = Instant::now();
        hub.ctl(&["apply", "-f", m.to_str().unwrap(), "--wait"]);
        ctl.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    println!("`edgectl apply --wait` wall time (update): {}", percentiles(ctl));
}
