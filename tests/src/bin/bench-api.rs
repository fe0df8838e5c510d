//! The hub API's latency for `get workloads` with TLS (the default) against
//! plain HTTP (`--insecure-plaintext`), in the same run: two hubs with the
//! same workloads, each asked the same number of times, on a fresh
//! connection per request (TLS handshake included), on one kept-alive
//! connection, and through `edgectl` (a process per call).
//!
//! It also starts one agent on each hub and reports its resident memory,
//! joined and idle, and after a workload that uses a sealed secret ran.
//!
//! `cargo build --release --workspace && target/release/bench-api [--requests N] [--workloads N]`

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use edge_tests::*;

/// One API connection, plain or TLS (trusting the hub's CA).
enum Conn {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>>),
}

impl Conn {
    fn open(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Conn {
        let s = TcpStream::connect(addr).expect("connect to the hub");
        s.set_nodelay(true).ok();
        match tls {
            None => Conn::Plain(BufReader::new(s)),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap().to_owned();
                let c = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
                Conn::Tls(Box::new(BufReader::new(rustls::StreamOwned::new(c, s))))
            }
        }
    }

    fn reader(&mut self) -> &mut dyn BufRead {
        match self {
            Conn::Plain(r) => r,
            Conn::Tls(r) => r.as_mut(),
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Conn::Plain(r) => r.get_mut(),
            Conn::Tls(r) => r.get_mut(),
        }
    }

    /// GET `path`; returns the body's length (the status must be 200).
    fn get(&mut self, path: &str, token: &str) -> usize {
        let req = format!("GET {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\r\n");
        self.writer().write_all(req.as_bytes()).unwrap();
        self.writer().flush().unwrap();
        let r = self.reader();
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        len
    }
}

fn tls_config(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Anonymous (heap and stack) memory of a process, in KiB.
fn anon_kib(pid: i32) -> u64 {
    proc_kib(pid, "smaps_rollup", "Anonymous:")
}

fn ms(samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    format!("p50 {:7.3} ms  p90 {:7.3} ms  p99 {:7.3} ms", at(0.5), at(0.9), at(0.99))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (requests, workloads) = (flag("--requests", 500), flag("--workloads", 20));
    let t = TempDir::new("bench-api");
    let mut hubs = Vec::new();
    for (name, extra) in [("tls", vec![]), ("plaintext", vec!["--insecure-plaintext".to_string()])] {
        let dir = t.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let hub = Hub::start(&dir, HubOpts { extra, ..Default::default() });
        for i in 0..workloads {
            let m =
                manifest(&dir, &format!("w{i}.toml"), &hello_manifest(&format!("w{i}"), &["--ticks", "1"], "never"));
            hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
        }
        hubs.push((name, hub));
    }
    println!("GET /v1/workloads ({workloads} workloads), {requests} requests each, hubs side by side:");
    for (name, hub) in &hubs {
        let addr = hub.api_addr();
        let tls = hub.ca.as_deref().map(tls_config);
        // Warm up both paths.
        for _ in 0..20 {
            Conn::open(&addr, tls.as_ref()).get("/v1/workloads", &hub.token);
        }
        let mut fresh = Vec::new();
        for _ in 0..requests {
            let start = Instant::now();
            Conn::open(&addr, tls.as_ref()).get("/v1/workloads", &hub.token);
            fresh.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let mut conn = Conn::open(&addr, tls.as_ref());
        let mut kept = Vec::new();
        let mut bytes = 0;
        for _ in 0..requests {
            let start = Instant::now();
            bytes = conn.get("/v1/workloads", &hub.token);
            kept.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let mut ctl = Vec::new();
        for _ in 0..(requests / 10).max(10) {
            let start = Instant::now();
            hub.ctl(&["get", "workloads", "-o", "json"]);
            ctl.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        println!("  {name:<9} new connection  {}", ms(&mut fresh));
        println!("  {name:<9} kept alive      {}   ({bytes} bytes)", ms(&mut kept));
        println!("  {name:<9} edgectl         {}", ms(&mut ctl));
    }
    println!("agent resident memory, one agent per hub:");
    for (name, hub) in &hubs {
        let names: Vec<String> = (0..workloads).map(|i| format!("w{i}")).collect();
        let mut args = vec!["delete", "workload"];
        args.extend(names.iter().map(String::as_str));
        hub.ctl(&args);
        let dir = hub.dir.clone();
        let node = format!("pi-{name}");
        let agent = Agent::start(&dir, &node, &hub.mqtt_url, &hub.join, &[]);
        hub.wait_node_state(&node, "Ready");
        std::thread::sleep(std::time::Duration::from_secs(5));
        let idle = rss_kib(agent.proc.pid()) as f64 / 1024.0;
        let idle_anon = anon_kib(agent.proc.pid()) as f64 / 1024.0;
        hub.ctl(&["create", "secret", "db", "--from-literal", "password=hunter2"]);
        let m = hello_manifest("reader", &[], "never").replace(
            "[spec.resources]",
            "env = { GREETING = { secret = \"db\", key = \"password\" } }\n[spec.resources]",
        );
        hub.ctl(&["apply", "-f", manifest(&dir, "reader.toml", &m).to_str().unwrap()]);
        hub.wait("reader", "Succeeded");
        std::thread::sleep(std::time::Duration::from_secs(2));
        let after = rss_kib(agent.proc.pid()) as f64 / 1024.0;
        println!(
            "  {name:<9} joined, idle {idle:5.1} MiB ({idle_anon:.2} MiB anonymous); after a workload with a secret {after:5.1} MiB"
        );
    }
}
