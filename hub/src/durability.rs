//! Group commit. A change is applied to the store under the hub's lock
//! (memory and the store's log: no wait for the disk) and counted; one
//! thread makes everything applied so far durable with one sync, however
//! many changes that is. Nothing the hub sends leaves before what was
//! applied ahead of it is durable (a node never acts on a state the hub
//! could lose), and an API answer waits for the same
//! ([`Durability::settled`]). So the lock is never held across a sync,
//! concurrent changes share one, and the MQTT loop never waits for a disk.
//!
//! A sync that fails leaves the hub unable to tell what is on disk: it
//! stops (its supervisor starts it again from what is there), as databases
//! do when fsync fails.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::hub::Outgoing;
use crate::store::Store;

struct State {
    /// Changes applied to the store.
    applied: u64,
    /// Changes known durable.
    synced: u64,
    /// Messages waiting for the change numbered with them to be durable.
    held: VecDeque<(u64, Outgoing)>,
}

pub struct Durability {
    state: Mutex<State>,
    wake: Condvar,
    synced: watch::Sender<u64>,
    outbox: mpsc::UnboundedSender<Outgoing>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Durability {
    /// With a store whose writes need a sync, a thread makes them durable;
    /// with one whose writes are durable at once, nothing waits.
    pub fn start(store: Arc<dyn Store>, outbox: mpsc::UnboundedSender<Outgoing>) -> Arc<Durability> {
        let d = Arc::new(Durability {
            state: Mutex::new(State { applied: 0, synced: 0, held: VecDeque::new() }),
            wake: Condvar::new(),
            synced: watch::channel(0).0,
            outbox,
        });
        if store.needs_sync() {
            let weak = Arc::downgrade(&d);
            std::thread::Builder::new()
                .name("hub-sync".into())
                .spawn(move || sync_loop(weak, store))
                .expect("start the hub's sync thread");
        } else {
            lock(&d.state).synced = u64::MAX;
        }
        d
    }

    /// Counts a change just applied to the store (call it in the order the
    /// changes were applied, under the lock that ordered them).
    pub fn applied(&self) {
        let mut st = lock(&self.state);
        st.applied += 1;
        drop(st);
        self.wake.notify_all();
    }

    /// Sends `o` once every change applied so far is durable (at once if
    /// it is), after whatever was held before it.
    pub fn send(&self, o: Outgoing) {
        let mut st = lock(&self.state);
        if st.held.is_empty() && st.synced >= st.applied {
            let _ = self.outbox.send(o);
        } else {
            let at = st.applied;
            st.held.push_back((at, o));
        }
    }

    /// Waits until every change applied before the call is durable.
    pub async fn settled(&self) {
        let target = {
            let st = lock(&self.state);
            if st.synced >= st.applied {
                return;
            }
            st.applied
        };
        let mut rx = self.synced.subscribe();
        // The sender lives as long as `self`.
        let _ = rx.wait_for(|s| *s >= target).await;
    }

    /// Marks changes up to `target` durable and lets out what waited for them.
    fn synced_to(&self, target: u64) {
        let mut st = lock(&self.state);
        st.synced = st.synced.max(target);
        while st.held.front().is_some_and(|(at, _)| *at <= st.synced) {
            if let Some((_, o)) = st.held.pop_front() {
                let _ = self.outbox.send(o);
            }
        }
        drop(st);
        self.synced.send_replace(target);
    }
}

fn sync_loop(d: Weak<Durability>, store: Arc<dyn Store>) {
    loop {
        let target = {
            let Some(d) = d.upgrade() else { return };
            let st = lock(&d.state);
            let (st, _) = d
                .wake
                .wait_timeout_while(st, Duration::from_secs(1), |st| st.applied <= st.synced)
                .unwrap_or_else(|p| p.into_inner());
            if st.applied <= st.synced {
                continue;
            }
            st.applied
        };
        if let Err(e) = store.sync() {
            if matches!(e, crate::store::StoreError::Fenced) {
                tracing::error!("another hub leads now: stopping; started again, this one follows");
                std::process::exit(crate::ha::LOST_LEAD);
            }
            tracing::error!(
                "cannot make the hub's state durable ({e}): stopping, so that it starts again from what is on disk"
            );
            std::process::exit(74);
        }
        let Some(d) = d.upgrade() else { return };
        d.synced_to(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, StoreError};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A store whose syncs wait for the test to let them through.
    #[derive(Default)]
    struct Gated {
        open: Mutex<bool>,
        turn: Condvar,
        syncs: AtomicU64,
    }

    impl Gated {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.turn.notify_all();
        }
    }

    impl Store for Gated {
        fn load(&self, _: crate::store::Collection) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            Ok(vec![])
        }
        fn apply(&self, _: Batch) -> Result<(), StoreError> {
            Ok(())
        }
        fn sync(&self) -> Result<(), StoreError> {
            let open = self.open.lock().unwrap();
            let _open = self.turn.wait_while(open, |o| !*o).unwrap();
            self.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn msg(topic: &str) -> Outgoing {
        Outgoing { topic: topic.into(), payload: vec![], retain: false, lossy: false }
    }

    #[tokio::test]
    async fn nothing_leaves_before_what_came_before_it_is_durable_and_changes_share_a_sync() {
        let store = Arc::new(Gated::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = Durability::start(store.clone(), tx);
        d.send(msg("before any change"));
        assert_eq!(rx.try_recv().unwrap().topic, "before any change");
        for i in 0..5 {
            d.applied();
            d.send(msg(&format!("after change {i}")));
        }
        // Held while the sync waits; an answer waits too.
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.settled().await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "sent before it was durable");
        assert!(!waiter.is_finished(), "answered before it was durable");
        store.open();
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            got.push(tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap().topic);
        }
        let want: Vec<String> = (0..5).map(|i| format!("after change {i}")).collect();
        assert_eq!(got, want, "in order");
        assert!(store.syncs.load(Ordering::SeqCst) <= 2, "five changes, at most two syncs");
        // Nothing pending: sent at once.
        d.send(msg("idle"));
        assert_eq!(rx.try_recv().unwrap().topic, "idle");
    }
}
