//! Hubs over etcd, losing their leader: two hubs share a real three-member
//! etcd and a Mosquitto; `--nodes` simulated nodes (edge-sim's, on the real
//! protocol) each run a per-node workload. Each of `--trials` times the
//! leading hub is killed (kill -9) and started again (it then follows). It
//! reports, from the kill: when a new term began (a hub holds the leader
//! key), when the new leader's first desired state reached the broker, and
//! when every node's had been published again; p50/p99/max over the trials.
//!
//! `cargo build --release --workspace && target/release/bench-ha [--nodes 200] [--trials 20] [--lease 3s]`

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edge_tests::etcd::EtcdCluster;
use edge_tests::*;

fn flag(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!("  {name:<44} p50 {:>6.0} ms  p99 {:>6.0} ms  max {:>6.0} ms", p(0.5), p(0.99), p(1.0));
}

fn main() {
    let nodes: usize = flag("--nodes", "200").parse().expect("--nodes N");
    let trials: usize = flag("--trials", "20").parse().expect("--trials N");
    let lease = flag("--lease", "3s");
    let _ = edge_listen::raise_open_files_limit();
    let t = TempDir::new("bench-ha");
    let cluster = EtcdCluster::start(t.path(), 3);
    let port = free_port();
    let _mosq = run_mosquitto(
        t.path(),
        port,
        &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000"),
    );
    let broker = format!("mqtt://127.0.0.1:{port}");
    let shared = t.path().join("artifacts");
    let opts = || HubOpts {
        broker: Some(broker.clone()),
        heartbeat: Some("30s".into()),
        extra: [
            "--store",
            &cluster.url(),
            "--leader-lease",
            &lease,
            "--insecure-plaintext",
            "--artifacts-dir",
            shared.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let (da, db) = (t.path().join("a"), t.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    let mut hubs = vec![Hub::start(&da, opts())];
    wait_for("the first hub to lead", || cluster.leader());
    let ok = Command::new(bin("edge-hub"))
        .args(["init", "--data-dir"])
        .arg(db.join("hub"))
        .arg("--from")
        .arg(da.join("hub"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "edge-hub init --from");
    hubs.push(Hub::start(&db, opts()));
    let leader_index = |hubs: &[Hub], url: &str| hubs.iter().position(|h| h.api_url.trim_end_matches('/') == url);

    let fleet = edge_tests::sim::Running::start_at(&broker, &hubs[0].join, "sim", nodes, 200);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = hubs[0].json(&["get", "nodes"]);
        let ready = list.as_array().map_or(0, |l| l.iter().filter(|n| n["state"] == "Ready").count());
        if ready == nodes {
            break;
        }
        assert!(Instant::now() < deadline, "{ready}/{nodes} nodes Ready after 10 minutes");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::fs::copy(repo().join("examples/hello.wasm"), t.path().join("hello.wasm")).unwrap();
    let m =
        hello_manifest("everywhere", &["--forever"], "always").replace("[spec]\n", "[spec]\nreplicas = \"per-node\"\n");
    let m = manifest(t.path(), "everywhere.toml", &m);
    hubs[0].ctl(&["apply", "-f", m.to_str().unwrap()]);
    wait_for("every node to apply its state", || (fleet.stats().applied() >= nodes as u64).then_some(()));
    println!("{nodes} simulated nodes Ready, each running one replica; {trials} kills of the leading hub:");

    // What reaches the broker live (not retained copies): topic per line.
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-R", "-F", "%t"])
        .args(["-t", "edge/v1/nodes/+/desired"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (mosquitto-clients)");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let out = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));

    let (mut term_ms, mut first_ms, mut all_ms) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..trials {
        let (url, was) = wait_for("a leader", || cluster.leader());
        let l = leader_index(&hubs, &url).expect("the leader is one of the hubs");
        while rx.try_recv().is_ok() {}
        let killed = Instant::now();
        hubs[l].kill(true);
        let (_, _) = wait_for("a new term", || cluster.leader().filter(|(_, r)| *r != was));
        term_ms.push(killed.elapsed().as_secs_f64() * 1000.0);
        let mut seen = std::collections::HashSet::new();
        let limit = Instant::now() + Duration::from_secs(120);
        while seen.len() < nodes && Instant::now() < limit {
            if let Ok((at, topic)) = rx.recv_timeout(Duration::from_millis(200)) {
                if seen.is_empty() {
                    first_ms.push(at.duration_since(killed).as_secs_f64() * 1000.0);
                }
                seen.insert(topic);
                if seen.len() == nodes {
                    all_ms.push(at.duration_since(killed).as_secs_f64() * 1000.0);
                }
            }
        }
        assert_eq!(seen.len(), nodes, "trial {trial}: only {} of {nodes} nodes' states published again", seen.len());
        hubs[l].start_again();
        // The restarted hub follows; let it settle before the next kill.
        std::thread::sleep(Duration::from_secs(1));
    }
    stats("kill -9 → new term (leader key held)", term_ms);
    stats("kill -9 → first desired state published", first_ms);
    stats(&format!("kill -9 → all {nodes} nodes' states published"), all_ms);
    let _ = sub.kill();
    let _ = sub.wait();
    drop(fleet);
}
