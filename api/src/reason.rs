//! Why a replica is in its phase, or why a run or a request failed: one
//! word, as agents report it and the hub and edgectl show it.
//!
//! On the wire it is the word itself (`"BackOff"`), so a newer agent's
//! reason that this build does not know arrives as [`Reason::Other`] and is
//! shown as sent, never refused or misread.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[doc = $doc])* $name,)*
            /// A word this build does not know (from a newer agent).
            Other(String),
        }

        impl Reason {
            /// Every reason this build knows, for tests and documentation.
            pub const KNOWN: &'static [Reason] = &[$(Reason::$name,)*];

            pub fn as_str(&self) -> &str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                    Reason::Other(s) => s,
                }
            }

            fn known(s: &str) -> Option<Reason> {
                match s {
                    $(stringify!($name) => Some(Reason::$name),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    // Placement (the hub).
    /// No node fits; the message says why each node was passed over.
    Unschedulable,
    /// Placed; the node has not reported it yet.
    Scheduled,
    /// The node holding it is not Ready (missed heartbeats); last report is history.
    NodeNotReady,
    /// The node holding it is disconnected; last report is history.
    NodeOffline,
    // Starting (the agent).
    /// Downloading the component or image.
    Fetching,
    /// The download failed; retried with back-off.
    FetchFailed,
    /// Compiling or preparing to run.
    Starting,
    /// Waiting before the next restart.
    BackOff,
    /// Stopped, or held back, by its own agent: the node cannot show that
    /// the hub hears it (`[spec.node_loss]`), so a replacement may run
    /// elsewhere.
    Fenced,
    /// A secret it uses could not be opened on the node.
    SecretUnavailable,
    /// Its route is taken by another workload on the node.
    RouteConflict,
    /// The node could not record it durably.
    StorageError,
    // How a run ended.
    /// Exited 0.
    Completed,
    /// Exited non-zero.
    Error,
    /// Killed by a signal.
    Signaled,
    /// Killed by the kernel for exceeding its memory limit.
    OOMKilled,
    /// The agent stopped while it ran.
    Interrupted,
    /// Its startup or liveness probe failed too often; restarted.
    Unhealthy,
    /// The guest trapped.
    Trap,
    StackOverflow,
    /// Linear memory could not grow within its limit.
    OutOfMemory,
    /// Used its CPU budget.
    CpuBudgetExceeded,
    /// The component could not be instantiated.
    InstantiateError,
    /// The component is not a valid component for its kind.
    InvalidComponent,
    /// A file the replica needs (component, compiled code) failed its
    /// check when read: deleted, and fetched again when the hub answers.
    ArtifactCorrupt,
    /// The agent has no compiler and the hub has no compiled code for it.
    NoCompiler,
    /// The spec cannot be run on this node.
    InvalidSpec,
    /// The image has nothing for this node, or its config is unreadable.
    InvalidImage,
    /// The image could not be pulled.
    ImagePullFailed,
    /// This node has no OCI runtime (or is not root).
    NoContainerRuntime,
    /// The container's network could not be set up.
    NetworkError,
    /// The OCI runtime failed to start or lost the container.
    RuntimeError,
    // How a request to a service failed.
    /// All instances were busy (the service's, or the node's pool).
    AtCapacity,
    /// Longer than `request_timeout`.
    RequestTimeout,
    /// The component returned without setting a response.
    NoResponse,
    /// The component answered with a wasi:http error code.
    ErrorCode,
    /// The request could not be passed to the component.
    BadRequest,
    /// The service was stopped while the request ran.
    Stopped,
    /// The agent's handler panicked (a bug).
    Panic,
}

impl From<&str> for Reason {
    fn from(s: &str) -> Self {
        Reason::known(s).unwrap_or_else(|| Reason::Other(s.to_string()))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Reason::from(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_reason_is_its_own_word_on_the_wire_and_back() {
        for r in Reason::KNOWN {
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{r}\""));
            assert_eq!(&serde_json::from_str::<Reason>(&json).unwrap(), r);
            assert!(!matches!(Reason::from(r.as_str()), Reason::Other(_)), "{r}");
        }
        assert_eq!(Reason::OOMKilled.to_string(), "OOMKilled");
    }

    #[test]
    fn a_reason_from_a_newer_agent_is_kept_as_sent() {
        let r: Reason = serde_json::from_str("\"ThermalThrottled\"").unwrap();
        assert_eq!(r, Reason::Other("ThermalThrottled".into()));
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"ThermalThrottled\"");
        assert!(serde_json::from_str::<Reason>("42").is_err(), "not a word");
    }
}
