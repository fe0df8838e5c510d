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
use edge_api::model::{InstanceStatus, Phase, Runtime};
use edge_api::time::now_ms;
use edge_api::wire::{Assignment, NodeDesired};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::Ctx;
use crate::plan::{self, Artifact, Exit, Step};
use crate::state::InstanceRecord;

pub enum Cmd {
    /// A verified desired state, already persisted.
    Desired {
        generation: u64,
        doc: NodeDesired,
    },
    Started {
        key: String,
        run: u64,
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
}

/// What the agent reports: everything it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub observed_generation: u64,
    pub instances: Vec<InstanceStatus>,
}

/// Planning passes per wake-up; each pass makes progress (adopt, then fetch
/// or start), so a handful always suffices. A bound keeps a bug from spinning.
const MAX_PASSES: usize = 8;

/// The loop goes round at least this often, proving it is alive (see
/// `Ctx::supervisor_alive_ms`).
pub const LIVENESS_TICK: Duration = Duration::from_secs(5);

/// Retries of a failed download: 2 s, doubling, at most a minute.
const FETCH_RETRY_BASE_MS: u64 = 2_000;
const FETCH_RETRY_MAX_MS: u64 = 60_000;

pub struct Supervisor {
    ctx: Arc<Ctx>,
    records: BTreeMap<String, InstanceRecord>,
    runs: HashMap<String, (u64, JoinHandle<()>)>,
    artifacts: HashMap<Digest, Artifact>,
    fetch_failures: HashMap<Digest, u32>,
    desired: Vec<Assignment>,
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
        tx: mpsc::UnboundedSender<Cmd>,
        status: watch::Sender<Snapshot>,
    ) -> Self {
        Supervisor {
            ctx,
            records: records.into_iter().collect(),
            runs: HashMap::new(),
            artifacts: HashMap::new(),
            fetch_failures: HashMap::new(),
            desired: Vec::new(),
            generation: 0,
            next_run: 1,
            wake_at_ms: None,
            tx,
            status,
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, mut shutdown: watch::Receiver<bool>) {
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
                if generation >= self.generation {
                    self.generation = generation;
                    self.desired = doc.workloads;
                }
            }
            Cmd::Started { key, run } => {
                if self.runs.get(&key).map(|r| r.0) == Some(run)
                    && let Some(rec) = self.records.get_mut(&key)
                {
                    rec.phase = Phase::Running;
                    rec.reason = None;
                    rec.message = None;
                    rec.started_ms = Some(now_ms());
                    self.persist(&key);
                }
            }
            Cmd::Exited { key, run, exit } => {
                if self.runs.get(&key).map(|r| r.0) != Some(run) {
                    return; // a run we already stopped
                }
                self.runs.remove(&key);
                if let Some(rec) = self.records.get(&key) {
                    let next = plan::after_exit(rec, &exit, now_ms());
                    let sink = self.ctx.logs.sink(&key);
                    match (&exit.exit_code, &exit.message) {
                        (Some(c), _) => sink.note(&format!("exited with code {c}")),
                        (None, Some(m)) => sink.note(&format!("{}: {m}", exit.reason)),
                        (None, None) => sink.note(&exit.reason),
                    }
                    tracing::info!(key, reason = %exit.reason, code = ?exit.exit_code, "run ended");
                    self.records.insert(key.clone(), next);
                    self.persist(&key);
                }
            }
            Cmd::Fetched { digest, result } => match result {
                Ok(()) => {
                    self.fetch_failures.remove(&digest);
                    self.artifacts.insert(digest, Artifact::Ready);
                }
                Err(e) => {
                    let n = self.fetch_failures.entry(digest).or_insert(0);
                    *n += 1;
                    let delay = (FETCH_RETRY_BASE_MS << (*n - 1).min(8)).min(FETCH_RETRY_MAX_MS);
                    tracing::warn!(%digest, "artifact download failed (retry in {}s): {e}", delay / 1000);
                    self.artifacts.insert(digest, Artifact::Failed { retry_at_ms: now_ms() + delay });
                    for rec in self.records.values_mut() {
                        if rec.phase == Phase::Pending
                            && rec.assignment.spec.runtime.artifact().digest() == Some(&digest)
                        {
                            rec.reason = Some("FetchFailed".into());
                            rec.message = Some(format!("{e}; retrying in {}s", delay / 1000));
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
        for _ in 0..MAX_PASSES {
            let running: BTreeSet<String> = self.runs.keys().cloned().collect();
            let p = plan::plan(&self.desired, &self.records, &running, &|d| self.artifact(d), now_ms());
            self.wake_at_ms = p.wake_at_ms;
            if p.steps.is_empty() {
                break;
            }
            for step in p.steps {
                self.execute(step);
            }
        }
        self.publish();
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

    fn execute(&mut self, step: Step) {
        match step {
            Step::Stop(key) => {
                if let Some((_, task)) = self.runs.remove(&key) {
                    task.abort();
                    self.ctx.logs.sink(&key).note("stopped: the replica was changed or removed");
                    tracing::info!(key, "stopped");
                }
            }
            Step::Forget(key) => {
                self.records.remove(&key);
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
                    if rec.phase == Phase::Pending && rec.assignment.spec.runtime.artifact().digest() == Some(&digest) {
                        rec.reason = Some("Fetching".into());
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
                            .fetch(&url, &ctx.node, &ctx.key, digest)
                            .await
                            .map(|n| {
                                tracing::info!(%digest, bytes = n, "artifact downloaded");
                            })
                            .map_err(|e| e.to_string()),
                    };
                    let _ = tx.send(Cmd::Fetched { digest, result });
                });
            }
            Step::MarkInterrupted(key) => {
                if let Some(rec) = self.records.get_mut(&key) {
                    rec.phase = Phase::Failed;
                    rec.reason = Some("Interrupted".into());
                    rec.message = Some("the agent stopped while this ran; restart policy is never".into());
                    rec.finished_ms = Some(now_ms());
                    self.persist(&key);
                }
            }
            Step::Start(key) => self.start(key),
        }
    }

    fn start(&mut self, key: String) {
        let Some(rec) = self.records.get_mut(&key) else { return };
        if rec.started_ms.is_some() {
            rec.restarts += 1;
        }
        rec.phase = Phase::Pending;
        rec.reason = Some("Starting".into());
        rec.message = None;
        rec.exit_code = None;
        rec.backoff_until_ms = None;
        let run = self.next_run;
        self.next_run += 1;
        let a = rec.assignment.clone();
        let ctx = self.ctx.clone();
        let tx = self.tx.clone();
        let k = key.clone();
        let task = tokio::spawn(async move {
            let exit = run_replica(&ctx, &k, run, &a, &tx).await;
            let _ = tx.send(Cmd::Exited { key: k, run, exit });
        });
        self.runs.insert(key, (run, task));
    }

    fn publish(&self) {
        let instances = self
            .records
            .values()
            .map(|r| InstanceStatus {
                workload: r.assignment.workload.clone(),
                replica: r.assignment.replica,
                uid: r.assignment.uid.clone(),
                generation: r.assignment.generation,
                phase: r.phase,
                restarts: r.restarts,
                exit_code: r.exit_code,
                reason: r.reason.clone(),
                message: r.message.clone(),
                started_ms: r.started_ms,
                finished_ms: r.finished_ms,
            })
            .collect();
        let snap = Snapshot { observed_generation: self.generation, instances };
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

/// One run of one replica, start to end.
async fn run_replica(ctx: &Ctx, key: &str, run: u64, a: &Assignment, tx: &mpsc::UnboundedSender<Cmd>) -> Exit {
    let Runtime::Wasm(spec) = &a.spec.runtime;
    let Some(digest) = spec.component.digest().copied() else {
        return Exit {
            exit_code: None,
            succeeded: false,
            reason: "InvalidSpec".into(),
            message: Some("the component is not a digest".into()),
        };
    };
    let pre = match ctx.wasm.prepare(digest, ctx.fetcher.path(&digest)).await {
        Ok(p) => p,
        Err(e) => {
            return Exit {
                exit_code: None,
                succeeded: false,
                reason: "InvalidComponent".into(),
                message: Some(format!("{e:#}")),
            };
        }
    };
    let mut env: Vec<(String, String)> = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.push(("EDGE_WORKLOAD".into(), a.workload.clone()));
    env.push(("EDGE_REPLICA".into(), a.replica.to_string()));
    env.push(("EDGE_NODE".into(), ctx.node.clone()));
    let mut args = vec![a.workload.clone()];
    args.extend(spec.args.iter().cloned());
    let inv = crate::wasm::Invocation { args, env, memory_limit: a.spec.resources.memory.0, sink: ctx.logs.sink(key) };
    let started = || {
        let _ = tx.send(Cmd::Started { key: key.to_string(), run });
    };
    ctx.wasm.run_command(pre, inv, started).await
}
