//! Every listener has limits: nothing a client does (stay idle, send half a
//! request, open too many connections, hold instances, trickle a body) holds
//! the hub or an agent for ever or uses it up; and the proxy routes and
//! forwards one unambiguous request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edge_tests::*;

/// Whether the server ends the connection (EOF or reset) within `PATIENCE`,
/// reading whatever it answers first.
fn server_closes(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn connect(addr: &str) -> TcpStream {
    TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

fn api_addr(hub: &Hub) -> String {
    hub.api_addr()
}

/// A hub whose API speaks plain HTTP, so raw requests can be written to it
/// (TLS handshakes are limited the same way; see tls.rs).
fn plain(extra: &[&str]) -> HubOpts {
    let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    extra.push("--insecure-plaintext".into());
    HubOpts { extra, ..Default::default() }
}

#[test]
fn idle_and_half_sent_connections_are_dropped_by_the_hub_and_the_proxy() {
    let t = TempDir::new("idle");
    let hub = Hub::start(t.path(), plain(&[]));
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    for addr in [api_addr(&hub), agent.proxy()] {
        let started = Instant::now();
        let idle = connect(&addr);
        let mut half = connect(&addr);
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
        let mut after_one = connect(&addr);
        after_one.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let threads: Vec<_> =
            [idle, half, after_one].into_iter().map(|s| std::thread::spawn(move || server_closes(s))).collect();
        for (i, th) in threads.into_iter().enumerate() {
            assert!(th.join().unwrap(), "{addr}: connection {i} was held open for {:?}", started.elapsed());
        }
    }
}

#[test]
fn connections_beyond_the_limits_are_refused_and_the_listeners_recover() {
    let t = TempDir::new("connlimit");
    let hub = Hub::start(t.path(), plain(&["--api-max-connections-per-address", "4"]));
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &["--proxy-max-connections-per-address", "4"]);
    hub.wait_node_state("pi-1", "Ready");
    let api = api_addr(&hub);
    let proxy = agent.proxy();

    // Idle connections, one more each time, until a request is turned away.
    let fill = |addr: &str, refused: &dyn Fn(&str) -> bool| {
        let mut held = Vec::new();
        for _ in 0..16 {
            if refused(addr) {
                return held;
            }
            held.push(connect(addr));
        }
        panic!("{addr}: {} idle connections and still no refusal", held.len());
    };
    let api_refused = |a: &str| {
        let (status, body) = http(a, "GET", a, "/healthz", b"").unwrap_or((0, String::new()));
        status == 503 && body.contains("TooManyConnections")
    };
    let held = fill(&api, &api_refused);
    assert!(open(&held) <= 4, "{} connections served from one address", open(&held));
    drop(held);
    wait_for("the API to serve again", || (http(&api, "GET", &api, "/healthz", b"").ok()?.0 == 200).then_some(()));
    assert!(hub.metric("edge_hub_api_limited_total") >= 1.0);

    // The proxy closes an excess connection at once, without a word.
    let proxy_refused = |a: &str| http(a, "GET", "x", "/", b"").map_or(true, |(s, _)| s == 0);
    let held = fill(&proxy, &proxy_refused);
    assert!(open(&held) <= 4, "{} connections served from one address", open(&held));
    drop(held);
    wait_for("the proxy to serve again", || (http(&proxy, "GET", "x", "/", b"").ok()?.0 == 404).then_some(()));
}

/// How many of these connections the server still holds open.
fn open(held: &[TcpStream]) -> usize {
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let alive = matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            s.set_nonblocking(false).unwrap();
            alive
        })
        .count()
}

#[test]
fn running_out_of_file_descriptors_backs_off_quietly_and_recovers() {
    let t = TempDir::new("nofile");
    let hub = Hub::start(t.path(), HubOpts { max_open_files: Some(96), ..plain(&[]) });
    let mqtt = hub.mqtt_url.split_once("://").map_or(hub.mqtt_url.as_str(), |(_, a)| a).to_string();
    let api = api_addr(&hub);
    // Sockets that never log in, until the hub has no file descriptors left.
    let mut held = Vec::new();
    for _ in 0..200 {
        match TcpStream::connect(&mqtt) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    wait_for("the hub to run out of file descriptors", || {
        hub.proc.log_text().contains("Too many open files").then_some(())
    });
    let pid = hub.proc.pid();
    let (cpu, log) = (cpu_time(pid), std::fs::metadata(&hub.proc.log).unwrap().len());
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - cpu;
    let logged = std::fs::metadata(&hub.proc.log).unwrap().len() - log;
    assert!(used < wall.elapsed() / 2, "the accept loop spins: {used:?} of CPU in {:?}", wall.elapsed());
    assert!(logged < 64 << 10, "{logged} bytes of log in 3 s");
    // The broker drops sockets that never log in; the hub serves again.
    drop(held);
    wait_for("the API to answer again", || (http(&api, "GET", &api, "/healthz", b"").ok()?.0 == 200).then_some(()));
    let _agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
}

/// Sends `n` requests at once; returns their statuses.
fn burst(addr: &str, host: &str, path: &str, n: usize) -> Vec<u16> {
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (addr, host, path) = (addr.to_string(), host.to_string(), path.to_string());
            std::thread::spawn(move || http(&addr, "GET", &host, &path, b"").map(|r| r.0).unwrap_or(0))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn a_hog_holds_only_its_own_instances_and_gives_them_back() {
    let t = TempDir::new("hog");
    let hub = Hub::start(t.path(), HubOpts::default());
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    example(t.path(), "hello-http.wasm");
    for (name, extra) in [
        ("hog", "max_instances = 2\nrequest_timeout = \"2s\""),
        ("other", ""),
        ("single", "max_instances = 1\nrequest_timeout = \"1h\""),
    ] {
        let m = manifest(
            t.path(),
            &format!("{name}.toml"),
            &service_manifest(name, "hello-http.wasm", &[&format!("{name}.local")], &["/"], extra),
        );
        hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
        hub.wait(name, "Running");
    }
    let proxy = agent.proxy();

    // Six requests that would sleep for a minute each: every one ends
    // within its limits (2 s running, 5 s queued), and the other service
    // answers all along.
    let hog = {
        let proxy = proxy.clone();
        std::thread::spawn(move || burst(&proxy, "hog.local", "/sleep?ms=60000", 6))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&proxy, "other.local", "/").0, 200);
    let statuses = hog.join().unwrap();
    assert!(statuses.iter().all(|s| *s == 504 || *s == 503), "{statuses:?}");
    assert!(statuses.contains(&504), "requests past request_timeout are stopped: {statuses:?}");
    assert_eq!(get(&proxy, "hog.local", "/").0, 200, "the hog's instances came back");

    // A client that leaves ends its request: the only instance is free at once.
    let mut leaving = connect(&proxy);
    leaving.write_all(b"GET /sleep?ms=600000 HTTP/1.1\r\nHost: single.local\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(leaving);
    let (status, body) = wait_for("the left request's instance to be freed", || {
        http(&proxy, "GET", "single.local", "/", b"").ok().filter(|(s, _)| *s == 200)
    });
    assert_eq!(status, 200, "{body}");

    // Thirty-two bodies trickling in do not block the service for good.
    let slow: Vec<TcpStream> = (0..32)
        .map(|_| {
            let mut s = connect(&proxy);
            s.write_all(b"POST /echo HTTP/1.1\r\nHost: hog.local\r\nContent-Length: 100000\r\n\r\nten bytes.").unwrap();
            s
        })
        .collect();
    let cut: Vec<_> = slow.into_iter().map(|s| std::thread::spawn(move || server_closes(s))).collect();
    for c in cut {
        assert!(c.join().unwrap(), "a trickling body was held for ever");
    }
    assert_eq!(get(&proxy, "hog.local", "/").0, 200);

    // Deleting a service ends its requests in flight.
    let mut long = connect(&proxy);
    long.write_all(b"GET /sleep?ms=600000 HTTP/1.1\r\nHost: single.local\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    hub.ctl(&["delete", "workload", "single"]);
    assert!(server_closes(long), "the deleted service's request ended");
    assert_eq!(get(&proxy, "other.local", "/").0, 200);
}

#[test]
fn a_service_reserves_the_memory_all_its_instances_may_use() {
    let t = TempDir::new("reserve");
    let hub = Hub::start(t.path(), HubOpts::default());
    let _agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &["--reserve-memory", "0"]);
    let node = hub.wait_node_state("pi-1", "Ready");
    let allocatable = node["facts"]["allocatable_memory"].as_str().unwrap().to_string();
    example(t.path(), "hello-http.wasm");
    // 100 instances of 1Gi: more than any test machine has.
    let greedy = service_manifest("greedy", "hello-http.wasm", &["g.local"], &["/"], "max_instances = 100")
        .replace("memory = \"16Mi\"", "memory = \"1Gi\"");
    let m = manifest(t.path(), "greedy.toml", &greedy);
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    let w = wait_for("the reservation to be refused for memory", || {
        hub.workload("greedy").filter(|w| {
            w["status"]["reason"] == "Unschedulable"
                && w["status"]["message"].as_str().is_some_and(|m| m.contains("insufficient memory"))
        })
    });
    assert_eq!(w["status"]["phase"], "Pending", "(node has {allocatable})");
    // With a total the agent enforces across instances, it fits.
    let capped = greedy.replace("max_instances = 100", "max_instances = 100\nmemory_total = \"2Gi\"");
    std::fs::write(&m, capped).unwrap();
    hub.ctl(&["apply", "-f", m.to_str().unwrap()]);
    hub.wait("greedy", "Running");
    let n = hub.node("pi-1").unwrap();
    assert_eq!(n["allocated"]["memory"], "2Gi", "{n}");
}

/// A plain server that answers each request with the request head it got.
fn echo_backend() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).to_string();
                let resp =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}", head.len());
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    addr
}

/// One raw request (written as given); the status and body of the answer.
fn raw(addr: &str, request: &str) -> (u16, String) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn the_proxy_routes_and_forwards_one_unambiguous_request() {
    let t = TempDir::new("proxypath");
    let hub = Hub::start(t.path(), HubOpts::default());
    let backend = echo_backend();
    let route = format!("public.local/public=http://{backend}");
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &["--route", &route]);
    hub.wait_node_state("pi-1", "Ready");
    let p = agent.proxy();
    let req = |line: &str, headers: &str| raw(&p, &format!("{line}\r\n{headers}Connection: close\r\n\r\n"));

    let (s, body) = req("GET /public/a.txt HTTP/1.1", "Host: public.local\r\n");
    assert!(s == 200 && body.starts_with("GET /public/a.txt HTTP/1.1"), "{s} {body}");
    // Dot-segments are resolved before routing: these leave /public, and no route serves them.
    for path in ["/public/../secret.txt", "/public/x/../../secret.txt"] {
        let (s, body) = req(&format!("GET {path} HTTP/1.1"), "Host: public.local\r\n");
        assert!(s == 404 && body.contains("/secret.txt"), "{path}: {s} {body}");
    }
    // The backend gets the normalised path, never the raw one.
    let (s, body) = req("GET /public/./x/../a.txt HTTP/1.1", "Host: public.local\r\n");
    assert!(s == 200 && body.starts_with("GET /public/a.txt HTTP/1.1"), "{s} {body}");
    // Escaped dots and slashes are refused.
    for path in ["/public/%2e%2e/secret.txt", "/public/..%2fsecret.txt", "/public/%2E%2E%2Fsecret.txt"] {
        let (s, body) = req(&format!("GET {path} HTTP/1.1"), "Host: public.local\r\n");
        assert!(s == 400 && body.contains("escaped"), "{path}: {s} {body}");
    }
    // Two Host headers are refused.
    let (s, body) = req("GET /public/a HTTP/1.1", "Host: public.local\r\nHost: secret.local\r\n");
    assert!(s == 400 && body.contains("more than one Host"), "{s} {body}");
    // Hop-by-hop headers, and those Connection names, do not reach the backend.
    let (s, body) = req(
        "GET /public/a HTTP/1.1",
        "Host: public.local\r\nX-Auth-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nConnection: X-Auth-Hop\r\n",
    );
    let lower = body.to_ascii_lowercase();
    assert!(s == 200 && lower.contains("x-kept: yes"), "{s} {body}");
    assert!(!lower.contains("x-auth-hop") && !lower.contains("keep-alive"), "{body}");
    // An absolute-form request is routed by its authority, and forwarded with it as Host.
    let (s, body) = req("GET http://public.local/public/a HTTP/1.1", "Host: other.local\r\n");
    assert!(s == 200 && body.to_ascii_lowercase().contains("host: public.local"), "{s} {body}");
}
