//! Measures the ARM agents under qemu-user against the native agent, in one
//! run, with one hub:
//!
//! - each agent's binary size (release builds are stripped);
//! - each agent's resident memory, joined and idle (under qemu-user this
//!   includes the emulator and its translated code);
//! - the hello component: apply to Succeeded, end to end (component cached
//!   on the node), and how long a compute-bound run (`--primes N`) takes
//!   in the component itself (the node's own start and finish times), which
//!   compares Pulley on armv7 with Cranelift on aarch64;
//! - the hello-http service: apply to first answer, and requests through
//!   the agent's proxy.
//!
//! Under qemu-user, code that wasmtime compiles at run time pays for qemu's
//! tracking of self-modifying code (about a thousand host `mprotect` calls
//! per instantiation), so the aarch64 agent's per-run and per-request
//! figures are emulation artefacts; the compute figure, where the guest
//! runs long enough, is the one to compare between Cranelift and Pulley.
//!
//! ```text
//! cargo build --release --workspace && scripts/cross --release aarch64 armv7
//! target/release/bench-arm [--runs N] [--primes N] [--requests N]
//! ```

use std::time::{Duration, Instant};

use edge_tests::arm::ARCHES;
use edge_tests::*;

fn arg(name: &str, default: u64) -> u64 {
    std::env::args().skip_while(|a| a != name).nth(1).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Node {
    name: &'static str,
    arch: &'static str,
    mode: &'static str,
    agent: Agent,
    binary: std::path::PathBuf,
}

struct Result {
    hello_ms: Vec<f64>,
    primes_ms: Vec<f64>,
    first_answer_ms: f64,
    request_ms: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs = arg("--runs", 5).max(1);
    let primes = arg("--primes", 200_000);
    let requests = arg("--requests", 50).max(1);
    for a in &ARCHES {
        a.check_binfmt();
    }
    let t = TempDir::new("bench-arm");
    let hub = Hub::start(t.path(), HubOpts { heartbeat: Some("15s".into()), ..Default::default() });
    let mut nodes = vec![Node {
        name: "x86",
        arch: "amd64",
        mode: "cranelift",
        agent: Agent::start(t.path(), "x86", &hub.mqtt_url, &hub.join, &["--wasm-pool-slots", "0"]),
        binary: bin("edge-agent"),
    }];
    for a in &ARCHES {
        nodes.push(Node {
            name: a.node,
            arch: a.arch,
            mode: a.mode,
            agent: a.agent(t.path(), &hub.mqtt_url, &hub.join),
            binary: cross_bin(a.triple, "edge-agent"),
        });
    }
    for n in &nodes {
        hub.wait_node_state(n.name, "Ready");
        let _ = n.agent.proxy();
    }
    example(t.path(), "hello.wasm");
    example(t.path(), "hello-http.wasm");
    std::thread::sleep(Duration::from_secs(3));

    println!("agents (one workload at a time each; the x86-64 agent runs natively, the ARM agents under qemu-user):");
    for n in &nodes {
        let size = std::fs::metadata(&n.binary).map(|m| m.len()).unwrap_or(0);
        println!(
            "  {:<7} {:<9} binary {:>5.1} MiB   idle RSS {:>5.1} MiB",
            n.arch,
            n.mode,
            size as f64 / (1 << 20) as f64,
            rss_kib(n.agent.proc.pid()) as f64 / 1024.0
        );
    }

    let command = |name: &str, arch: &str, args: &str| {
        format!(
            "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec]\nrestart = \"never\"\n\
             [spec.wasm]\ncomponent = \"hello.wasm\"\nargs = [{args}]\n\
             [spec.resources]\nmemory = \"32Mi\"\ncpu = \"1\"\n[spec.placement]\narch = [\"{arch}\"]\n"
        )
    };
    let apply = |name: &str, toml: &str| -> Duration {
        let file = t.path().join(format!("{name}.toml"));
        std::fs::write(&file, toml).unwrap();
        let started = Instant::now();
        hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
        started.elapsed()
    };

    let mut results = Vec::new();
    for n in &nodes {
        // The first run compiles the component (or, on Pulley, translates it).
        let warm = format!("warm-{}", n.name);
        let started = Instant::now();
        apply(&warm, &command(&warm, n.arch, ""));
        hub.wait(&warm, "Succeeded");
        let first = started.elapsed();
        hub.ctl(&["delete", "workload", &warm]);

        let mut r =
            Result { hello_ms: Vec::new(), primes_ms: Vec::new(), first_answer_ms: 0.0, request_ms: Vec::new() };
        for i in 0..runs {
            let name = format!("hello-{}-{i}", n.name);
            let started = Instant::now();
            apply(&name, &command(&name, n.arch, ""));
            hub.wait(&name, "Succeeded");
            r.hello_ms.push(ms(started.elapsed()));
            hub.ctl(&["delete", "workload", &name]);

            let name = format!("primes-{}-{i}", n.name);
            apply(&name, &command(&name, n.arch, &format!("\"--primes\", \"{primes}\"")));
            hub.wait(&name, "Succeeded");
            let w = hub.workload(&name).unwrap();
            let rep = &w["status"]["replicas"][0];
            let (s, f) = (rep["started_ms"].as_u64().unwrap(), rep["finished_ms"].as_u64().unwrap());
            r.primes_ms.push(f.saturating_sub(s) as f64);
            let logs = hub.ctl(&["logs", &name]);
            assert!(logs.contains(&format!("primes below {primes}")), "{logs}");
            hub.ctl(&["delete", "workload", &name]);
        }

        let svc = format!("web-{}", n.name);
        let host = format!("{svc}.local");
        let toml = format!(
            "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{svc}\"\n[spec.wasm]\ncomponent = \"hello-http.wasm\"\n\
             [spec.resources]\nmemory = \"16Mi\"\n[spec.http]\nhosts = [\"{host}\"]\n[spec.placement]\narch = [\"{}\"]\n",
            n.arch
        );
        let started = Instant::now();
        apply(&svc, &toml);
        let proxy = n.agent.proxy();
        wait_for("the service to answer", || (get(&proxy, &host, "/").0 == 200).then_some(()));
        r.first_answer_ms = ms(started.elapsed());
        for _ in 0..requests {
            let t0 = Instant::now();
            assert_eq!(get(&proxy, &host, "/").0, 200);
            r.request_ms.push(ms(t0.elapsed()));
        }
        hub.ctl(&["delete", "workload", &svc]);
        println!(
            "{} ({}): first run incl. compile {:.0} ms; hello apply to Succeeded {}; --primes {primes} ran {}; \
             service apply to first answer {:.0} ms; request {}",
            n.arch,
            n.mode,
            ms(first),
            percentiles(r.hello_ms.clone()),
            percentiles(r.primes_ms.clone()),
            r.first_answer_ms,
            percentiles(r.request_ms.clone())
        );
        results.push(r);
    }

    let by_mode = |i: usize, j: usize, what: &str, f: fn(&Result) -> f64| {
        let (a, b) = (f(&results[i]), f(&results[j]));
        println!(
            "  {what:<34} {} {} / {} {}: {:.1}x",
            nodes[i].arch,
            nodes[i].mode,
            nodes[j].arch,
            nodes[j].mode,
            a / b
        );
    };
    println!("ratios (p50):");
    for (i, j) in [(2, 1), (1, 0), (2, 0)] {
        by_mode(i, j, "compute (--primes)", |r| p50(&r.primes_ms));
        by_mode(i, j, "hello apply to Succeeded", |r| p50(&r.hello_ms));
        by_mode(i, j, "request through the proxy", |r| p50(&r.request_ms));
    }
}
