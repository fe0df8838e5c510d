//! A harness for end-to-end tests: it starts the real `edge-hub`,
//! `edge-agent` and `edgectl` binaries (from the same target directory as
//! the test) on free loopback ports with temporary data directories, and
//! cleans up after itself even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod arm;
pub mod bigwasm;
pub mod etcd;
mod mosquitto;
pub mod oci_layout;
pub mod rogue;
pub mod sim;
pub use mosquitto::*;

/// Generous: CI machines are slow and shared. Tests poll for conditions and
/// move on as soon as they hold; this is only the give-up point.
pub const PATIENCE: Duration = Duration::from_secs(60);

fn target_dir() -> PathBuf {
    // Tests live in target/<profile>/deps/, bench binaries in target/<profile>/.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("target directory");
    if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().expect("target directory") } else { dir }
        .to_path_buf()
}

/// A binary cross-built for `triple` (by `scripts/cross`), from the same profile as this test.
pub fn cross_bin(triple: &str, name: &str) -> PathBuf {
    let dir = target_dir();
    let profile = dir.file_name().expect("profile directory").to_owned();
    let p = dir.parent().expect("target directory").join(triple).join(profile).join(name);
    assert!(p.is_file(), "{} is missing: build it with scripts/cross", p.display());
    p
}

pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(p.is_file(), "{} is missing: build the workspace first (cargo build --workspace)", p.display());
    p
}

/// The repository root (for examples).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// A temporary directory, removed on drop unless the test failed (then its
/// path is printed so the logs inside can be read).
pub struct TempDir(pub PathBuf);

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("edge-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The children alive now, with the thread that started each, killed by a
/// panic hook: binaries built with `panic = "abort"` (the release profile)
/// never run `Drop`. Tests run in parallel threads of one process, so a
/// panicking test kills only its own children (another test's would fail
/// for no fault of its own); a panic in a thread that started none kills all.
static CHILDREN: std::sync::Mutex<Vec<(u32, std::thread::ThreadId)>> = std::sync::Mutex::new(Vec::new());
static HOOK: std::sync::Once = std::sync::Once::new();

fn track(pid: u32) {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(children) = CHILDREN.lock() {
                let me = std::thread::current().id();
                let mine = children.iter().any(|(_, t)| *t == me);
                for (pid, _) in children.iter().filter(|(_, t)| !mine || *t == me) {
                    // SAFETY: kill(2) on a child this process spawned.
                    unsafe {
                        libc::kill(*pid as i32, libc::SIGKILL);
                    }
                }
            }
            previous(info);
        }));
    });
    if let Ok(mut children) = CHILDREN.lock() {
        children.push((pid, std::thread::current().id()));
    }
}

fn untrack(pid: u32) {
    if let Ok(mut children) = CHILDREN.lock() {
        children.retain(|(p, _)| *p != pid);
    }
}

/// A child process that is killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .env("EDGE_LOG", "info,edge_hub=debug,edge_agent=debug")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        track(child.id());
        Proc { name: name.to_string(), child: Some(child), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            untrack(c.id());
        }
    }

    /// SIGTERM, and wait for a clean exit (SIGKILL after `PATIENCE`).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        untrack(c.id());
        // SAFETY: as in `signal`.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            if std::thread::panicking()
                && let Ok(Some(status)) = c.try_wait()
            {
                eprintln!("---- {} had exited: {status} ----", self.name);
            }
            let _ = c.kill();
            let _ = c.wait();
            untrack(c.id());
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- last lines of {} ({}) ----", self.name, self.log.display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `PATIENCE`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real OCI registry (Debian's docker-registry) on a free loopback port;
/// returns it and its `host:port`.
pub fn registry(dir: &Path) -> (Proc, String) {
    let bin = ["/usr/bin/docker-registry", "/usr/bin/registry"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("docker-registry is not installed: apt-get install docker-registry (the test command installs it)");
    let port = free_port();
    let conf = dir.join("registry.yml");
    std::fs::write(
        &conf,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry-data").display()
        ),
    )
    .unwrap();
    let p = Proc::spawn("docker-registry", Command::new(bin).arg("serve").arg(&conf), dir.join("registry.log"));
    let addr = format!("127.0.0.1:{port}");
    wait_for("the registry to answer", || (http(&addr, "GET", &addr, "/v2/", b"").ok()?.0 == 200).then_some(()));
    (p, addr)
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Resident memory of a process, in KiB (0 once it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    proc_kib(pid, "status", "VmRSS:")
}

/// A `field` in KiB from `/proc/PID/file` (`status`, `smaps_rollup`); 0 if absent.
pub fn proc_kib(pid: i32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// "p50 …, p95 …, max … (n=…)" of samples in milliseconds.
pub fn percentiles(mut v: Vec<f64>) -> String {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!("p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (n={})", p(0.5), p(0.95), p(1.0), v.len())
}

pub mod link;
pub mod netns;

pub use link::Link;

/// `gw`: a per-node service of the example component (`hello-http.wasm`
/// next to the manifest), version `v`, probed for readiness at
/// `ready_path` every 500 ms, rolled out as `rollout` (TOML lines) says.
pub fn per_node_service(v: &str, ready_path: &str, rollout: &str) -> String {
    format!(
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"gw\"\n[spec]\nreplicas = \"per-node\"\n\
         [spec.wasm]\ncomponent = \"hello-http.wasm\"\nenv = {{ VERSION = \"{v}\" }}\n[spec.resources]\nmemory = \"16Mi\"\ncpu = \"20m\"\n\
         [spec.http]\nhosts = [\"gw.local\"]\npaths = [\"/\"]\n\
         [spec.health.readiness]\nhttp = {{ path = \"{ready_path}\" }}\nperiod = \"500ms\"\ntimeout = \"400ms\"\nfailure_threshold = 1\n\
         [spec.rollout]\n{rollout}"
    )
}

/// Bytes sent and received on the agent's connection to the broker port, from tcp_info.
pub fn tcp_bytes(broker_port: u16, agent_pid: i32) -> (u64, u64) {
    let out =
        std::process::Command::new("ss").args(["-tinpH", "state", "established"]).output().expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        let info = lines.next().unwrap_or("");
        if l.contains(&format!(":{broker_port} ")) && l.contains(&format!("pid={agent_pid},")) {
            let field = |name: &str| {
                info.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            return (field("bytes_acked:"), field("bytes_received:"));
        }
    }
    (0, 0)
}

/// A free TCP port on loopback (for brokers that cannot report theirs).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

#[derive(Default, Clone)]
pub struct HubOpts {
    /// An external broker URL, instead of the embedded broker.
    pub broker: Option<String>,
    pub api_addr: Option<String>,
    pub mqtt_addr: Option<String>,
    /// The heartbeat interval agents are told to use (default 1s, for quick tests).
    pub heartbeat: Option<String>,
    /// More arguments for `edge-hub serve`.
    pub extra: Vec<String>,
    /// A limit on the hub's open files (soft and hard), to run it out of them.
    pub max_open_files: Option<u64>,
}

pub struct Hub {
    pub proc: Proc,
    pub dir: PathBuf,
    pub api_url: String,
    /// The CA of the hub's TLS (none with --insecure-plaintext).
    pub ca: Option<PathBuf>,
    pub mqtt_url: String,
    pub token: String,
    pub join: String,
    opts: HubOpts,
}

impl Hub {
    pub fn start(dir: &Path, opts: HubOpts) -> Hub {
        let proc = Self::start_process(dir, opts.clone());
        let pid = proc.pid();
        Hub::attach(dir, proc, Some(pid), opts)
    }

    /// Starts `edge-hub serve` as [`Hub::start`] does, without waiting for it.
    pub fn start_process(dir: &Path, opts: HubOpts) -> Proc {
        let data = dir.join("hub");
        let _ = std::fs::remove_file(data.join("hub.json"));
        let mut cmd = Command::new(bin("edge-hub"));
        cmd.arg("serve").arg("--data-dir").arg(&data).args(["--heartbeat", opts.heartbeat.as_deref().unwrap_or("1s")]);
        cmd.args(["--api-addr", opts.api_addr.as_deref().unwrap_or("127.0.0.1:0")]);
        match &opts.broker {
            Some(b) => cmd.args(["--broker", b]),
            None => cmd.args(["--mqtt-addr", opts.mqtt_addr.as_deref().unwrap_or("127.0.0.1:0")]),
        };
        cmd.args(&opts.extra);
        if let Some(n) = opts.max_open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Proc::spawn("edge-hub", &mut cmd, dir.join("hub.log"))
    }

    /// A hub started some other way (`proc`, e.g. a container runtime) with
    /// its data in `dir/hub`; `pid`: the one its `hub.json` must name.
    pub fn attach(dir: &Path, mut proc: Proc, pid: Option<i32>, opts: HubOpts) -> Hub {
        let data = dir.join("hub");
        let endpoints: serde_json::Value = wait_for("the hub to start", || {
            if let Some(s) = proc.exited() {
                panic!("{} exited ({s}):\n{}", proc.name, proc.log_text());
            }
            let text = std::fs::read_to_string(data.join("hub.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            (pid.is_none() || v["pid"].as_i64() == pid.map(i64::from)).then_some(v)
        });
        let read = |f: &str| std::fs::read_to_string(data.join(f)).expect(f).trim().to_string();
        Hub {
            api_url: endpoints["api_url"].as_str().expect("api_url").to_string(),
            // A hub in a container names the CA by its path inside.
            ca: endpoints["ca"].as_str().map(PathBuf::from).map(
                |p| {
                    if p.exists() { p } else { data.join("tls/ca.crt") }
                },
            ),
            mqtt_url: endpoints["mqtt_url"].as_str().expect("mqtt_url").to_string(),
            token: read("admin.token"),
            join: read("join.token"),
            dir: dir.to_path_buf(),
            proc,
            opts,
        }
    }

    /// Stops the hub (kill -9 when `hard`) and starts it again on the same addresses.
    pub fn restart(&mut self, hard: bool) {
        self.kill(hard);
        self.start_again();
    }

    pub fn kill(&mut self, hard: bool) {
        if hard {
            self.proc.kill9();
        } else {
            self.proc.stop();
        }
    }

    pub fn start_again(&mut self) {
        let mut opts = self.opts.clone();
        opts.api_addr = Some(self.api_addr());
        if opts.broker.is_none() {
            opts.mqtt_addr =
                Some(self.mqtt_url.split_once("://").map_or(self.mqtt_url.as_str(), |(_, a)| a).to_string());
        }
        let log = self.proc.log.clone();
        let _ = std::fs::write(log.with_extension("log.prev"), self.proc.log_text());
        *self = Hub::start(&self.dir, opts);
    }

    /// The API's `host:port`.
    pub fn api_addr(&self) -> String {
        self.api_url.split_once("://").map_or(self.api_url.as_str(), |(_, a)| a).trim_end_matches('/').to_string()
    }

    /// An edgectl command for this hub with `token`; `EDGE_CONFIG` points
    /// nowhere so a developer's own config never leaks in.
    pub fn edgectl_cmd(&self, token: &str) -> Command {
        let mut cmd = Command::new(bin("edgectl"));
        cmd.env("EDGE_HUB", &self.api_url)
            .env("EDGE_TOKEN", token)
            .env("EDGE_CONFIG", self.dir.join("no-such-config.toml"))
            .env_remove("EDGE_CA");
        if let Some(ca) = &self.ca {
            cmd.env("EDGE_CA", ca);
        }
        cmd
    }

    /// Runs edgectl against this hub.
    pub fn edgectl(&self, args: &[&str]) -> Output {
        self.edgectl_as(&self.token, args)
    }

    /// Runs edgectl with another API token.
    pub fn edgectl_as(&self, token: &str, args: &[&str]) -> Output {
        self.edgectl_cmd(token).args(args).output().expect("run edgectl")
    }

    /// curl, trusting the hub's CA, silent.
    pub fn curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.arg("-s");
        if let Some(ca) = &self.ca {
            cmd.arg("--cacert").arg(ca);
        }
        cmd
    }

    /// GET `path` of the API without a token: (status, body).
    pub fn api_get(&self, path: &str) -> (u16, String) {
        let out =
            self.curl().args(["-w", "\n%{http_code}"]).arg(format!("{}{path}", self.api_url)).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The port of the MQTT broker agents dial.
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the MQTT URL")
    }

    /// A new join token (`edgectl token create` with these flags).
    pub fn token(&self, flags: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend(flags);
        self.ctl(&args).trim().to_string()
    }

    /// Runs edgectl and returns its stdout, failing the test if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.edgectl(args);
        assert!(
            out.status.success(),
            "edgectl {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let text = self.ctl(&a);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("edgectl {} printed invalid JSON ({e}): {text}", args.join(" ")))
    }

    /// A workload's view, or None if it does not exist.
    pub fn workload(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.edgectl(&["get", "workload", name, "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("workload JSON"))
    }

    pub fn node(&self, name: &str) -> Option<serde_json::Value> {
        let out = self.edgectl(&["get", "node", name, "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("node JSON"))
    }

    pub fn wait_node_state(&self, name: &str, state: &str) -> serde_json::Value {
        wait_for(&format!("node {name} to be {state}"), || self.node(name).filter(|n| n["state"] == state))
    }

    /// Waits for a workload condition through `edgectl wait` (which blocks on the hub, no polling).
    pub fn wait(&self, name: &str, condition: &str) {
        let timeout = format!("{}s", PATIENCE.as_secs());
        self.ctl(&["wait", "workload", name, "--for", condition, "--timeout", &timeout]);
    }

    /// Applies a short hello command (`hello`) and checks it ran to completion on `node`.
    pub fn hello_runs_on(&self, dir: &Path, node: &str) {
        let file =
            manifest(dir, "hello.toml", &hello_manifest("hello", &["--ticks", "2", "--interval-ms", "10"], "never"));
        self.ctl(&["apply", "-f", file.to_str().unwrap()]);
        self.wait("hello", "Succeeded");
        let logs = self.ctl(&["logs", "hello"]);
        assert!(logs.contains(&format!("running on {node}")) && logs.contains("tick 2"), "{logs}");
    }

    /// Reads a hub metric by name (the sum over its label sets).
    pub fn metric(&self, name: &str) -> f64 {
        let out = self
            .curl()
            .args(["-f", "-H", &format!("Authorization: Bearer {}", self.token), &format!("{}/metrics", self.api_url)])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub struct Agent {
    pub proc: Proc,
    pub dir: PathBuf,
    pub name: String,
    args: Vec<String>,
    binary: PathBuf,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent named `name` with its data under `dir/agent-<name>`.
    pub fn start(dir: &Path, name: &str, broker: &str, join: &str, extra: &[&str]) -> Agent {
        Self::start_with(&bin("edge-agent"), &[], dir, name, broker, join, extra)
    }

    /// As `start`, inside a network namespace (`ip netns exec NS`).
    pub fn start_in(ns: &str, dir: &Path, name: &str, broker: &str, join: &str, extra: &[&str]) -> Agent {
        let launcher = ["netns".to_string(), "exec".into(), ns.into(), bin("edge-agent").display().to_string()];
        Self::launch(Path::new("ip"), &launcher, &[], dir, name, broker, join, extra)
    }

    /// As `start`, with another agent binary (one built for another CPU, run
    /// under qemu-user) and extra environment.
    pub fn start_with(
        binary: &Path,
        env: &[(&str, &str)],
        dir: &Path,
        name: &str,
        broker: &str,
        join: &str,
        extra: &[&str],
    ) -> Agent {
        Self::launch(binary, &[], env, dir, name, broker, join, extra)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        binary: &Path,
        launcher: &[String],
        env: &[(&str, &str)],
        dir: &Path,
        name: &str,
        broker: &str,
        join: &str,
        extra: &[&str],
    ) -> Agent {
        let data = dir.join(format!("agent-{name}"));
        let mut args: Vec<String> = launcher.to_vec();
        args.extend(["run".into(), "--data-dir".into(), data.display().to_string()]);
        args.extend(["--broker".into(), broker.into(), "--name".into(), name.into()]);
        if !extra.contains(&"--keepalive") {
            args.extend(["--keepalive".into(), "1s".into()]);
        }
        if !extra.contains(&"--proxy-addr") {
            args.extend(["--proxy-addr".into(), "127.0.0.1:0".into()]);
        }
        if !join.is_empty() {
            args.extend(["--join-token".into(), join.into()]);
        }
        if !extra.contains(&"--run-dir") {
            args.extend(["--run-dir".into(), dir.join(format!("run-{name}")).display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(binary);
        cmd.args(&args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn(&format!("edge-agent {name}"), &mut cmd, dir.join(format!("agent-{name}.log")));
        Agent {
            proc,
            dir: data,
            name: name.to_string(),
            args,
            binary: binary.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Starts the agent again with the same arguments (its state is on disk).
    pub fn start_again(&mut self) {
        let log = self.proc.log.clone();
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.proc = Proc::spawn(&self.proc.name.clone(), &mut cmd, log);
    }

    /// The address of the agent's proxy (from `agent.json`, written at start).
    pub fn proxy(&self) -> String {
        let pid = self.proc.pid();
        wait_for("the agent's proxy address", || {
            let text = std::fs::read_to_string(self.dir.join("agent.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            (v["pid"].as_i64() == Some(i64::from(pid))).then(|| v["proxy_addr"].as_str().map(str::to_string)).flatten()
        })
    }

    /// The replica's log as the agent keeps it on disk.
    pub fn log_file(&self, workload: &str, replica: u32) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{workload}.{replica}.log"))).unwrap_or_default()
    }
}

/// Copies the example component next to a manifest written from `toml`.
pub fn manifest(dir: &Path, file: &str, toml: &str) -> PathBuf {
    let wasm = dir.join("hello.wasm");
    if !wasm.exists() {
        std::fs::copy(repo().join("examples/hello.wasm"), &wasm).expect("copy hello.wasm");
    }
    let p = dir.join(file);
    std::fs::write(&p, toml).expect("write manifest");
    p
}

/// A manifest for the example component with these args and restart policy.
pub fn hello_manifest(name: &str, args: &[&str], restart: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec]\nrestart = \"{restart}\"\n[spec.wasm]\ncomponent = \"hello.wasm\"\nargs = [{}]\n[spec.resources]\nmemory = \"32Mi\"\ncpu = \"50m\"\n",
        args.join(", ")
    )
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
pub fn http(addr: &str, method: &str, host: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.set_nodelay(true)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn get(addr: &str, host: &str, path: &str) -> (u16, String) {
    http(addr, "GET", host, path, b"").unwrap_or_else(|e| panic!("GET {host}{path} via {addr}: {e}"))
}

/// A plain HTTP server on loopback answering every request with `body`,
/// for outbound and upstream tests. It stops with the test process.
pub fn backend(body: &'static str) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = l.local_addr().expect("backend addr").to_string();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                // Serve requests on this connection until it closes (keep-alive).
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        req.drain(..end + 4);
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Copies an example component into `dir` (for manifests that name it).
pub fn example(dir: &Path, name: &str) {
    let to = dir.join(name);
    if !to.exists() {
        std::fs::copy(repo().join("examples").join(name), &to).unwrap_or_else(|e| panic!("copy {name}: {e}"));
    }
}

/// A service manifest for an example component.
pub fn service_manifest(name: &str, component: &str, hosts: &[&str], paths: &[&str], extra_wasm: &str) -> String {
    let list = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    format!(
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec.wasm]\ncomponent = \"{component}\"\n{extra_wasm}\n[spec.resources]\nmemory = \"16Mi\"\ncpu = \"50m\"\n[spec.http]\nhosts = [{}]\npaths = [{}]\n",
        list(hosts),
        list(paths)
    )
}
