//! Node loss and leases: `[spec.node_loss]`, and the one rule agent and hub
//! share so that a replica rescheduled away from a lost node never runs in
//! two places at once, with no shared clock.
//!
//! The agent holds a lease: the hub acknowledges each heartbeat it hears,
//! and the lease runs from when the agent *sent* the newest acknowledged
//! heartbeat (its own monotonic clock). The hub reschedules a replica once
//! it has heard nothing from the node for `reschedule_after` (R), from when
//! it *received* the node's last message (its own clock). The agent stops
//! the replica once its lease is [`fence_after`]`(R)` (F) old.
//!
//! Let t₀ be when the agent sent the last heartbeat the hub acknowledged.
//! The hub received it, and anything later, after t₀, so it places a
//! replacement no earlier than t₀ + R·(1 − ε) in real time; the agent has
//! stopped its copy by t₀ + F·(1 + ε) + S, where ε bounds how fast either
//! clock may run against real time and S how long stopping takes. At most
//! one copy runs when
//!
//! ```text
//! F + S + 2εR < R,   i.e.   margin(R) = R − F > S + 2εR.
//! ```
//!
//! With S ≤ [`STOP_BOUND`] (a fenced replica is killed, not asked to stop)
//! and ε ≤ 2.5 % (quartz drifts by 0.01 %), `margin(R) = S + 5 % · R`.

use serde::{Deserialize, Serialize};

use crate::model::Millis;

/// How long an agent may take to stop a fenced replica.
pub const STOP_BOUND: Millis = Millis(1_500);

/// The shortest `reschedule_after`.
pub const MIN_RESCHEDULE_AFTER: Millis = Millis(5_000);

/// A singleton without `reschedule_after` is fenced as if it had this one.
pub const SINGLETON_FENCE_BASIS: Millis = Millis(30_000);

/// How old an agent's lease may be before it stops replicas whose workload
/// is rescheduled after `reschedule_after`: see the module's inequality.
pub fn fence_after(reschedule_after: Millis) -> Millis {
    let margin = STOP_BOUND.0 + reschedule_after.0 / 20;
    Millis(reschedule_after.0.saturating_sub(margin))
}

/// What happens to a workload's replicas when their node is lost.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeLossSpec {
    /// Place a replica elsewhere once its node has not been heard from for
    /// this long. None (the default): never; right for workloads bound to
    /// the node's hardware, and agents run on through outages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reschedule_after: Option<Millis>,
    /// At most one copy may run at any instant: the agent stops it when it
    /// cannot show the hub hears it (after `fence_after(reschedule_after)`,
    /// or at once without `reschedule_after`), and starts it only with a
    /// fresh lease.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub singleton: bool,
}

impl NodeLossSpec {
    pub fn is_empty(&self) -> bool {
        *self == NodeLossSpec::default()
    }

    /// How many heartbeat intervals a fence must span at least.
    pub const HEARTBEATS: f64 = 1.5;

    /// Whether agents sending heartbeats every `heartbeat` can hold the
    /// lease this policy needs (a fence of at least one and a half
    /// heartbeats); else what to change.
    pub fn check(&self, heartbeat_ms: u64) -> Result<(), String> {
        let Some(f) = self.fence() else { return Ok(()) };
        if (f.0 as f64) >= Self::HEARTBEATS * heartbeat_ms as f64 {
            return Ok(());
        }
        let need = ((Self::HEARTBEATS * heartbeat_ms as f64 + STOP_BOUND.0 as f64) / 0.95 / 1000.0).ceil() as u64;
        let what = match self.reschedule_after {
            Some(r) => format!("reschedule_after = \"{r}\""),
            None => "singleton = true".to_string(),
        };
        Err(format!(
            "{what} lets an agent go {f} without the hub hearing it before it stops the replica, under one and a half of this hub's heartbeats ({}): give reschedule_after of at least {need}s, or run the hub with a shorter --heartbeat",
            Millis(heartbeat_ms)
        ))
    }

    /// How old the lease may be while the replica runs, if it is fenced at all.
    pub fn fence(&self) -> Option<Millis> {
        match (self.reschedule_after, self.singleton) {
            (Some(r), _) => Some(fence_after(r)),
            (None, true) => Some(fence_after(SINGLETON_FENCE_BASIS)),
            (None, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_comes_before_the_reschedule_with_the_margin_the_inequality_needs() {
        for r in [5_000u64, 30_000, 300_000, 3_600_000] {
            let f = fence_after(Millis(r)).0 as f64;
            let (r, s, eps) = (r as f64, STOP_BOUND.0 as f64, 0.025);
            assert!(f * (1.0 + eps) + s < r * (1.0 - eps), "R = {r} ms: F = {f} ms");
            assert!(f > 0.6 * r, "R = {r} ms: the fence is not needlessly early (F = {f} ms)");
        }
        assert_eq!(fence_after(Millis(5_000)), Millis(3_250));
        let none = NodeLossSpec::default();
        assert_eq!(none.fence(), None);
        let single = NodeLossSpec { singleton: true, ..none.clone() };
        assert_eq!(single.fence(), Some(Millis(27_000)));
        let moved = NodeLossSpec { reschedule_after: Some(Millis(30_000)), singleton: false };
        assert_eq!(moved.fence(), Some(Millis(27_000)));
        assert!(moved.check(15_000).is_ok());
        let quick = NodeLossSpec { reschedule_after: Some(Millis(5_000)), singleton: false };
        assert!(quick.check(1_000).is_ok());
        let e = quick.check(15_000).unwrap_err();
        assert!(e.contains("give reschedule_after of at least 26s") && e.contains("--heartbeat"), "{e}");
        assert!(none.check(60_000).is_ok());
    }
}
