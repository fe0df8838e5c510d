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

/// Heartbeats a node sends within each fence: its lease outlives two lost
/// in a row.
pub const RENEWALS_PER_FENCE: u64 = 3;

/// The shortest interval between heartbeats.
pub const MIN_HEARTBEAT: Millis = Millis(500);

/// How often a node sends heartbeats: the hub's interval (`base`), or more
/// often while it runs replicas fenced by its lease (`fence`, the shortest
/// of their fences, see [`NodeLossSpec::fence`]), so that the lease is
/// renewed [`RENEWALS_PER_FENCE`] times per fence. Nodes without such
/// replicas stay quiet; only those that need a lease pay for one.
pub fn heartbeat_interval(base: Millis, fence: Option<Millis>) -> Millis {
    match fence {
        Some(f) => Millis((f.0 / RENEWALS_PER_FENCE).max(MIN_HEARTBEAT.0).min(base.0)),
        None => base,
    }
}

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
    }

    #[test]
    fn nodes_that_need_a_lease_renew_it_three_times_per_fence_and_others_keep_the_hubs_pace() {
        let base = Millis(30_000);
        assert_eq!(heartbeat_interval(base, None), base);
        // The shortest policy: a fence of 3.25 s, renewed about every 1.08 s.
        let quick = heartbeat_interval(base, Some(fence_after(MIN_RESCHEDULE_AFTER)));
        assert_eq!(quick, Millis(1_083));
        // A long fence never slows a node below the hub's pace.
        assert_eq!(heartbeat_interval(base, Some(fence_after(Millis(3_600_000)))), base);
        assert_eq!(heartbeat_interval(Millis(1_000), Some(Millis(27_000))), Millis(1_000));
        assert_eq!(heartbeat_interval(base, Some(Millis(27_000))), Millis(9_000));
        assert_eq!(heartbeat_interval(base, Some(Millis(900))), MIN_HEARTBEAT);
        // Any policy the manifest admits leaves room for three renewals.
        for r in [MIN_RESCHEDULE_AFTER.0, 7_000, 30_000, 120_000, 3_600_000] {
            let f = fence_after(Millis(r));
            let hb = heartbeat_interval(base, Some(f));
            assert!(hb.0 * RENEWALS_PER_FENCE <= f.0, "R = {r} ms: heartbeat {hb} for fence {f}");
        }
    }
}
