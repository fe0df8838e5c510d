//! The object model: workloads with their specs, nodes with their facts, and
//! the status both report. These are the shapes stored by the hub, served by
//! its API, and carried (inside envelopes) over MQTT.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;
pub use crate::event::{AuditEntry, Event, ListedEvent};
pub use crate::health::{HealthSpec, Probe, ProbeCheck, ProbeKind};
pub use crate::lease::NodeLossSpec;
pub use crate::placement::{Placement, Replicas, Selector, Taint, TaintEffect, Toleration};
use crate::quantity::{Cpu, Memory};
pub use crate::reason::Reason;
pub use crate::rollout::{Amount, RolloutPhase, RolloutSpec, RolloutView};

pub type Labels = BTreeMap<String, String>;

/// When a finished run is started again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Never,
    /// The default: a command that succeeds stays done; one that fails is retried.
    #[default]
    OnFailure,
    Always,
}

impl RestartPolicy {
    pub const NAMES: &'static [&'static str] = &["never", "on-failure", "always"];

    /// Whether a run that ended (successfully or not) is started again.
    pub fn restarts_after(self, succeeded: bool) -> bool {
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !succeeded,
            RestartPolicy::Always => true,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "never" => Some(RestartPolicy::Never),
            "on-failure" => Some(RestartPolicy::OnFailure),
            "always" => Some(RestartPolicy::Always),
            _ => None,
        }
    }
}

/// What a workload needs from its node. The scheduler reserves these amounts
/// and the agent enforces the memory figure as a hard limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resources {
    pub memory: Memory,
    pub cpu: Cpu,
}

impl Resources {
    /// 64 MiB: enough for typical Rust, C or Python components, small enough
    /// that a Raspberry Pi 3 (1 GiB) holds a dozen.
    pub const DEFAULT_MEMORY: Memory = Memory::mib(64);
    /// A tenth of a core: components are mostly idle.
    pub const DEFAULT_CPU: Cpu = Cpu(100);
}

impl Default for Resources {
    fn default() -> Self {
        Resources { memory: Self::DEFAULT_MEMORY, cpu: Self::DEFAULT_CPU }
    }
}

/// Architectures in OCI platform notation (`GOARCH[/variant]`).
pub const ARCHES: &[&str] = &["amd64", "arm64", "arm/v7", "arm/v6", "riscv64"];

/// Where a component comes from. In a manifest file it may be a local path
/// (which `edgectl apply` uploads); everything the hub stores is a digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum ArtifactRef {
    Digest(Digest),
    /// `oci://registry/repository[:tag][@sha256:…]`: the hub pulls it at apply time.
    Oci(crate::oci_ref::Reference),
    Path(String),
}

impl ArtifactRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        if Digest::is_digest_like(s) {
            Ok(ArtifactRef::Digest(s.parse().map_err(|e: crate::digest::DigestError| e.to_string())?))
        } else if s.starts_with("oci://") {
            Ok(ArtifactRef::Oci(s.parse().map_err(|e: crate::oci_ref::ReferenceError| e.to_string())?))
        } else {
            Ok(ArtifactRef::Path(s.to_string()))
        }
    }

    pub fn digest(&self) -> Option<&Digest> {
        match self {
            ArtifactRef::Digest(d) => Some(d),
            ArtifactRef::Oci(_) | ArtifactRef::Path(_) => None,
        }
    }
}

impl fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactRef::Digest(d) => d.fmt(f),
            ArtifactRef::Oci(r) => r.fmt(f),
            ArtifactRef::Path(p) => f.write_str(p),
        }
    }
}

impl fmt::Debug for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for ArtifactRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArtifactRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ArtifactRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Environment variables: each a value, or a reference to a key of a Secret.
pub type Env = BTreeMap<String, EnvValue>;

/// The value of one environment variable. Stored and shown as written: a
/// secret's value never appears in a workload, only where it comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum EnvValue {
    Text(String),
    Secret(SecretKeyRef),
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> Self {
        EnvValue::Text(s.to_string())
    }
}

impl fmt::Display for EnvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvValue::Text(t) => f.write_str(t),
            EnvValue::Secret(r) => write!(f, "<secret {}/{}>", r.secret, r.key),
        }
    }
}

/// `{ secret = "db", key = "password" }`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    pub secret: String,
    pub key: String,
}

/// `{ secret = "db", path = "/run/secrets/db" }`: the secret as a read-only
/// directory holding one file per key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct SecretMount {
    pub secret: String,
    pub path: String,
}

/// A WebAssembly component: a `wasi:cli/command` (run to completion) or,
/// with `[spec.http]`, a `wasi:http/proxy` service (an instance per request).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct WasmSpec {
    pub component: ArtifactRef,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: Env,
    /// Secrets given as read-only directories (one file per key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretMount>,
    /// Instances that may exist at once (for a service: requests in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// The linear memory a service's instances may use together, enforced
    /// by the agent and reserved by the scheduler (default: `memory ×
    /// max_instances`). Lets a service take many requests at once without
    /// reserving the worst case of each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total: Option<Memory>,
    /// CPU time one request (service) or one run (command) may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_budget: Option<Millis>,
    /// Wall-clock time one request may take, body included (services only;
    /// default 30 s): a guest still busy then is stopped and its instance freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Millis>,
    /// Where `wasi:http/outgoing-handler` may send requests:
    /// `scheme://host[:port]`, host possibly `*.domain`. Nowhere by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
    /// Whether the component gets `wasi:keyvalue`, stored on the node.
    #[serde(default, skip_serializing_if = "is_false")]
    pub key_value: bool,
    /// Where the component came from (a file name, an `oci://` reference),
    /// for people; `component` is what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl WasmSpec {
    /// Default concurrency of a service.
    pub const DEFAULT_MAX_INSTANCES: u32 = 16;
    /// Default CPU budget of one request: generous for a request handler,
    /// short enough that a runaway loop is cut off quickly.
    pub const DEFAULT_REQUEST_CPU_MS: u64 = 10_000;
    /// Default wall-clock limit of one request: a guest waiting on something
    /// (a slow body, an outbound call) uses no CPU but holds an instance.
    pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;

    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.request_timeout.map_or(Self::DEFAULT_REQUEST_TIMEOUT_MS, |m| m.0))
    }

    pub fn max_instances(&self) -> u32 {
        self.max_instances.unwrap_or(Self::DEFAULT_MAX_INSTANCES)
    }

    /// The linear memory all instances of one replica may use together:
    /// `memory_total`, or `per_instance × max_instances`.
    pub fn memory_total(&self, per_instance: Memory) -> Memory {
        self.memory_total.unwrap_or(Memory(per_instance.0.saturating_mul(u64::from(self.max_instances()))))
    }
}

/// An OCI container image, run by the node's OCI runtime (runc or crun).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerSpec {
    /// `oci://registry/repository[:tag][@sha256:…]`; the hub pins it to the
    /// digest it resolved at apply time.
    pub image: crate::oci_ref::Reference,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's default arguments (its `Cmd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: Env,
    /// Secrets mounted read-only (one file per key, owned by the container's user).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretMount>,
    /// Its network: its own namespace on the node's container bridge
    /// (default), loopback only, or the node's own (where the hub allows it).
    #[serde(default, skip_serializing_if = "ContainerNetwork::is_default")]
    pub network: ContainerNetwork,
    /// The port its HTTP server listens on, for `[spec.http]` routes
    /// through the agent's proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `uid[:gid]`. Default: the image's user, unless that is root, in
    /// which case 65534 (nobody): containers are not root unless asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Set by the hub: the platforms the image offers, each with its manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<ImagePlatform>,
    /// The reference as the manifest gave it, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A container's network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum ContainerNetwork {
    /// Its own network namespace with an address on the node's container
    /// bridge: outbound traffic is masqueraded, inbound comes through the
    /// agent's proxy; the node's loopback services are out of reach.
    #[default]
    Bridge,
    /// Its own network namespace with only a loopback interface.
    None,
    /// The node's network namespace: only where the hub allows it
    /// (`edge-hub serve --allow-host-network`).
    Host,
}

impl ContainerNetwork {
    pub const NAMES: &'static [&'static str] = &["bridge", "none", "host"];

    pub fn is_default(&self) -> bool {
        *self == ContainerNetwork::Bridge
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bridge" => Some(ContainerNetwork::Bridge),
            "none" => Some(ContainerNetwork::None),
            "host" => Some(ContainerNetwork::Host),
            _ => None,
        }
    }
}

/// One platform of a container image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImagePlatform {
    /// `linux/arm/v7`.
    pub platform: crate::platform::Platform,
    /// The digest of the image manifest for that platform.
    pub manifest: Digest,
}

impl ContainerSpec {
    /// The image with nothing overridden.
    pub fn new(image: crate::oci_ref::Reference) -> ContainerSpec {
        ContainerSpec {
            image,
            command: Vec::new(),
            args: Vec::new(),
            env: Env::new(),
            secrets: Vec::new(),
            network: ContainerNetwork::Bridge,
            port: None,
            user: None,
            platforms: Vec::new(),
            source: None,
        }
    }

    /// The manifest of the image's best platform for a node of `arch`, if any.
    pub fn image_for(&self, arch: &str) -> Option<&ImagePlatform> {
        let node = crate::platform::Platform::linux(arch);
        crate::platform::Platform::best(self.platforms.iter().map(|p| &p.platform), &node).map(|i| &self.platforms[i])
    }
}

/// A duration in milliseconds, written as `500ms`, `5s`, `2m`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) && ms > 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl fmt::Debug for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::time::parse_duration(&s).map(|d| Millis(d.as_millis() as u64)).map_err(serde::de::Error::custom)
    }
}

/// How an HTTP service is reached through the agent's proxy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpSpec {
    /// Host names it answers (`Host` header, port ignored); `*.domain`
    /// matches subdomains; empty means any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Path prefixes it answers, on segment boundaries; default `/`.
    #[serde(default = "root_path")]
    pub paths: Vec<String>,
}

fn root_path() -> Vec<String> {
    vec!["/".to_string()]
}

/// What runs. Serialized as one key (`wasm = {...}`), as in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Wasm(WasmSpec),
    Container(ContainerSpec),
}

impl Runtime {
    /// The node runtime it needs (`RuntimeInfo::name`).
    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Wasm(_) => "wasm",
            Runtime::Container(_) => "oci",
        }
    }

    /// The component the hub serves, for Wasm workloads.
    pub fn artifact(&self) -> Option<&ArtifactRef> {
        match self {
            Runtime::Wasm(w) => Some(&w.component),
            Runtime::Container(_) => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadSpec {
    pub replicas: Replicas,
    pub restart: RestartPolicy,
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    #[serde(flatten)]
    pub runtime: Runtime,
    /// Present for services: how the proxy routes requests to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// Probes the agent runs on each replica (`[spec.health]`).
    #[serde(default, skip_serializing_if = "HealthSpec::is_empty")]
    pub health: HealthSpec,
    /// Whether a run the agent was in the middle of when it stopped (a
    /// crash, a power cut) runs again when it comes back (at least once),
    /// or is reported `Interrupted` (at most once). Runs without
    /// `[spec.http]` only; a `restart = "never"` run never runs again.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub rerun_interrupted: bool,
    /// What happens when its node is lost (`[spec.node_loss]`).
    #[serde(default, skip_serializing_if = "NodeLossSpec::is_empty")]
    pub node_loss: NodeLossSpec,
    /// How a new revision reaches the replicas (`[spec.rollout]`).
    #[serde(default = "RolloutSpec::standard", skip_serializing_if = "RolloutSpec::is_empty")]
    pub rollout: RolloutSpec,
}

impl WorkloadSpec {
    /// The names of the secrets it uses (in its env or as files).
    pub fn secret_names(&self) -> std::collections::BTreeSet<&str> {
        let (env, mounts) = match &self.runtime {
            Runtime::Wasm(w) => (&w.env, &w.secrets),
            Runtime::Container(c) => (&c.env, &c.secrets),
        };
        let from_env = env.values().filter_map(|v| match v {
            EnvValue::Secret(r) => Some(r.secret.as_str()),
            EnvValue::Text(_) => None,
        });
        from_env.chain(mounts.iter().map(|m| m.secret.as_str())).collect()
    }

    /// Its env and secret mounts.
    pub fn env_and_secrets(&self) -> (&Env, &[SecretMount]) {
        match &self.runtime {
            Runtime::Wasm(w) => (&w.env, &w.secrets),
            Runtime::Container(c) => (&c.env, &c.secrets),
        }
    }

    /// The Wasm instances one replica may hold at once (0 for containers).
    pub fn instances(&self) -> u32 {
        match (&self.runtime, &self.http) {
            (Runtime::Wasm(w), Some(_)) => w.max_instances(),
            (Runtime::Wasm(_), None) => 1,
            (Runtime::Container(_), _) => 0,
        }
    }

    /// What the scheduler reserves on a node for one replica: the memory all
    /// its instances may use together (a service's `memory_total`, else
    /// `memory × max_instances`; a command runs one instance) and its CPU.
    pub fn reserved(&self) -> Resources {
        let memory = match (&self.runtime, &self.http) {
            (Runtime::Wasm(w), Some(_)) => w.memory_total(self.resources.memory),
            // A command probe runs a second instance beside the replica (one
            // probe at a time; a service's takes one of its instance slots).
            (Runtime::Wasm(_), None) if self.health.probes().any(|p| matches!(p.check, ProbeCheck::Command(_))) => {
                Memory(self.resources.memory.0.saturating_mul(2))
            }
            _ => self.resources.memory,
        };
        Resources { memory, cpu: self.resources.cpu }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Set by the hub when the workload is created; a workload deleted and
    /// created again gets a new one, so agents never confuse the two.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Set by the hub; increases each time the spec changes.
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: WorkloadSpec,
}

/// The phase of one run of a workload replica, or of a whole workload.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Accepted, not yet running: unscheduled, fetching, compiling or backing off.
    Pending,
    Running,
    /// Finished with exit code 0 and will not run again.
    Succeeded,
    /// Finished otherwise (exit code, trap, limit); see the reason.
    Failed,
    /// Its node is not Ready (missed heartbeats, disconnected): what it
    /// last reported is history, not the truth now. Only the hub says this;
    /// a phase this build does not know reads as this too.
    #[serde(other)]
    Unknown,
}

impl Phase {
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What an agent reports about one replica it runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    pub workload: String,
    pub replica: u32,
    pub uid: String,
    /// The workload generation this status is for.
    pub generation: u64,
    pub phase: Phase,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it is in its phase, in one word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// With a readiness probe: whether it passes (traffic and `READY` follow it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// The last probe result worth telling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
}

/// The hub's view of one replica: where it is placed and what its node said.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub replica: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub phase: Phase,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The workload generation the node last reported for this replica (0: none yet).
    #[serde(default)]
    pub observed_generation: u64,
    /// With a readiness probe: whether it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// The last probe result worth telling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// The revision the hub gave this replica (0: not placed).
    #[serde(default)]
    pub revision: u64,
    /// Whether that revision runs what the workload's spec says now (a
    /// rollout has reached it).
    #[serde(default)]
    pub up_to_date: bool,
}

impl ReplicaStatus {
    /// Running (or done) at the revision it was given, and passing its
    /// readiness probe if it has one, whichever revision that is.
    pub fn is_available(&self) -> bool {
        self.revision != 0
            && self.observed_generation == self.revision
            && matches!(self.phase, Phase::Running | Phase::Succeeded)
            && self.ready != Some(false)
    }

    /// Available at what the workload's spec says now.
    pub fn is_ready(&self) -> bool {
        self.up_to_date && self.is_available()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkloadStatus {
    pub phase: Phase,
    /// Replicas that are running or have succeeded, at the current generation.
    pub ready: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
}

impl WorkloadStatus {
    /// Derives the workload's phase from its replicas: any failed replica makes
    /// it Failed, then any pending one Pending, then any running one Running;
    /// only when all succeeded is it Succeeded.
    pub fn aggregate(replicas: Vec<ReplicaStatus>) -> WorkloadStatus {
        let ready = replicas.iter().filter(|r| r.is_ready()).count() as u32;
        let pick = |p: Phase| replicas.iter().find(|r| r.phase == p);
        let (phase, from) = if let Some(r) = pick(Phase::Failed) {
            (Phase::Failed, Some(r))
        } else if let Some(r) = pick(Phase::Pending) {
            (Phase::Pending, Some(r))
        } else if let Some(r) = pick(Phase::Unknown) {
            (Phase::Unknown, Some(r))
        } else if replicas.is_empty() {
            (Phase::Pending, None)
        } else if let Some(r) = pick(Phase::Running) {
            (Phase::Running, Some(r))
        } else {
            (Phase::Succeeded, None)
        };
        WorkloadStatus {
            phase,
            ready,
            reason: from.and_then(|r| r.reason.clone()),
            message: from.and_then(|r| r.message.clone()),
            replicas,
        }
    }
}

/// One version of a workload's spec, kept so it can be looked back at and
/// returned to (`edgectl rollout history|undo`). Its number is the
/// workload's generation when the spec was made.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub revision: u64,
    pub created_ms: u64,
    /// Who made it: the API token's id.
    pub by: String,
    /// What changed, in a few words: `created`, `changed wasm.env, replicas`,
    /// `rolled back to revision 2`.
    pub change: String,
    pub spec: WorkloadSpec,
}

/// A workload with its status and recent events, as the API returns it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkloadView {
    #[serde(flatten)]
    pub workload: Workload,
    pub status: WorkloadStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    /// A Wasm component compiled by the hub, per target its nodes run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compiled: Vec<CompiledView>,
}

/// A component compiled by the hub for one target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CompiledView {
    /// `x86_64`, `aarch64`, `pulley32`.
    pub target: String,
    /// The engine fingerprint it is compiled for.
    pub fingerprint: String,
    /// `Queued`, `Compiling`, `Ready` or `Failed`.
    pub state: String,
    /// How long it took (so far, while compiling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile_ms: Option<u64>,
    /// The compiled size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A way this node can run workloads.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// `wasm` or `oci`.
    pub name: String,
    /// e.g. `wasmtime 48.0.8`, `runc 1.1.5`.
    pub version: String,
    /// How code runs: `cranelift` (compiled) or `pulley` (interpreted);
    /// for containers, the OCI runtime (`runc`, `crun`).
    pub mode: String,
    /// Wasm: the engine fingerprint of the compiled code this node loads
    /// (wasmtime version, target, settings), which the hub compiles for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
    /// Wasm: this agent has no compiler; it runs only code compiled by the hub.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub precompiled_only: bool,
}

/// What an agent reports about its machine when it joins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// OCI platform notation: `amd64`, `arm64`, `arm/v7`.
    pub arch: String,
    pub os: String,
    #[serde(default)]
    pub os_release: String,
    #[serde(default)]
    pub kernel: String,
    pub cpus: u32,
    pub memory: Memory,
    /// What workloads may use: total minus what the agent keeps for the system.
    pub allocatable_memory: Memory,
    pub allocatable_cpu: Cpu,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub runtimes: Vec<RuntimeInfo>,
    #[serde(default)]
    pub agent_version: String,
    /// How many Wasm instances the node can hold at once (its pooling
    /// allocator's slots); `None`: no fixed limit. The scheduler reserves a
    /// service's `max_instances` (a command's one) against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_instances: Option<u32>,
}

impl NodeFacts {
    /// 64 TiB: more memory than any device that runs an agent; the hub
    /// refuses reports above it as implausible.
    pub const MAX_MEMORY: Memory = Memory(64 << 40);
    /// 4096 CPUs, likewise.
    pub const MAX_CPUS: u32 = 4096;

    pub fn supports(&self, runtime: &str) -> bool {
        self.runtimes.iter().any(|r| r.name == runtime)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    /// Connected and sending heartbeats.
    Ready,
    /// Asked to enrol; waits for `edgectl approve node`.
    Pending,
    /// Connected as far as the broker knows, but heartbeats stopped (hung?).
    NotReady,
    /// Disconnected: the broker delivered its last will, or it never came back.
    Offline,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A node as the API returns it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub facts: NodeFacts,
    pub key_fingerprint: String,
    pub joined_ms: u64,
    #[serde(default)]
    pub last_seen_ms: u64,
    pub desired_generation: u64,
    pub observed_generation: u64,
    /// Resources reserved by the workloads placed here.
    pub allocated: Resources,
    #[serde(default)]
    pub workloads: Vec<String>,
    /// Labels set through the API (or the node's bootstrap token); they win
    /// over the agent's own, and only they may use the `admin.edge/` prefix.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub admin_labels: Labels,
    /// The most this node may offer workloads, whatever it reports: set when
    /// it enrolled (or approved), changed with `edgectl approve node --memory/--cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    /// What the hub did not believe of what the node reported, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The bootstrap token it enrolled with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_with: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Cordoned: no new counted replicas are placed here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
    /// Its recent events (state changes), when one node is asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    /// Files that failed their check on the node's disk (and were deleted)
    /// since its agent started, as it last reported.
    #[serde(default, skip_serializing_if = "crate::model::is_zero")]
    pub corrupt_files: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What `edgectl drain` did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Drained {
    pub node: String,
    /// Counted replicas moved off the node.
    pub moved: Vec<MovedReplica>,
    /// Per-node workloads, which stay (they run on every selected node).
    pub stayed: Vec<String>,
    /// Said when the node is not Ready: it stops its copies only once it hears the hub again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MovedReplica {
    pub workload: String,
    pub replica: u32,
    /// Where it went, if a node could take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Why it is waiting, if none could.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// What an API token may do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only: get, describe, wait, version, metrics.
    Viewer,
    /// Viewer, plus apply, delete and logs of workloads and secrets.
    Operator,
    /// Everything: nodes, tokens, approval, labels, the audit log.
    Admin,
}

impl Role {
    pub const NAMES: &'static [&'static str] = &["viewer", "operator", "admin"];

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether this role includes everything `other` may do.
    pub fn covers(self, other: Role) -> bool {
        self >= other
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// What a token is for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Enrols devices (a bootstrap token).
    Join,
    /// Authenticates `edgectl` with a role.
    Api,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::Join => "join",
            TokenKind::Api => "api",
        })
    }
}

/// A token as the API shows it: never its secret (the hub keeps only a hash).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub kind: TokenKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub created_ms: u64,
    /// The token id (or `bootstrap`) that created it.
    #[serde(default)]
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// How many nodes it may enrol (join tokens); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default)]
    pub uses: u32,
    /// Labels every node enrolled with it gets (they may use `admin.edge/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Nodes enrolled with it wait for `edgectl approve node`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_approval: bool,
    /// The most a node enrolled with it may offer; `None`: what it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

impl TokenInfo {
    /// A token with nothing set but what it is, when and by whom it was made.
    pub fn new(id: &str, kind: TokenKind, created_ms: u64, created_by: &str) -> Self {
        TokenInfo {
            id: id.to_string(),
            kind,
            role: None,
            description: String::new(),
            created_ms,
            created_by: created_by.to_string(),
            expires_ms: None,
            max_uses: None,
            uses: 0,
            labels: Labels::new(),
            require_approval: false,
            capacity: None,
            revoked_ms: None,
        }
    }
}

/// What `POST /v1/tokens` takes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TokenRequest {
    /// `Some(role)`: an API token; `None`: a join token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_approval: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
}

/// A Secret as applied: named values that workloads use in their env or as
/// files. The hub stores them encrypted and sends each only to the nodes
/// that run a workload using it, sealed to that node's key.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Secret {
    pub api_version: String,
    pub kind: String,
    pub metadata: SecretMetadata,
    pub data: BTreeMap<String, String>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values never reach a log through a `{:?}`.
        f.debug_struct("Secret").field("name", &self.metadata.name).field("keys", &self.data.keys()).finish()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SecretMetadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// A Secret as the API shows it: its keys and their sizes, never the values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretView {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Increases each time the values change.
    pub version: u64,
    /// Key → size of its value in bytes.
    pub keys: BTreeMap<String, u64>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Workloads that use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(phase: Phase, generation: u64) -> ReplicaStatus {
        ReplicaStatus {
            replica: 0,
            node: Some("n".into()),
            phase,
            restarts: 0,
            exit_code: None,
            reason: Some(Reason::Other(format!("{phase:?}-reason"))),
            message: None,
            started_ms: None,
            finished_ms: None,
            observed_generation: generation,
            ready: None,
            probe: None,
            revision: 1,
            up_to_date: true,
        }
    }

    #[test]
    fn a_running_replica_failing_its_readiness_probe_is_not_ready() {
        let mut r = replica(Phase::Running, 1);
        assert!(r.is_ready());
        r.ready = Some(false);
        let s = WorkloadStatus::aggregate(vec![r.clone(), replica(Phase::Running, 1)]);
        assert_eq!((s.phase, s.ready), (Phase::Running, 1));
        r.ready = Some(true);
        assert!(r.is_ready());
        r.up_to_date = false;
        assert!(r.is_available() && !r.is_ready(), "available at an old revision, not ready at the new one");
    }

    #[test]
    fn workload_phase_aggregates_replicas() {
        use Phase::*;
        let cases: &[(&[Phase], Phase, u32)] = &[
            (&[], Pending, 0),
            (&[Running, Running], Running, 2),
            (&[Running, Pending], Pending, 1),
            (&[Succeeded, Running], Running, 2),
            (&[Succeeded, Succeeded], Succeeded, 2),
            (&[Succeeded, Failed, Running], Failed, 2),
            (&[Running, Unknown], Unknown, 1),
            (&[Unknown, Pending], Pending, 0),
            (&[Unknown, Failed], Failed, 0),
        ];
        for (phases, want, ready) in cases {
            let s = WorkloadStatus::aggregate(phases.iter().map(|p| replica(*p, 1)).collect());
            assert_eq!((s.phase, s.ready), (*want, *ready), "{phases:?}");
        }
    }

    #[test]
    fn replicas_at_an_old_generation_are_not_ready() {
        let mut r = replica(Phase::Running, 1);
        r.revision = 2;
        let s = WorkloadStatus::aggregate(vec![r]);
        assert_eq!((s.phase, s.ready), (Phase::Running, 0));
    }

    #[test]
    fn failed_workload_carries_the_failing_replica_reason() {
        let s = WorkloadStatus::aggregate(vec![replica(Phase::Running, 1), replica(Phase::Failed, 1)]);
        assert_eq!(s.reason, Some(Reason::Other("Failed-reason".into())));
    }

    #[test]
    fn restart_policy_table() {
        use RestartPolicy::*;
        for (p, ok, fail) in [(Never, false, false), (OnFailure, false, true), (Always, true, true)] {
            assert_eq!(p.restarts_after(true), ok, "{p:?} after success");
            assert_eq!(p.restarts_after(false), fail, "{p:?} after failure");
        }
    }

    #[test]
    fn spec_serializes_in_manifest_shape() {
        let spec = WorkloadSpec {
            replicas: Replicas::Count(1),
            restart: RestartPolicy::OnFailure,
            resources: Resources::default(),
            placement: Placement::default(),
            runtime: Runtime::Wasm(WasmSpec {
                component: ArtifactRef::Digest(Digest::of(b"x")),
                args: vec!["a".into()],
                env: Env::new(),
                secrets: Vec::new(),
                max_instances: None,
                memory_total: None,
                cpu_budget: Some(Millis(1500)),
                request_timeout: None,
                outbound: vec![],
                key_value: false,
                source: None,
            }),
            http: Some(HttpSpec { hosts: vec!["a.local".into()], paths: vec!["/".into()] }),
            health: HealthSpec::default(),
            rerun_interrupted: true,
            rollout: RolloutSpec::standard(),
            node_loss: Default::default(),
        };
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["wasm"]["args"][0], "a");
        assert_eq!(v["resources"]["memory"], "64Mi");
        assert_eq!(v["restart"], "on-failure");
        assert_eq!(v["wasm"]["cpu_budget"], "1500ms");
        assert_eq!(v["http"]["hosts"][0], "a.local");
        let back: WorkloadSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, spec);
    }
}
