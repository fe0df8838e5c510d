//! `[spec.rollout]`: how a new revision reaches a workload's replicas, and
//! what the hub shows of a rollout in progress.
//!
//! A counted workload is updated in place a few replicas at a time
//! (`max_unavailable`, and for services, whose agent keeps the old version
//! serving until the new one is ready, `max_surge` as well). A per-node
//! workload goes in waves: a canary, then batches by percentage or one
//! value of a label at a time. Each wave must be ready for `min_ready`
//! before the next starts, and within `progress_deadline` of its start;
//! a replica that fails or crash-loops at the new revision fails the wave.
//! With `auto_rollback`, a failed rollout returns to the revision it came
//! from.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Millis;

/// A number of replicas or nodes, or a percentage of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// Of `total`: a percentage rounded up (`ceil`) or down.
    pub fn of(self, total: usize, ceil: bool) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => {
                let x = total * p as usize;
                if ceil { x.div_ceil(100) } else { x / 100 }
            }
        }
    }

    /// `3`, `25%`.
    pub fn parse(s: &str) -> Option<Amount> {
        match s.strip_suffix('%') {
            Some(p) => p.parse().ok().filter(|p| *p <= 100).map(Amount::Percent),
            None => s.parse().ok().map(Amount::Count),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(n) => s.serialize_u32(*n),
            Amount::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Amount::Count(n)),
            Raw::Text(s) => Amount::parse(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("expected a number or a percentage, found {s:?}"))),
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct RolloutSpec {
    /// Counted replicas that may be unavailable during an update (default 25%, rounded down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<Amount>,
    /// Counted replicas of a service updated beyond that at once (default 25%, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<Amount>,
    /// Per-node workloads: the nodes in the first wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Amount>,
    /// Per-node workloads: the nodes in each later wave (default 25%, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Amount>,
    /// Per-node workloads: a wave per value of this node label instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_label: Option<String>,
    /// How long a wave must stay ready before the next starts.
    #[serde(default, skip_serializing_if = "is_default")]
    pub min_ready: Millis,
    /// How long a wave may take to become ready before the rollout fails.
    #[serde(default = "RolloutSpec::default_deadline", skip_serializing_if = "RolloutSpec::is_default_deadline")]
    pub progress_deadline: Millis,
    /// Return to the revision the rollout came from when it fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_rollback: bool,
}

impl RolloutSpec {
    pub const DEFAULT_DEADLINE: Millis = Millis(600_000);

    fn default_deadline() -> Millis {
        Self::DEFAULT_DEADLINE
    }

    fn is_default_deadline(m: &Millis) -> bool {
        *m == Self::DEFAULT_DEADLINE
    }

    pub fn is_empty(&self) -> bool {
        *self == RolloutSpec { progress_deadline: Self::DEFAULT_DEADLINE, ..RolloutSpec::default() }
    }

    /// The default rollout: no canary, batches of a quarter, ten minutes per wave.
    pub fn standard() -> RolloutSpec {
        RolloutSpec { progress_deadline: Self::DEFAULT_DEADLINE, ..RolloutSpec::default() }
    }
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RolloutPhase {
    /// Waves are being rolled out.
    Progressing,
    /// `edgectl rollout pause`: no new wave starts.
    Paused,
    /// Every replica runs the revision (replicas on nodes that were offline
    /// get it when they return).
    Complete,
    /// A wave failed; the rollout stopped where it was.
    Failed,
    /// A wave failed and the workload went back to the revision it came from.
    RolledBack,
}

impl RolloutPhase {
    /// Whether it still moves replicas.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutPhase::Progressing | RolloutPhase::Paused)
    }
}

impl fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What `edgectl rollout status` shows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RolloutView {
    pub workload: String,
    /// The revision being rolled out.
    pub revision: u64,
    /// The revision it came from (and returns to on rollback).
    pub from: u64,
    pub phase: RolloutPhase,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Waves started so far.
    pub wave: usize,
    /// Replicas given the revision, and of those ready at it.
    pub updated: u32,
    pub ready: u32,
    pub total: u32,
    /// Nodes not Ready whose replicas were given the revision and will run
    /// it when they return.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_offline: Vec<String>,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_counts_or_percentages() {
        assert_eq!(Amount::parse("3"), Some(Amount::Count(3)));
        assert_eq!(Amount::parse("25%"), Some(Amount::Percent(25)));
        assert_eq!(Amount::parse("101%"), None);
        assert_eq!(Amount::parse("x%"), None);
        assert_eq!(Amount::Percent(25).of(10, true), 3);
        assert_eq!(Amount::Percent(25).of(10, false), 2);
        assert_eq!(Amount::Count(4).of(10, false), 4);
        assert_eq!(serde_json::to_string(&Amount::Percent(10)).unwrap(), r#""10%""#);
        assert_eq!(serde_json::from_str::<Amount>("2").unwrap(), Amount::Count(2));
        let spec = RolloutSpec { canary: Some(Amount::Count(1)), ..RolloutSpec::standard() };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"canary":1}"#);
        assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), spec);
        assert!(RolloutSpec::standard().is_empty());
        assert!(serde_json::from_str::<RolloutSpec>("{}").unwrap().is_empty());
    }
}
