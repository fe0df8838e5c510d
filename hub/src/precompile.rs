//! Compiling components for the devices that will run them.
//!
//! For every Wasm component a workload names and every engine its nodes
//! report (`RuntimeInfo::fingerprint`: x86_64 and aarch64 Cranelift, Pulley
//! for 32-bit ARM), the hub compiles the component once with the exact
//! configuration agents use (`edge_engine::config`), stores the result in
//! the artifact store (content-addressed), and seals it: component digest,
//! engine fingerprint, the compiled bytes' digest and size, signed with the
//! hub key every agent pinned at enrolment. Agents fetch it
//! (`GET /v1/artifacts/<component>/precompiled/<fingerprint>`) and load it
//! after checking the seal, so a small device never runs Cranelift.
//!
//! Compiles run on threads of their own (`jobs` at once), never on the
//! API's or the MQTT session's runtime. A job is asked for when a workload
//! is applied, when a node with a new engine appears (the tick), and when
//! an agent asks for code that is not there yet (answered "compiling").
//!
//! Invariant: a seal is written only after the bytes it covers are in the
//! artifact store, synced; a seal file that does not verify with the hub's
//! key, or whose bytes are missing, is ignored (and compiled again).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use edge_api::digest::Digest;
use edge_api::keys::SigningKey;
use edge_api::model::CompiledView;
use edge_api::precompiled::{Compiler, Seal};
use edge_engine::Target;
use serde::{Deserialize, Serialize};

use crate::artifacts::ArtifactStore;

/// What the hub knows of one (component, target).
#[derive(Clone, Debug)]
enum Job {
    Queued,
    Compiling {
        since: Instant,
    },
    Done(Record),
    /// `retry_at`: for failures that may pass (I/O, a damaged stored
    /// component); a component that does not compile fails for good.
    Failed {
        error: String,
        retry_at: Option<Instant>,
    },
}

/// How long a failure that may pass is kept before the job is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// A seal and how the compile went; the file `precompiled/<hex>-<fingerprint>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    seal: Seal,
    compile_ms: u64,
    /// When the bytes were last hashed and found to be the seal's (their
    /// file's modification time then), in memory only.
    #[serde(skip)]
    checked: Option<std::time::SystemTime>,
}

/// What an agent asking for compiled code is told.
pub enum Answer {
    Ready {
        seal: Seal,
        path: PathBuf,
    },
    /// Being compiled (or queued); ask again.
    Pending(String),
    /// It will not be there: why.
    Unavailable(String),
}

pub struct Precompiler {
    inner: Arc<Shared>,
    queue: Mutex<mpsc::Sender<(Digest, Target)>>,
    /// Compile threads; none: this hub compiles nothing (`--compile-jobs 0`).
    jobs: usize,
}

struct Shared {
    artifacts: ArtifactStore,
    dir: PathBuf,
    key: SigningKey,
    jobs: Mutex<HashMap<(Digest, Target), Job>>,
    engines: Mutex<HashMap<Target, edge_engine::wasmtime::Engine>>,
    /// The components workloads name: the only ones compiled on request.
    named: Mutex<std::collections::HashSet<Digest>>,
    /// Bumped whenever a job ends, for requests waiting on one.
    ended: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Precompiler {
    /// Loads the seals already made and starts `jobs` compile threads.
    pub fn start(artifacts: ArtifactStore, dir: &Path, key: &SigningKey, jobs: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = SigningKey::from_pkcs8(key.pkcs8()).map_err(std::io::Error::other)?;
        let mut known = HashMap::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match load_record(&path, &artifacts, &key) {
                Ok((id, rec)) => {
                    known.insert(id, Job::Done(rec));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring a precompiled record: {e}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let inner = Arc::new(Shared {
            artifacts,
            dir: dir.to_path_buf(),
            key,
            jobs: Mutex::new(known),
            engines: Mutex::new(HashMap::new()),
            named: Mutex::new(Default::default()),
            ended: tokio::sync::watch::Sender::new(0),
        });
        let (tx, rx) = mpsc::channel::<(Digest, Target)>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..jobs {
            let inner = inner.clone();
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("precompile-{i}")).spawn(move || {
                loop {
                    let next = lock(&rx).recv();
                    let Ok((digest, target)) = next else { return };
                    inner.compile(digest, target);
                }
            })?;
        }
        Ok(Precompiler { inner, queue: Mutex::new(tx), jobs })
    }

    /// Changes whenever a compile ends: subscribe before asking `answer`,
    /// and wait on it while the answer is `Pending`.
    pub fn ended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.ended.subscribe()
    }

    /// The components workloads name now (the hub's tick says).
    pub fn set_named(&self, named: std::collections::HashSet<Digest>) {
        *lock(&self.inner.named) = named;
    }

    /// One more component a workload names (one just applied).
    pub fn name(&self, component: Digest) {
        lock(&self.inner.named).insert(component);
    }

    /// Asks for `component` compiled for `target`, unless it is done, under
    /// way, or failed (for good, or not long ago).
    pub fn want(&self, component: Digest, target: Target) {
        let mut jobs = lock(&self.inner.jobs);
        self.want_locked(&mut jobs, component, target);
    }

    fn want_locked(&self, jobs: &mut HashMap<(Digest, Target), Job>, component: Digest, target: Target) -> bool {
        if self.jobs == 0 {
            return false;
        }
        let again = match jobs.get(&(component, target)) {
            None => true,
            Some(Job::Failed { retry_at: Some(t), .. }) => Instant::now() >= *t,
            Some(_) => false,
        };
        if again {
            jobs.insert((component, target), Job::Queued);
            let _ = lock(&self.queue).send((component, target));
        }
        again
    }

    /// What an agent asking for `component` on `fingerprint` gets. Blocking:
    /// it may hash the compiled bytes (once per change of their file).
    pub fn answer(&self, component: Digest, fingerprint: &str) -> Answer {
        let Some(target) = Target::from_fingerprint(fingerprint) else {
            return Answer::Unavailable(format!(
                "this hub (wasmtime {}) does not compile for engine {fingerprint}",
                edge_engine::WASMTIME_VERSION
            ));
        };
        if !self.inner.artifacts.has(&component) {
            return Answer::Unavailable(format!("component {component} is not in the hub's store"));
        }
        let pending = || Answer::Pending(format!("compiling {component} for {target}"));
        let job = lock(&self.inner.jobs).get(&(component, target)).cloned();
        match job {
            Some(Job::Done(rec)) => {
                let path = self.inner.artifacts.path(&rec.seal.digest);
                match self.inner.intact(&rec) {
                    Ok(checked) => {
                        if let Some(Job::Done(r)) = lock(&self.inner.jobs).get_mut(&(component, target))
                            && r.seal == rec.seal
                        {
                            r.checked = Some(checked);
                        }
                        Answer::Ready { seal: rec.seal, path }
                    }
                    Err(why) => {
                        // Compile again, unless another request already saw to it.
                        tracing::warn!(path = %path.display(), "precompiled code damaged ({why}); compiling again");
                        let mut jobs = lock(&self.inner.jobs);
                        if matches!(jobs.get(&(component, target)), Some(Job::Done(r)) if r.seal == rec.seal) {
                            jobs.remove(&(component, target));
                            let _ = std::fs::remove_file(self.inner.dir.join(record_name(&component, fingerprint)));
                        }
                        if self.want_locked(&mut jobs, component, target)
                            || !matches!(jobs.get(&(component, target)), Some(Job::Done(_)))
                        {
                            return if self.jobs == 0 { self.no_jobs() } else { pending() };
                        }
                        drop(jobs);
                        self.answer(component, fingerprint)
                    }
                }
            }
            _ if self.jobs == 0 => self.no_jobs(),
            Some(Job::Failed { error, retry_at }) => {
                if retry_at.is_some_and(|t| Instant::now() >= t) {
                    self.want(component, target);
                    return pending();
                }
                Answer::Unavailable(format!("compiling for {target} failed: {error}"))
            }
            Some(Job::Queued) | Some(Job::Compiling { .. }) => pending(),
            None if !lock(&self.inner.named).contains(&component) => {
                Answer::Unavailable(format!("no workload names component {component}: it is not compiled on request"))
            }
            None => {
                self.want(component, target);
                pending()
            }
        }
    }

    fn no_jobs(&self) -> Answer {
        Answer::Unavailable("this hub compiles no components (--compile-jobs 0)".into())
    }

    /// Per target: the compile state of `component`, for `describe`.
    pub fn views(&self, component: &Digest) -> Vec<CompiledView> {
        let jobs = lock(&self.inner.jobs);
        let mut out: Vec<CompiledView> = Target::ALL
            .iter()
            .filter_map(|t| {
                let job = jobs.get(&(*component, *t))?;
                let mut v = CompiledView {
                    target: t.name().into(),
                    fingerprint: t.fingerprint(),
                    state: String::new(),
                    compile_ms: None,
                    size: None,
                    error: None,
                };
                match job {
                    Job::Queued => v.state = "Queued".into(),
                    Job::Compiling { since } => {
                        v.state = "Compiling".into();
                        v.compile_ms = Some(since.elapsed().as_millis() as u64);
                    }
                    Job::Done(rec) => {
                        v.state = "Ready".into();
                        v.compile_ms = Some(rec.compile_ms);
                        v.size = Some(rec.seal.size);
                    }
                    Job::Failed { error, .. } => {
                        v.state = "Failed".into();
                        v.error = Some(error.clone());
                    }
                }
                Some(v)
            })
            .collect();
        out.sort_by(|a, b| a.target.cmp(&b.target));
        out
    }
}

impl Shared {
    fn set(&self, id: (Digest, Target), job: Job) {
        let ended = matches!(job, Job::Done(_) | Job::Failed { .. });
        lock(&self.jobs).insert(id, job);
        if ended {
            self.ended.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Checks the compiled bytes of `rec` against its seal: hashed again
    /// only when their file changed since the last check.
    fn intact(&self, rec: &Record) -> Result<std::time::SystemTime, String> {
        let path = self.artifacts.path(&rec.seal.digest);
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let modified = meta.modified().map_err(|e| e.to_string())?;
        if meta.len() != rec.seal.size {
            return Err(format!("{} is {} bytes, its seal says {}", path.display(), meta.len(), rec.seal.size));
        }
        if rec.checked == Some(modified) {
            return Ok(modified);
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        rec.seal.covers(Digest::of(&bytes), bytes.len() as u64).map_err(|e| e.to_string())?;
        Ok(modified)
    }

    fn engine(&self, target: Target) -> Result<edge_engine::wasmtime::Engine, String> {
        let mut engines = lock(&self.engines);
        if let Some(e) = engines.get(&target) {
            return Ok(e.clone());
        }
        let engine = edge_engine::config(target)
            .and_then(|c| edge_engine::wasmtime::Engine::new(&c))
            .map_err(|e| format!("cannot make an engine for {target}: {e:#}"))?;
        engines.insert(target, engine.clone());
        Ok(engine)
    }

    fn compile(&self, component: Digest, target: Target) {
        let id = (component, target);
        let started = Instant::now();
        self.set(id, Job::Compiling { since: started });
        match self.compile_to_store(component, target) {
            Ok((digest, size)) => {
                let compile_ms = started.elapsed().as_millis() as u64;
                let seal = Seal::sign(component, &target.fingerprint(), digest, size, Compiler::Hub, &self.key);
                let rec = Record { seal, compile_ms, checked: None };
                match self.write_record(&rec) {
                    Ok(()) => {
                        tracing::info!(%component, %target, ms = compile_ms, bytes = size, "precompiled component");
                        self.set(id, Job::Done(rec));
                    }
                    Err(e) => {
                        tracing::warn!(%component, %target, "cannot record a precompiled component: {e}");
                        let retry_at = Some(Instant::now() + RETRY_AFTER);
                        self.set(id, Job::Failed { error: format!("cannot store it: {e}"), retry_at });
                    }
                }
            }
            Err((error, lasting)) => {
                tracing::warn!(%component, %target, "precompiling failed: {error}");
                let retry_at = (!lasting).then(|| Instant::now() + RETRY_AFTER);
                self.set(id, Job::Failed { error, retry_at });
            }
        }
    }

    /// The compiled bytes' digest and size; or why not, and whether that
    /// will last (the component does not compile) or may pass (I/O).
    fn compile_to_store(&self, component: Digest, target: Target) -> Result<(Digest, u64), (String, bool)> {
        let path = self.artifacts.path(&component);
        let bytes = std::fs::read(&path).map_err(|e| (format!("cannot read {}: {e}", path.display()), false))?;
        // The store's own disk may rot too: compile only the bytes named.
        let actual = Digest::of(&bytes);
        if actual != component {
            return Err((format!("{} hashes to {actual}: the stored component is damaged", path.display()), false));
        }
        let engine = self.engine(target).map_err(|e| (e, false))?;
        let code = engine.precompile_component(&bytes).map_err(|e| (format!("{e:#}"), true))?;
        drop(bytes);
        let digest = Digest::of(&code);
        self.artifacts.put_sync(digest, &code).map_err(|e| (e.to_string(), false))?;
        Ok((digest, code.len() as u64))
    }

    fn write_record(&self, rec: &Record) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.dir.join(record_name(&rec.seal.component, &rec.seal.fingerprint));
        let tmp = path.with_extension(format!("{}.tmp", edge_api::keys::random_hex(4).unwrap_or_default()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(rec).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn record_name(component: &Digest, fingerprint: &str) -> String {
    format!("{}-{fingerprint}.json", component.hex())
}

fn load_record(path: &Path, artifacts: &ArtifactStore, key: &SigningKey) -> Result<((Digest, Target), Record), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if bytes.len() > 16 << 10 {
        return Err("too large".into());
    }
    let rec: Record = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let target = Target::from_fingerprint(&rec.seal.fingerprint)
        .ok_or_else(|| format!("engine {} is not this hub's", rec.seal.fingerprint))?;
    let public = key.public();
    rec.seal.verify(&rec.seal.component, &rec.seal.fingerprint, Some(&public), &public).map_err(|e| e.to_string())?;
    if path.file_name().and_then(|n| n.to_str()) != Some(&record_name(&rec.seal.component, &rec.seal.fingerprint)) {
        return Err("its name does not match its seal".into());
    }
    if artifacts.size(&rec.seal.digest) != Some(rec.seal.size) {
        return Err(format!("its compiled bytes {} are missing", rec.seal.digest));
    }
    Ok(((rec.seal.component, target), rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_done(p: &Precompiler, c: Digest, t: Target) -> Answer {
        for _ in 0..1200 {
            match p.answer(c, &t.fingerprint()) {
                Answer::Pending(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                a => return a,
            }
        }
        panic!("no compile result in 120 s");
    }

    #[test]
    fn components_are_compiled_for_every_target_sealed_and_remembered() {
        let dir = std::env::temp_dir().join(format!("edge-hub-precompile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = ArtifactStore::open(&dir.join("artifacts")).unwrap();
        let key = SigningKey::generate().unwrap();
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello.wasm")).unwrap();
        let c = Digest::of(&bytes);
        store.put_sync(c, &bytes).unwrap();
        let p = Precompiler::start(store.clone(), &dir.join("precompiled"), &key, 1).unwrap();
        for t in Target::ALL {
            p.want(c, t);
        }
        for t in Target::ALL {
            let Answer::Ready { seal, path } = wait_done(&p, c, t) else { panic!("{t} did not compile") };
            seal.verify(&c, &t.fingerprint(), Some(&key.public()), &key.public()).unwrap();
            let code = std::fs::read(&path).unwrap();
            seal.covers(Digest::of(&code), code.len() as u64).unwrap();
        }
        let views = p.views(&c);
        assert_eq!(views.len(), Target::ALL.len());
        assert!(views.iter().all(|v| v.state == "Ready" && v.size.is_some()), "{views:?}");
        assert!(matches!(p.answer(c, "wasmtime-1.0.0-x86_64-00000000"), Answer::Unavailable(_)));

        // Not a component: it fails, and says why.
        let junk = b"\0asm\x0d\0\x01\0not really".to_vec();
        let j = Digest::of(&junk);
        store.put_sync(j, &junk).unwrap();
        assert!(
            matches!(p.answer(j, &Target::X86_64.fingerprint()), Answer::Unavailable(w) if w.contains("no workload names")),
            "only what workloads name is compiled on request"
        );
        p.set_named([c, j].into_iter().collect());
        let Answer::Unavailable(why) = wait_done(&p, j, Target::X86_64) else { panic!("junk compiled") };
        assert!(why.contains("failed"), "{why}");

        // A restarted hub knows what it compiled, and ignores a forged record.
        drop(p);
        let x86 = dir.join("precompiled").join(record_name(&c, &Target::X86_64.fingerprint()));
        let mut rec: Record = serde_json::from_slice(&std::fs::read(&x86).unwrap()).unwrap();
        let other = SigningKey::generate().unwrap();
        rec.seal = Seal::sign(c, &rec.seal.fingerprint, rec.seal.digest, rec.seal.size, Compiler::Hub, &other);
        std::fs::write(&x86, serde_json::to_vec(&rec).unwrap()).unwrap();
        let p = Precompiler::start(store.clone(), &dir.join("precompiled"), &key, 1).unwrap();
        p.set_named([c].into_iter().collect());
        assert!(matches!(p.answer(c, &Target::Aarch64.fingerprint()), Answer::Ready { .. }), "remembered");
        assert!(!x86.exists(), "the forged record was dropped");
        assert!(matches!(p.answer(c, &Target::X86_64.fingerprint()), Answer::Pending(_)), "and compiled again");
        let Answer::Ready { seal, path } = wait_done(&p, c, Target::X86_64) else { panic!("not compiled again") };

        // Its bytes rot in the hub's store: never served, compiled again.
        let mut code = std::fs::read(&path).unwrap();
        let mid = code.len() / 2;
        code[mid] ^= 0x01;
        std::fs::write(&path, &code).unwrap();
        let again = wait_done(&p, c, Target::X86_64);
        let Answer::Ready { seal: s2, path: p2 } = again else { panic!("not compiled again") };
        let fresh = std::fs::read(&p2).unwrap();
        s2.covers(Digest::of(&fresh), fresh.len() as u64).unwrap();
        assert_eq!(s2.digest, seal.digest, "the same code again");

        // A hub that compiles nothing says so at once.
        drop(p);
        let none = Precompiler::start(store, &dir.join("precompiled-none"), &key, 0).unwrap();
        none.set_named([c].into_iter().collect());
        assert!(
            matches!(none.answer(c, &Target::X86_64.fingerprint()), Answer::Unavailable(w) if w.contains("--compile-jobs 0"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
