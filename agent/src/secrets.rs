//! Secrets on the node: opened from the assignment with the node's own key,
//! given to a replica as env values or as read-only files, never logged and
//! never written to persistent storage.
//!
//! Files live under the run directory (`--run-dir`, a tmpfs such as
//! `/run/edge-agent`): `secrets/<replica>/<secret>/<key>`, directories 0500
//! and files 0400, owned by the user the replica runs as. They are removed
//! when the replica stops, and the whole tree when the agent starts.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use edge_api::model::{EnvValue, WorkloadSpec};
use edge_api::seal::KemKeyPair;
use edge_api::wire::Assignment;

/// A secret's values, by key.
pub type Values = BTreeMap<String, String>;

/// Why a replica cannot have its secrets (reported as `SecretUnavailable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// Opens every secret the assignment's spec uses.
pub fn open_all(node: &str, kem: &KemKeyPair, a: &Assignment) -> Result<BTreeMap<String, Values>, Unavailable> {
    let mut out = BTreeMap::new();
    for name in a.spec.secret_names() {
        let Some(s) = a.secrets.get(name) else {
            return Err(Unavailable(format!(
                "secret {name:?} did not come with the assignment (see the workload's events on the hub)"
            )));
        };
        if s.sealed.ct.len() > edge_api::manifest::MAX_SECRET_BYTES * 8 {
            return Err(Unavailable(format!("secret {name:?} is larger than any secret can be")));
        }
        let info = edge_api::seal::secret_info(node, name, s.version);
        let plain = kem
            .open(&info, &s.sealed)
            .map_err(|e| Unavailable(format!("secret {name:?} (version {}): {e}", s.version)))?;
        let values: Values = serde_json::from_slice(&plain)
            .map_err(|_| Unavailable(format!("secret {name:?} (version {}) is malformed", s.version)))?;
        out.insert(name.to_string(), values);
    }
    Ok(out)
}

/// The spec's environment with secret references replaced by their values.
pub fn env(spec: &WorkloadSpec, opened: &BTreeMap<String, Values>) -> Result<Vec<(String, String)>, Unavailable> {
    let (env, _) = spec.env_and_secrets();
    env.iter()
        .map(|(k, v)| match v {
            EnvValue::Text(t) => Ok((k.clone(), t.clone())),
            EnvValue::Secret(r) => opened
                .get(&r.secret)
                .and_then(|vals| vals.get(&r.key))
                .map(|val| (k.clone(), val.clone()))
                .ok_or_else(|| Unavailable(format!("env {k}: secret {:?} has no key {:?}", r.secret, r.key))),
        })
        .collect()
}

/// A secret written out for one replica: `host` holds one file per key and
/// is shown to the replica at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretDir {
    pub host: PathBuf,
    pub guest: String,
}

/// A replica run's secret files; removed when dropped (a service's
/// capabilities hold it until its last request is done).
#[derive(Debug, Default)]
pub struct SecretFiles {
    base: Option<PathBuf>,
    pub dirs: Vec<SecretDir>,
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        if let Some(base) = self.base.take() {
            remove_tree(&base);
            if let Some(parent) = base.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Removes a tree of read-only directories (0500: made writable first, at
/// every depth; symlinks are never followed).
fn remove_tree(dir: &Path) {
    fn writable(dir: &Path, depth: usize) {
        let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        if depth == 0 {
            return;
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                writable(&e.path(), depth - 1);
            }
        }
    }
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        writable(dir, 8);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Where the agent keeps what must not outlive a boot.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Takes the run directory: creates it (0700), makes sure no other agent
    /// uses it, and removes what a previous run left in it.
    pub fn open(root: &Path) -> anyhow::Result<(RunDir, std::fs::File)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| anyhow::anyhow!("cannot create the run directory {}: {e} (pass --run-dir)", root.display()))?;
        // Secrets go here: a directory someone else owns or may write to
        // could redirect them.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(root)?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            anyhow::bail!(
                "the run directory {} must be a directory owned by uid {me} and writable by no one else (it is {:o}, uid {})",
                root.display(),
                meta.mode() & 0o7777,
                meta.uid()
            );
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(root.join("lock"))
            .map_err(|e| anyhow::anyhow!("cannot lock the run directory {}: {e}", root.display()))?;
        // SAFETY: flock on a file descriptor we own; released when it closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!("another agent uses the run directory {}: give each agent its own --run-dir", root.display());
        }
        let dir = RunDir { root: root.to_path_buf() };
        remove_tree(&dir.secrets_root());
        let _ = std::fs::remove_dir_all(root.join("bundles"));
        Ok((dir, lock))
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Removes what the agent put in the run directory, and the directory
    /// if nothing else is in it (it may be shared with other files).
    pub fn close(&self) {
        remove_tree(&self.secrets_root());
        let _ = std::fs::remove_dir_all(self.root.join("bundles"));
        let _ = std::fs::remove_file(self.root.join("lock"));
        let _ = std::fs::remove_dir(&self.root);
    }

    fn secrets_root(&self) -> PathBuf {
        self.root.join("secrets")
    }

    /// Writes the secrets the spec mounts for one run of a replica,
    /// readable only by `owner` (`None`: the agent itself, for Wasm).
    pub fn write(
        &self,
        replica: &str,
        run: u64,
        spec: &WorkloadSpec,
        opened: &BTreeMap<String, Values>,
        owner: Option<(u32, u32)>,
    ) -> Result<SecretFiles, String> {
        let (_, mounts) = spec.env_and_secrets();
        if mounts.is_empty() {
            return Ok(SecretFiles::default());
        }
        let base = self.secrets_root().join(replica).join(run.to_string());
        let mkdir = |p: &Path, mode: u32| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(p)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))
        };
        remove_tree(&base);
        mkdir(&base, 0o711)?;
        let mut files = SecretFiles { base: Some(base.clone()), dirs: Vec::new() };
        for (i, m) in mounts.iter().enumerate() {
            let values = opened.get(&m.secret).ok_or_else(|| format!("secret {:?} was not opened", m.secret))?;
            // A directory per mount; the same secret may be mounted twice.
            let dir = base.join(format!("{i}-{}", m.secret));
            mkdir(&dir, 0o700)?;
            for (k, v) in values {
                // Keys were checked by the hub; check again before they become file names.
                edge_api::manifest::check_secret_key(k)?;
                let f = dir.join(k);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o400)
                    .open(&f)
                    .map_err(|e| format!("cannot write {}: {e}", f.display()))?;
                file.write_all(v.as_bytes()).map_err(|e| format!("cannot write {}: {e}", f.display()))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&f, Some(uid), Some(gid))
                        .map_err(|e| format!("cannot give {} to {uid}:{gid}: {e}", f.display()))?;
                }
            }
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))
                    .map_err(|e| format!("cannot give {} to {uid}:{gid}: {e}", dir.display()))?;
            }
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o500))
                .map_err(|e| format!("cannot protect {}: {e}", dir.display()))?;
            files.dirs.push(SecretDir { host: dir, guest: m.path.clone() });
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::model::*;
    use edge_api::wire::SealedSecret;

    fn assignment(node_kem: &KemKeyPair, node: &str, version: u64) -> Assignment {
        let mut spec = WasmSpec {
            component: ArtifactRef::Digest(edge_api::digest::Digest::of(b"c")),
            args: vec![],
            env: Env::new(),
            secrets: vec![SecretMount { secret: "tls".into(), path: "/etc/tls".into() }],
            max_instances: None,
            memory_total: None,
            cpu_budget: None,
            request_timeout: None,
            outbound: vec![],
            key_value: false,
            source: None,
        };
        spec.env.insert("MODE".into(), "x".into());
        spec.env.insert("PW".into(), EnvValue::Secret(SecretKeyRef { secret: "db".into(), key: "password".into() }));
        let seal = |name: &str, json: &str| SealedSecret {
            version,
            sealed: edge_api::seal::seal(
                &node_kem.public(),
                &edge_api::seal::secret_info(node, name, version),
                json.as_bytes(),
            )
            .unwrap(),
        };
        Assignment {
            workload: "w".into(),
            replica: 0,
            uid: "u".into(),
            generation: 1,
            spec: WorkloadSpec {
                replicas: edge_api::model::Replicas::Count(1),
                restart: RestartPolicy::OnFailure,
                resources: Resources::default(),
                placement: Placement::default(),
                runtime: Runtime::Wasm(spec),
                http: None,
                health: Default::default(),
                rerun_interrupted: true,
                rollout: edge_api::model::RolloutSpec::standard(),
                node_loss: Default::default(),
            },
            secrets: [
                ("db".to_string(), seal("db", r#"{"password":"hunter2"}"#)),
                ("tls".to_string(), seal("tls", r#"{"ca.crt":"PEM","key":"K"}"#)),
            ]
            .into(),
        }
    }

    #[test]
    fn a_node_opens_its_own_secrets_and_no_one_else_does() {
        let kem = KemKeyPair::generate().unwrap();
        let a = assignment(&kem, "pi-1", 2);
        let opened = open_all("pi-1", &kem, &a).unwrap();
        let env = env(&a.spec, &opened).unwrap();
        assert_eq!(env, [("MODE".to_string(), "x".to_string()), ("PW".to_string(), "hunter2".to_string())]);

        // Another node's key, another node's name, a box missing or tampered.
        let other = KemKeyPair::generate().unwrap();
        assert!(open_all("pi-1", &other, &a).unwrap_err().0.contains("\"db\""));
        assert!(open_all("pi-2", &kem, &a).is_err());
        let mut missing = a.clone();
        missing.secrets.remove("tls");
        assert!(open_all("pi-1", &kem, &missing).unwrap_err().0.contains("did not come"));
        let mut tampered = a.clone();
        tampered.secrets.get_mut("db").unwrap().sealed.ct[0] ^= 1;
        assert!(open_all("pi-1", &kem, &tampered).is_err());
        let mut rolled = a.clone();
        rolled.secrets.get_mut("db").unwrap().version = 1;
        assert!(open_all("pi-1", &kem, &rolled).is_err(), "a box is bound to its version");
    }

    #[test]
    fn files_are_private_read_only_and_go_away() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("edge-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (run, _lock) = RunDir::open(&root).unwrap();
        assert!(RunDir::open(&root).unwrap_err().to_string().contains("another agent"));
        let open = root.with_extension("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(RunDir::open(&open).unwrap_err().to_string().contains("writable by no one else"));
        let _ = std::fs::remove_dir_all(&open);
        let kem = KemKeyPair::generate().unwrap();
        let a = assignment(&kem, "pi-1", 1);
        let opened = open_all("pi-1", &kem, &a).unwrap();
        let files = run.write("w.0", 1, &a.spec, &opened, None).unwrap();
        let dirs = &files.dirs;
        assert_eq!(dirs.len(), 1);
        assert_eq!(dirs[0].guest, "/etc/tls");
        assert_eq!(std::fs::read_to_string(dirs[0].host.join("ca.crt")).unwrap(), "PEM");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dirs[0].host), mode(&dirs[0].host.join("key"))), (0o500, 0o400));
        assert_eq!(mode(&root), 0o700);
        // A second run has its own files; each run's go when it ends.
        let second = run.write("w.0", 2, &a.spec, &opened, None).unwrap();
        let first_dir = dirs[0].host.clone();
        drop(files);
        assert!(!first_dir.exists());
        assert!(second.dirs[0].host.join("key").exists());
        drop(second);
        assert!(!root.join("secrets/w.0").exists());
        let _ = std::fs::remove_dir_all(&root);
    }
}
