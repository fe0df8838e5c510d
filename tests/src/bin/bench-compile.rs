//! Where large components are compiled, and what that costs the device:
//! apply → first answer for large `wasi:http` components, compiled by the
//! hub vs on the device (in the agent's child process, `--compile-jobs 0`),
//! in the same run, and the agent's memory after three of them.
//!
//! `target/release/bench-compile [--mib 17] [--count 3] [--agent PATH] [--component FILE ...]`
//!
//! `--agent` runs another agent binary, such as a device build without the
//! compiler (`scripts/cross --release x86_64`): then only the hub-compiled
//! run is made (such an agent cannot compile).
//!
//! The components are the hello-http example with a generated core module
//! added (`edge_tests::bigwasm`), to the size asked; or, with
//! `--component`, the files given (`wasi:http` components answering `/`
//! with 200: made with componentize-py or componentize-js, say).

use std::time::{Duration, Instant};

use edge_tests::*;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

struct Run {
    first_answers: Vec<Duration>,
    idle_kib: u64,
    after_kib: u64,
    peak_kib: u64,
}

fn run(tag: &str, hub_args: &[&str], agent: &std::path::Path, components: &[Vec<u8>]) -> Run {
    let t = TempDir::new(tag);
    let hub =
        Hub::start(t.path(), HubOpts { extra: hub_args.iter().map(|s| s.to_string()).collect(), ..HubOpts::default() });
    let agent = Agent::start_with(agent, &[], t.path(), "bench-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("bench-1", "Ready");
    let proxy = agent.proxy();
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.proc.pid();
    let idle_kib = rss_kib(pid);
    let mut first_answers = Vec::new();
    for (i, c) in components.iter().enumerate() {
        let name = format!("big-{i}");
        std::fs::write(t.path().join(format!("{name}.wasm")), c).unwrap();
        let file = t.path().join(format!("{name}.toml"));
        let host = format!("{name}.local");
        std::fs::write(&file, service_manifest(&name, &format!("{name}.wasm"), &[&host], &["/"], "")).unwrap();
        let started = Instant::now();
        hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
        let deadline = started + Duration::from_secs(600);
        loop {
            if get(&proxy, &host, "/").0 == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not answer in 10 minutes");
            std::thread::sleep(Duration::from_millis(20));
        }
        first_answers.push(started.elapsed());
    }
    Run { first_answers, idle_kib, after_kib: rss_kib(pid), peak_kib: proc_kib(pid, "status", "VmHWM:") }
}

fn main() {
    let mib: f64 = arg("--mib").and_then(|v| v.parse().ok()).unwrap_or(17.0);
    let count: u32 = arg("--count").and_then(|v| v.parse().ok()).unwrap_or(3);
    let base = std::fs::read(repo().join("examples/hello-http.wasm")).expect("examples/hello-http.wasm");
    // About 9.5 bytes of Wasm per step; 1000 steps per function.
    let functions = ((mib * 1048576.0 - base.len() as f64) / 9500.0).max(1.0) as u32;
    let given: Vec<String> =
        std::env::args().skip_while(|a| a != "--component").skip(1).filter(|a| !a.starts_with("--")).collect();
    let components: Vec<Vec<u8>> = if given.is_empty() {
        let c: Vec<Vec<u8>> =
            (0..count).map(|i| edge_tests::bigwasm::big_component(&base, 1000 + i, functions, 1000)).collect();
        println!(
            "{count} components of {:.1} MiB each ({functions} generated functions besides hello-http)",
            c[0].len() as f64 / 1048576.0
        );
        c
    } else {
        let c: Vec<Vec<u8>> = given.iter().map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"))).collect();
        let sizes: Vec<String> = c.iter().map(|b| format!("{:.1} MiB", b.len() as f64 / 1048576.0)).collect();
        println!("{} components given: {}", c.len(), sizes.join(", "));
        c
    };
    let count = components.len();
    let agent = arg("--agent").map(std::path::PathBuf::from).unwrap_or_else(|| bin("edge-agent"));
    println!("agent: {} ({} bytes)", agent.display(), std::fs::metadata(&agent).map_or(0, |m| m.len()));
    let mut runs = vec![("compiled by the hub", run("bench-compile-hub", &[], &agent, &components))];
    if arg("--agent").is_none() {
        runs.push((
            "compiled on the device (child process)",
            run("bench-compile-local", &["--compile-jobs", "0"], &agent, &components),
        ));
    }
    for (label, r) in &runs {
        let answers: Vec<String> = r.first_answers.iter().map(|d| format!("{:.1}s", d.as_secs_f64())).collect();
        println!("{label}:");
        println!("  apply → first 200, each in turn: {}", answers.join(", "));
        println!(
            "  agent RSS: idle {:.1} MiB, after {count} services {:.1} MiB, peak {:.1} MiB",
            r.idle_kib as f64 / 1024.0,
            r.after_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0
        );
    }
}
