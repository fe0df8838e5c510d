//! Compiled components on disk, and where they come from.
//!
//! Compiled code is machine code (or Pulley bytecode): loading it is
//! trusting it completely. So each compiled file `<component>-<fingerprint>.cwasm`
//! rests beside its seal (`.seal`, see `edge_api::precompiled`): signed by
//! the hub that compiled it, or by this node's key when the agent compiled
//! it itself. Before every load the seal is verified and the file hashed
//! against it; a file that fails is deleted, counted and logged with its
//! path, and compiled code is got again: from the hub, or compiled here.
//!
//! Local compiles run in a child process (`edge-agent compile`, this same
//! binary), one at a time, under a data-size limit: Cranelift's memory goes
//! back to the system when the child ends, and a compile that outgrows the
//! limit fails alone. The child hashes the component it reads against the
//! digest it was given, so only the bytes the hub named are ever compiled.
//!
//! Invariant: no byte reaches `Component::deserialize_file` that was not
//! hashed against a verified seal when this process read it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edge_api::digest::{Digest, Hasher};
use edge_api::keys::{PublicKey, SigningKey};
use edge_api::model::Reason;
use edge_api::precompiled::{Compiler, Seal};

/// Why a component could not be prepared, as a replica reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareError {
    pub reason: Reason,
    pub message: String,
}

impl PrepareError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        PrepareError { reason, message: message.into() }
    }
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// What the cache had for a component.
pub enum Loaded {
    Component(wasmtime::component::Component),
    /// Nothing.
    Absent,
    /// Something that failed its check; deleted.
    Corrupt,
    /// Checked code that wasmtime would not load (another engine's, or a
    /// CPU feature this one lacks); deleted.
    Refused(String),
}

/// Exit codes of `edge-agent compile`.
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_CORRUPT: i32 = 3;
pub const EXIT_NO_COMPILER: i32 = 4;

/// A seal is a few hundred bytes; anything much larger is not one.
const SEAL_LIMIT: u64 = 4096;

/// How long a local compile may take before it is stopped.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub struct CodeCache {
    dir: PathBuf,
    fingerprint: String,
    /// The data-size limit of a compiling child (bytes).
    compile_memory: u64,
    /// Compile in this process (tests and benchmarks, whose programs have
    /// no `compile` command), not in a child.
    pub in_process: std::sync::atomic::AtomicBool,
    /// Compiled files and components found bad when read.
    pub corrupt: AtomicU64,
}

impl CodeCache {
    pub fn new(dir: &Path, fingerprint: String, compile_memory: u64) -> Self {
        CodeCache {
            dir: dir.to_path_buf(),
            fingerprint,
            compile_memory,
            in_process: Default::default(),
            corrupt: AtomicU64::new(0),
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The compiled file and its seal.
    pub fn paths(&self, component: &Digest) -> (PathBuf, PathBuf) {
        let stem = format!("{}-{}", component.hex(), self.fingerprint);
        (self.dir.join(format!("{stem}.cwasm")), self.dir.join(format!("{stem}.seal")))
    }

    /// A temporary path in the cache directory (same file system: renamed into place).
    pub fn scratch(&self, component: &Digest, what: &str) -> PathBuf {
        self.dir.join(format!("{}.{what}.{}", component.hex(), std::process::id()))
    }

    /// Loads the compiled code for `component`, if the cache has it: its
    /// seal verified (`hub`: the pinned hub key; `node`: this node's), the
    /// file read into memory and hashed against the seal, and only those
    /// bytes given to wasmtime (a mapped file would be read from the disk
    /// again, unchecked, whenever its pages were evicted). A pair that
    /// fails its check is deleted. Blocking.
    pub fn load(
        &self,
        engine: &wasmtime::Engine,
        component: &Digest,
        hub: Option<&PublicKey>,
        node: &PublicKey,
    ) -> Loaded {
        let (code, seal) = self.paths(component);
        if !code.exists() && !seal.exists() {
            return Loaded::Absent;
        }
        let bytes = match self.check(component, &code, &seal, hub, node) {
            Ok(b) => b,
            Err(why) => {
                self.discard(component, &why);
                return Loaded::Corrupt;
            }
        };
        // SAFETY: `bytes` are, byte for byte, what a seal signed by the
        // pinned hub key or this node's own key vouches for (checked just
        // above, on this copy), for this component and engine fingerprint;
        // wasmtime also checks their header against this engine.
        match unsafe { wasmtime::component::Component::deserialize(engine, &bytes) } {
            Ok(c) => Loaded::Component(c),
            Err(e) => {
                let why = format!("wasmtime refused the compiled code {}: {e:#}", code.display());
                tracing::warn!(%component, "{why}; deleted");
                let _ = std::fs::remove_file(&code);
                let _ = std::fs::remove_file(&seal);
                Loaded::Refused(why)
            }
        }
    }

    /// The compiled bytes, if their seal verifies and they hash to it.
    fn check(
        &self,
        component: &Digest,
        code: &Path,
        seal_path: &Path,
        hub: Option<&PublicKey>,
        node: &PublicKey,
    ) -> Result<Vec<u8>, String> {
        let mut text = Vec::new();
        std::fs::File::open(seal_path)
            .and_then(|f| f.take(SEAL_LIMIT + 1).read_to_end(&mut text))
            .map_err(|e| format!("cannot read its seal {}: {e}", seal_path.display()))?;
        if text.len() as u64 > SEAL_LIMIT {
            return Err(format!("its seal {} is over {SEAL_LIMIT} bytes", seal_path.display()));
        }
        let seal = Seal::parse(&text).map_err(|e| format!("its seal {}: {e}", seal_path.display()))?;
        seal.verify(component, &self.fingerprint, hub, node)
            .map_err(|e| format!("its seal {}: {e}", seal_path.display()))?;
        let mut bytes = Vec::new();
        std::fs::File::open(code)
            .and_then(|f| f.take(seal.size.saturating_add(1)).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read {}: {e}", code.display()))?;
        seal.covers(Digest::of(&bytes), bytes.len() as u64).map_err(|e| format!("{}: {e}", code.display()))?;
        Ok(bytes)
    }

    /// Deletes what a crash or an older engine left in the cache directory:
    /// unfinished downloads and compiles, and code for other fingerprints.
    pub fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let suffixes = [format!("-{}.cwasm", self.fingerprint), format!("-{}.seal", self.fingerprint)];
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !suffixes.iter().any(|s| name.ends_with(s.as_str())) {
                tracing::debug!(path = %e.path().display(), "removing a leftover from the code cache");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Deletes a compiled file and its seal that failed a check, and says so.
    pub fn discard(&self, component: &Digest, why: &str) {
        let (code, seal) = self.paths(component);
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %code.display(), %component, "compiled code failed its check and was deleted: {why}");
        let _ = std::fs::remove_file(&code);
        let _ = std::fs::remove_file(&seal);
    }

    /// A component file that failed its check: deleted, so it is fetched again.
    pub fn discard_component(&self, path: &Path, why: &str) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %path.display(), "component failed its check and was deleted: {why}");
        let _ = std::fs::remove_file(path);
    }

    /// Moves compiled bytes (at `tmp`, synced) into place with their seal,
    /// after checking the seal and the bytes as measured (`digest`, `size`).
    pub fn install(
        &self,
        tmp: &Path,
        seal: &Seal,
        measured: (Digest, u64),
        hub: Option<&PublicKey>,
        node: &PublicKey,
    ) -> Result<(), String> {
        let checked = seal
            .verify(&seal.component, &self.fingerprint, hub, node)
            .and_then(|()| seal.covers(measured.0, measured.1))
            .map_err(|e| e.to_string());
        if let Err(e) = checked {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
        let (code, seal_path) = self.paths(&seal.component);
        let seal_tmp = self.scratch(&seal.component, "seal");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&seal_tmp)?;
            f.write_all(&serde_json::to_vec(seal).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            // The code first: a crash between the renames leaves code
            // without a seal (deleted when next read), never a seal that
            // vouches for a file still being written.
            std::fs::rename(tmp, &code)?;
            std::fs::rename(&seal_tmp, &seal_path)?;
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            let _ = std::fs::remove_file(&seal_tmp);
            format!("cannot store compiled code at {}: {e}", code.display())
        })
    }

    /// Compiles `component` (its file at `source`, which must hash to it)
    /// here, in a child process, and installs the result sealed by `key`.
    pub async fn compile_locally(
        self: &std::sync::Arc<Self>,
        component: Digest,
        source: &Path,
        key: &SigningKey,
    ) -> Result<(), PrepareError> {
        if !super::AGENT_COMPILES {
            return Err(PrepareError::new(Reason::NoCompiler, "this agent was built without a compiler"));
        }
        let out = self.scratch(&component, "compiling");
        let started = std::time::Instant::now();
        let result = if self.in_process.load(Ordering::Relaxed) {
            let (src, dst) = (source.to_path_buf(), out.clone());
            let code = tokio::task::spawn_blocking(move || compile_main(&src, &component.to_string(), &dst))
                .await
                .unwrap_or(1);
            match code {
                0 => Ok(()),
                EXIT_CORRUPT => Err(ChildError::Corrupt("it is missing or does not hash to its digest".into())),
                EXIT_INVALID => {
                    Err(ChildError::Invalid(format!("{} is not a valid WebAssembly component", source.display())))
                }
                EXIT_NO_COMPILER => Err(ChildError::NoCompiler),
                c => Err(ChildError::Failed(format!("compiling failed ({c})"))),
            }
        } else {
            run_compiler(component, source, &out, self.compile_memory).await
        };
        match result {
            Ok(()) => {}
            Err(ChildError::Corrupt(why)) => {
                let _ = std::fs::remove_file(&out);
                self.discard_component(source, &why);
                return Err(PrepareError::new(
                    Reason::ArtifactCorrupt,
                    format!("{} failed its check and was deleted ({why}); fetching it again", source.display()),
                ));
            }
            Err(ChildError::Invalid(why)) => {
                let _ = std::fs::remove_file(&out);
                return Err(PrepareError::new(Reason::InvalidComponent, why));
            }
            Err(ChildError::NoCompiler) => {
                let _ = std::fs::remove_file(&out);
                return Err(PrepareError::new(Reason::NoCompiler, "this agent was built without a compiler"));
            }
            Err(ChildError::Failed(why)) => {
                let _ = std::fs::remove_file(&out);
                return Err(PrepareError::new(Reason::RuntimeError, format!("compiling failed: {why}")));
            }
        }
        let hashed = out.clone();
        let measured = tokio::task::spawn_blocking(move || hash_file(&hashed))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| {
                PrepareError::new(Reason::StorageError, format!("cannot read compiled code {}: {e}", out.display()))
            })?;
        let seal = Seal::sign(component, &self.fingerprint, measured.0, measured.1, Compiler::Node, key);
        tracing::info!(
            %component,
            ms = started.elapsed().as_millis() as u64,
            bytes = measured.1,
            "compiled component in a child process"
        );
        let node = key.public();
        let cache = self.clone();
        tokio::task::spawn_blocking(move || cache.install(&out, &seal, measured, None, &node))
            .await
            .map_err(|e| PrepareError::new(Reason::RuntimeError, format!("storing task failed: {e}")))?
            .map_err(|e| PrepareError::new(Reason::StorageError, e))
    }
}

/// The sha256 and size of a file, read in 1 MiB pieces.
pub fn hash_file(path: &Path) -> std::io::Result<(Digest, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((h.finish(), len))
}

enum ChildError {
    /// The component did not hash to its digest.
    Corrupt(String),
    /// It is not a component wasmtime compiles.
    Invalid(String),
    /// This build has no compiler.
    NoCompiler,
    /// Out of memory, killed, timed out, or could not start.
    Failed(String),
}

async fn run_compiler(component: Digest, source: &Path, out: &Path, memory: u64) -> Result<(), ChildError> {
    let exe = std::env::current_exe().map_err(|e| ChildError::Failed(format!("cannot find this program: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("compile")
        .arg("--component")
        .arg(source)
        .arg("--digest")
        .arg(component.to_string())
        .arg("--output")
        .arg(out)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: setrlimit, prctl and setpriority are async-signal-safe, and
    // nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: memory as libc::rlim_t, rlim_max: memory as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // It dies with the agent (a killed agent leaves no compile
            // holding memory), and yields the CPU to the workloads.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| ChildError::Failed(format!("cannot start the compiler: {e}")))?;
    let output = match tokio::time::timeout(COMPILE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => return Err(ChildError::Failed(format!("did not finish in {}s", COMPILE_TIMEOUT.as_secs()))),
        Ok(Err(e)) => return Err(ChildError::Failed(e.to_string())),
        Ok(Ok(o)) => o,
    };
    let text = String::from_utf8_lossy(&output.stderr);
    let said = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
    use std::os::unix::process::ExitStatusExt;
    match (output.status.code(), output.status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(EXIT_CORRUPT), _) => Err(ChildError::Corrupt(said)),
        (Some(EXIT_INVALID), _) => Err(ChildError::Invalid(said)),
        (Some(EXIT_NO_COMPILER), _) => Err(ChildError::NoCompiler),
        (_, Some(sig)) if sig == libc::SIGABRT || sig == libc::SIGKILL || sig == libc::SIGSEGV => {
            Err(ChildError::Failed(format!(
                "the compiler was killed by signal {sig}, likely out of memory (limit {} MiB){}",
                memory >> 20,
                if said.is_empty() { String::new() } else { format!(": {said}") }
            )))
        }
        (code, sig) => Err(ChildError::Failed(format!("the compiler ended with {code:?}/{sig:?}: {said}"))),
    }
}

/// `edge-agent compile`: reads a component, checks it hashes to `digest`,
/// compiles it for this host's engine and writes the result to `output`
/// (synced). Exit codes: 0, or [`EXIT_CORRUPT`], [`EXIT_INVALID`],
/// [`EXIT_NO_COMPILER`], 1 for anything else.
pub fn compile_main(component: &Path, digest: &str, output: &Path) -> i32 {
    let Ok(expected) = digest.parse::<Digest>() else {
        eprintln!("--digest {digest:?} is not a sha256 digest");
        return 1;
    };
    let bytes = match std::fs::read(component) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{} is missing", component.display());
            return EXIT_CORRUPT;
        }
        Err(e) => {
            eprintln!("cannot read {}: {e}", component.display());
            return 1;
        }
    };
    let actual = Digest::of(&bytes);
    if actual != expected {
        eprintln!("{} hashes to {actual}, not {expected}", component.display());
        return EXIT_CORRUPT;
    }
    compile_bytes(component, &bytes, output)
}

#[cfg(feature = "compiler")]
fn compile_bytes(component: &Path, bytes: &[u8], output: &Path) -> i32 {
    use std::io::Write;
    let Some(target) = edge_engine::Target::host() else {
        eprintln!("no compiler target for this architecture");
        return 1;
    };
    let engine = match edge_engine::config(target).and_then(|c| wasmtime::Engine::new(&c)) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot create the engine: {e:#}");
            return 1;
        }
    };
    let code = match engine.precompile_component(bytes) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{} is not a valid WebAssembly component: {e:#}", component.display());
            return EXIT_INVALID;
        }
    };
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(output)?;
        f.write_all(&code)?;
        f.sync_all()
    };
    match write() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cannot write {}: {e}", output.display());
            1
        }
    }
}

#[cfg(not(feature = "compiler"))]
fn compile_bytes(_: &Path, _: &[u8], _: &Path) -> i32 {
    eprintln!("this agent was built without a compiler");
    EXIT_NO_COMPILER
}
