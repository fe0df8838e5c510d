//! Compiled code: the hub compiles each component for the targets its
//! nodes report and seals it; an agent loads compiled code only after
//! checking the seal and the bytes, and recovers from every bad file on its
//! disk (re-fetch, or compile here) without ever running it or exiting.

use std::path::{Path, PathBuf};

use edge_api::digest::Digest;
use edge_api::keys::SigningKey;
use edge_api::precompiled::{Compiler, Seal};
use edge_tests::*;

/// The agent's compiled file of an example component, and its seal.
fn compiled_files(agent: &Agent, component: &str) -> (PathBuf, PathBuf) {
    let hex = Digest::of(&std::fs::read(repo().join("examples").join(component)).unwrap()).hex();
    let code = wait_for("compiled code in the agent's cache", || {
        std::fs::read_dir(agent.dir.join("cache")).ok()?.flatten().map(|e| e.path()).find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&hex) && name.ends_with(".cwasm")
        })
    });
    let seal = code.with_extension("seal");
    (code, seal)
}

fn seal_of(path: &Path) -> Seal {
    Seal::parse(&std::fs::read(path).unwrap()).unwrap()
}

/// Flips the bits of one byte at `at` (a fraction of the file's length).
fn flip(path: &Path, at: f64) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = ((bytes.len() as f64) * at) as usize;
    bytes[i] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// What the agent logged since `from` bytes into its log.
fn log_since(agent: &Agent, from: usize) -> String {
    agent.proc.log_text().get(from..).unwrap_or("").to_string()
}

fn answers(agent: &Agent, host: &str, status: u16, body: &str) -> String {
    wait_for(&format!("{host} to answer {status}"), || {
        let (st, b) = get(&agent.proxy(), host, "/");
        (st == status && b.contains(body)).then_some(b)
    })
}

#[test]
fn the_hub_compiles_for_the_node_and_bad_compiled_files_are_replaced_never_run() {
    let t = TempDir::new("compiled");
    let mut hub = Hub::start(t.path(), HubOpts::default());
    let mut agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    for c in ["hello-http.wasm", "counter.wasm"] {
        example(t.path(), c);
    }
    let apply = |file: &str, toml: &str| {
        let p = t.path().join(file);
        std::fs::write(&p, toml).unwrap();
        hub.ctl(&["apply", "-f", p.to_str().unwrap()]);
    };
    apply("web.toml", &service_manifest("web", "hello-http.wasm", &["web.local"], &["/"], ""));
    apply("kv.toml", &service_manifest("kv", "counter.wasm", &["kv.local"], &["/"], "key_value = true"));
    hub.wait("web", "Running");
    hub.wait("kv", "Running");
    answers(&agent, "web.local", 200, "Hello from web");
    answers(&agent, "kv.local", 200, "");

    // The hub compiled it for this node's target and sealed it; the agent
    // compiled nothing.
    let (code, seal) = compiled_files(&agent, "hello-http.wasm");
    assert_eq!(seal_of(&seal).compiler, Compiler::Hub);
    let log = agent.proc.log_text();
    assert!(log.contains("compiled code from the hub") && !log.contains("compiling here"), "{log}");
    let w = hub.workload("web").unwrap();
    let compiled = w["compiled"].as_array().expect("compiled targets").clone();
    assert!(
        compiled.iter().any(|c| c["target"] == "x86_64" && c["state"] == "Ready" && c["size"].as_u64() > Some(0)),
        "{compiled:?}"
    );
    let described = hub.ctl(&["describe", "workload", "web"]);
    assert!(described.contains("Compiled by the hub") && described.contains("x86_64"), "{described}");

    // Flipped bits in the code, then in the data near its end: found when
    // read at start, deleted, fetched again, served.
    for at in [0.5, 0.98] {
        agent.proc.stop();
        flip(&code, at);
        let from = agent.proc.log_text().len();
        agent.start_again();
        answers(&agent, "web.local", 200, "Hello from web");
        let log = log_since(&agent, from);
        assert!(
            log.contains("failed its check and was deleted") && log.contains("compiled code from the hub"),
            "{log}"
        );
        let s = seal_of(&seal);
        assert_eq!(Digest::of(&std::fs::read(&code).unwrap()), s.digest, "the cache holds the hub's bytes again");
    }

    // A forged seal: valid code, a signature by another key claiming to be
    // the hub's. Refused, and replaced.
    agent.proc.stop();
    let s = seal_of(&seal);
    let forger = SigningKey::generate().unwrap();
    let forged = Seal::sign(s.component, &s.fingerprint, s.digest, s.size, Compiler::Hub, &forger);
    std::fs::write(&seal, serde_json::to_vec(&forged).unwrap()).unwrap();
    let from = agent.proc.log_text().len();
    agent.start_again();
    answers(&agent, "web.local", 200, "Hello from web");
    let log = log_since(&agent, from);
    assert!(log.contains("signature does not verify"), "{log}");
    assert_eq!(seal_of(&seal), s, "the hub's seal is back");

    // The hub is gone: the agent compiles it itself (in a child process)
    // and seals it with its own key.
    hub.kill(false);
    agent.proc.stop();
    flip(&code, 0.5);
    let from = agent.proc.log_text().len();
    agent.start_again();
    answers(&agent, "web.local", 200, "Hello from web");
    let log = log_since(&agent, from);
    assert!(log.contains("compiling here") && log.contains("compiled component in a child process"), "{log}");
    assert_eq!(seal_of(&seal).compiler, Compiler::Node);

    // The component rotted too, and there is no hub to fetch it from: that
    // replica alone says ArtifactCorrupt; the other service serves on.
    agent.proc.stop();
    flip(&code, 0.5);
    let hex = Digest::of(&std::fs::read(repo().join("examples/hello-http.wasm")).unwrap()).hex();
    let component = agent.dir.join("artifacts/sha256").join(&hex);
    flip(&component, 0.5);
    let from = agent.proc.log_text().len();
    agent.start_again();
    let body = answers(&agent, "web.local", 503, "ArtifactCorrupt");
    assert!(body.contains("web"), "{body}");
    answers(&agent, "kv.local", 200, "");
    let log = log_since(&agent, from);
    assert!(log.contains("component failed its check and was deleted"), "{log}");
    assert!(agent.proc.exited().is_none(), "the agent runs on");

    // The hub is back: fetched again, compiled by the hub, served; the
    // node's report counts what it found bad.
    hub.start_again();
    answers(&agent, "web.local", 200, "Hello from web");
    let n = wait_for("the node to report its corrupt files", || {
        hub.node("pi-1").filter(|n| n["corrupt_files"].as_u64().unwrap_or(0) >= 2)
    });
    let described = hub.ctl(&["describe", "node", "pi-1"]);
    assert!(described.contains("Corrupt files") && described.contains("engine wasmtime-"), "{described}\n{n}");
    assert!(!described.contains("runs only hub-compiled code"), "this agent compiles: {described}");
    assert_eq!(seal_of(&seal).compiler, Compiler::Hub);
    assert_eq!(Digest::of(&std::fs::read(&component).unwrap()).hex(), hex);
    assert!(agent.proc.exited().is_none());
}

/// What an agent's memory (KiB) was before and after large components.
struct Grown {
    /// Resident before the first deployment (joined, idle).
    before: u64,
    /// Resident once all answer.
    after: u64,
    /// The most it was resident.
    peak: u64,
    log: String,
}

/// Deploys three large services (each ~2.5 MiB of Wasm, ~9 MiB compiled).
fn deploy_large(tag: &str, hub_args: &[&str]) -> Grown {
    let t = TempDir::new(tag);
    let hub =
        Hub::start(t.path(), HubOpts { extra: hub_args.iter().map(|s| s.to_string()).collect(), ..HubOpts::default() });
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    let before = rss_kib(agent.proc.pid());
    let base = std::fs::read(repo().join("examples/hello-http.wasm")).unwrap();
    for i in 0..3 {
        let name = format!("big-{i}");
        let big = edge_tests::bigwasm::big_component(&base, i, 500, 1000);
        assert!(big.len() > 2 << 20, "{}", big.len());
        std::fs::write(t.path().join(format!("{name}.wasm")), big).unwrap();
        let file = t.path().join(format!("{name}.toml"));
        let host = format!("{name}.local");
        std::fs::write(&file, service_manifest(&name, &format!("{name}.wasm"), &[&host], &["/"], "")).unwrap();
        hub.ctl(&["apply", "-f", file.to_str().unwrap()]);
    }
    for i in 0..3 {
        let name = format!("big-{i}");
        hub.wait(&name, "Running");
        answers(&agent, &format!("{name}.local"), 200, &format!("Hello from {name}"));
    }
    let pid = agent.proc.pid();
    let kib = |f: &str| proc_kib(pid, "smaps_rollup", f) / 1024;
    eprintln!(
        "{tag}: agent RSS {} MiB: anonymous {} MiB, file-backed {} MiB",
        rss_kib(pid) / 1024,
        kib("Anonymous:"),
        (proc_kib(pid, "smaps_rollup", "Rss:") - proc_kib(pid, "smaps_rollup", "Anonymous:")) / 1024
    );
    if std::env::var_os("EDGE_TEST_SMAPS").is_some() {
        let _ = std::process::Command::new("sh").arg("-c").arg(format!("awk '/^[0-9a-f]+-/ {{m=$0}} /^Rss:/ {{ if ($2 > 1024) print $2, m }}' /proc/{pid}/smaps | sort -rn | head -25")).status();
    }
    Grown { before, after: rss_kib(pid), peak: proc_kib(pid, "status", "VmHWM:"), log: agent.proc.log_text() }
}

#[test]
fn large_components_compiled_by_the_hub_or_in_a_child_leave_the_agent_small() {
    // Compiled by the hub: the agent maps the code it runs, and no more.
    let g = deploy_large("big-hub", &[]);
    let (grew, peak) = (g.after.saturating_sub(g.before), g.peak.saturating_sub(g.before));
    eprintln!("hub-compiled: agent RSS grew {} MiB (peak +{} MiB) from {} MiB", grew >> 10, peak >> 10, g.before >> 10);
    assert!(g.log.contains("compiled code from the hub") && !g.log.contains("compiling here"), "{}", g.log);
    // The code itself (~9 MiB each) is resident: copied in after it was
    // checked, never mapped from the disk, which could read it again unchecked.
    assert!(grew < 56 << 10, "agent RSS grew {grew} KiB with 3 large components");
    // Compiled on the device, in a child process: Cranelift's memory goes
    // with the child (in the agent's own process it stayed: hundreds of MB
    // for large components).
    let g = deploy_large("big-local", &["--compile-jobs", "0"]);
    let (grew, peak) = (g.after.saturating_sub(g.before), g.peak.saturating_sub(g.before));
    eprintln!(
        "compiled here: agent RSS grew {} MiB (peak +{} MiB) from {} MiB",
        grew >> 10,
        peak >> 10,
        g.before >> 10
    );
    assert!(g.log.contains("compiled component in a child process"), "{}", g.log);
    assert!(grew < 56 << 10, "agent RSS grew {grew} KiB compiling 3 large components");
    assert!(peak < 64 << 10, "agent peak +{peak} KiB: did the compiles run in the agent's own process?");
}
