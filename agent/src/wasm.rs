//! Running WebAssembly components on wasmtime.
//!
//! One `Engine` per agent, created on first use (it is most of an idle
//! agent's memory, so an agent with no Wasm work never pays for it), with the
//! configuration of `edge_engine` (the hub compiles with the same) and the
//! pooling allocator when the host can afford it. Compiled code comes from
//! the disk cache, else from the hub (compiled there for this node's engine
//! fingerprint), else from a local compile in a child process
//! (`compiled.rs`); every copy is sealed and checked before it is loaded.
//! Every run of a command and every request to a service gets a fresh
//! `Store` with its own limits: linear memory, a CPU-time budget, and (for
//! services) a cap on concurrent instances.
//!
//! Architecture invariant: compiled code is loaded only after its seal
//! (signed by the hub or by this node) verified and its bytes hashed to
//! what the seal says, under a name holding the engine fingerprint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use edge_api::digest::Digest;
use edge_api::model::{Reason, RuntimeInfo};
use edge_api::outbound::Rule;
use http_body_util::BodyExt;
use tokio::io::AsyncWrite;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::fetch::{FetchError, Precompiled};
use crate::keyvalue::{self, KvView, Namespace};
use crate::logs::LogSink;
use crate::plan::Exit;

mod check;
pub mod compiled;
mod service;
pub use check::CommandCheck;
pub use compiled::PrepareError;
pub use service::{ERROR_HEADER, HttpService, Stats, text_response};

/// 10 ms: the epoch tick. A running guest yields to the agent's scheduler at
/// least this often, and CPU time is measured in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long a request waits for a free instance before it gets 503.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// The linear memory all instances of one service may use together
/// (`memory_total`): charged as they grow, returned as they end.
#[derive(Debug)]
pub struct MemoryBudget {
    total: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(total: u64) -> Arc<Self> {
        Arc::new(MemoryBudget { total, used: AtomicU64::new(0) })
    }

    fn charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|n| *n <= self.total))
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(bytes)));
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// One instance's limits: its own memory limit, and its share of the
/// service's budget, given back when the instance ends.
struct GuestLimits {
    own: StoreLimits,
    budget: Option<Arc<MemoryBudget>>,
    charged: u64,
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if !self.own.memory_growing(current, desired, maximum)? {
            return Ok(false);
        }
        if let Some(b) = &self.budget {
            let more = desired.saturating_sub(current) as u64;
            if !b.charge(more) {
                return Err(wasmtime::format_err!(
                    "memory growth failure: the service's instances together reached spec.wasm.memory_total ({} bytes)",
                    b.total
                ));
            }
            self.charged += more;
        }
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.own.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.own.instances()
    }

    fn tables(&self) -> usize {
        self.own.tables()
    }

    fn memories(&self) -> usize {
        self.own.memories()
    }
}

impl Drop for GuestLimits {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.release(self.charged);
        }
    }
}

/// How code runs on this CPU: compiled by Cranelift where it has a backend,
/// interpreted by Pulley elsewhere (32-bit ARM).
pub fn execution_mode() -> &'static str {
    edge_engine::Target::host().map(|t| t.mode()).unwrap_or("none")
}

pub fn runtime_info() -> RuntimeInfo {
    RuntimeInfo {
        name: "wasm".into(),
        version: format!("wasmtime {}", edge_engine::WASMTIME_VERSION),
        mode: execution_mode().into(),
        fingerprint: edge_engine::Target::host().map(|t| t.fingerprint()).unwrap_or_default(),
        precompiled_only: !AGENT_COMPILES,
    }
}

/// What asking the hub for compiled code gives: `None` when there is no hub
/// to ask.
pub type PrecompiledFuture<'a> =
    Pin<Box<dyn std::future::Future<Output = Option<Result<Precompiled, FetchError>>> + Send + 'a>>;

/// Where compiled code comes from when the cache has none, and the keys
/// that vouch for it: the agent's link to its hub.
pub trait Supplier: Send + Sync {
    /// The hub key pinned at enrolment.
    fn hub_key(&self) -> Option<edge_api::keys::PublicKey>;
    /// This node's key (it seals code compiled here).
    fn node_key(&self) -> &edge_api::keys::SigningKey;
    /// Asks the hub for `component` compiled for `fingerprint`, into
    /// `dest`. `None`: there is no hub to ask (not enrolled).
    fn precompiled<'a>(&'a self, component: Digest, fingerprint: &'a str, dest: &'a Path) -> PrecompiledFuture<'a>;
}

/// No hub: components are compiled here.
pub struct NoHub(pub edge_api::keys::SigningKey);

impl Supplier for NoHub {
    fn hub_key(&self) -> Option<edge_api::keys::PublicKey> {
        None
    }
    fn node_key(&self) -> &edge_api::keys::SigningKey {
        &self.0
    }
    fn precompiled<'a>(&'a self, _: Digest, _: &'a str, _: &'a Path) -> PrecompiledFuture<'a> {
        Box::pin(async { None })
    }
}

/// Whether this agent can compile components itself (built with the
/// `compiler` feature).
pub const AGENT_COMPILES: bool = cfg!(feature = "compiler");

/// How long an agent waits for a hub that says it is compiling.
const HUB_COMPILE_WAIT: Duration = Duration::from_secs(10 * 60);

/// Counts the epoch ticks in which a guest was executing: CPU time, sampled
/// at [`EPOCH_TICK`] (a guest blocked in a host call, sleeping or waiting for
/// I/O, accrues none).
#[derive(Default)]
pub struct CpuMeter {
    pub ticks: u64,
    pub budget_ticks: Option<u64>,
    pub exceeded: bool,
    /// Ticks allowed per [`THROTTLE_WINDOW`], if throttled to a CPU share.
    pub share_ticks: Option<u64>,
    window_start: Option<std::time::Instant>,
    window_ticks: u64,
}

/// The accounting window of CPU throttling (as CFS's period): a guest
/// throttled to 100m runs at most one 10 ms tick in each 100 ms.
pub const THROTTLE_WINDOW: Duration = Duration::from_millis(100);

impl CpuMeter {
    /// Counts one tick; says whether to stop the guest, let it go on, or
    /// make it wait until its share allows more.
    fn tick(&mut self) -> Option<Duration> {
        let now = std::time::Instant::now();
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= THROTTLE_WINDOW {
            self.window_start = Some(now);
            self.window_ticks = 0;
        }
        self.window_ticks += 1;
        match self.share_ticks {
            Some(share) if self.window_ticks >= share => {
                let end = self.window_start.map(|s| s + THROTTLE_WINDOW).unwrap_or(now);
                Some(end.saturating_duration_since(now))
            }
            _ => None,
        }
    }
}

pub struct Host {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: GuestLimits,
    outbound: Outbound,
    kv: Option<Namespace>,
    kv_wrote: bool,
    pub cpu: CpuMeter,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

fn kv_view(h: &mut Host) -> KvView<'_> {
    KvView { ns: h.kv.as_ref(), table: &mut h.table, wrote: &mut h.kv_wrote }
}

/// `wasi:http/outgoing-handler`, limited to the workload's allow-list.
struct Outbound {
    rules: Arc<Vec<Rule>>,
    sink: Arc<LogSink>,
}

type SendFuture = Box<
    dyn std::future::Future<
            Output = Result<
                (
                    hyper::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("http").to_string();
        let host = uri.host().unwrap_or("").trim_matches(['[', ']']).to_string();
        let port = uri.port_u16();
        let shown_host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let allowed = edge_api::outbound::allowed(&self.rules, &scheme, &shown_host, port);
        if !allowed {
            let target = match port {
                Some(p) => format!("{scheme}://{shown_host}:{p}"),
                None => format!("{scheme}://{shown_host}"),
            };
            self.sink.note(&format!("outbound request to {target} denied: not allowed by spec.wasm.outbound"));
            return Box::new(async { Err(ErrorCode::HttpRequestDenied.into()) });
        }
        Box::new(async move {
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((res.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>))
        })
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
    _ticker: EpochTicker,
}

/// Address space one pool slot takes: up to two linear memories, each with
/// wasmtime's default 4 GiB reservation and 32 MiB guard on 64-bit hosts.
const SLOT_ADDRESS_SPACE: u64 = 2 * ((4 << 30) + (32 << 20));

/// Below this many slots the pool is more limit than help: on-demand it is.
const MIN_POOL_SLOTS: u32 = 64;

/// The instance slots the engine will have (reported in the node facts, so
/// the scheduler reserves them): `None` when instances are allocated on
/// demand.
pub fn planned_slots(pool: PoolSize, node_memory: u64) -> Option<u32> {
    let slots = match pool {
        PoolSize::Slots(n) => n,
        PoolSize::Auto if cfg!(target_pointer_width = "64") => pool_slots(node_memory, address_bits()),
        PoolSize::Auto => 0,
    };
    (slots > 0).then_some(slots)
}

/// How many instances the pooling allocator holds at once: one per 16 MiB
/// of the node's memory (at most 1000), and no more than a quarter of the
/// process's address space can reserve (`va_bits`: 47 on x86-64, often 39
/// on 64-bit Raspberry Pi OS). `0`: too few to be worth it, allocate on demand.
pub fn pool_slots(node_memory: u64, va_bits: u32) -> u32 {
    let by_memory = (node_memory / (16 << 20)).clamp(32, 1000);
    let by_address_space = (1u64 << va_bits.min(62)) / 4 / SLOT_ADDRESS_SPACE;
    let slots = by_memory.min(by_address_space) as u32;
    if slots < MIN_POOL_SLOTS { 0 } else { slots }
}

/// The width of this process's virtual addresses, from its highest mapping
/// (the stack sits near the top): 47 on x86-64, 39 or 48 on arm64.
pub fn address_bits() -> u32 {
    let top = std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split('-').nth(1)?.split_whitespace().next().and_then(|end| u64::from_str_radix(end, 16).ok())
        })
        .filter(|end| *end < (1 << 60)) // the vsyscall page of some kernels sits outside user space
        .max()
        .unwrap_or(1 << 32);
    64 - top.leading_zeros()
}

/// How the engine allocates instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolSize {
    /// From node memory and address space.
    Auto,
    /// This many slots; 0 for on-demand allocation.
    Slots(u32),
}

pub struct WasmRuntime {
    cache_dir: PathBuf,
    pub cache: Arc<compiled::CodeCache>,
    node_memory: u64,
    pool: PoolSize,
    shared: OnceLock<Arc<Shared>>,
    init: Mutex<()>,
    components: Mutex<HashMap<Digest, Component>>,
    /// One preparation per component at a time: replicas sharing one wait
    /// for the first (others go on meanwhile).
    preparing: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// One local compile at a time: a small device is not asked to compile
    /// several components at once.
    compiling: tokio::sync::Mutex<()>,
    /// Whether the engine got the pooling allocator (for reporting).
    pub pooled: AtomicBool,
}

/// wasmtime has its own error type; the agent speaks anyhow.
fn wt<T>(r: wasmtime::Result<T>) -> anyhow::Result<T> {
    r.map_err(anyhow::Error::from)
}

/// This host's engine configuration (see `edge_engine`).
fn base_config() -> anyhow::Result<wasmtime::Config> {
    let target = edge_engine::Target::host().context("no WebAssembly engine for this architecture")?;
    wt(edge_engine::config(target))
}

impl WasmRuntime {
    pub fn new(cache_dir: &Path, node_memory: u64, pool: PoolSize) -> Self {
        let fingerprint = edge_engine::Target::host().map(|t| t.fingerprint()).unwrap_or_default();
        // A compile may use most of the device, never all of it.
        let compile_memory = (node_memory / 4 * 3).max(256 << 20);
        WasmRuntime {
            cache_dir: cache_dir.to_path_buf(),
            cache: Arc::new(compiled::CodeCache::new(cache_dir, fingerprint, compile_memory)),
            node_memory,
            pool,
            shared: OnceLock::new(),
            init: Mutex::new(()),
            components: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
            compiling: tokio::sync::Mutex::new(()),
            pooled: AtomicBool::new(false),
        }
    }

    fn engine(&self) -> anyhow::Result<(Engine, bool)> {
        // The pool reserves address space up front (several GiB per slot on
        // 64-bit hosts, for guard regions); 32-bit hosts cannot, and a host
        // with a virtual memory limit may not: both get on-demand allocation.
        // (So does an agent under qemu-user, which backs such reservations
        // with real memory: run it with --wasm-pool-slots 0.)
        let slots = planned_slots(self.pool, self.node_memory).unwrap_or(0);
        if slots > 0 {
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(slots)
                .total_core_instances(slots * 4)
                .total_memories(slots * 2)
                .total_tables(slots * 4)
                .total_stacks(slots)
                .max_memories_per_module(2);
            let mut config = base_config()?;
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            match Engine::new(&config) {
                Ok(e) => {
                    tracing::info!(slots, "wasm engine with the pooling allocator");
                    return Ok((e, true));
                }
                Err(e) => tracing::warn!("pooling allocator unavailable ({e}); allocating instances on demand"),
            }
        }
        let engine = wt(Engine::new(&base_config()?)).context("cannot create the wasmtime engine")?;
        Ok((engine, false))
    }

    fn shared(&self) -> anyhow::Result<Arc<Shared>> {
        if let Some(s) = self.shared.get() {
            return Ok(s.clone());
        }
        let _guard = self.init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = self.shared.get() {
            return Ok(s.clone());
        }
        let (engine, pooled) = self.engine()?;
        self.pooled.store(pooled, Ordering::Relaxed);
        let mut linker = Linker::new(&engine);
        wt(wasmtime_wasi::p2::add_to_linker_async(&mut linker)).context("cannot link WASI")?;
        wt(wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)).context("cannot link wasi:http")?;
        wt(keyvalue::add_to_linker(&mut linker, kv_view)).context("cannot link wasi:keyvalue")?;
        let ticker = EpochTicker::start(engine.clone()).context("cannot start the epoch ticker")?;
        std::fs::create_dir_all(&self.cache_dir)
            .with_context(|| format!("cannot create {}", self.cache_dir.display()))?;
        self.cache.sweep();
        let s = Arc::new(Shared { engine, linker, _ticker: ticker });
        let _ = self.shared.set(s.clone());
        Ok(s)
    }

    /// The compiled component: from memory, from the disk cache, from the
    /// hub, or compiled here (see `compiled.rs`).
    async fn component(
        &self,
        digest: Digest,
        artifact: PathBuf,
        supply: &dyn Supplier,
    ) -> Result<(Arc<Shared>, Component), PrepareError> {
        let shared = self.shared().map_err(|e| PrepareError::new(Reason::RuntimeError, format!("{e:#}")))?;
        if let Some(c) = self.components.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            return Ok((shared, c.clone()));
        }
        let turn = self.preparing.lock().unwrap_or_else(|p| p.into_inner()).entry(digest).or_default().clone();
        let _turn = turn.lock().await;
        if let Some(c) = self.components.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            return Ok((shared, c.clone()));
        }
        let hub = supply.hub_key();
        let node = supply.node_key().public();
        // Whether a file of this component failed its check here.
        let mut lost = false;
        let mut refused: Option<String> = None;
        for _ in 0..3 {
            let engine = shared.engine.clone();
            let cache = self.cache.clone();
            let loaded = tokio::task::spawn_blocking(move || cache.load(&engine, &digest, hub.as_ref(), &node))
                .await
                .map_err(|e| PrepareError::new(Reason::RuntimeError, format!("loading task failed: {e}")))?;
            match loaded {
                compiled::Loaded::Component(component) => {
                    self.components.lock().unwrap_or_else(|p| p.into_inner()).insert(digest, component.clone());
                    return Ok((shared, component));
                }
                compiled::Loaded::Absent => {}
                compiled::Loaded::Corrupt => lost = true,
                compiled::Loaded::Refused(why) => {
                    if refused.is_some() {
                        return Err(PrepareError::new(Reason::InvalidComponent, why));
                    }
                    refused = Some(why);
                }
            }
            self.obtain(digest, &artifact, supply, lost).await?;
        }
        Err(PrepareError::new(
            Reason::InvalidComponent,
            refused.unwrap_or_else(|| "compiled code did not stay in the cache".into()),
        ))
    }

    /// Puts checked compiled code for `digest` in the cache: from the hub,
    /// else compiled here. `lost`: the cache had some and it failed its check.
    async fn obtain(
        &self,
        digest: Digest,
        artifact: &Path,
        supply: &dyn Supplier,
        lost: bool,
    ) -> Result<(), PrepareError> {
        let hub = supply.hub_key();
        let node = supply.node_key().public();
        let fingerprint = self.cache.fingerprint().to_string();
        let waiting_since = std::time::Instant::now();
        // Asked again soon (a small component is compiled in a moment),
        // then less often (a fleet waiting for one large compile is not a
        // stampede), at least every 10 s.
        let mut pause = Duration::from_millis(200);
        // Why the hub gave none, and whether that may pass.
        let (no_hub_code, passing) = loop {
            let tmp = self.cache.scratch(&digest, "fetching");
            match supply.precompiled(digest, &fingerprint, &tmp).await {
                None => break ("not enrolled with a hub".to_string(), true),
                Some(Ok(Precompiled::Fetched { seal, digest: measured, size })) => {
                    if seal.component != digest {
                        let _ = std::fs::remove_file(&tmp);
                        break (format!("the hub sent code for {}", seal.component), false);
                    }
                    let cache = self.cache.clone();
                    let installed = tokio::task::spawn_blocking(move || {
                        cache.install(&tmp, &seal, (measured, size), hub.as_ref(), &node)
                    })
                    .await
                    .map_err(|e| PrepareError::new(Reason::RuntimeError, format!("storing task failed: {e}")))?;
                    match installed {
                        Ok(()) => {
                            tracing::info!(%digest, bytes = size, "compiled code from the hub");
                            return Ok(());
                        }
                        Err(e) => {
                            self.cache.corrupt.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%digest, "compiled code from the hub refused: {e}");
                            break (format!("the hub's compiled code was refused: {e}"), false);
                        }
                    }
                }
                Some(Ok(Precompiled::Pending(_))) if waiting_since.elapsed() < HUB_COMPILE_WAIT => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 3 / 2).min(Duration::from_secs(10));
                }
                Some(Ok(Precompiled::Pending(why))) => break (format!("the hub is still compiling it: {why}"), true),
                Some(Ok(Precompiled::Unavailable(why))) => break (why, false),
                Some(Err(e)) => break (e.to_string(), true),
            }
        };
        if !AGENT_COMPILES {
            let (reason, what) = match (lost, passing) {
                (true, _) => (Reason::ArtifactCorrupt, "its compiled code failed its check and was deleted"),
                (false, true) => (Reason::FetchFailed, "no compiled code yet"),
                (false, false) => (Reason::NoCompiler, "no compiled code"),
            };
            return Err(PrepareError::new(
                reason,
                format!("{what}, and none from the hub for {fingerprint} ({no_hub_code}); this agent has no compiler"),
            ));
        }
        tracing::info!(%digest, "compiling here: {no_hub_code}");
        let _compiling = self.compiling.lock().await;
        self.cache.compile_locally(digest, artifact, supply.node_key()).await
    }

    /// Forgets compiled components no replica uses any more.
    pub fn retain(&self, keep: &std::collections::HashSet<Digest>) {
        self.components.lock().unwrap_or_else(|p| p.into_inner()).retain(|d, _| keep.contains(d));
        self.preparing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, m| keep.contains(d) || m.try_lock().is_err());
    }

    pub async fn prepare_command(
        &self,
        digest: Digest,
        artifact: PathBuf,
        supply: &dyn Supplier,
    ) -> Result<CommandPre<Host>, PrepareError> {
        let pre = self.linked(digest, artifact, supply).await?;
        wt(CommandPre::new(pre))
            .context("not a wasi:cli/command component (it must export wasi:cli/run)")
            .map_err(invalid_component)
    }

    pub async fn prepare_proxy(
        &self,
        digest: Digest,
        artifact: PathBuf,
        supply: &dyn Supplier,
    ) -> Result<ProxyPre<Host>, PrepareError> {
        let pre = self.linked(digest, artifact, supply).await?;
        wt(ProxyPre::new(pre))
            .context(
                "not a wasi:http/proxy component (it must export wasi:http/incoming-handler), but [spec.http] is set",
            )
            .map_err(invalid_component)
    }

    /// The component, linked with what the agent provides.
    async fn linked(
        &self,
        digest: Digest,
        artifact: PathBuf,
        supply: &dyn Supplier,
    ) -> Result<wasmtime::component::InstancePre<Host>, PrepareError> {
        let (shared, component) = self.component(digest, artifact, supply).await?;
        wt(shared.linker.instantiate_pre(&component))
            .context("the component imports something this agent does not provide")
            .map_err(invalid_component)
    }

    /// Runs a command component to completion. `started` is called once the
    /// instance exists (the replica is then Running).
    pub async fn run_command(&self, pre: CommandPre<Host>, inv: Invocation, started: impl FnOnce()) -> Exit {
        let sink = inv.caps.sink.clone();
        let mut store = match new_store(pre.engine(), &inv.caps, &inv.limits, &inv.args, None) {
            Ok(s) => s,
            Err(e) => {
                return Exit {
                    exit_code: None,
                    succeeded: false,
                    reason: Reason::SecretUnavailable,
                    message: Some(format!("{e:#}")),
                };
            }
        };
        let result = match pre.instantiate_async(&mut store).await {
            Ok(cmd) => {
                started();
                cmd.wasi_cli_run().call_run(&mut store).await
            }
            Err(e) => {
                sink.flush_partial();
                let (reason, message) = classify(&e, store.data(), Reason::InstantiateError);
                sink.note(&details(&e));
                return Exit { exit_code: None, succeeded: false, reason, message: Some(message) };
            }
        };
        sink.flush_partial();
        match result {
            Ok(Ok(())) => Exit { exit_code: Some(0), succeeded: true, reason: Reason::Completed, message: None },
            Ok(Err(())) => Exit { exit_code: Some(1), succeeded: false, reason: Reason::Error, message: None },
            Err(e) => {
                if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    return Exit {
                        exit_code: Some(exit.0),
                        succeeded: exit.0 == 0,
                        reason: if exit.0 == 0 { Reason::Completed } else { Reason::Error },
                        message: None,
                    };
                }
                let (reason, message) = classify(&e, store.data(), Reason::Trap);
                sink.note(&details(&e));
                Exit { exit_code: None, succeeded: false, reason, message: Some(message) }
            }
        }
    }
}

fn invalid_component(e: anyhow::Error) -> PrepareError {
    PrepareError::new(Reason::InvalidComponent, format!("{e:#}"))
}

/// What a guest may use.
#[derive(Clone)]
pub struct Limits {
    pub memory: u64,
    /// Shared by all instances of a service (`memory_total`).
    pub budget: Option<Arc<MemoryBudget>>,
    /// Wall-clock time a request may take (services).
    pub request_timeout: Duration,
    /// CPU time per run (command) or request (service).
    pub cpu_budget: Option<Duration>,
    /// The share of one CPU an instance may use, in thousandths (as
    /// `resources.cpu`); `None`: not throttled.
    pub cpu_share: Option<u64>,
}

/// What a guest is given.
#[derive(Clone)]
pub struct Capabilities {
    pub env: Vec<(String, String)>,
    pub outbound: Arc<Vec<Rule>>,
    pub kv: Option<Namespace>,
    pub sink: Arc<LogSink>,
    /// Secrets as read-only directories; removed when the last holder drops them.
    pub files: Arc<crate::secrets::SecretFiles>,
}

/// One run of a command: its arguments (argv[0] first), capabilities and limits.
pub struct Invocation {
    pub args: Vec<String>,
    pub caps: Capabilities,
    pub limits: Limits,
}

/// A store for one instance; its output goes to the replica's log, or to
/// `tail` (a probe's).
fn new_store(
    engine: &Engine,
    caps: &Capabilities,
    limits: &Limits,
    args: &[String],
    tail: Option<&check::Tail>,
) -> anyhow::Result<Store<Host>> {
    let mut b = WasiCtx::builder();
    b.args(args);
    b.envs(&caps.env);
    for d in &caps.files.dirs {
        b.preopened_dir(&d.host, &d.guest, wasmtime_wasi::FsPerms::ReadOnly)
            .map_err(|e| anyhow::anyhow!("cannot give the secret directory {}: {e}", d.guest))?;
    }
    match tail {
        Some(t) => {
            b.stdout(t.clone());
            b.stderr(t.clone());
        }
        None => {
            b.stdout(LogOut { sink: caps.sink.clone(), stream: "stdout" });
            b.stderr(LogOut { sink: caps.sink.clone(), stream: "stderr" });
        }
    }
    let store_limits = StoreLimitsBuilder::new()
        .memory_size(usize::try_from(limits.memory).unwrap_or(usize::MAX))
        .trap_on_grow_failure(true)
        .build();
    let budget_ticks = limits.cpu_budget.map(|d| (d.as_millis() as u64).div_ceil(EPOCH_TICK.as_millis() as u64).max(1));
    let host = Host {
        wasi: b.build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        limits: GuestLimits { own: store_limits, budget: limits.budget.clone(), charged: 0 },
        outbound: Outbound { rules: caps.outbound.clone(), sink: caps.sink.clone() },
        kv: caps.kv.clone(),
        kv_wrote: false,
        cpu: CpuMeter {
            budget_ticks,
            // 100m → 1 tick of every 10 in a window; a full core or more: not throttled.
            share_ticks: limits
                .cpu_share
                .filter(|m| *m < 1000)
                .map(|m| (m * (THROTTLE_WINDOW.as_millis() / EPOCH_TICK.as_millis()) as u64).div_ceil(1000).max(1)),
            ..CpuMeter::default()
        },
    };
    let mut store = Store::new(engine, host);
    store.limiter(|h| &mut h.limits);
    // Called at each tick while the guest executes: count it, stop a guest
    // over its budget, and otherwise yield so that no guest starves the
    // agent or other workloads.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| {
        let cpu = &mut ctx.data_mut().cpu;
        cpu.ticks += 1;
        if cpu.budget_ticks.is_some_and(|b| cpu.ticks > b) {
            cpu.exceeded = true;
            return Ok(UpdateDeadline::Interrupt);
        }
        match cpu.tick() {
            // Over its share in this window: sleep until the next one.
            Some(wait) if !wait.is_zero() => Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep(wait)))),
            _ => Ok(UpdateDeadline::Yield(1)),
        }
    });
    Ok(store)
}

/// Names how a guest failed: (reason, message). The message is the trap's
/// own description (the backtrace goes to the log, not the status).
fn classify(e: &wasmtime::Error, host: &Host, default_reason: Reason) -> (Reason, String) {
    let text = format!("{e:#}");
    if host.cpu.exceeded {
        let used = Duration::from_millis(host.cpu.ticks.saturating_sub(1) * EPOCH_TICK.as_millis() as u64);
        return (Reason::CpuBudgetExceeded, format!("stopped after using its CPU budget ({used:?} of CPU time)"));
    }
    // The description is on the line after the backtrace frames, after
    // their last `: `; without a backtrace it is the whole text.
    let description = text
        .lines()
        .rev()
        .find_map(|l| l.rsplit_once(": ").map(|(_, d)| d.trim().to_string()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| text.lines().next().unwrap_or("").to_string());
    let trap = e.downcast_ref::<wasmtime::Trap>().copied();
    let reason = if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some()
        || text.contains("maximum concurrent limit")
    {
        // The node's instance pool is full: no fault of this guest.
        Reason::AtCapacity
    } else if trap == Some(wasmtime::Trap::StackOverflow) || text.contains("call stack exhausted") {
        Reason::StackOverflow
    } else if text.contains("growing memory") || text.contains("memory growth failure") {
        Reason::OutOfMemory
    } else if trap == Some(wasmtime::Trap::Interrupt) {
        Reason::Interrupted
    } else {
        default_reason
    };
    (reason, description)
}

/// The full text of a failure, backtrace included, for the replica's log.
fn details(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_allows_the_share_of_each_window() {
        // 200m: 2 ticks of every 10 in a 100 ms window.
        let mut m = CpuMeter { share_ticks: Some(2), ..CpuMeter::default() };
        assert_eq!(m.tick(), None);
        let wait = m.tick().expect("the second tick uses up the share");
        assert!(wait <= THROTTLE_WINDOW);
        let mut free = CpuMeter::default();
        assert!((0..100).all(|_| free.tick().is_none()), "no share: never throttled");
    }

    #[test]
    fn the_pool_is_sized_from_memory_and_address_space() {
        assert_eq!(pool_slots(1 << 30, 47), 64, "1 GiB of memory");
        assert_eq!(pool_slots(4 << 30, 47), 256);
        assert_eq!(pool_slots(64 << 30, 47), 1000, "large hosts are capped");
        assert_eq!(pool_slots(256 << 20, 47), 0, "too little memory for a useful pool");
        assert_eq!(pool_slots(8 << 30, 39), 0, "a 39-bit address space holds too few slots");
        assert_eq!(pool_slots(8 << 30, 48), 512);
    }

    #[test]
    fn a_service_memory_budget_is_shared_by_its_instances_and_given_back() {
        let budget = MemoryBudget::new(24 << 20);
        let limits = || GuestLimits {
            own: StoreLimitsBuilder::new().memory_size(16 << 20).build(),
            budget: Some(budget.clone()),
            charged: 0,
        };
        let mut a = limits();
        let mut b = limits();
        assert!(a.memory_growing(0, 10 << 20, None).unwrap());
        assert!(b.memory_growing(0, 10 << 20, None).unwrap());
        assert!(!a.memory_growing(10 << 20, 17 << 20, None).unwrap(), "over its own limit");
        let e = b.memory_growing(10 << 20, 15 << 20, None).unwrap_err();
        assert!(format!("{e}").contains("memory_total"), "{e}");
        assert_eq!(budget.used(), 20 << 20);
        drop(a);
        assert_eq!(budget.used(), 10 << 20, "an instance that ends gives its share back");
        assert!(b.memory_growing(10 << 20, 15 << 20, None).unwrap());
    }

    fn request(path: &str) -> hyper::Request<http_body_util::Empty<Bytes>> {
        hyper::Request::get(format!("http://svc.local{path}")).body(http_body_util::Empty::new()).unwrap()
    }

    fn test_runtime(dir: &Path, pool: PoolSize) -> WasmRuntime {
        let rt = WasmRuntime::new(&dir.join("cache"), 1 << 30, pool);
        rt.cache.in_process.store(true, Ordering::Relaxed);
        rt
    }

    /// A service of the hello-http example, on an engine shared with others.
    async fn service(
        rt: &WasmRuntime,
        logs: &crate::logs::Logs,
        name: &str,
        max: u32,
        timeout_ms: u64,
    ) -> Arc<HttpService> {
        let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/hello-http.wasm"));
        let digest = Digest::of(&std::fs::read(&path).unwrap());
        let pre = rt
            .prepare_proxy(digest, path, &super::NoHub(edge_api::keys::SigningKey::generate().unwrap()))
            .await
            .unwrap();
        let caps = Capabilities {
            env: vec![],
            outbound: Arc::new(vec![]),
            kv: None,
            sink: logs.sink(name),
            files: Default::default(),
        };
        let limits = Limits {
            memory: 16 << 20,
            budget: None,
            request_timeout: Duration::from_millis(timeout_ms),
            cpu_budget: Some(Duration::from_secs(1)),
            cpu_share: None,
        };
        Arc::new(HttpService::new(name.into(), name.into(), 1, pre, caps, limits, max))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_service_without_probes_is_checked_by_instantiating_it_with_its_limits() {
        let dir = std::env::temp_dir().join(format!("edge-agent-inst-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let logs = crate::logs::Logs::open(&dir.join("logs")).unwrap();
        let rt = test_runtime(&dir, PoolSize::Slots(4));
        let fine = service(&rt, &logs, "fine", 2, 60_000).await;
        assert_eq!(fine.instantiates(Duration::from_secs(5)).await.as_deref(), Ok("instantiates"));
        assert_eq!(fine.stats.requests.load(Ordering::Relaxed), 0, "no request was made");
        // Too little memory for the component's own: it cannot start.
        let tight = service(&rt, &logs, "tight", 2, 60_000).await;
        let mut limits = tight.limits.clone();
        limits.memory = 64 << 10;
        let tight = Arc::new(HttpService::new(
            "tight".into(),
            "tight".into(),
            1,
            tight.pre.clone(),
            tight.caps.clone(),
            limits,
            2,
        ));
        let e = tight.instantiates(Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with("instantiating failed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_served_but_not_counted_so_a_status_does_not_change_with_each() {
        let dir = std::env::temp_dir().join(format!("edge-agent-probecount-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let logs = crate::logs::Logs::open(&dir.join("logs")).unwrap();
        let rt = test_runtime(&dir, PoolSize::Slots(4));
        let svc = service(&rt, &logs, "probed", 2, 60_000).await;
        let counts =
            |s: &HttpService| (s.stats.requests.load(Ordering::Relaxed), s.stats.failures.load(Ordering::Relaxed));
        assert_eq!(svc.probe(request("/")).await.status().as_u16(), 200);
        assert_eq!(svc.probe(request("/trap")).await.status().as_u16(), 500);
        assert_eq!(counts(&svc), (0, 0), "probes leave the counts alone");
        let log = std::fs::read_to_string(logs.path("probed")).unwrap_or_default();
        assert!(!log.contains("request failed"), "{log}");
        assert_eq!(svc.handle(request("/trap")).await.status().as_u16(), 500);
        assert_eq!(counts(&svc), (1, 1), "requests are counted");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_pool_answers_503_at_capacity_and_recovers_and_a_request_ends_in_time() {
        let dir = std::env::temp_dir().join(format!("edge-agent-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let logs = crate::logs::Logs::open(&dir.join("logs")).unwrap();
        // One pool slot for the whole node, two services.
        let rt = test_runtime(&dir, PoolSize::Slots(1));
        let hog = service(&rt, &logs, "hog", 4, 60_000).await;
        let other = service(&rt, &logs, "other", 4, 60_000).await;
        let held = {
            let hog = hog.clone();
            tokio::spawn(async move { hog.handle(request("/sleep?ms=1500")).await.status().as_u16() })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let resp = other.handle(request("/")).await;
        assert_eq!(resp.status().as_u16(), 503, "the pool is full");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("AtCapacity"), "{body:?}");
        assert_eq!(held.await.unwrap(), 200);
        assert_eq!(other.handle(request("/")).await.status().as_u16(), 200, "the slot came back");
        // The answer leaves before its instance ends: wait for that (the
        // node has one pool slot), bounded.
        for _ in 0..500 {
            if other.instances() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(other.instances(), 0, "the instance ended after its answer");

        // A request past its wall-clock limit is stopped, and its slot freed.
        let slow = service(&rt, &logs, "slow", 1, 300).await;
        let resp = slow.handle(request("/sleep?ms=60000")).await;
        assert_eq!(resp.status().as_u16(), 504);
        assert_eq!(slow.in_flight(), 0);
        assert_eq!(other.handle(request("/")).await.status().as_u16(), 200);

        // A stopped service ends its requests in flight.
        let stopped = {
            let hog = hog.clone();
            tokio::spawn(async move { hog.handle(request("/sleep?ms=60000")).await.status().as_u16() })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        hog.stop();
        assert_eq!(tokio::time::timeout(Duration::from_secs(30), stopped).await.unwrap().unwrap(), 503);
        assert_eq!(other.handle(request("/")).await.status().as_u16(), 200);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_process_knows_its_address_width() {
        let bits = address_bits();
        assert!((32..=57).contains(&bits), "{bits}");
    }
}
