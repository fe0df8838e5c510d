//! Executes the plan: the agent's reconcile loop.
//!
//! It owns every replica's record and run. Commands arrive on a channel (a
//! new desired state, a run that started or ended, a finished download); after
//! each batch it plans, executes the steps, and plans again until there is
//! nothing left to do, then publishes a status snapshot. A failed step is
//! logged and retried on a later pass; it never stops the loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use edge_api::digest::Digest;
use edge_api::model::{InstanceStatus, Phase, ProbeKind, Reason, Runtime};
use edge_api::time::now_ms;
use edge_api::wire::{Assignment, NodeDesired};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::Ctx;
use crate::health::{Health, Verdict};
use crate::plan::{self, Artifact, Exit, Step};
use crate::probe;
use crate::proxy::{Backend, HostMatch, Route, Table};
use crate::state::InstanceRecord;
use crate::wasm::{Capabilities, HttpService, Limits};

pub enum Cmd {
    /// An HTTP replica is prepared and can take requests.
    ServiceReady {
        key: String,
        run: u64,
        service: Arc<HttpService>,
    },
    /// A verified desired state, already persisted.
    Desired {
        generation: u64,
        doc: NodeDesired,
    },
    Started {
        key: String,
        run: u64,
        /// Where a container's HTTP server is (`http://addr:port`).
        upstream: Option<String>,
        /// How command probes run a Wasm command replica's component.
        check: Option<Arc<crate::wasm::CommandCheck>>,
    },
    Exited {
        key: String,
        run: u64,
        exit: Exit,
    },
    Fetched {
        digest: Digest,
        result: Result<(), String>,
    },
    /// A stopped run's task has ended (its container, network and secret
    /// files are gone): the replica may start again.
    Stopped {
        key: String,
    },
    /// A probe of run `run` of a replica ended.
    Probed {
        key: String,
        run: u64,
        kind: ProbeKind,
        result: Result<String, String>,
    },
}

/// What the agent reports: everything it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub observed_generation: u64,
    pub instances: Vec<InstanceStatus>,
    /// Files that failed their check when read (and were deleted) since start.
    pub corrupt_files: u64,
}

/// Planning passes per wake-up; each pass makes progress (adopt, then fetch
/// or start), so a handful always suffices. A bound keeps a bug from spinning.
const MAX_PASSES: usize = 8;

/// The loop goes round at least this often, proving it is alive (see
/// `Ctx::supervisor_alive_ms`).
pub const LIVENESS_TICK: Duration = Duration::from_secs(5);

pub struct Supervisor {
    ctx: Arc<Ctx>,
    records: BTreeMap<String, InstanceRecord>,
    runs: HashMap<String, (u64, JoinHandle<()>)>,
    /// HTTP replicas serving requests.
    services: HashMap<String, Arc<HttpService>>,
    /// HTTP replicas being replaced: they serve until their successor is
    /// ready (make before break), or until they are forgotten.
    retiring: HashMap<String, Arc<HttpService>>,
    /// Where each running container's HTTP server is, for the proxy.
    upstreams: HashMap<String, String>,
    /// Replicas whose run was stopped but whose task is still ending: they
    /// count as running, so nothing starts under the same names meanwhile.
    stopping: BTreeSet<String>,
    /// Replicas whose routes lost to another's, with the reason.
    conflicts: HashMap<String, String>,
    /// What the probes of each running replica with `[spec.health]` have
    /// shown, for which run, and the probe tasks.
    health: HashMap<String, (u64, Health, Vec<JoinHandle<()>>)>,
    artifacts: HashMap<Digest, Artifact>,
    fetch_failures: HashMap<Digest, u32>,
    /// Components deleted because they failed their check, until fetched again.
    corrupt: std::collections::HashSet<Digest>,
    /// `None` until a desired state is known (from disk or from the hub):
    /// nothing is planned before, so an empty start never forgets replicas.
    desired: Option<Vec<Assignment>>,
    generation: u64,
    next_run: u64,
    wake_at_ms: Option<u64>,
    tx: mpsc::UnboundedSender<Cmd>,
    status: watch::Sender<Snapshot>,
}

impl Supervisor {
    pub fn new(
        ctx: Arc<Ctx>,
        records: Vec<(String, InstanceRecord)>,
        initial: Option<(u64, NodeDesired)>,
        tx: mpsc::UnboundedSender<Cmd>,
        status: watch::Sender<Snapshot>,
    ) -> Self {
        let (generation, desired) = match initial {
            Some((g, doc)) => (g, Some(doc.workloads)),
            None => (0, None),
        };
        Supervisor {
            ctx,
            records: records.into_iter().collect(),
            runs: HashMap::new(),
            services: HashMap::new(),
            retiring: HashMap::new(),
            upstreams: HashMap::new(),
            stopping: BTreeSet::new(),
            conflicts: HashMap::new(),
            health: HashMap::new(),
            artifacts: HashMap::new(),
            fetch_failures: HashMap::new(),
            corrupt: Default::default(),
            desired,
            generation,
            next_run: 1,
            wake_at_ms: None,
            tx,
            status,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, mut shutdown: watch::Receiver<bool>) {
        // Routes and status before anything arrives (static routes, records from disk).
        while let Ok(c) = rx.try_recv() {
            self.handle(c);
        }
        self.reconcile();
        let mut lease = self.ctx.lease.subscribe();
        loop {
            self.ctx.supervisor_alive_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
            let sleep = match self.wake_at_ms {
                Some(t) => Duration::from_millis(t.saturating_sub(now_ms()).max(1)),
                None => LIVENESS_TICK,
            }
            .min(LIVENESS_TICK);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => self.handle(c),
                    None => break,
                },
                _ = tokio::time::sleep(sleep) => {}
                // A renewed lease lets fenced replicas run again.
                _ = lease.changed() => {}
                _ = shutdown.changed() => break,
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            self.reconcile();
        }
        // The agent is stopping: runs end with the process. Their records
        // still say Running, so the next start runs them again.
        for (_, (_, task)) in self.runs.drain() {
            task.abort();
        }
    }

    /// How long ago the agent sent the last heartbeat the hub acknowledged.
    fn lease_age_ms(&self) -> Option<u64> {
        (*self.ctx.lease.borrow()).map(|t| t.elapsed().as_millis() as u64)
    }

    fn persist(&self, key: &str) {
        if let Some(rec) = self.records.get(key)
            && let Err(e) = self.ctx.state.put_instance(key, rec)
        {
            tracing::error!(key, "cannot persist replica state: {e}");
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Desired { generation, doc } => {
                if generation >= self.generation || self.desired.is_none() {
                    self.generation = generation;
                    self.desired = Some(doc.workloads);
                }
            }
            Cmd::Started { key, run, upstream, check } => {
                if self.runs.get(&key).map(|r| r.0) == Some(run)
                    && let Some(rec) = self.records.get_mut(&key)
                {
                    let target = match check {
                        Some(c) => probe::Target::WasmCommand(c),
                        None => probe::Target::Container { key: key.clone(), upstream: upstream.clone() },
                    };
                    match upstream {
                        Some(u) => self.upstreams.insert(key.clone(), u),
                        None => self.upstreams.remove(&key),
                    };
                    *rec = plan::running(rec, now_ms());
                    self.persist(&key);
                    self.start_probes(&key, run, target);
                    if self.ready(&key) {
                        self.retiring.remove(&key);
                    }
                }
            }
            Cmd::ServiceReady { key, run, service } => {
                if self.runs.get(&key).map(|r| r.0) != Some(run) {
                    return; // superseded while it was being prepared
                }
                self.runs.remove(&key);
                self.services.insert(key.clone(), service.clone());
                if let Some(rec) = self.records.get_mut(&key) {
                    *rec = plan::running(rec, now_ms());
                }
                tracing::info!(key, "service ready");
                self.persist(&key);
                self.start_probes(&key, run, probe::Target::Wasm(service));
                if self.ready(&key) {
                    // Make before break: the one it replaces goes once this one is ready.
                    self.retiring.remove(&key);
                }
            }
            Cmd::Exited { key, run, exit } => {
                if self.runs.get(&key).map(|r| r.0) != Some(run) {
                    return; // a run we already stopped
                }
                self.runs.remove(&key);
                self.stop_probes(&key);
                if exit.reason == Reason::ArtifactCorrupt {
                    // Its component was deleted: fetch it again, and say
                    // why while that fails.
                    if let Some(d) =
                        self.records.get(&key).and_then(|r| r.assignment.spec.runtime.artifact()?.digest().copied())
                    {
                        self.artifacts.remove(&d);
                        self.corrupt.insert(d);
                    }
                }
                if let Some(rec) = self.records.get(&key) {
                    let next = plan::after_exit(rec, &exit, now_ms());
                    let sink = self.ctx.logs.sink(&key);
                    match (&exit.exit_code, &exit.message) {
                        (Some(c), _) => sink.note(&format!("exited with code {c}")),
                        (None, Some(m)) => sink.note(&format!("{}: {m}", exit.reason)),
                        (None, None) => sink.note(exit.reason.as_str()),
                    }
                    tracing::info!(key, reason = %exit.reason, code = ?exit.exit_code, "run ended");
                    self.records.insert(key.clone(), next);
                    self.persist(&key);
                }
            }
            Cmd::Stopped { key } => {
                self.stopping.remove(&key);
            }
            Cmd::Probed { key, run, kind, result } => self.probed(key, run, kind, result),
            Cmd::Fetched { digest, result } => match result {
                Ok(()) => {
                    self.fetch_failures.remove(&digest);
                    self.corrupt.remove(&digest);
                    self.artifacts.insert(digest, Artifact::Ready);
                }
                Err(e) => {
                    let n = self.fetch_failures.entry(digest).or_insert(0);
                    *n += 1;
                    let delay = plan::fetch_retry_ms(*n);
                    tracing::warn!(%digest, "artifact download failed (retry in {}s): {e}", delay / 1000);
                    self.artifacts.insert(digest, Artifact::Failed { retry_at_ms: now_ms() + delay });
                    let corrupt = self.corrupt.contains(&digest);
                    for rec in self.records.values_mut() {
                        if plan::waits_for(rec, &digest) {
                            if corrupt {
                                rec.reason = Some(Reason::ArtifactCorrupt);
                                rec.message = Some(format!(
                                    "its component failed its check on disk and was deleted; fetching it again failed: {e}; retrying in {}s",
                                    delay / 1000
                                ));
                            } else {
                                rec.reason = Some(Reason::FetchFailed);
                                rec.message = Some(format!("{e}; retrying in {}s", delay / 1000));
                            }
                        }
                    }
                }
            },
        }
    }

    fn artifact(&self, d: &Digest) -> Artifact {
        match self.artifacts.get(d) {
            Some(a) => *a,
            None if self.ctx.fetcher.has(d) => Artifact::Ready,
            None => Artifact::Missing,
        }
    }

    fn reconcile(&mut self) {
        let Some(desired) = self.desired.clone() else {
            // No desired state yet: serve static routes, report what is on disk, change nothing.
            self.route();
            self.publish();
            return;
        };
        for _ in 0..MAX_PASSES {
            let running: BTreeSet<String> =
                self.runs.keys().chain(self.services.keys()).chain(self.stopping.iter()).cloned().collect();
            let lease = self.lease_age_ms();
            let p = plan::plan(&desired, &self.records, &running, &|d| self.artifact(d), now_ms(), lease);
            self.wake_at_ms = p.wake_at_ms;
            if p.steps.is_empty() {
                break;
            }
            for step in p.steps {
                self.execute(step);
            }
        }
        self.route();
        self.publish();
    }

    /// Rebuilds the proxy's route table from the HTTP replicas and swaps it in.
    fn route(&mut self) {
        let mut routes: Vec<Route> = self.ctx.static_routes.clone();
        for (key, rec) in &self.records {
            let Some(http) = &rec.assignment.spec.http else { continue };
            let ready = self.ready(key);
            let running_upstream =
                self.upstreams.get(key).filter(|_| ready && rec.phase == Phase::Running && self.runs.contains_key(key));
            // An unready replica gets no traffic; the one it replaces serves meanwhile.
            let service =
                if ready { self.services.get(key).or_else(|| self.retiring.get(key)) } else { self.retiring.get(key) };
            let backend = match (service, running_upstream) {
                (Some(svc), _) => Backend::Wasm(svc.clone()),
                (None, Some(u)) => Backend::Upstream(u.clone()),
                (None, None) => {
                    let why = match (&rec.reason, &rec.message, self.health.get(key)) {
                        (_, _, Some((_, h, _))) if !h.ready => {
                            format!("not ready: {}", h.last.as_deref().unwrap_or("waiting for its readiness probe"))
                        }
                        (Some(r), Some(m), _) => format!("{r}: {m}"),
                        (Some(r), None, _) => r.to_string(),
                        _ => rec.phase.to_string(),
                    };
                    Backend::Unavailable(format!(
                        "workload {} is not ready on node {} ({why})",
                        rec.assignment.workload, self.ctx.node
                    ))
                }
            };
            let hosts: Vec<HostMatch> = if http.hosts.is_empty() {
                vec![HostMatch::Any]
            } else {
                http.hosts.iter().map(|h| HostMatch::parse(h)).collect()
            };
            for host in hosts {
                for prefix in &http.paths {
                    routes.push(Route {
                        host: host.clone(),
                        prefix: prefix.clone(),
                        backend: backend.clone(),
                        owner: key.clone(),
                    });
                }
            }
        }
        let (table, conflicts) = Table::build(routes);
        self.conflicts = conflicts.into_iter().collect();
        self.ctx.proxy.set(table);
    }

    /// Whether a replica may get traffic (it has no readiness probe, or passes it).
    /// Whether the replica gets traffic: its probes pass (the implicit
    /// check of a service without probes gates its readiness in status and
    /// rollouts, not its traffic: it is served as soon as it is up).
    fn ready(&self, key: &str) -> bool {
        let own = self.records.get(key).is_some_and(|r| !r.assignment.spec.health.is_empty());
        !own || self.health.get(key).is_none_or(|(_, h, _)| h.serving())
    }

    /// Starts the probes of a run that is up (`health::effective`: its own,
    /// or a Wasm service's check that it instantiates).
    fn start_probes(&mut self, key: &str, run: u64, target: probe::Target) {
        self.stop_probes(key);
        let Some(rec) = self.records.get(key) else { return };
        let spec = crate::health::effective(&rec.assignment.spec);
        if spec.is_empty() {
            return;
        }
        let mut tasks = Vec::new();
        for (kind, p) in [
            (ProbeKind::Startup, &spec.startup),
            (ProbeKind::Readiness, &spec.readiness),
            (ProbeKind::Liveness, &spec.liveness),
        ] {
            let Some(p) = p.clone() else { continue };
            let (ctx, tx, target, key) = (self.ctx.clone(), self.tx.clone(), target.clone(), key.to_string());
            tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(p.period.0));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let timeout = Duration::from_millis(p.timeout.0);
                    let result = probe::run(&ctx.containers, &target, &p.check, timeout).await;
                    // A startup probe is done once it passed.
                    let done = kind == ProbeKind::Startup && result.is_ok();
                    if tx.send(Cmd::Probed { key: key.clone(), run, kind, result }).is_err() || done {
                        return;
                    }
                }
            }));
        }
        self.health.insert(key.to_string(), (run, Health::new(&spec), tasks));
    }

    fn stop_probes(&mut self, key: &str) {
        if let Some((_, _, tasks)) = self.health.remove(key) {
            for t in tasks {
                t.abort();
            }
        }
    }

    fn probed(&mut self, key: String, run: u64, kind: ProbeKind, result: Result<String, String>) {
        let Some(rec) = self.records.get(&key) else { return };
        let spec = crate::health::effective(&rec.assignment.spec);
        let Some((r, h, _)) = self.health.get_mut(&key) else { return };
        if *r != run {
            return; // a probe of an earlier run
        }
        let was_ready = h.serving();
        let verdict = h.record(&spec, kind, result);
        let now_ready = h.serving();
        if was_ready != now_ready {
            let text = h.last.clone().unwrap_or_default();
            let word = if now_ready { "ready" } else { "not ready" };
            self.ctx.logs.sink(&key).note(&format!("{word}: {text}"));
            tracing::info!(key, ready = now_ready, "{text}");
            if now_ready {
                self.retiring.remove(&key);
            }
        }
        let Verdict::Restart(why) = verdict else { return };
        // Unhealthy: end this run as if it had failed; restart policy and
        // back-off decide what follows.
        tracing::warn!(key, "{why}; restarting");
        self.ctx.logs.sink(&key).note(&format!("unhealthy: {why}; restarting"));
        self.stop_probes(&key);
        self.end_run(&key);
        if let Some(svc) = self.services.remove(&key) {
            svc.stop();
        }
        self.upstreams.remove(&key);
        if let Some(rec) = self.records.get(&key) {
            let exit = Exit { exit_code: None, succeeded: false, reason: Reason::Unhealthy, message: Some(why) };
            let next = plan::after_exit(rec, &exit, now_ms());
            self.records.insert(key.clone(), next);
            self.persist(&key);
        }
    }

    fn new_record(a: Assignment) -> InstanceRecord {
        InstanceRecord {
            assignment: a,
            phase: Phase::Pending,
            restarts: 0,
            exit_code: None,
            reason: None,
            message: None,
            started_ms: None,
            finished_ms: None,
            last_succeeded: None,
            streak: 0,
            backoff_until_ms: None,
        }
    }

    /// Ends a replica's run, if it has one: it counts as running (so
    /// nothing starts under its name) until its clean-up (the container
    /// deleted, its network and secret files released) is over.
    fn end_run(&mut self, key: &str) -> bool {
        let Some((_, task)) = self.runs.remove(key) else { return false };
        task.abort();
        self.stopping.insert(key.to_string());
        let (tx, k) = (self.tx.clone(), key.to_string());
        tokio::spawn(async move {
            let _ = task.await;
            let _ = tx.send(Cmd::Stopped { key: k });
        });
        true
    }

    fn execute(&mut self, step: Step) {
        match step {
            Step::Stop(key) => {
                let was_ready = self.ready(&key);
                self.stop_probes(&key);
                if self.end_run(&key) {
                    self.ctx.logs.sink(&key).note("stopped: the replica was changed or removed");
                    tracing::info!(key, "stopped");
                }
                let singleton = self.records.get(&key).is_some_and(|r| r.assignment.spec.node_loss.singleton);
                if let Some(svc) = self.services.remove(&key) {
                    if was_ready && !singleton {
                        // Keeps serving until its successor is ready or it is forgotten.
                        if let Some(older) = self.retiring.insert(key.clone(), svc) {
                            older.stop();
                        }
                    } else {
                        // Never ready (what serves now keeps serving), or a
                        // singleton, of which two must never run at once.
                        svc.stop();
                    }
                }
            }
            Step::Forget(key) => {
                // Gone for good: end its requests in flight too.
                for svc in [self.services.remove(&key), self.retiring.remove(&key)].into_iter().flatten() {
                    svc.stop();
                }
                self.conflicts.remove(&key);
                self.upstreams.remove(&key);
                self.stop_probes(&key);
                if let Some(rec) = self.records.remove(&key) {
                    let workload = rec.assignment.workload;
                    let others = self.records.values().any(|r| r.assignment.workload == workload);
                    if !others && let Err(e) = self.ctx.state.drop_key_value(&workload) {
                        tracing::error!(workload, "cannot remove key-value data: {e}");
                    }
                }
                if let Err(e) = self.ctx.state.remove_instance(&key) {
                    tracing::error!(key, "cannot forget replica: {e}");
                }
                self.ctx.logs.remove(&key);
                tracing::info!(key, "removed");
            }
            Step::Adopt(a) | Step::Replace(a) => {
                let key = a.key();
                self.records.insert(key.clone(), Self::new_record(a));
                self.persist(&key);
            }
            Step::Fetch(digest) => {
                self.artifacts.insert(digest, Artifact::Fetching);
                for rec in self.records.values_mut() {
                    if plan::waits_for(rec, &digest) {
                        rec.reason = Some(Reason::Fetching);
                        rec.message = None;
                    }
                }
                let ctx = self.ctx.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = match ctx.api_url() {
                        None => Err("not enrolled with a hub yet".to_string()),
                        Some(url) => ctx
                            .fetcher
                            .fetch(&url, &ctx.node, &ctx.key, digest, ctx.hub_now_ms())
                            .await
                            .map(|n| {
                                tracing::info!(%digest, bytes = n, "artifact downloaded");
                            })
                            .map_err(|e| e.to_string()),
                    };
                    let _ = tx.send(Cmd::Fetched { digest, result });
                });
            }
            Step::Fence(key) => {
                // Killed at once (no grace), and its service stops serving:
                // a replacement may start elsewhere soon.
                self.stop_probes(&key);
                if self.end_run(&key) {
                    self.ctx.logs.sink(&key).note("stopped: fenced, the hub has not acknowledged this node");
                    tracing::warn!(key, "fenced: the lease from the hub ran out");
                }
                for svc in [self.services.remove(&key), self.retiring.remove(&key)].into_iter().flatten() {
                    svc.stop();
                }
                let age = self.lease_age_ms();
                if let Some(rec) = self.records.get_mut(&key) {
                    *rec = plan::fenced(rec, age);
                    self.persist(&key);
                }
            }
            Step::MarkInterrupted(key) => {
                if let Some(rec) = self.records.get_mut(&key) {
                    *rec = plan::interrupted(rec, now_ms());
                    self.persist(&key);
                }
            }
            Step::Start(key) => self.start(key),
        }
    }

    fn start(&mut self, key: String) {
        let Some(rec) = self.records.get_mut(&key) else { return };
        *rec = plan::starting(rec);
        let rec = rec.clone();
        // Durable before the run begins: after a crash, the attempt is known
        // (`rerun_interrupted`).
        if let Err(e) = self.ctx.state.put_instance(&key, &rec) {
            tracing::error!(key, "cannot persist replica state: {e}");
        }
        let run = self.next_run;
        self.next_run += 1;
        let a = rec.assignment.clone();
        let ctx = self.ctx.clone();
        let tx = self.tx.clone();
        let k = key.clone();
        let task = tokio::spawn(async move {
            if let Some(exit) = run_replica(&ctx, &k, run, &a, &tx).await {
                let _ = tx.send(Cmd::Exited { key: k, run, exit });
            }
        });
        self.runs.insert(key, (run, task));
    }

    /// What a replica's status says beyond its phase: for a service, its
    /// request counts and last failure; a lost route conflict.
    fn message(&self, key: &str, r: &InstanceRecord) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(svc) = self.services.get(key) {
            let requests = svc.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
            let failures = svc.stats.failures.load(std::sync::atomic::Ordering::Relaxed);
            if requests > 0 {
                let mut m = format!("{requests} requests, {failures} failed");
                if let Some(last) = svc.stats.last_failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    m.push_str(&format!("; last failure: {last}"));
                }
                parts.push(m);
            }
        } else if let Some(m) = &r.message {
            parts.push(m.clone());
        }
        if let Some(c) = self.conflicts.get(key) {
            parts.push(c.clone());
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn publish(&self) {
        let instances = self
            .records
            .iter()
            .map(|(key, r)| InstanceStatus {
                workload: r.assignment.workload.clone(),
                replica: r.assignment.replica,
                uid: r.assignment.uid.clone(),
                generation: r.assignment.generation,
                phase: r.phase,
                restarts: r.restarts,
                exit_code: r.exit_code,
                reason: if self.conflicts.contains_key(key) && r.reason.is_none() {
                    Some(Reason::RouteConflict)
                } else {
                    r.reason.clone()
                },
                message: self.message(key, r),
                started_ms: r.started_ms,
                finished_ms: r.finished_ms,
                ready: self
                    .health
                    .get(key)
                    .filter(|_| {
                        let h = crate::health::effective(&r.assignment.spec);
                        h.readiness.is_some() || h.startup.is_some()
                    })
                    .map(|(_, h, _)| h.serving()),
                probe: self.health.get(key).and_then(|(_, h, _)| h.last.clone()),
            })
            .collect();
        let snap = Snapshot {
            observed_generation: self.generation,
            instances,
            corrupt_files: self.ctx.wasm.cache.corrupt.load(std::sync::atomic::Ordering::Relaxed),
        };
        self.status.send_if_modified(|old| {
            if *old == snap {
                false
            } else {
                *old = snap;
                true
            }
        });
    }
}

/// What a replica gets to run with: its environment, allow-list, key-value
/// namespace and log; and its limits.
fn grants(
    ctx: &Ctx,
    key: &str,
    run: u64,
    a: &Assignment,
    spec: &edge_api::model::WasmSpec,
) -> Result<(Capabilities, Limits), Exit> {
    let opened =
        crate::secrets::open_all(&ctx.node, &ctx.kem, a).map_err(|e| invalid(Reason::SecretUnavailable, e.0))?;
    let mut env = crate::secrets::env(&a.spec, &opened).map_err(|e| invalid(Reason::SecretUnavailable, e.0))?;
    let files =
        ctx.run_dir.write(key, run, &a.spec, &opened, None).map_err(|e| invalid(Reason::SecretUnavailable, e))?;
    env.push(("EDGE_WORKLOAD".into(), a.workload.clone()));
    env.push(("EDGE_REPLICA".into(), a.replica.to_string()));
    env.push(("EDGE_NODE".into(), ctx.node.clone()));
    let outbound = spec.outbound.iter().filter_map(|r| r.parse().ok()).collect();
    let kv = if spec.key_value {
        Some(ctx.key_value(&a.workload).map_err(|e| invalid(Reason::StorageError, format!("{e:#}")))?)
    } else {
        None
    };
    let caps = Capabilities { env, outbound: Arc::new(outbound), kv, sink: ctx.logs.sink(key), files: Arc::new(files) };
    let cpu_budget = match (spec.cpu_budget, &a.spec.http) {
        (Some(b), _) => Some(Duration::from_millis(b.0)),
        (None, Some(_)) => Some(Duration::from_millis(edge_api::model::WasmSpec::DEFAULT_REQUEST_CPU_MS)),
        (None, None) => None,
    };
    // Commands are throttled to their CPU share (as a cgroup quota would);
    // a request is bounded by its budget instead, and served at full speed.
    let cpu_share = a.spec.http.is_none().then_some(a.spec.resources.cpu.0);
    // Without memory_total each instance's own limit bounds the total at
    // memory × max_instances, which is what the scheduler reserved.
    let budget = spec.memory_total.filter(|_| a.spec.http.is_some()).map(|m| crate::wasm::MemoryBudget::new(m.0));
    let limits = Limits {
        memory: a.spec.resources.memory.0,
        budget,
        request_timeout: spec.request_timeout(),
        cpu_budget,
        cpu_share,
    };
    Ok((caps, limits))
}

fn invalid(reason: Reason, message: String) -> Exit {
    Exit { exit_code: None, succeeded: false, reason, message: Some(message) }
}

/// One run of one replica: a command, start to end (its exit); or the
/// preparation of a service, which is handed to the supervisor (`None`).
async fn run_replica(ctx: &Ctx, key: &str, run: u64, a: &Assignment, tx: &mpsc::UnboundedSender<Cmd>) -> Option<Exit> {
    let spec = match &a.spec.runtime {
        Runtime::Wasm(spec) => spec,
        Runtime::Container(_) => {
            let opened = match crate::secrets::open_all(&ctx.node, &ctx.kem, a) {
                Ok(o) => o,
                Err(e) => return Some(invalid(Reason::SecretUnavailable, e.0)),
            };
            let given = crate::container::Given { run, opened: &opened, run_dir: &ctx.run_dir };
            let started = |upstream| {
                let _ = tx.send(Cmd::Started { key: key.to_string(), run, upstream, check: None });
            };
            return Some(ctx.containers.run(key, a, &ctx.facts.arch, ctx.logs.sink(key), given, started).await);
        }
    };
    let Some(digest) = spec.component.digest().copied() else {
        return Some(invalid(Reason::InvalidSpec, "the component is not a digest".into()));
    };
    let (caps, limits) = match grants(ctx, key, run, a, spec) {
        Ok(g) => g,
        Err(exit) => return Some(exit),
    };
    if a.spec.http.is_some() {
        let pre = match ctx.wasm.prepare_proxy(digest, ctx.fetcher.path(&digest), ctx).await {
            Ok(p) => p,
            Err(e) => return Some(invalid(e.reason, e.message)),
        };
        let service = Arc::new(HttpService::new(
            key.to_string(),
            a.workload.clone(),
            a.generation,
            pre,
            caps,
            limits,
            spec.max_instances(),
        ));
        let _ = tx.send(Cmd::ServiceReady { key: key.to_string(), run, service });
        return None;
    }
    let pre = match ctx.wasm.prepare_command(digest, ctx.fetcher.path(&digest), ctx).await {
        Ok(p) => p,
        Err(e) => return Some(invalid(e.reason, e.message)),
    };
    // Command probes run the same component beside it, with its grants.
    let check = (!a.spec.health.is_empty()).then(|| {
        Arc::new(crate::wasm::CommandCheck::new(pre.clone(), caps.clone(), limits.clone(), a.workload.clone()))
    });
    let started = || {
        let _ = tx.send(Cmd::Started { key: key.to_string(), run, upstream: None, check });
    };
    let mut args = vec![a.workload.clone()];
    args.extend(spec.args.iter().cloned());
    let inv = crate::wasm::Invocation { args, caps, limits };
    Some(ctx.wasm.run_command(pre, inv, started).await)
}
