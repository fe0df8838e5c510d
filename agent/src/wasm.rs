//! Running WebAssembly components on wasmtime.
//!
//! One `Engine` per agent, created on first use (it is most of an idle
//! agent's memory, so an agent with no Wasm work never pays for it). Each
//! component is compiled once per (artifact digest, engine fingerprint) and
//! the compiled form is cached on disk, so an agent restart does not
//! recompile. Each run gets a fresh `Store` with its own limits.
//!
//! Architecture invariant: a compiled artifact is only ever loaded by an
//! engine whose compatibility fingerprint is part of its file name, so code
//! compiled for another CPU or configuration is never mapped.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use edge_api::digest::Digest;
use edge_api::model::RuntimeInfo;
use tokio::io::AsyncWrite;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::logs::LogSink;
use crate::plan::Exit;

/// 10 ms: a running guest yields to the agent's scheduler at least this often.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How code runs on this CPU: compiled by Cranelift where it has a backend,
/// interpreted by Pulley elsewhere (32-bit ARM).
pub fn execution_mode() -> &'static str {
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64", target_arch = "s390x")) {
        "cranelift"
    } else {
        "pulley"
    }
}

pub fn runtime_info() -> RuntimeInfo {
    RuntimeInfo { name: "wasm".into(), version: "wasmtime 48.0.8".into(), mode: execution_mode().into() }
}

/// One run of a command: its arguments (argv[0] first), environment, memory
/// limit and where its output goes.
pub struct Invocation {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub memory_limit: u64,
    pub sink: Arc<LogSink>,
}

pub struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    engine: Engine,
    linker: Linker<Host>,
    fingerprint: String,
    _ticker: EpochTicker,
}

pub struct WasmRuntime {
    cache_dir: PathBuf,
    shared: OnceLock<Arc<Shared>>,
    init: Mutex<()>,
    commands: Mutex<HashMap<Digest, CommandPre<Host>>>,
    compiling: tokio::sync::Mutex<()>,
}

/// FNV-1a: a hash that is the same in every build, for cache file names.
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl WasmRuntime {
    pub fn new(cache_dir: &Path) -> Self {
        WasmRuntime {
            cache_dir: cache_dir.to_path_buf(),
            shared: OnceLock::new(),
            init: Mutex::new(()),
            commands: Mutex::new(HashMap::new()),
            compiling: tokio::sync::Mutex::new(()),
        }
    }

    fn shared(&self) -> anyhow::Result<Arc<Shared>> {
        if let Some(s) = self.shared.get() {
            return Ok(s.clone());
        }
        let _guard = self.init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = self.shared.get() {
            return Ok(s.clone());
        }
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = wt(Engine::new(&config)).context("cannot create the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        wt(wasmtime_wasi::p2::add_to_linker_async(&mut linker)).context("cannot link WASI")?;
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        engine.precompile_compatibility_hash().hash(&mut h);
        let fingerprint = format!("{}-{:016x}", std::env::consts::ARCH, h.finish());
        let ticker = EpochTicker::start(engine.clone()).context("cannot start the epoch ticker")?;
        std::fs::create_dir_all(&self.cache_dir)
            .with_context(|| format!("cannot create {}", self.cache_dir.display()))?;
        let s = Arc::new(Shared { engine, linker, fingerprint, _ticker: ticker });
        let _ = self.shared.set(s.clone());
        Ok(s)
    }

    /// The pre-instantiated command for an artifact: from memory, from the
    /// disk cache, or compiled now (and cached).
    pub async fn prepare(&self, digest: Digest, artifact: PathBuf) -> anyhow::Result<CommandPre<Host>> {
        if let Some(pre) = self.commands.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            return Ok(pre.clone());
        }
        // One compilation at a time: replicas sharing a component wait for
        // the first instead of compiling it again (and a small device is not
        // asked to compile several components at once).
        let _compiling = self.compiling.lock().await;
        if let Some(pre) = self.commands.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            return Ok(pre.clone());
        }
        let shared = self.shared()?;
        let cached = self.cache_dir.join(format!("{}-{}.cwasm", digest.hex(), shared.fingerprint));
        let s = shared.clone();
        let component = tokio::task::spawn_blocking(move || load_or_compile(&s.engine, &artifact, &cached))
            .await
            .context("compilation task failed")??;
        let pre = wt(shared.linker.instantiate_pre(&component))
            .context("the component imports something this agent does not provide")?;
        let pre = wt(CommandPre::new(pre)).context("not a wasi:cli/command component (it must export wasi:cli/run)")?;
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).insert(digest, pre.clone());
        Ok(pre)
    }

    /// Runs a command component to completion. `started` is called once the
    /// instance exists (the replica is then Running).
    pub async fn run_command(&self, pre: CommandPre<Host>, inv: Invocation, started: impl FnOnce()) -> Exit {
        let engine = pre.engine().clone();
        let sink = inv.sink;
        let mut b = WasiCtx::builder();
        b.args(&inv.args);
        b.envs(&inv.env);
        b.stdout(LogOut { sink: sink.clone(), stream: "stdout" });
        b.stderr(LogOut { sink: sink.clone(), stream: "stderr" });
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(inv.memory_limit).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&engine, Host { wasi: b.build(), table: ResourceTable::new(), limits });
        store.limiter(|h| &mut h.limits);
        // Yield back to the scheduler every tick so one busy guest cannot
        // starve the agent or other workloads.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));

        let result = match pre.instantiate_async(&mut store).await {
            Ok(cmd) => {
                started();
                cmd.wasi_cli_run().call_run(&mut store).await
            }
            Err(e) => {
                sink.flush_partial();
                return exit_from_error(e, "InstantiateError");
            }
        };
        sink.flush_partial();
        match result {
            Ok(Ok(())) => Exit { exit_code: Some(0), succeeded: true, reason: "Completed".into(), message: None },
            Ok(Err(())) => Exit { exit_code: Some(1), succeeded: false, reason: "Error".into(), message: None },
            Err(e) => exit_from_error(e, "Trap"),
        }
    }
}

/// wasmtime has its own error type; the agent speaks anyhow.
fn wt<T>(r: wasmtime::Result<T>) -> anyhow::Result<T> {
    r.map_err(anyhow::Error::from)
}

fn load_or_compile(engine: &Engine, artifact: &Path, cached: &Path) -> anyhow::Result<Component> {
    if cached.exists() {
        // SAFETY: `cached` was written by `Component::serialize` of an engine
        // with this same compatibility fingerprint (it is in the file name),
        // into the agent's private data directory, and renamed into place only
        // after it was fully written and synced. wasmtime also checks the
        // header against this engine and refuses an incompatible file.
        match unsafe { Component::deserialize_file(engine, cached) } {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(path = %cached.display(), "discarding unusable compiled artifact: {e:#}");
                let _ = std::fs::remove_file(cached);
            }
        }
    }
    let started = std::time::Instant::now();
    let component = wt(Component::from_file(engine, artifact))
        .with_context(|| format!("{} is not a valid WebAssembly component", artifact.display()))?;
    tracing::info!(artifact = %artifact.display(), ms = started.elapsed().as_millis() as u64, "compiled component");
    match component.serialize() {
        Ok(bytes) => {
            let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, cached)
            };
            if let Err(e) = write() {
                tracing::warn!(path = %cached.display(), "cannot cache compiled artifact: {e}");
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Err(e) => tracing::warn!("cannot serialize compiled artifact: {e:#}"),
    }
    Ok(component)
}

/// Turns a wasmtime error into how the run ended.
fn exit_from_error(e: wasmtime::Error, default_reason: &str) -> Exit {
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Exit {
            exit_code: Some(exit.0),
            succeeded: exit.0 == 0,
            reason: if exit.0 == 0 { "Completed".into() } else { "Error".into() },
            message: None,
        };
    }
    let text = format!("{e:#}");
    let reason = if text.contains("memory growth failure") || text.contains("exceeds memory limits") {
        "OutOfMemory"
    } else {
        default_reason
    };
    // The first line names the trap; backtraces follow on later lines.
    let summary: String = text.lines().take(6).collect::<Vec<_>>().join("\n");
    Exit { exit_code: None, succeeded: false, reason: reason.into(), message: Some(summary) }
}

struct LogOut {
    sink: Arc<LogSink>,
    stream: &'static str,
}

impl IsTerminal for LogOut {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogOut {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LogWriter { sink: self.sink.clone(), stream: self.stream })
    }
}

struct LogWriter {
    sink: Arc<LogSink>,
    stream: &'static str,
}

impl AsyncWrite for LogWriter {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.sink.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
