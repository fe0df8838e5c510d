//! Real Mosquitto brokers for tests: plain with passwords, or as shipped in
//! deploy/mosquitto (TLS, a password per node, per-node ACLs).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Proc, free_port, repo, wait_for};

/// Adds `users` (name, password) to a Mosquitto password file.
pub fn mosquitto_passwd(file: &Path, users: &[(&str, &str)]) {
    for (i, (user, pass)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 && !file.exists() {
            cmd.arg("-c");
        }
        let ok = cmd.arg("-b").arg(file).args([user, pass]).status().expect("mosquitto_passwd").success();
        assert!(ok, "mosquitto_passwd failed");
    }
}

/// Runs Mosquitto with the configuration `conf` and waits until it listens on `port`.
pub fn run_mosquitto(dir: &Path, port: u16, conf: &str) -> Proc {
    let mosq = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is not installed: apt-get install mosquitto (the test command installs it)");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let file = dir.join("mosquitto.conf");
    std::fs::write(&file, format!("{conf}\nlog_dest stderr\n{}", if root { "user root\n" } else { "" })).unwrap();
    let p = Proc::spawn("mosquitto", Command::new(mosq).arg("-c").arg(&file), dir.join("mosquitto.log"));
    wait_for("mosquitto to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
    p
}

/// Mosquitto with plain MQTT and a password file, on `port`.
pub fn mosquitto(dir: &Path, port: u16, users: &[(&str, &str)]) -> Proc {
    let file = dir.join("mosquitto.passwd");
    mosquitto_passwd(&file, users);
    run_mosquitto(
        dir,
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false",
            file.display()
        ),
    )
}

/// The Mosquitto configuration shipped in deploy/mosquitto, with its
/// certificates made by its make-certs.sh, as shipped but for its paths and
/// port (loopback).
pub struct TlsBroker {
    pub port: u16,
    /// The CA that signed the broker's certificate (for `--broker-ca`).
    pub ca: PathBuf,
    dir: PathBuf,
    etc: PathBuf,
}

impl TlsBroker {
    /// Certificates and a port; nothing runs yet.
    pub fn prepare(dir: &Path) -> TlsBroker {
        let etc = dir.join("mosquitto-edge");
        let out = Command::new(repo().join("deploy/mosquitto/make-certs.sh"))
            .arg(&etc)
            .args(["127.0.0.1", "localhost"])
            .output()
            .expect("make-certs.sh");
        assert!(out.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
        TlsBroker { port: free_port(), ca: etc.join("ca.crt"), dir: dir.to_path_buf(), etc }
    }

    /// Starts it with these users (name, password) in its password file.
    pub fn start(&self, users: &[(&str, &str)]) -> Proc {
        mosquitto_passwd(&self.etc.join("passwd"), users);
        let shipped = std::fs::read_to_string(repo().join("deploy/mosquitto/mosquitto.conf")).unwrap();
        assert!(shipped.contains("\nlistener 8883\n") && shipped.contains("/etc/mosquitto/edge/"), "{shipped}");
        std::fs::copy(repo().join("deploy/mosquitto/acl"), self.etc.join("acl")).unwrap();
        let state = self.dir.join("mosquitto-state");
        std::fs::create_dir_all(&state).unwrap();
        let conf = shipped
            .replace("\nlistener 8883\n", &format!("\nlistener {} 127.0.0.1\n", self.port))
            .replace("/etc/mosquitto/edge/", &format!("{}/", self.etc.display()))
            .replace("/var/lib/mosquitto/", &format!("{}/", state.display()));
        run_mosquitto(&self.dir, self.port, &conf)
    }
}
