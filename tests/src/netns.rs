//! Real network partitions for chaos tests: each agent in a network
//! namespace of its own, joined to the hub's side by a veth pair on a
//! bridge. `cut` takes the node's link down (a cable pull: nothing is sent
//! or refused, packets are simply gone), `lossy` drops a share of packets
//! at random both ways (iptables `statistic`; this kernel has no `netem`,
//! so jitter comes from a `Link` in the node's path instead).
//! Root only; everything is removed when the `Net` is dropped, also when
//! the test fails.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Whether this process may make namespaces (root).
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub struct Net {
    id: String,
    bridge: String,
    /// `10.X.Y.` of the /24 the bridge (`.1`) and the nodes are on.
    prefix: String,
    nodes: Vec<String>,
}

impl Net {
    /// A bridge with the hub's address (`hub_ip`).
    pub fn create() -> Net {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{:x}{n:x}", pid % 0xffff);
        let k = (pid.wrapping_mul(31).wrapping_add(n * 7)) % 250;
        let net = Net { bridge: format!("eb{id}"), prefix: format!("10.213.{k}."), nodes: vec![], id };
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        let addr = format!("{}1/24", net.prefix);
        ip(&["addr", "add", &addr, "dev", &net.bridge]);
        ip(&["link", "set", &net.bridge, "up"]);
        net
    }

    /// The hub's address on the bridge.
    pub fn hub_ip(&self) -> String {
        format!("{}1", self.prefix)
    }

    fn host_end(&self, i: usize) -> String {
        format!("ev{}-{i}", self.id)
    }

    /// A namespace for one node, its link up; returns the namespace's name.
    pub fn node(&mut self) -> String {
        let i = self.nodes.len();
        let ns = format!("edge-{}-{i}", self.id);
        let (host, peer) = (self.host_end(i), format!("ep{}-{i}", self.id));
        ip(&["netns", "add", &ns]);
        self.nodes.push(ns.clone());
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["link", "set", &host, "master", &self.bridge]);
        ip(&["link", "set", &host, "up"]);
        let addr = format!("{}{}/24", self.prefix, 10 + i);
        ip(&["-n", &ns, "addr", "add", &addr, "dev", &peer]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn index(&self, ns: &str) -> usize {
        self.nodes.iter().position(|n| n == ns).expect("a node of this net")
    }

    /// Takes the node's link down: a partition.
    pub fn cut(&self, ns: &str) {
        ip(&["link", "set", &self.host_end(self.index(ns)), "down"]);
    }

    pub fn heal(&self, ns: &str) {
        ip(&["link", "set", &self.host_end(self.index(ns)), "up"]);
    }

    /// Drops `percent` of the packets the node sends and receives, at random.
    pub fn lossy(&self, ns: &str, percent: u32) {
        let p = format!("{:.2}", f64::from(percent) / 100.0);
        for chain in ["INPUT", "OUTPUT"] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "iptables", "-A", chain, "-m", "statistic", "--mode", "random"])
                .args(["--probability", &p, "-j", "DROP"])
                .output()
                .expect("run iptables");
            assert!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Lets every packet through again.
    pub fn clean(&self, ns: &str) {
        for chain in ["INPUT", "OUTPUT"] {
            quiet("ip", &["netns", "exec", ns, "iptables", "-F", chain]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (i, ns) in self.nodes.iter().enumerate() {
            quiet("ip", &["link", "del", &self.host_end(i)]);
            quiet("ip", &["netns", "del", ns]);
        }
        quiet("ip", &["link", "del", &self.bridge]);
    }
}
