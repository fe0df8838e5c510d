//! The hub's event log: what happened to workloads and nodes (scheduling,
//! evictions, probe failures, restarts, rollouts, fencing), persisted in
//! the store and bounded per object and in total, oldest dropped first.
//!
//! Each event has a sequence number, its key in the store and the cursor
//! readers watch from (`edgectl get events -w`). Those of a change the hub
//! made (scheduling, waves, rollbacks, drains) are synced like the change;
//! those derived from what nodes report are history, written without
//! waiting for the disk. One that does not decode when read back is
//! dropped and deleted, never trusted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use edge_api::model::{Event, ListedEvent};
use serde::{Deserialize, Serialize};

use crate::store::{Batch, Collection};

/// Events kept per object (workload or node).
pub const PER_OBJECT: usize = 100;
/// Events alike (same object, reason and type) kept one by one within
/// [`SERIES_WINDOW`]; more are folded into one series event, counted, so
/// that 2,500 replicas starting leave an object's other events alone (as
/// Kubernetes' event aggregation does).
pub const SERIES_AFTER: usize = 10;
/// How close in time events alike must come to be folded.
pub const SERIES_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Events kept in all.
pub const TOTAL: usize = 10_000;
/// The most events one read returns.
pub const PAGE: usize = 1_000;

#[derive(Serialize, Deserialize)]
struct Stored {
    object: String,
    #[serde(flatten)]
    event: Event,
}

fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// The log in memory, mirrored in [`Collection::Events`].
#[derive(Default)]
pub struct EventLog {
    all: BTreeMap<u64, (String, Event)>,
    by_object: HashMap<String, VecDeque<u64>>,
    next: u64,
}

impl EventLog {
    /// Rebuilds the log from the store. Returns the deletions it needs:
    /// entries that do not decode (counted in the second value) and those
    /// beyond the bounds.
    pub fn load(entries: Vec<(String, Vec<u8>)>) -> (EventLog, Batch, usize) {
        let mut log = EventLog::default();
        let mut fix = Batch::default();
        let mut bad = 0;
        for (k, v) in entries {
            let decoded = k.parse::<u64>().ok().zip(serde_json::from_slice::<Stored>(&v).ok());
            match decoded {
                Some((seq, s)) if k == key(seq) => {
                    log.next = log.next.max(seq + 1);
                    log.insert(seq, s.object, s.event, &mut fix);
                }
                _ => {
                    bad += 1;
                    fix.delete(Collection::Events, k);
                }
            }
        }
        (log, fix, bad)
    }

    fn insert(&mut self, seq: u64, object: String, event: Event, batch: &mut Batch) {
        let q = self.by_object.entry(object.clone()).or_default();
        q.push_back(seq);
        if q.len() > PER_OBJECT
            && let Some(old) = q.pop_front()
        {
            self.all.remove(&old);
            batch.delete(Collection::Events, key(old));
        }
        self.all.insert(seq, (object, event));
        while self.all.len() > TOTAL {
            let Some(&old) = self.all.keys().next() else { break };
            self.remove(old, batch);
        }
    }

    /// Drops event `seq`, from memory and (in `batch`) from the store.
    fn remove(&mut self, seq: u64, batch: &mut Batch) {
        let Some((obj, _)) = self.all.remove(&seq) else { return };
        batch.delete(Collection::Events, key(seq));
        if let Some(q) = self.by_object.get_mut(&obj) {
            q.retain(|s| *s != seq);
            if q.is_empty() {
                self.by_object.remove(&obj);
            }
        }
    }

    /// Adds an event about `object` (`workload/NAME`, `node/NAME`); the
    /// writes (and deletions of what it pushes out) go into `batch`.
    ///
    /// Past [`SERIES_AFTER`] events alike within [`SERIES_WINDOW_MS`], the
    /// event starts a series, or takes the place of the series so far with
    /// its count one more (a new number: a reader following the log sees
    /// the series move up to its end).
    pub fn push(&mut self, object: &str, mut event: Event, batch: &mut Batch) {
        if let Some(q) = self.by_object.get(object) {
            let alike = |e: &Event| e.reason == event.reason && e.warning == event.warning;
            let since = event.ts_ms.saturating_sub(SERIES_WINDOW_MS);
            let mut recent = 0;
            let mut series = None;
            for seq in q.iter().rev() {
                let Some((_, e)) = self.all.get(seq) else { continue };
                if e.ts_ms < since {
                    break;
                }
                if alike(e) {
                    if e.is_series() && series.is_none() && recent == 0 {
                        series = Some((*seq, e.count, e.first_ts_ms));
                    }
                    recent += 1;
                }
            }
            if let Some((seq, count, first)) = series {
                self.remove(seq, batch);
                event.count = count.saturating_add(event.count);
                event.first_ts_ms = first;
            } else if recent >= SERIES_AFTER && !event.is_series() {
                event.first_ts_ms = Some(event.ts_ms);
            }
        }
        let seq = self.next;
        self.next += 1;
        match serde_json::to_vec(&Stored { object: object.to_string(), event: event.clone() }) {
            Ok(v) => batch.put(Collection::Events, key(seq), v),
            Err(e) => tracing::error!("cannot encode an event: {e}"),
        }
        self.insert(seq, object.to_string(), event, batch);
    }

    /// The events about `object` from `since_ms` on, oldest first.
    pub fn of(&self, object: &str, since_ms: u64) -> Vec<Event> {
        let Some(q) = self.by_object.get(object) else { return Vec::new() };
        q.iter().filter_map(|s| self.all.get(s)).map(|(_, e)| e).filter(|e| e.ts_ms >= since_ms).cloned().collect()
    }

    /// Events about `object` (if given), oldest first: the first [`PAGE`]
    /// after the cursor `after`, or the newest [`PAGE`] without one.
    pub fn after(&self, after: Option<u64>, object: Option<&str>) -> Vec<ListedEvent> {
        // `node/NAME` one object; `node` every object of a kind.
        let wanted = |(_, (o, _)): &(&u64, &(String, Event))| {
            object.is_none_or(|want| o == want || o.strip_prefix(want).is_some_and(|rest| rest.starts_with('/')))
        };
        let listed =
            |(seq, (o, e)): (&u64, &(String, Event))| ListedEvent { seq: *seq, object: o.clone(), event: e.clone() };
        match after {
            Some(a) => self.all.range(a.saturating_add(1)..).filter(wanted).take(PAGE).map(listed).collect(),
            None => {
                let mut newest: Vec<ListedEvent> =
                    self.all.iter().rev().filter(wanted).take(PAGE).map(listed).collect();
                newest.reverse();
                newest
            }
        }
    }

    /// The newest event's number, if any.
    pub fn last(&self) -> Option<u64> {
        self.all.last_key_value().map(|(s, _)| *s)
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts_ms: u64, reason: &str) -> Event {
        Event::new(ts_ms, false, reason, String::new())
    }

    /// Applies batches to a map, as the store would.
    fn apply(disk: &mut BTreeMap<String, Vec<u8>>, b: Batch) {
        for (c, k, v) in b.ops {
            assert!(matches!(c, Collection::Events));
            match v {
                Some(v) => disk.insert(k, v),
                None => disk.remove(&k),
            };
        }
    }

    #[test]
    fn events_are_bounded_per_object_and_in_total_on_disk_as_in_memory() {
        let mut log = EventLog::default();
        let mut disk = BTreeMap::new();
        for i in 0..(PER_OBJECT as u64 + 5) {
            let mut b = Batch::default();
            log.push("workload/busy", ev(i, &format!("Tick{i}")), &mut b);
            apply(&mut disk, b);
        }
        let mut b = Batch::default();
        log.push("workload/quiet", ev(1, "Scheduled"), &mut b);
        apply(&mut disk, b);
        assert_eq!(log.of("workload/busy", 0).len(), PER_OBJECT);
        assert_eq!(log.of("workload/busy", 0)[0].ts_ms, 5, "the oldest went first");
        assert_eq!(log.of("workload/busy", 100).len(), 5, "since a time");
        assert_eq!(disk.len(), PER_OBJECT + 1, "what memory dropped, disk dropped");
        // A reload gives the same log, and numbers go on from the last.
        let (again, fix, bad) = EventLog::load(disk.clone().into_iter().collect());
        assert!(fix.is_empty() && bad == 0);
        assert_eq!(again.after(None, None), log.after(None, None));
        assert_eq!(again.last(), log.last());
        // Many objects: the total bound holds.
        for i in 0..(TOTAL as u64) {
            let mut b = Batch::default();
            log.push(&format!("node/n{}", i % 500), ev(i, &format!("X{i}")), &mut b);
            apply(&mut disk, b);
        }
        assert_eq!((log.len(), disk.len()), (TOTAL, TOTAL));
        assert!(log.of("workload/quiet", 0).is_empty(), "pushed out by newer events");
    }

    #[test]
    fn events_alike_past_ten_are_one_series_that_counts_them() {
        let mut log = EventLog::default();
        let mut disk = BTreeMap::new();
        fn push(log: &mut EventLog, disk: &mut BTreeMap<String, Vec<u8>>, o: &str, e: Event) {
            let mut b = Batch::default();
            log.push(o, e, &mut b);
            apply(disk, b);
        }
        push(&mut log, &mut disk, "workload/many", ev(1, "Scheduled"));
        for i in 0..2_500u64 {
            let mut e = ev(10 + i, "Started");
            e.message = format!("replica {i} started");
            push(&mut log, &mut disk, "workload/many", e);
        }
        push(&mut log, &mut disk, "workload/other", ev(5, "Started"));
        let events = log.of("workload/many", 0);
        let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons.len(), 1 + SERIES_AFTER + 1, "{reasons:?}");
        assert_eq!(reasons[0], "Scheduled", "kept: the series did not push it out");
        let series = events.last().unwrap();
        assert_eq!(
            (series.count as usize, series.first_ts_ms, series.ts_ms, series.message.as_str()),
            (2_500 - SERIES_AFTER, Some(10 + SERIES_AFTER as u64), 2_509, "replica 2499 started")
        );
        assert!(events[1..=SERIES_AFTER].iter().all(|e| e.count == 1 && !e.is_series()));
        assert_eq!(log.of("workload/other", 0).len(), 1, "another object's are its own");
        // Disk holds what memory holds; a reload gives the same log.
        assert_eq!(disk.len(), log.len());
        let (again, _, _) = EventLog::load(disk.clone().into_iter().collect());
        assert_eq!(again.after(None, None), log.after(None, None));
        // Past the window, events alike start over one by one; another
        // reason or type is not alike.
        let later = 2_509 + SERIES_WINDOW_MS + 1;
        push(&mut log, &mut disk, "workload/many", ev(later, "Started"));
        let mut warning = ev(later, "Started");
        warning.warning = true;
        push(&mut log, &mut disk, "workload/many", warning);
        let events = log.of("workload/many", later);
        assert_eq!(events.iter().map(|e| (e.count, e.warning)).collect::<Vec<_>>(), [(1, false), (1, true)]);
    }

    #[test]
    fn readers_page_from_a_cursor_and_filter_by_object() {
        let mut log = EventLog::default();
        let mut b = Batch::default();
        for (o, r) in [("workload/a", "1"), ("node/n", "2"), ("workload/a", "3")] {
            log.push(o, ev(0, r), &mut b);
        }
        let all = log.after(None, None);
        assert_eq!(all.iter().map(|e| e.event.reason.as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
        let later = log.after(Some(all[0].seq), Some("workload/a"));
        assert_eq!(later.iter().map(|e| e.event.reason.as_str()).collect::<Vec<_>>(), ["3"]);
        assert!(log.after(log.last(), None).is_empty());
        // Without a cursor, the newest page.
        let mut log = EventLog::default();
        for i in 0..(PAGE as u64 + 3) {
            log.push(&format!("node/n{}", i % 20), ev(i, &format!("X{i}")), &mut b);
        }
        let page = log.after(None, None);
        assert_eq!((page.len(), page[0].event.ts_ms, page.last().map(|e| e.seq)), (PAGE, 3, log.last()));
        assert_eq!(log.after(Some(0), None)[0].event.ts_ms, 1, "from a cursor, the oldest after it");
    }

    #[test]
    fn entries_that_do_not_decode_are_deleted_not_trusted() {
        let good = serde_json::to_vec(&Stored { object: "workload/a".into(), event: ev(1, "Ok") }).unwrap();
        let entries = vec![
            (key(1), good.clone()),
            (key(2), b"{\"object\":".to_vec()),
            ("x".into(), good.clone()),
            ("7".into(), good),
        ];
        let (log, fix, bad) = EventLog::load(entries);
        assert_eq!((log.len(), bad), (1, 3));
        let deleted: Vec<&str> = fix.ops.iter().filter(|(_, _, v)| v.is_none()).map(|(_, k, _)| k.as_str()).collect();
        assert_eq!(deleted, [key(2).as_str(), "x", "7"]);
        assert_eq!(log.last(), Some(1));
    }
}
