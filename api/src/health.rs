//! `[spec.health]`: the probes an agent runs on each replica of a workload
//! (what they check, how often, how patiently). Parsed and validated in
//! [`crate::manifest`]; run by the agent.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::Millis;

/// `[spec.health]`: probes the agent runs on each replica, on the node
/// itself (no traffic to the hub; only changes are reported).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct HealthSpec {
    /// Until it succeeds once, the others wait; failing it restarts the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Probe>,
    /// While it fails, the replica gets no traffic and is not counted ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    /// Failing it restarts the replica (with the usual back-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

impl HealthSpec {
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.readiness.is_none() && self.liveness.is_none()
    }

    /// The probes given, startup first.
    pub fn probes(&self) -> impl Iterator<Item = &Probe> {
        [&self.startup, &self.readiness, &self.liveness].into_iter().flatten()
    }
}

/// Which probe of [`HealthSpec`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Liveness => "liveness",
        })
    }
}

/// One probe: what to check, how often, how patiently.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    #[serde(flatten)]
    pub check: ProbeCheck,
    pub period: Millis,
    pub timeout: Millis,
    /// Failures in a row that count (a success resets the count).
    pub failure_threshold: u32,
}

impl Probe {
    pub const DEFAULT_PERIOD: Millis = Millis(10_000);
    pub const DEFAULT_TIMEOUT: Millis = Millis(1_000);
    pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProbeCheck {
    /// GET `path`: a 2xx or 3xx answer passes. A Wasm service is asked in
    /// process (no socket); a container on `port` (default its `port`).
    Http {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    /// A TCP connection to the container's `port` is accepted.
    Tcp(u16),
    /// The command exits 0: run inside the container; for a Wasm component,
    /// the component itself run with these arguments (its `wasi:cli/run`).
    Command(Vec<String>),
    /// A Wasm service creates an instance (no request is made): the agent's
    /// check of a service without probes of its own. Never in a manifest.
    #[serde(skip)]
    Instantiates,
}

impl fmt::Display for ProbeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeCheck::Http { path, port: Some(p) } => write!(f, "HTTP GET :{p}{path}"),
            ProbeCheck::Http { path, port: None } => write!(f, "HTTP GET {path}"),
            ProbeCheck::Tcp(p) => write!(f, "TCP :{p}"),
            ProbeCheck::Command(argv) => write!(f, "command {argv:?}"),
            ProbeCheck::Instantiates => f.write_str("instantiates"),
        }
    }
}
