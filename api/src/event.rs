//! What the hub records of what happened: events about workloads and
//! nodes (folded into series when alike ones repeat) and the audit log of
//! changes. Re-exported by [`crate::model`].

use serde::{Deserialize, Serialize};

use crate::model::Role;

/// Something that happened to an object, newest last (as `kubectl describe` shows).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// When it (the last of a series) happened.
    pub ts_ms: u64,
    #[serde(default)]
    pub warning: bool,
    pub reason: String,
    /// What happened (the last of a series).
    pub message: String,
    /// A series: this many events alike (same object, reason and type)
    /// folded into one, the first at `first_ts_ms` (as Kubernetes counts
    /// repeated events). 1 for a single event.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_ts_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl Event {
    /// A single event.
    pub fn new(ts_ms: u64, warning: bool, reason: impl Into<String>, message: impl Into<String>) -> Event {
        Event { ts_ms, warning, reason: reason.into(), message: message.into(), count: 1, first_ts_ms: None }
    }

    /// Whether it stands for a series of events alike.
    pub fn is_series(&self) -> bool {
        self.first_ts_ms.is_some()
    }
}

/// An event in the hub's log, with its number (the cursor to read on from)
/// and the object it is about (`workload/NAME`, `node/NAME`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ListedEvent {
    pub seq: u64,
    pub object: String,
    #[serde(flatten)]
    pub event: Event,
}

/// One entry of the audit log: a call that changed (or tried to change) something.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub ts_ms: u64,
    /// The token id that made the call (`-` if none was valid).
    pub who: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The caller's address; for a request another hub of the cluster
    /// forwarded (and signed for), `CLIENT (via HUB)`.
    pub from: String,
    /// `PUT /v1/workloads/hello`.
    pub action: String,
    /// The HTTP status answered.
    pub status: u16,
}
