//! Real etcd clusters on loopback (Debian's etcd-server), for the hubs that
//! share one; and a TCP balancer standing in for the Service in front of them.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::{Proc, free_port, wait_for};

pub struct EtcdCluster {
    pub members: Vec<Proc>,
    /// `host:port` of each member's client endpoint.
    pub clients: Vec<String>,
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster is healthy.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("etcd is not installed: apt-get install etcd-server (the test command installs it)");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let mut cmd = Command::new(etcd);
            cmd.args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-m{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "edge-test"])
                // A slow, shared machine: the defaults (100 ms, 1 s) make elections flap.
                .args(["--heartbeat-interval", "200", "--election-timeout", "2000"]);
            members.push(Proc::spawn(&format!("etcd m{i}"), &mut cmd, dir.join(format!("etcd-m{i}.log"))));
        }
        let clients: Vec<String> = ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect();
        let cluster = EtcdCluster { members, clients };
        wait_for("the etcd cluster to be healthy", || cluster.healthy().then_some(()));
        cluster
    }

    /// `etcd://` URL of the whole cluster, as `edge-hub serve --store` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.clients.join(","))
    }

    pub fn healthy(&self) -> bool {
        self.ctl(&["endpoint", "health"]).is_some_and(|o| o.status.success())
    }

    /// `etcdctl` against the cluster (None if it could not run).
    pub fn ctl(&self, args: &[&str]) -> Option<std::process::Output> {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.clients.join(","), "--command-timeout", "5s"])
            .args(args)
            .output()
            .ok()
    }

    /// Who leads a hub cluster (the URL its leader key holds) and since
    /// which revision (a hub that dies and comes back under the same URL
    /// leads in a new term).
    pub fn leader(&self) -> Option<(String, u64)> {
        let out = self.ctl(&["get", "/edge-hub/leader", "-w", "fields"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("\"{name}\" : ")).map(|v| v.trim().trim_matches('"').to_string()))
        };
        Some((field("Value")?, field("CreateRevision")?.parse().ok()?))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"])?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !v.is_empty()).then_some(v)
    }
}

/// A TCP balancer on loopback: each connection goes to the first backend
/// that accepts it, starting from the next one each time (as a Service
/// in front of several hubs does). Stops when dropped.
pub struct Balancer {
    pub addr: String,
    stop: Arc<AtomicBool>,
    backends: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Balancer {
    /// Listens at once; connections wait for [`Balancer::to`] to name backends.
    pub fn start() -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the balancer");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let backends = Arc::new(std::sync::Mutex::new(Vec::new()));
        let chosen = backends.clone();
        std::thread::spawn(move || {
            let mut next = 0usize;
            while !halt.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                next += 1;
                let backends: Vec<String> = chosen.lock().unwrap().clone();
                std::thread::spawn(move || {
                    for i in 0..backends.len() {
                        let b = &backends[(next + i) % backends.len()];
                        if let Ok(server) =
                            TcpStream::connect_timeout(&b.parse().expect("backend"), Duration::from_secs(1))
                        {
                            pipe(client, server);
                            return;
                        }
                    }
                });
            }
        });
        Balancer { addr, stop, backends }
    }

    /// Where connections go from now on.
    pub fn to(&mut self, backends: Vec<String>) {
        *self.backends.lock().unwrap() = backends;
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
    let up = std::thread::spawn(move || {
        let (mut a, mut b) = (a, b);
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b2, &mut a2);
    let _ = a2.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}
