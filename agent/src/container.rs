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
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use edge_api::digest::Digest;
use edge_api::model::{ContainerSpec, RuntimeInfo};
use edge_api::wire::Assignment;
use serde::Deserialize;
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

fn invalid(reason: &str, message: String) -> Exit {
    Exit { exit_code: None, succeeded: false, reason: reason.into(), message: Some(message) }
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
    pub fn new(data_dir: &Path, node: &str, insecure_registries: Vec<String>) -> anyhow::Result<Containers> {
        let dir = data_dir.join("containers");
        for d in ["images", "blobs", "state"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        Ok(Containers {
            runtime: detect(),
            dir,
            node: node.to_string(),
            registry: std::sync::OnceLock::new(),
            insecure_registries,
            pulling: tokio::sync::Mutex::new(()),
        })
    }

    /// What the node reports, if it can run containers.
    pub fn info(&self) -> Option<RuntimeInfo> {
        self.runtime.as_ref().map(|r| RuntimeInfo {
            name: "oci".into(),
            version: r.version.clone(),
            mode: r.name.into(),
        })
    }

    fn state_root(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Deletes containers a previous run of the agent left behind (after a
    /// kill -9 or a power cut): their replicas are started afresh.
    pub fn remove_stale(&self) {
        let Some(rt) = &self.runtime else { return };
        let Ok(entries) = std::fs::read_dir(self.state_root()) else { return };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            tracing::info!(id, "removing a container left from a previous run");
            delete(rt, &self.state_root(), &id);
        }
        // Bundles lived here before they moved to the run directory.
        let _ = std::fs::remove_dir_all(self.dir.join("bundles"));
        prune_cgroups(&self.node);
    }

    /// Pulls and unpacks the image for this node's platform, once per manifest.
    async fn pull(&self, spec: &ContainerSpec, arch: &str, sink: &LogSink) -> Result<Image, Exit> {
        let Some(chosen) = spec.image_for(arch) else {
            return Err(invalid("InvalidImage", format!("{} offers no image for {arch}", spec.image)));
        };
        let digest = chosen.manifest;
        let image_dir = self.dir.join("images").join(digest.hex());
        let config_file = image_dir.join("config.json");
        let _guard = self.pulling.lock().await;
        if !image_dir.join("complete").exists() {
            sink.note(&format!("pulling {} for {} ({digest})", spec.image, chosen.platform));
            self.pull_into(spec, &digest, &image_dir).await.map_err(|e| invalid("ImagePullFailed", e))?;
        }
        let config: ImageConfig =
            std::fs::read(&config_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or_else(|| {
                invalid("InvalidImage", format!("cannot read the image config {}", config_file.display()))
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
            tokio::task::spawn_blocking(move || unpack_layer(&blob2, &media_type, &rootfs2))
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

    /// One run of a container replica, start to exit.
    pub async fn run(
        &self,
        key: &str,
        a: &Assignment,
        arch: &str,
        sink: Arc<LogSink>,
        given: Given<'_>,
        started: impl FnOnce(),
    ) -> Exit {
        let edge_api::model::Runtime::Container(spec) = &a.spec.runtime else {
            return invalid("InvalidSpec", "not a container workload".into());
        };
        let Some(rt) = self.runtime.clone() else {
            return invalid("NoContainerRuntime", "this node has no OCI runtime (runc or crun) or is not root".into());
        };
        let image = match self.pull(spec, arch, &sink).await {
            Ok(i) => i,
            Err(exit) => return exit,
        };
        let id = container_id(key);
        let (uid, gid) = match resolve_user(spec, &image) {
            Ok(u) => u,
            Err(e) => return invalid("InvalidImage", e),
        };
        let env = match crate::secrets::env(&a.spec, given.opened) {
            Ok(e) => e,
            Err(e) => return invalid("SecretUnavailable", e.0),
        };
        // Held until the container is gone: its secret files go with it.
        let files = match given.run_dir.write(key, given.run, &a.spec, given.opened, Some((uid, gid))) {
            Ok(f) => f,
            Err(e) => return invalid("SecretUnavailable", e),
        };
        // The bundle holds env values (secrets among them): on the run
        // directory's tmpfs, never the data directory's disk.
        let bundle = given.run_dir.path().join("bundles").join(&id);
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&bundle) {
            return invalid("StorageError", format!("cannot create the bundle {}: {e}", bundle.display()));
        }
        let cgroup = format!("/edge/{}/{id}", self.node);
        let user = (uid, gid);
        let runtime_spec = match runtime_spec(a, spec, &image, &cgroup, &self.node, user, &env, &files.dirs) {
            Ok(s) => s,
            Err(e) => return invalid("InvalidImage", e),
        };
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(bundle.join("config.json"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, runtime_spec.to_string().as_bytes()));
        if let Err(e) = written {
            return invalid("StorageError", format!("cannot write the bundle: {e}"));
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
            Err(e) => return invalid("RuntimeError", format!("cannot start {}: {e}", rt.path.display())),
        };
        // From here on the container exists until this guard deletes it,
        // also when the run is stopped (this future dropped).
        let guard = Deleter { rt: rt.clone(), root: root.clone(), id: id.clone(), bundle, node: self.node.clone() };
        started();
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
        drop(files);
        let code = match status {
            Ok(s) => s.code().unwrap_or(-1),
            Err(e) => return invalid("RuntimeError", format!("lost the container: {e}")),
        };
        if oom > 0 {
            return Exit {
                exit_code: Some(code),
                succeeded: false,
                reason: "OOMKilled".into(),
                message: Some(format!("the memory limit of {} was reached", a.spec.resources.memory)),
            };
        }
        match code {
            0 => Exit { exit_code: Some(0), succeeded: true, reason: "Completed".into(), message: None },
            c if c > 128 && c < 160 => Exit {
                exit_code: Some(c),
                succeeded: false,
                reason: "Signaled".into(),
                message: Some(format!("killed by signal {}", c - 128)),
            },
            c => Exit { exit_code: Some(c), succeeded: false, reason: "Error".into(), message: None },
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
    let passwd = std::fs::read_to_string(image.rootfs.join("etc/passwd")).unwrap_or_default();
    let uid_gid = match name.parse::<u32>() {
        Ok(uid) => Some((uid, uid)),
        Err(_) => passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
        }),
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
    // The host's network, so its name resolution too (read-only).
    for f in ["/etc/resolv.conf", "/etc/hosts"] {
        if Path::new(f).exists() && image.rootfs.join(&f[1..]).exists() {
            mounts.push(serde_json::json!({"destination": f, "type": "bind", "source": f, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
        }
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
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }],
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

/// The relative, normalised form of a path in a layer; `..` is refused.
fn layer_path(p: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err(format!("entry {} climbs out of the image root", p.display())),
            Component::Prefix(_) => return Err(format!("entry {} is not a Unix path", p.display())),
        }
    }
    Ok(out)
}

/// The directory `parts` names inside `root`, following symlinks in every
/// component as if `root` were `/`: the result is always under `root`.
/// (An entry's own name is never followed: it is replaced.)
fn resolve_in(root: &Path, parts: &[String]) -> Result<PathBuf, String> {
    let mut resolved: Vec<String> = Vec::new();
    let mut todo: std::collections::VecDeque<String> = parts.iter().cloned().collect();
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let candidate = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!("too many symlinks resolving {}", parts.join("/")));
                }
                let target = std::fs::read_link(&candidate).map_err(|e| e.to_string())?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut t: Vec<String> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                t.extend(todo.drain(..));
                todo = t.into();
            }
            _ => resolved.push(part),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()))
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn open_layer(blob: &Path, media_type: &str) -> Result<Box<dyn Read>, String> {
    let mut f = std::fs::File::open(blob).map_err(|e| e.to_string())?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(|e| e.to_string())?;
    std::io::Seek::rewind(&mut f).map_err(|e| e.to_string())?;
    if n == 2 && magic == [0x1f, 0x8b] {
        return Ok(Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f))));
    }
    if media_type.contains("zstd") {
        return Err(format!("layers compressed with zstd are not supported yet ({media_type})"));
    }
    Ok(Box::new(std::io::BufReader::new(f)))
}

/// Applies one layer to `root`: whiteouts first (they hide what lower
/// layers put there), then every entry, each resolved inside `root`.
pub fn unpack_layer(blob: &Path, media_type: &str, root: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut archive = tar::Archive::new(open_layer(blob, media_type)?);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let parts = layer_path(&path)?;
        let Some(name) = parts.last() else { continue };
        let Some(hidden) = name.strip_prefix(".wh.") else { continue };
        let dir = resolve_in(root, &parts[..parts.len() - 1])?;
        if hidden == ".wh..opq" {
            if let Ok(children) = std::fs::read_dir(&dir) {
                for c in children.flatten() {
                    remove_any(&c.path());
                }
            }
        } else {
            remove_any(&dir.join(hidden));
        }
    }
    let mut archive = tar::Archive::new(open_layer(blob, media_type)?);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let parts = layer_path(&path)?;
        let Some(name) = parts.last().cloned() else { continue };
        if name.starts_with(".wh.") {
            continue;
        }
        let parent = resolve_in(root, &parts[..parts.len() - 1])?;
        std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", path.display()))?;
        let target = parent.join(&name);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        if kind.is_dir() {
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&target);
                    std::fs::create_dir(&target).map_err(err)?;
                }
                Err(_) => std::fs::create_dir(&target).map_err(err)?,
            }
        } else if kind.is_file() {
            remove_any(&target);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(err)?;
            std::io::copy(&mut entry, &mut f).map_err(err)?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(err)?
                .ok_or_else(|| format!("{}: a symlink without a target", path.display()))?;
            remove_any(&target);
            std::os::unix::fs::symlink(&link, &target).map_err(err)?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(err)?
                .ok_or_else(|| format!("{}: a hard link without a target", path.display()))?;
            let lparts = layer_path(&link)?;
            let Some((lname, ldir)) = lparts.split_last() else {
                return Err(format!("{}: an empty link target", path.display()));
            };
            let source = resolve_in(root, ldir)?.join(lname);
            remove_any(&target);
            std::fs::hard_link(&source, &target).map_err(err)?;
            continue;
        } else {
            // Devices, FIFOs: containers get their /dev from the runtime.
            continue;
        }
        if as_root {
            let (uid, gid) = (header.uid().unwrap_or(0) as u32, header.gid().unwrap_or(0) as u32);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(err)?;
        }
        if !kind.is_symlink() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            let link = kind.is_symlink() || kind.is_hard_link();
            let body: &[u8] = if link { &[] } else { data.as_bytes() };
            if link {
                h.set_link_name(data).unwrap();
            }
            h.set_size(body.len() as u64);
            // set_path refuses `..`; write the raw name for hostile cases.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn unpack(dir: &Path, n: usize, entries: &[(&str, tar::EntryType, &str)]) -> Result<(), String> {
        let blob = dir.join(format!("layer-{n}.tar"));
        std::fs::write(&blob, tar_of(entries)).unwrap();
        unpack_layer(&blob, "application/vnd.oci.image.layer.v1.tar", &dir.join("root"))
    }

    #[test]
    fn layers_stack_with_whiteouts_and_never_write_outside_the_root() {
        use tar::EntryType::{Directory as D, Regular as F, Symlink as L};
        let dir = std::env::temp_dir().join(format!("edge-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        unpack(
            &dir,
            0,
            &[
                ("etc/", D, ""),
                ("etc/gone", F, "old"),
                ("etc/kept", F, "kept"),
                ("data/", D, ""),
                ("data/old", F, "old"),
                ("usr/lib/", D, ""),
                ("lib", L, "usr/lib"),
                ("escape", L, "/../../../outside"),
            ],
        )
        .unwrap();
        unpack(
            &dir,
            1,
            &[
                ("etc/.wh.gone", F, ""),
                ("data/.wh..wh..opq", F, ""),
                ("data/new", F, "new"),
                ("lib/libx.so", F, "through the link"),
                // Through a symlink pointing out of the root: lands inside it.
                ("escape/file", F, "contained"),
            ],
        )
        .unwrap();
        let root = dir.join("root");
        assert!(!root.join("etc/gone").exists(), "whited out");
        assert_eq!(std::fs::read_to_string(root.join("etc/kept")).unwrap(), "kept");
        assert!(!root.join("data/old").exists(), "an opaque directory hides lower layers");
        assert_eq!(std::fs::read_to_string(root.join("data/new")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(root.join("usr/lib/libx.so")).unwrap(), "through the link");
        assert_eq!(std::fs::read_to_string(root.join("outside/file")).unwrap(), "contained");
        assert!(!dir.join("outside").exists() && !Path::new("/outside").exists());

        let e = unpack(&dir, 2, &[("../evil", F, "x")]).unwrap_err();
        assert!(e.contains("climbs out"), "{e}");
        assert!(!dir.join("evil").exists());
        let e = unpack(&dir, 3, &[("a/../../evil2", F, "x")]).unwrap_err();
        assert!(e.contains("climbs out"), "{e}");
        // A hard link may only point inside the root too.
        unpack(&dir, 4, &[("hl", tar::EntryType::Link, "../../../etc/passwd")]).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn container_ids_are_safe_names() {
        assert_eq!(container_id("web.0"), "edge-web.0");
        assert_eq!(container_id("a-b/c 12"), "edge-a-b_c_12");
    }
}
