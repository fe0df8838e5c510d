//! What the hub knows about each node's connection, and the rules by which
//! joins, heartbeats, presence and status messages move it. Pure: callers
//! pass the clock in.
//!
//! Architecture invariant: only messages the node signed reach these
//! functions, and each kind is ordered by the node's own (session,
//! sequence) numbers, so a replayed or delayed message never moves a node
//! back in time, and nothing but the node itself can advance its session.

use std::time::{Duration, Instant};

use edge_api::model::NodeState;
use edge_api::wire::{Heartbeat, NodeStatus, Presence};

/// A node is Ready while its last heartbeat is younger than this many
/// intervals: one lost heartbeat is not an outage.
pub const MISSED_HEARTBEATS: u32 = 3;

/// What the hub knows about a node's connection; not persisted, rebuilt
/// from what agents (re)send.
#[derive(Debug, Default, Clone)]
pub struct Live {
    /// The newest agent session seen; older messages are stale.
    pub session: u64,
    pub online: bool,
    pub last_seen: Option<Instant>,
    pub last_seen_ms: u64,
    pub status: Option<NodeStatus>,
    /// (session, seq) of the status held; a status is accepted only if newer.
    pub status_order: (u64, u64),
    /// (session, seq) of the newest heartbeat; older ones are replays.
    pub heartbeat_order: (u64, u64),
    /// (session, connection) of the newest presence; a will of an older
    /// connection, delivered late, changes nothing.
    pub presence_order: (u64, u64),
    pub observed_generation: u64,
    /// When the newest heartbeat arrived: the lease the hub gave the node
    /// is no younger (`edge_api::lease`). Retained messages, which a
    /// restarted hub receives again, do not count.
    pub last_heartbeat: Option<Instant>,
    /// How often the node sends heartbeats, as the desired state it holds
    /// asks (`edge_api::lease::heartbeat_interval`); None: the hub's.
    pub interval: Option<Duration>,
    /// A shorter interval the hub asked for in the desired state of this
    /// generation, which counts once the node shows it applied it.
    pub asked: Option<(Duration, u64)>,
    /// The node sends compact heartbeats, so it paces them by its lease;
    /// an agent of an earlier release keeps the hub's interval.
    pub paced: bool,
}

/// Whether a node is Ready, NotReady or Offline, and why; `heartbeat` is
/// the hub's interval, for nodes not asked for another.
pub fn node_state(live: Option<&Live>, now: Instant, heartbeat: Duration) -> (NodeState, Option<String>) {
    let Some(l) = live.filter(|l| l.online) else {
        return (NodeState::Offline, Some("disconnected".into()));
    };
    let heartbeat = if l.paced { l.interval.unwrap_or(heartbeat) } else { heartbeat };
    match l.last_seen {
        Some(t) if now.duration_since(t) <= heartbeat * MISSED_HEARTBEATS => (NodeState::Ready, None),
        Some(t) => (NodeState::NotReady, Some(format!("no heartbeat for {}s", now.duration_since(t).as_secs()))),
        None => (NodeState::NotReady, Some("no heartbeat yet".into())),
    }
}

/// What a message did to a node's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Older than what the hub holds (a replay, a duplicate, a late will).
    Stale,
    /// Taken; `readiness` says whether the node may have changed between
    /// Ready and not (so placement should look again).
    Taken { readiness: bool },
}

/// A status older than the one held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stale status (session {got_session}, seq {got_seq}; have session {have_session}, seq {have_seq})")]
pub struct StaleStatus {
    pub got_session: u64,
    pub got_seq: u64,
    pub have_session: u64,
    pub have_seq: u64,
}

impl Live {
    fn seen(&mut self, now: Instant, now_ms: u64) {
        self.last_seen = Some(now);
        self.last_seen_ms = now_ms;
    }

    /// The hub published the node a desired state of `generation` that asks
    /// for a heartbeat every `interval` (`base`: the hub's own). A longer
    /// interval counts at once; a shorter one once the node shows it
    /// applied that state, so that no node looks NotReady for a change the
    /// hub made.
    pub fn ask(&mut self, interval: Duration, generation: u64, base: Duration) {
        if interval < self.interval.unwrap_or(base) && self.observed_generation < generation {
            self.asked = Some((interval, generation));
        } else {
            self.interval = Some(interval);
            self.asked = None;
        }
    }

    fn observed(&mut self, generation: u64) {
        self.observed_generation = generation;
        if let Some((interval, g)) = self.asked
            && generation >= g
        {
            self.interval = Some(interval);
            self.asked = None;
        }
    }

    /// A join (the node's first message of a session): it is online from now.
    pub fn on_join(&mut self, session: u64, now: Instant, now_ms: u64) {
        if session >= self.session {
            self.session = session;
            self.online = true;
            self.seen(now, now_ms);
        }
    }

    /// A signed heartbeat; `compact` when it came as a frame.
    pub fn on_heartbeat(
        &mut self,
        hb: &Heartbeat,
        compact: bool,
        now: Instant,
        now_ms: u64,
        interval: Duration,
    ) -> Moved {
        if (hb.session, hb.seq) <= self.heartbeat_order || hb.session < self.session {
            return Moved::Stale;
        }
        let was_ready = node_state(Some(self), now, interval).0 == NodeState::Ready;
        self.heartbeat_order = (hb.session, hb.seq);
        self.session = hb.session;
        self.online = true;
        self.seen(now, now_ms);
        self.last_heartbeat = Some(now);
        self.paced = compact;
        self.observed(hb.observed_generation);
        Moved::Taken { readiness: !was_ready }
    }

    /// A signed presence (the retained "online", or the Last Will).
    pub fn on_presence(&mut self, p: &Presence, now: Instant, now_ms: u64) -> Moved {
        if p.session < self.session || (p.session, p.conn) < self.presence_order {
            return Moved::Stale;
        }
        self.presence_order = (p.session, p.conn);
        self.session = p.session;
        self.online = p.online;
        if p.online {
            self.seen(now, now_ms);
        }
        Moved::Taken { readiness: true }
    }

    /// A signed status: held if newer than the one held, which is returned.
    pub fn on_status(&mut self, st: NodeStatus, now: Instant, now_ms: u64) -> Result<Option<NodeStatus>, StaleStatus> {
        if self.status.is_some() && (st.session, st.seq) <= self.status_order {
            return Err(StaleStatus {
                got_session: st.session,
                got_seq: st.seq,
                have_session: self.status_order.0,
                have_seq: self.status_order.1,
            });
        }
        self.status_order = (st.session, st.seq);
        if st.session >= self.session {
            self.session = st.session;
            self.online = true;
        }
        self.seen(now, now_ms);
        self.observed(st.observed_generation);
        Ok(self.status.replace(st))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(2);

    fn hb(session: u64, seq: u64) -> Heartbeat {
        Heartbeat { session, seq, observed_generation: seq }
    }

    fn status(session: u64, seq: u64) -> NodeStatus {
        NodeStatus { node: "pi".into(), session, seq, observed_generation: 0, instances: vec![], corrupt_files: 0 }
    }

    #[test]
    fn a_node_is_ready_only_while_online_and_heard_from_recently() {
        let t0 = Instant::now();
        let heard = |secs_ago: Option<u64>, online: bool| Live {
            online,
            last_seen: secs_ago.map(|s| t0 - Duration::from_secs(s)),
            ..Live::default()
        };
        let cases: &[(Option<Live>, NodeState, Option<&str>)] = &[
            (None, NodeState::Offline, Some("disconnected")),
            (Some(heard(Some(0), false)), NodeState::Offline, Some("disconnected")),
            (Some(heard(None, true)), NodeState::NotReady, Some("no heartbeat yet")),
            (Some(heard(Some(0), true)), NodeState::Ready, None),
            (Some(heard(Some(6), true)), NodeState::Ready, None), // three intervals
            (Some(heard(Some(7), true)), NodeState::NotReady, Some("no heartbeat for 7s")),
        ];
        for (live, state, reason) in cases {
            let got = node_state(live.as_ref(), t0, HB);
            assert_eq!((got.0, got.1.as_deref()), (*state, *reason), "{live:?}");
        }
    }

    #[test]
    fn heartbeats_are_ordered_and_only_a_return_from_silence_moves_readiness() {
        let t0 = Instant::now();
        let mut l = Live::default();
        assert_eq!(l.on_heartbeat(&hb(5, 1), true, t0, 1, HB), Moved::Taken { readiness: true });
        assert_eq!(l.on_heartbeat(&hb(5, 2), true, t0, 2, HB), Moved::Taken { readiness: false });
        assert_eq!(l.observed_generation, 2);
        assert_eq!(l.on_heartbeat(&hb(5, 2), true, t0, 3, HB), Moved::Stale, "a duplicate");
        assert_eq!(l.on_heartbeat(&hb(4, 99), true, t0, 3, HB), Moved::Stale, "an older session");
        assert_eq!(l.observed_generation, 2);
        let later = t0 + HB * 4;
        assert_eq!(l.on_heartbeat(&hb(5, 3), true, later, 4, HB), Moved::Taken { readiness: true });
        assert_eq!(l.on_heartbeat(&hb(6, 1), true, later, 5, HB), Moved::Taken { readiness: false }, "a new session");
        assert_eq!(l.session, 6);
    }

    #[test]
    fn a_node_asked_for_quicker_heartbeats_is_judged_by_them_once_it_applied_the_ask() {
        let t0 = Instant::now();
        let mut l = Live::default();
        l.on_heartbeat(&hb(5, 1), true, t0, 1, HB);
        let quick = Duration::from_millis(500);
        // Generation 3 asks for heartbeats every 500 ms: until the node has
        // it, the hub's pace holds, so 5 s of quiet is still Ready.
        l.ask(quick, 3, HB);
        assert_eq!(node_state(Some(&l), t0 + Duration::from_secs(5), HB).0, NodeState::Ready);
        assert_eq!(l.on_heartbeat(&hb(5, 2), true, t0, 2, HB), Moved::Taken { readiness: false });
        assert_eq!(l.interval, None, "generation 2 applied, not 3");
        l.on_heartbeat(&hb(5, 3), true, t0, 3, HB);
        assert_eq!(l.interval, Some(quick));
        assert_eq!(node_state(Some(&l), t0 + Duration::from_millis(1_500), HB).0, NodeState::Ready);
        let (state, why) = node_state(Some(&l), t0 + Duration::from_secs(2), HB);
        assert_eq!((state, why.as_deref()), (NodeState::NotReady, Some("no heartbeat for 2s")));
        // Slower again (the fenced replica left): at once.
        l.ask(HB, 4, HB);
        assert_eq!((l.interval, l.asked), (Some(HB), None));
        assert_eq!(node_state(Some(&l), t0 + Duration::from_secs(5), HB).0, NodeState::Ready);
        // A status showing the generation counts too.
        l.ask(quick, 5, HB);
        l.on_status(NodeStatus { observed_generation: 5, ..status(5, 1) }, t0, 4).unwrap();
        assert_eq!(l.interval, Some(quick));
        // An agent of an earlier release (JSON heartbeats) keeps the hub's pace.
        l.on_heartbeat(&hb(5, 6), false, t0, 5, HB);
        assert_eq!(node_state(Some(&l), t0 + Duration::from_secs(5), HB).0, NodeState::Ready);
    }

    #[test]
    fn a_late_will_of_an_older_connection_changes_nothing() {
        let t0 = Instant::now();
        let mut l = Live::default();
        let p = |session, conn, online| Presence { session, conn, online };
        assert_eq!(l.on_presence(&p(3, 1, true), t0, 1), Moved::Taken { readiness: true });
        assert_eq!(l.on_presence(&p(3, 2, true), t0, 2), Moved::Taken { readiness: true });
        assert_eq!(l.on_presence(&p(3, 1, false), t0, 3), Moved::Stale, "the will of connection 1");
        assert!(l.online);
        assert_eq!(l.on_presence(&p(2, 9, false), t0, 3), Moved::Stale, "a will of an older session");
        assert_eq!(l.on_presence(&p(3, 2, false), t0, 4), Moved::Taken { readiness: true });
        assert!(!l.online);
        assert_eq!(node_state(Some(&l), t0, HB).0, NodeState::Offline);
    }

    #[test]
    fn status_is_held_only_when_newer_and_brings_the_node_online() {
        let t0 = Instant::now();
        let mut l = Live::default();
        assert_eq!(l.on_status(status(2, 5), t0, 1), Ok(None));
        assert!(l.online);
        let stale = l.on_status(status(2, 5), t0, 2).unwrap_err();
        assert_eq!(stale.to_string(), "stale status (session 2, seq 5; have session 2, seq 5)");
        assert!(l.on_status(status(1, 50), t0, 2).is_err(), "an older session");
        assert_eq!(l.on_status(status(3, 1), t0, 3).unwrap().map(|s| s.seq), Some(5));
        assert_eq!(l.status_order, (3, 1));
    }

    #[test]
    fn a_join_of_an_older_session_is_ignored() {
        let t0 = Instant::now();
        let mut l = Live { session: 7, ..Live::default() };
        l.on_join(6, t0, 1);
        assert!(!l.online);
        l.on_join(7, t0, 2);
        assert!(l.online);
        assert_eq!(l.last_seen_ms, 2);
    }
}
