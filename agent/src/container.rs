//! OCI containers: the image for this node's platform pulled from its
//! registry (every digest checked), its layers unpacked safely, and run by
//! the node's OCI runtime (runc or crun) from a generated runtime spec.
//!
//! Architecture invariants:
//! - Nothing in a layer is written outside the image's root: `..` is
//!   refused, and every path is resolved through the symlinks already
//!   unpacked as if the root were `/` (as runc's securejoin does).
//! - A container is not root unless the manifest asks (`user = "0"`); it
//!   has no capabilities, cannot gain privileges, and runs in its own PID,
//!   IPC, UTS and mount namespaces (the host's network, for now) with
//!   memory, CPU and pids limits in a cgroup of its own.
//! - A run's container is deleted however the run ends: exit, stop (the
//!   task is dropped) or agent restart (stale containers under the agent's
//!   runtime root are deleted at start).

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edge_api::digest::Digest;
use edge_api::model::{ContainerNetwork, ContainerSpec, Reason, RuntimeInfo};
use edge_api::wire::Assignment;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::logs::LogSink;
use crate::plan::Exit;

/// Layers larger than this are refused (compressed size).
const MAX_LAYER_BYTES: u64 = 4 << 30;

/// The OCI runtime binary this node runs containers with.
#[derive(Clone, Debug)]
struct OciRuntime {
    path: PathBuf,
    name: &'static str,
    version: String,
}

pub struct Containers {
    runtime: Option<OciRuntime>,
    /// `DATA_DIR/containers`: `images/`, `blobs/`, `state/` (bundles, which
    /// hold env values, are in the run directory).
    dir: PathBuf,
    node: String,
    /// Made at the first pull: its TLS roots cost about a MiB that a node
    /// without containers need not pay.
    registry: std::sync::OnceLock<edge_oci::Client>,
    insecure_registries: Vec<String>,
    /// One pull at a time: layers are big, devices are small.
    pulling: tokio::sync::Mutex<()>,
    /// The node's container bridge (CNI).
    bridge: crate::cni::BridgeConfig,
    /// Where network namespaces are kept (`RUN_DIR/netns`).
    netns_dir: PathBuf,
    /// The runtime's state (`--root`): `RUN_DIR/oci`. crun copies each
    /// container's config.json (env values, secrets among them) there.
    state: PathBuf,
}

/// The parts of an image config a container needs.
#[derive(Deserialize, Default, Clone, Debug)]
struct ImageConfig {
    #[serde(default)]
    config: ImageRunConfig,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "PascalCase")]
struct ImageRunConfig {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

struct Image {
    rootfs: PathBuf,
    config: ImageConfig,
}

fn invalid(reason: Reason, message: String) -> Exit {
    Exit { exit_code: None, succeeded: false, reason, message: Some(message) }
}

/// Finds the OCI runtime: `EDGE_AGENT_OCI_RUNTIME`, else crun on cgroup v2
/// hosts (it refuses hybrid layouts) and runc, from `PATH`. Containers need
/// root; an agent that is not root reports no container runtime.
fn detect() -> Option<OciRuntime> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let wanted: Vec<String> = match std::env::var("EDGE_AGENT_OCI_RUNTIME") {
        Ok(v) if !v.is_empty() => vec![v],
        _ if unified => vec!["crun".into(), "runc".into()],
        _ => vec!["runc".into()],
    };
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin".into());
    for w in wanted {
        let candidates: Vec<PathBuf> = if w.contains('/') {
            vec![PathBuf::from(&w)]
        } else {
            std::env::split_paths(&path).map(|d| d.join(&w)).collect()
        };
        for c in candidates {
            let Ok(out) = std::process::Command::new(&c).arg("--version").output() else { continue };
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next().unwrap_or_default();
            let name = if first.starts_with("crun") { "crun" } else { "runc" };
            let version = first.split_whitespace().last().unwrap_or("unknown").to_string();
            return Some(OciRuntime { path: c, name, version: format!("{name} {version}") });
        }
    }
    None
}

impl Containers {
    pub fn new(
        data_dir: &Path,
        run_dir: &Path,
        node: &str,
        insecure_registries: Vec<String>,
        bridge: crate::cni::BridgeConfig,
    ) -> anyhow::Result<Containers> {
        let dir = data_dir.join("containers");
        for d in ["images", "blobs"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        Ok(Containers {
            runtime: detect(),
            dir,
            node: node.to_string(),
            registry: std::sync::OnceLock::new(),
            insecure_registries,
            pulling: tokio::sync::Mutex::new(()),
            bridge,
            netns_dir: run_dir.join("netns"),
            state: run_dir.join("oci"),
        })
    }

    /// What the node reports, if it can run containers.
    pub fn info(&self) -> Option<RuntimeInfo> {
        self.runtime.as_ref().map(|r| RuntimeInfo {
            name: "oci".into(),
            version: r.version.clone(),
            mode: r.name.into(),
            ..Default::default()
        })
    }

    fn state_root(&self) -> PathBuf {
        self.state.clone()
    }

    /// Deletes containers a previous run of the agent left behind (after a
    /// kill -9 or a power cut): their replicas are started afresh.
    pub fn remove_stale(&self) {
        let Some(rt) = &self.runtime else { return };
        // The runtime's state lived in the data directory before the run directory.
        let legacy = self.dir.join("state");
        for root in [self.state_root(), legacy.clone()] {
            for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                tracing::info!(id, "removing a container left from a previous run");
                delete(rt, &root, &id);
            }
        }
        let _ = std::fs::remove_dir_all(&legacy);
        // Bundles lived here before they moved to the run directory.
        let _ = std::fs::remove_dir_all(self.dir.join("bundles"));
        // Network namespaces, and the addresses they held.
        for e in std::fs::read_dir(&self.netns_dir).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            crate::cni::release(&e.path());
            if self.bridge.available() {
                self.bridge.del(&id, None);
            }
        }
        prune_cgroups(&self.node);
    }

    /// Pulls and unpacks the image for this node's platform, once per manifest.
    async fn pull(&self, spec: &ContainerSpec, arch: &str, sink: &LogSink) -> Result<Image, Exit> {
        let Some(chosen) = spec.image_for(arch) else {
            return Err(invalid(Reason::InvalidImage, format!("{} offers no image for {arch}", spec.image)));
        };
        let digest = chosen.manifest;
        let image_dir = self.dir.join("images").join(digest.hex());
        let config_file = image_dir.join("config.json");
        let _guard = self.pulling.lock().await;
        if !image_dir.join("complete").exists() {
            sink.note(&format!("pulling {} for {} ({digest})", spec.image, chosen.platform));
            self.pull_into(spec, &digest, &image_dir).await.map_err(|e| invalid(Reason::ImagePullFailed, e))?;
        }
        let config: ImageConfig =
            std::fs::read(&config_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(|| {
                invalid(Reason::InvalidImage, format!("cannot read the image config {}", config_file.display()))
            })?;
        Ok(Image { rootfs: image_dir.join("rootfs"), config })
    }

    fn registry(&self) -> Result<&edge_oci::Client, String> {
        if let Some(c) = self.registry.get() {
            return Ok(c);
        }
        let c = edge_oci::Client::new(self.insecure_registries.clone()).map_err(|e| e.to_string())?;
        Ok(self.registry.get_or_init(|| c))
    }

    async fn pull_into(&self, spec: &ContainerSpec, digest: &Digest, image_dir: &Path) -> Result<(), String> {
        let registry = self.registry()?;
        let mut r = spec.image.clone();
        r.digest = Some(*digest);
        let (manifest, config) = registry.image_manifest(&r, digest).await.map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(image_dir);
        let staging = image_dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(staging.join("rootfs")).map_err(|e| e.to_string())?;
        for (i, layer) in manifest.layers.iter().enumerate() {
            let blob = self.dir.join("blobs").join(layer.digest.hex());
            if !blob.exists() {
                registry.blob_to_file(&r, layer, &blob, MAX_LAYER_BYTES).await.map_err(|e| e.to_string())?;
            }
            let rootfs = staging.join("rootfs");
            let media_type = layer.media_type.clone();
            let (blob2, rootfs2) = (blob.clone(), rootfs.clone());
            tokio::task::spawn_blocking(move || edge_oci::unpack::unpack_layer(&blob2, &media_type, &rootfs2))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("layer {i} ({}): {e}", layer.digest))?;
            let _ = std::fs::remove_file(&blob);
        }
        std::fs::write(staging.join("config.json"), &config).map_err(|e| e.to_string())?;
        std::fs::rename(&staging, image_dir).map_err(|e| e.to_string())?;
        std::fs::write(image_dir.join("complete"), b"").map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The network of a run: `None` for the node's own.
    async fn network(&self, id: &str, spec: &ContainerSpec) -> Result<Option<Network>, String> {
        if spec.network == ContainerNetwork::Host {
            return Ok(None);
        }
        if spec.network == ContainerNetwork::Bridge && !self.bridge.available() {
            return Err(format!(
                "the CNI plugins are not in {} (Debian: apt-get install containernetworking-plugins)",
                self.bridge.plugins.display()
            ));
        }
        let ns = crate::cni::Netns::create(&self.netns_dir.join(id))?;
        let mut net = Network { ns, bridge: None, addr: None, id: id.to_string() };
        if spec.network == ContainerNetwork::Bridge {
            // Released when `net` drops, even if this run is stopped while
            // the address is being taken.
            net.bridge = Some(self.bridge.clone());
            // A lease a crash left under the same id (host-local keeps its
            // leases on disk) would refuse a new one.
            let (bridge, stale) = (self.bridge.clone(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || bridge.del(&stale, None)).await;
            net.addr = Some(self.bridge.add(id, net.ns.path()).await?);
        }
        Ok(Some(net))
    }

    /// One run of a container replica, start to exit.
    pub async fn run(
        &self,
        key: &str,
        a: &Assignment,
        arch: &str,
        sink: Arc<LogSink>,
        given: Given<'_>,
        started: impl FnOnce(Option<String>),
    ) -> Exit {
        let edge_api::model::Runtime::Container(spec) = &a.spec.runtime else {
            return invalid(Reason::InvalidSpec, "not a container workload".into());
        };
        let Some(rt) = self.runtime.clone() else {
            return invalid(
                Reason::NoContainerRuntime,
                "this node has no OCI runtime (runc or crun) or is not root".into(),
            );
        };
        let image = match self.pull(spec, arch, &sink).await {
            Ok(i) => i,
            Err(exit) => return exit,
        };
        let id = container_id(key);
        let (uid, gid) = match resolve_user(spec, &image) {
            Ok(u) => u,
            Err(e) => return invalid(Reason::InvalidImage, e),
        };
        let env = match crate::secrets::env(&a.spec, given.opened) {
            Ok(e) => e,
            Err(e) => return invalid(Reason::SecretUnavailable, e.0),
        };
        // Held until the container is gone: its secret files go with it.
        let files = match given.run_dir.write(key, given.run, &a.spec, given.opened, Some((uid, gid))) {
            Ok(f) => f,
            Err(e) => return invalid(Reason::SecretUnavailable, e),
        };
        // The bundle holds env values (secrets among them): on the run
        // directory's tmpfs, never the data directory's disk.
        let bundle = given.run_dir.path().join("bundles").join(&id);
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&bundle) {
            return invalid(Reason::StorageError, format!("cannot create the bundle {}: {e}", bundle.display()));
        }
        // Its network: a namespace of its own (on the bridge, or loopback
        // only), or the node's where the hub allowed it.
        let net = match self.network(&id, spec).await {
            Ok(n) => n,
            Err(e) => return invalid(Reason::NetworkError, e),
        };
        let cgroup = format!("/edge/{}/{id}", self.node);
        let user = (uid, gid);
        let netns = net.as_ref().map(|n| n.ns.path());
        let runtime_spec = match runtime_spec(a, spec, &image, &cgroup, &self.node, user, &env, &files.dirs, netns) {
            Ok(s) => s,
            Err(e) => return invalid(Reason::InvalidImage, e),
        };
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(bundle.join("config.json"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, runtime_spec.to_string().as_bytes()));
        if let Err(e) = written {
            return invalid(Reason::StorageError, format!("cannot write the bundle: {e}"));
        }
        let root = self.state_root();
        delete(&rt, &root, &id);
        let mut child = match tokio::process::Command::new(&rt.path)
            .arg("--root")
            .arg(&root)
            .args(["run", "--keep", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return invalid(Reason::RuntimeError, format!("cannot start {}: {e}", rt.path.display()));
            }
        };
        // From here on the container exists until this guard deletes it,
        // also when the run is stopped (this future dropped).
        let guard = Deleter { rt: rt.clone(), root: root.clone(), id: id.clone(), bundle, node: self.node.clone() };
        let upstream = match (&net, spec.port) {
            (Some(n), Some(port)) => n.addr.map(|ip| format!("http://{ip}:{port}")),
            (None, Some(port)) => Some(format!("http://127.0.0.1:{port}")),
            _ => None,
        };
        started(upstream);
        let pump = |stream: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, name: &'static str| {
            let sink = sink.clone();
            async move {
                let Some(s) = stream else { return };
                let mut lines = BufReader::new(s).split(b'\n');
                while let Ok(Some(mut line)) = lines.next_segment().await {
                    line.push(b'\n');
                    sink.write(name, &line);
                }
            }
        };
        let out = pump(child.stdout.take().map(|s| Box::new(s) as _), "stdout");
        let err = pump(child.stderr.take().map(|s| Box::new(s) as _), "stderr");
        let (status, _, _) = tokio::join!(child.wait(), out, err);
        let oom = oom_kills(&cgroup);
        drop(guard);
        drop(net);
        drop(files);
        let code = match status {
            Ok(s) => s.code().unwrap_or(-1),
            Err(e) => return invalid(Reason::RuntimeError, format!("lost the container: {e}")),
        };
        if oom > 0 {
            return Exit {
                exit_code: Some(code),
                succeeded: false,
                reason: Reason::OOMKilled,
                message: Some(format!("the memory limit of {} was reached", a.spec.resources.memory)),
            };
        }
        match code {
            0 => Exit { exit_code: Some(0), succeeded: true, reason: Reason::Completed, message: None },
            c if c > 128 && c < 160 => Exit {
                exit_code: Some(c),
                succeeded: false,
                reason: Reason::Signaled,
                message: Some(format!("killed by signal {}", c - 128)),
            },
            c => Exit { exit_code: Some(c), succeeded: false, reason: Reason::Error, message: None },
        }
    }
}

/// A run's network namespace and its address on the bridge; released when dropped.
struct Network {
    ns: crate::cni::Netns,
    bridge: Option<crate::cni::BridgeConfig>,
    addr: Option<std::net::IpAddr>,
    id: String,
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Some(b) = &self.bridge {
            b.del(&self.id, Some(self.ns.path()));
        }
    }
}

/// What a run is given besides its assignment: its secrets, opened, and
/// where to put what must stay off the disk.
pub struct Given<'a> {
    pub run: u64,
    pub opened: &'a std::collections::BTreeMap<String, crate::secrets::Values>,
    pub run_dir: &'a crate::secrets::RunDir,
}

impl Containers {
    /// Runs `argv` inside the running container of replica `key` (a probe),
    /// for at most `timeout`; its exit code. A command still running then
    /// (or when the probe is dropped) is killed, inside the container too.
    pub async fn exec(&self, key: &str, argv: &[String], timeout: Duration) -> Result<i32, String> {
        let rt = self.runtime.clone().ok_or("this node has no OCI runtime")?;
        let pid_file = self.state_root().join(format!(
            "probe-{}-{}.pid",
            container_id(key),
            edge_api::keys::random_hex(4).map_err(|e| e.to_string())?
        ));
        let mut child = tokio::process::Command::new(&rt.path)
            .arg("--root")
            .arg(self.state_root())
            .arg("exec")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(container_id(key))
            .args(argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", rt.path.display()))?;
        // Kills what runc started in the container unless it ended.
        let mut guard = KillProbe { pid_file, armed: true };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => {
                // runc exec returns when the process has ended: nothing to kill.
                guard.armed = false;
                Ok(status.code().unwrap_or(-1))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no exit within {timeout:?}")),
        }
    }
}

/// The process a probe's `runc exec` started, killed (SIGKILL) when the
/// probe is over; harmless if it already ended. Its pid file goes too.
struct KillProbe {
    pid_file: PathBuf,
    /// False once the process is known to have ended (its pid may be reused).
    armed: bool,
}

impl Drop for KillProbe {
    fn drop(&mut self) {
        if self.armed
            && let Some(pid) = std::fs::read_to_string(&self.pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok())
            && pid > 1
        {
            // SAFETY: kill(2) has no memory-safety preconditions. The pid is
            // the one runc wrote for the probe's process, which is still
            // running: `runc exec` (our child) has not returned.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// A container id from a replica key (`workload.replica`).
fn container_id(key: &str) -> String {
    let clean: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    format!("edge-{clean}")
}

fn delete(rt: &OciRuntime, root: &Path, id: &str) {
    let _ = std::process::Command::new(&rt.path)
        .arg("--root")
        .arg(root)
        .args(["delete", "--force", id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

struct Deleter {
    rt: OciRuntime,
    root: PathBuf,
    id: String,
    bundle: PathBuf,
    node: String,
}

impl Drop for Deleter {
    fn drop(&mut self) {
        delete(&self.rt, &self.root, &self.id);
        let _ = std::fs::remove_dir_all(&self.bundle);
        prune_cgroups(&self.node);
    }
}

/// Removes the agent's parent cgroups (`/edge/<node>`, `/edge`) once they
/// are empty: the runtime removes a container's own cgroup, not its parents.
/// A parent still in use refuses (EBUSY), which is fine.
fn prune_cgroups(node: &str) {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()).filter(|p| p.join("edge").is_dir()));
    }
    for r in roots {
        let _ = std::fs::remove_dir(r.join("edge").join(node));
        let _ = std::fs::remove_dir(r.join("edge"));
    }
}

/// OOM kills recorded in a container's memory cgroup (v2 or v1), read
/// before the container is deleted.
fn oom_kills(cgroup: &str) -> u64 {
    let rel = cgroup.trim_start_matches('/');
    for (file, key) in [
        (format!("/sys/fs/cgroup/{rel}/memory.events"), "oom_kill"),
        (format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"), "oom_kill"),
    ] {
        if let Ok(text) = std::fs::read_to_string(&file) {
            return text
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
        }
    }
    0
}

/// Larger than any real `/etc/passwd`.
const MAX_PASSWD_BYTES: u64 = 1 << 20;

/// `uid:gid` for the container: the manifest's, else the image's when it
/// is not root, else 65534 (nobody).
fn resolve_user(spec: &ContainerSpec, image: &Image) -> Result<(u32, u32), String> {
    let parse = |s: &str| -> Option<(u32, u32)> {
        match s.split_once(':') {
            Some((u, g)) => Some((u.parse().ok()?, g.parse().ok()?)),
            None => s.parse().ok().map(|u| (u, u)),
        }
    };
    if let Some(u) = &spec.user {
        return parse(u).ok_or_else(|| format!("spec.container.user {u:?} is not uid[:gid]"));
    }
    let from_image = image.config.config.user.clone().unwrap_or_default();
    if from_image.is_empty() {
        return Ok((65534, 65534));
    }
    let (name, group) = match from_image.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (from_image.clone(), None),
    };
    let uid_gid = match name.parse::<u32>() {
        Ok(uid) => Some((uid, uid)),
        Err(_) => {
            let passwd = edge_oci::unpack::read_in_image(&image.rootfs, &["etc", "passwd"], MAX_PASSWD_BYTES)?
                .unwrap_or_default();
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
            })
        }
    };
    let Some((uid, mut gid)) = uid_gid else {
        return Err(format!("the image's user {from_image:?} is not in its /etc/passwd; set spec.container.user"));
    };
    if let Some(g) = group {
        gid = g.parse().map_err(|_| format!("the image's group {g:?} is not numeric; set spec.container.user"))?;
    }
    Ok(if uid == 0 { (65534, 65534) } else { (uid, gid) })
}

/// The runtime spec (config.json) of a container replica.
#[allow(clippy::too_many_arguments)]
fn runtime_spec(
    a: &Assignment,
    spec: &ContainerSpec,
    image: &Image,
    cgroup: &str,
    node: &str,
    (uid, gid): (u32, u32),
    env_given: &[(String, String)],
    secret_dirs: &[crate::secrets::SecretDir],
    netns: Option<&Path>,
) -> Result<serde_json::Value, String> {
    let cfg = &image.config.config;
    let mut args: Vec<String> =
        if spec.command.is_empty() { cfg.entrypoint.clone().unwrap_or_default() } else { spec.command.clone() };
    if !spec.args.is_empty() {
        args.extend(spec.args.iter().cloned());
    } else if spec.command.is_empty() {
        args.extend(cfg.cmd.clone().unwrap_or_default());
    }
    if args.is_empty() {
        return Err("the image has no entrypoint or command; set spec.container.command".into());
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for kv in cfg.env.clone().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.into(), v.into());
        }
    }
    env.insert("EDGE_WORKLOAD".into(), a.workload.clone());
    env.insert("EDGE_REPLICA".into(), a.replica.to_string());
    env.insert("EDGE_NODE".into(), node.into());
    env.extend(env_given.iter().cloned());
    let memory = a.spec.resources.memory.0;
    // CFS: a quota per 100 ms period; 1000m is one CPU.
    let quota = (a.spec.resources.cpu.0 * 100).max(1000);
    let mut mem = serde_json::json!({ "limit": memory });
    let swap_accounted = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists();
    if swap_accounted {
        mem["swap"] = serde_json::json!(memory);
    }
    let mut mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        serde_json::json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        serde_json::json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}),
        serde_json::json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=16384k"]}),
    ];
    for d in secret_dirs {
        mounts.push(serde_json::json!({"destination": d.guest, "type": "bind", "source": d.host, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    // The node's name resolution (read-only); with a network of its own,
    // only where that has a way out.
    let resolves = match &spec.network {
        ContainerNetwork::None => &[][..],
        _ => &["/etc/resolv.conf", "/etc/hosts"][..],
    };
    for f in resolves {
        if Path::new(f).exists() && image.rootfs.join(&f[1..]).exists() {
            mounts.push(serde_json::json!({"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
        }
    }
    let mut namespaces =
        vec![json!({ "type": "pid" }), json!({ "type": "ipc" }), json!({ "type": "uts" }), json!({ "type": "mount" })];
    if let Some(ns) = netns {
        namespaces.push(json!({ "type": "network", "path": ns }));
    }
    Ok(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": uid, "gid": gid },
            "args": args,
            "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": cfg.working_dir.clone().filter(|d| d.starts_with('/')).unwrap_or_else(|| "/".into()),
            "capabilities": { "bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": [] },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": image.rootfs, "readonly": true },
        "hostname": a.workload,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroup,
            "resources": {
                "memory": mem,
                "cpu": { "quota": quota, "period": 100000 },
                "pids": { "limit": 1024 },
                "devices": [{ "allow": false, "access": "rwm" }]
            },
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_are_safe_names() {
        assert_eq!(container_id("web.0"), "edge-web.0");
        assert_eq!(container_id("a-b/c 12"), "edge-a-b_c_12");
    }

    fn image_with(root: &Path, user: &str) -> Image {
        let mut config = ImageConfig::default();
        config.config.user = Some(user.to_string());
        Image { rootfs: root.to_path_buf(), config }
    }

    #[test]
    fn the_image_user_is_found_inside_the_image_never_on_the_host() {
        let t = std::env::temp_dir().join(format!("edge-passwd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        let root = t.join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        let spec = ContainerSpec::new("oci://r.example/a:1".parse().unwrap());
        let passwd = root.join("etc/passwd");
        // A host file the image points at with an absolute symlink.
        let host = t.join("host-passwd");
        std::fs::write(&host, "app:x:4242:4242::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&host, &passwd).unwrap();
        let e = resolve_user(&spec, &image_with(&root, "app")).unwrap_err();
        assert!(e.contains("not in its /etc/passwd"), "the host's file was read: {e}");
        // A relative symlink inside the image is followed.
        std::fs::remove_file(&passwd).unwrap();
        std::fs::write(root.join("usr/lib/passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("../usr/lib/passwd", &passwd).unwrap();
        assert_eq!(resolve_user(&spec, &image_with(&root, "app")).unwrap(), (1000, 1001));
        // An absolute one too, as the container would see it.
        std::fs::remove_file(&passwd).unwrap();
        std::os::unix::fs::symlink("/usr/lib/passwd", &passwd).unwrap();
        assert_eq!(resolve_user(&spec, &image_with(&root, "app")).unwrap(), (1000, 1001));
        // /dev/zero, a FIFO, a huge file: refused at once, nothing read unbounded.
        std::fs::remove_file(&passwd).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &passwd).unwrap();
        assert!(resolve_user(&spec, &image_with(&root, "app")).is_err());
        std::fs::remove_file(&passwd).unwrap();
        let fifo = std::ffi::CString::new(passwd.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let e = resolve_user(&spec, &image_with(&root, "app")).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(&passwd).unwrap();
        std::fs::write(&passwd, vec![b'x'; (MAX_PASSWD_BYTES + 1) as usize]).unwrap();
        let e = resolve_user(&spec, &image_with(&root, "app")).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        // Numeric users need no file at all.
        assert_eq!(resolve_user(&spec, &image_with(&root, "1234:5")).unwrap(), (1234, 5));
        let _ = std::fs::remove_dir_all(&t);
    }
}
