//! Several hubs over a real etcd: the store writes whole changes and only
//! while it leads; killing the leader (kill -9, again and again, in the
//! middle of applies) hands over to another hub with nothing acknowledged
//! lost or doubled; a leader paused past its lease wakes up to stop.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_hub::etcd::{Etcd, EtcdOptions, EtcdStore, Fence};
use edge_hub::store::{Batch, Collection, Store, StoreError};
use edge_tests::etcd::{Balancer, EtcdCluster};
use edge_tests::*;

fn options(cluster: &EtcdCluster, prefix: &str, max_txn_ops: usize) -> EtcdOptions {
    EtcdOptions {
        url: cluster.url().parse().unwrap(),
        prefix: prefix.into(),
        ca: None,
        cert: None,
        key: None,
        user: None,
        max_txn_ops,
    }
}

/// Takes the lead for `fence` under a long lease (as a hub's campaign does,
/// but with no keep-alive to stop it: a hub that believes it leads).
fn lead(etcd: &Etcd, fence: &Fence) -> i64 {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
    let key = fence.key.clone();
    let (lease, revision) = etcd.block(|mut c| async move {
        let lease = c.lease_grant(600, None).await.unwrap().id();
        let r = c
            .txn(Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
                key,
                "test",
                Some(PutOptions::new().with_lease(lease)),
            )]))
            .await
            .unwrap();
        assert!(r.succeeded(), "someone else leads");
        (lease, r.header().unwrap().revision())
    });
    fence.revision.store(revision, std::sync::atomic::Ordering::SeqCst);
    fence.deadline_ms.store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    lease
}

fn put(keys: &[&str]) -> Batch {
    let mut b = Batch::default();
    for k in keys {
        b.put(Collection::Workloads, *k, format!("{{\"name\":{k:?}}}").into_bytes());
    }
    b
}

fn names(s: &EtcdStore) -> Vec<String> {
    s.load(Collection::Workloads).unwrap().into_iter().map(|(k, _)| k).collect()
}

#[test]
fn the_etcd_store_writes_whole_changes_and_only_while_it_leads() {
    let t = TempDir::new("etcd-store");
    let cluster = EtcdCluster::start(t.path(), 1);
    let etcd = Etcd::connect(&options(&cluster, "/t/", 3)).unwrap();

    let first = Arc::new(Fence::new(etcd.key("leader")));
    let lease = lead(&etcd, &first);
    let s1 = EtcdStore::open(etcd.clone(), first.clone(), 3).unwrap();
    // Seven operations where a transaction holds three: through the journal.
    s1.apply(put(&["a", "b", "c", "d"])).unwrap();
    let mut b = put(&["e", "f", "g"]);
    b.delete(Collection::Workloads, "b");
    s1.apply(b).unwrap();
    s1.sync().unwrap();
    assert_eq!(names(&s1), ["a", "c", "d", "e", "f", "g"]);
    assert!(cluster.ctl(&["get", "--prefix", "/t/journal", "--keys-only"]).unwrap().stdout.is_empty());

    // Its lease ends (a hub paused, cut off); another hub leads. The first
    // still believes it leads (its clock says so): etcd refuses its writes.
    etcd.block(move |mut c| async move { c.lease_revoke(lease).await.unwrap() });
    let second = Arc::new(Fence::new(etcd.key("leader")));
    lead(&etcd, &second);
    let s2 = EtcdStore::open(etcd.clone(), second.clone(), 3).unwrap();
    s1.apply(put(&["stale"])).unwrap();
    assert!(matches!(s1.sync(), Err(StoreError::Fenced)));
    s1.apply(put(&["s1", "s2", "s3", "s4"])).unwrap();
    assert!(matches!(s1.sync(), Err(StoreError::Fenced)), "nor through the journal");
    s2.apply(put(&["h"])).unwrap();
    s2.sync().unwrap();
    assert_eq!(names(&s2), ["a", "c", "d", "e", "f", "g", "h"]);
    assert!(cluster.ctl(&["get", "--prefix", "/t/journal", "--keys-only"]).unwrap().stdout.is_empty());

    // A leader that stopped after making its journal valid: the next one
    // finishes the change before it loads anything.
    let ops = vec![(b"/t/w/j1".to_vec(), Some(b"{}".to_vec())), (b"/t/w/a".to_vec(), None)];
    let bytes = edge_hub::etcd::encode_ops(&ops);
    let part = t.path().join("part");
    std::fs::write(&part, &bytes).unwrap();
    let put_file = |key: &str, file: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("etcdctl --endpoints {} put {key} < {}", cluster.clients.join(","), file.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    put_file("/t/journal/000000", &part);
    let marker = t.path().join("marker");
    let digest = edge_api::digest::Digest::of(&bytes).hex();
    std::fs::write(&marker, format!("{{\"parts\":1,\"sha256\":\"{digest}\"}}")).unwrap();
    put_file("/t/journal", &marker);
    let s3 = EtcdStore::open(etcd.clone(), second.clone(), 3).unwrap();
    assert_eq!(names(&s3), ["c", "d", "e", "f", "g", "h", "j1"]);
    assert!(cluster.ctl(&["get", "--prefix", "/t/journal", "--keys-only"]).unwrap().stdout.is_empty());

    // A damaged journal is named, and nothing of it is applied.
    let mut bad = bytes.clone();
    bad[9] ^= 1;
    std::fs::write(&part, &bad).unwrap();
    put_file("/t/journal/000000", &part);
    put_file("/t/journal", &marker);
    let e = EtcdStore::open(etcd.clone(), second.clone(), 3).err().expect("a damaged journal is refused");
    assert!(e.to_string().contains("journal") && e.to_string().contains("digest"), "{e}");
    assert_eq!(names(&s3), ["c", "d", "e", "f", "g", "h", "j1"]);
}

/// A small pseudo-random sequence (no dependency, reproducible by seed).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Which of `hubs` leads, by the URL in etcd.
fn leader(cluster: &EtcdCluster, hubs: &[&Hub]) -> Option<usize> {
    term(cluster, hubs).map(|(i, _)| i)
}

/// Which of `hubs` leads and since which etcd revision.
fn term(cluster: &EtcdCluster, hubs: &[&Hub]) -> Option<(usize, u64)> {
    let (url, revision) = cluster.leader()?;
    let i = hubs.iter().position(|h| h.api_url.trim_end_matches('/') == url.trim_end_matches('/'))?;
    Some((i, revision))
}

/// What edgectl needs to reach a hub cluster: token and CA.
#[derive(Clone)]
struct Client {
    token: String,
    ca: Option<std::path::PathBuf>,
}

impl Client {
    fn of(hub: &Hub) -> Client {
        Client { token: hub.token.clone(), ca: hub.ca.clone() }
    }

    /// Applies `file` through `api` until a hub acknowledges it; returns the attempts.
    fn apply_until_acknowledged(&self, api: &str, file: &Path) -> u32 {
        let began = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut cmd = Command::new(bin("edgectl"));
            cmd.env("EDGE_HUB", api).env("EDGE_TOKEN", &self.token).env("EDGE_CONFIG", file.with_extension("none"));
            if let Some(ca) = &self.ca {
                cmd.env("EDGE_CA", ca);
            }
            let out = cmd.args(["apply", "-f"]).arg(file).output().unwrap();
            if out.status.success() {
                return attempts;
            }
            if attempts == 1 || attempts % 10 == 0 {
                eprintln!(
                    "  apply {} via {api} refused: {}",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            assert!(
                began.elapsed() < PATIENCE,
                "no hub acknowledged {} in {PATIENCE:?}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn hubs_on_etcd_hand_over_when_the_leader_dies_and_lose_nothing() {
    let t = TempDir::new("ha");
    let cluster = EtcdCluster::start(t.path(), 3);
    let port = free_port();
    let _mosq =
        run_mosquitto(t.path(), port, &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false"));
    let broker = format!("mqtt://127.0.0.1:{port}");
    // What a Service in front of the hubs is: agents fetch artifacts through
    // it. It holds its port before the hubs' ports are picked.
    let mut lb = Balancer::start();
    let apis = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    assert_ne!(apis[0], apis[1]);
    lb.to(apis.to_vec());
    let shared = t.path().join("artifacts");
    let opts = |api: &str| HubOpts {
        broker: Some(broker.clone()),
        api_addr: Some(api.to_string()),
        extra: [
            "--store",
            &cluster.url(),
            "--leader-lease",
            "2s",
            "--artifacts-dir",
            shared.to_str().unwrap(),
            "--advertise-url",
            &format!("https://{}", lb.addr),
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    };
    let (da, db) = (t.path().join("a"), t.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    let mut a = Hub::start(&da, opts(&apis[0]));
    wait_for("the first hub to lead", || (leader(&cluster, &[&a]) == Some(0)).then_some(()));
    // A hub with an identity of its own is refused, and says why.
    let stranger = t.path().join("c");
    std::fs::create_dir_all(&stranger).unwrap();
    let out = Command::new(bin("edge-hub")).args(["init", "--data-dir"]).arg(stranger.join("hub")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut c = Hub::start_process(&stranger, opts(&format!("127.0.0.1:{}", free_port())));
    let status = wait_for("the stranger to stop", || c.exited());
    assert!(!status.success());
    assert!(c.log_text().contains("another hub key"), "{}", c.log_text());
    // Nor does a hub with the cluster's key but not its secrets key start.
    std::fs::copy(da.join("hub/hub.key"), stranger.join("hub/hub.key")).unwrap();
    let out = Command::new(bin("edge-hub")).args(["init", "--data-dir"]).arg(stranger.join("hub")).output().unwrap();
    assert!(!out.status.success(), "the join token no longer matches the key: init says so");
    std::fs::remove_file(stranger.join("hub/join.token")).unwrap();
    let mut c = Hub::start_process(&stranger, opts(&format!("127.0.0.1:{}", free_port())));
    let status = wait_for("the stranger to stop", || c.exited());
    assert!(!status.success());
    assert!(c.log_text().contains("another secrets key"), "{}", c.log_text());

    // Every hub of a cluster has the same identity: `edge-hub init --from` copies it.
    let out = Command::new(bin("edge-hub"))
        .args(["init", "--data-dir"])
        .arg(db.join("hub"))
        .arg("--from")
        .arg(da.join("hub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut b = Hub::start(&db, opts(&apis[1]));
    assert_eq!(leader(&cluster, &[&a, &b]), Some(0), "the second hub follows");

    let _agents: Vec<Agent> =
        ["pi-1", "pi-2"].iter().map(|n| Agent::start(t.path(), n, &broker, &a.join, &[])).collect();
    // Through the follower: it forwards to the leader.
    b.wait_node_state("pi-1", "Ready");
    b.wait_node_state("pi-2", "Ready");

    let mut rng = Lcg(std::process::id() as u64);
    let rounds = 20;
    let mut handovers = Vec::new();
    for i in 0..rounds {
        let (l, was) = wait_for("a hub to lead", || term(&cluster, &[&a, &b]));
        let file = manifest(
            t.path(),
            &format!("w-{i}.toml"),
            &hello_manifest(&format!("w-{i}"), &["--ticks", "1", "--interval-ms", "1"], "never"),
        );
        // Applied through either hub (or the balancer) while the leader dies.
        let via = [apis[0].clone(), apis[1].clone(), lb.addr.clone()][rng.below(3) as usize].clone();
        let via = format!("https://{via}");
        let client = Client::of(&a);
        let applying = std::thread::scope(|s| {
            let h = s.spawn(|| client.apply_until_acknowledged(&via, &file));
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            let killed = Instant::now();
            let dying = if l == 0 { &mut a } else { &mut b };
            dying.kill(true);
            dying.start_again();
            let attempts = h.join().unwrap();
            let next = wait_for("a new term", || term(&cluster, &[&a, &b]).filter(|(_, r)| *r != was));
            handovers.push(killed.elapsed().as_secs_f64() * 1000.0);
            eprintln!("  hub {} leads after {:.1} s", next.0, killed.elapsed().as_secs_f64());
            attempts
        });
        eprintln!("round {i}: leader {l} killed, w-{i} acknowledged after {applying} attempt(s)");
    }
    eprintln!("kill -9 of the leader until another term begins: {}", percentiles(handovers));

    // Every acknowledged change is there exactly once, and runs.
    let hub = &a;
    for i in 0..rounds {
        let name = format!("w-{i}");
        let w = wait_for("the workload", || hub.workload(&name));
        assert_eq!(w["metadata"]["generation"], 1, "{name} was applied once: {w}");
        let out = hub
            .curl()
            .args(["-H", &format!("authorization: Bearer {}", hub.token)])
            .arg(format!("{}/v1/workloads/{name}/revisions", hub.api_url))
            .output()
            .unwrap();
        let revisions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(revisions.as_array().map(Vec::len), Some(1), "{name}: {revisions}");
        hub.wait(&name, "Succeeded");
    }
    let all = hub.json(&["get", "workloads"]);
    assert_eq!(all.as_array().map(Vec::len), Some(rounds), "{all}");

    // The audit log names the client of a forwarded request (with the hub
    // that forwarded it), and a client cannot make it name another.
    let l = wait_for("a hub to lead", || leader(&cluster, &[&a, &b]));
    let (leading, following) = if l == 0 { (&a, &b) } else { (&b, &a) };
    let delete = |via: &Hub, from: &str, name: &str, extra: &[&str]| {
        let out = via
            .curl()
            .args(["--interface", from, "-X", "DELETE", "-H", &format!("authorization: Bearer {}", via.token)])
            .args(extra)
            .arg(format!("{}/v1/workloads/{name}", via.api_url))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    delete(following, "127.0.0.5", "probe-forwarded", &[]);
    let forged = format!("x-edge-forwarded: 10.9.9.9 {} 00ff", edge_api::time::now_ms());
    delete(leading, "127.0.0.6", "probe-forged", &["-H", &forged]);
    let audit = leading.json(&["get", "events", "--audit"]);
    let from = |name: &str| {
        let action = format!("DELETE /v1/workloads/{name}");
        audit.as_array().unwrap().iter().find(|e| e["action"] == action).map(|e| e["from"].clone())
    };
    assert_eq!(from("probe-forwarded"), Some("127.0.0.5 (via 127.0.0.1)".into()), "{audit}");
    assert_eq!(from("probe-forged"), Some("127.0.0.6".into()), "{audit}");

    // A leader paused past its lease (a VM frozen, a long GC): the other
    // takes over; woken, the old one stops at once, having changed nothing.
    let l = wait_for("a hub to lead", || leader(&cluster, &[&a, &b]));
    let (paused, other) = if l == 0 { (&mut a, &b) } else { (&mut b, &a) };
    paused.proc.signal(libc::SIGSTOP);
    wait_for("the other hub to lead", || (leader(&cluster, &[&*paused, other]) == Some(1)).then_some(()));
    let after = manifest(
        t.path(),
        "after.toml",
        &hello_manifest("after-pause", &["--ticks", "1", "--interval-ms", "1"], "never"),
    );
    Client::of(other).apply_until_acknowledged(&other.api_url, &after);
    paused.proc.signal(libc::SIGCONT);
    let status = wait_for("the paused hub to stop", || paused.proc.exited());
    assert_eq!(status.code(), Some(edge_hub::ha::LOST_LEAD), "{}", paused.proc.log_text());
    assert_eq!(leader(&cluster, &[&*paused, other]), Some(1));
    other.wait("after-pause", "Succeeded");
    let w = other.workload("after-pause").unwrap();
    assert_eq!(w["metadata"]["generation"], 1);
}
