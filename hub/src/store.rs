//! Durable hub state behind a narrow trait.
//!
//! The hub keeps its working state in memory and writes every accepted change
//! through a [`Store`] before answering. The trait is deliberately small (load
//! a collection, commit an atomic batch) so that a distributed backend such
//! as etcd is an implementation of it, not a rewrite of the hub.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("could not open the hub store at {path}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("hub store read failed")]
    Read(#[source] sled::Error),
    #[error("hub store write failed")]
    Write(#[source] sled::Error),
    #[error("corrupt record {key:?} in the hub store")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("another hub leads now: this one may no longer write")]
    Fenced,
    #[error("the journal of a change in etcd is damaged: {0}")]
    Journal(String),
    #[error("cannot open the store of precompiled components at {path}")]
    Precompiled { path: PathBuf, source: std::io::Error },
}

/// The collections the hub persists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Collection {
    Workloads,
    Nodes,
    /// `<workload>/<replica>` → node name.
    Placements,
    /// Single values such as the generation counter.
    Meta,
    /// Token id → [`crate::tokens::TokenRecord`] (secrets only as hashes).
    Tokens,
    /// `<time>-<seq>` → [`edge_api::model::AuditEntry`], oldest first.
    Audit,
    /// Name → [`crate::secrets::SecretRecord`] (values encrypted).
    Secrets,
    /// `<workload>/<revision, 20 digits>` → [`edge_api::model::Revision`].
    Revisions,
    /// `<sequence, 20 digits>` → an event and its object ([`crate::events`]).
    Events,
    /// Workload name → its latest [`crate::rollout::Rollout`].
    Rollouts,
}

impl Collection {
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Collection::Workloads => "w/",
            Collection::Nodes => "n/",
            Collection::Placements => "p/",
            Collection::Meta => "m/",
            Collection::Tokens => "t/",
            Collection::Audit => "a/",
            Collection::Secrets => "s/",
            Collection::Revisions => "r/",
            Collection::Events => "e/",
            Collection::Rollouts => "o/",
        }
    }
}

/// Writes that become durable together or not at all.
#[derive(Default, Debug)]
pub struct Batch {
    pub ops: Vec<(Collection, String, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, c: Collection, key: impl Into<String>, value: Vec<u8>) {
        self.ops.push((c, key.into(), Some(value)));
    }
    pub fn delete(&mut self, c: Collection, key: impl Into<String>) {
        self.ops.push((c, key.into(), None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub trait Store: Send + Sync {
    fn load(&self, c: Collection) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies the batch atomically, without waiting for the disk: later
    /// reads see it; [`Store::sync`] makes it durable.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    /// Makes every batch applied so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// Whether applied batches need [`Store::sync`] to be durable.
    fn needs_sync(&self) -> bool {
        true
    }
    /// Applies the batch atomically; it is durable when this returns `Ok`.
    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.sync()
    }
    /// Applies the batch without waiting for the disk: for history
    /// (events), which the store makes durable within moments.
    fn record(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch)
    }
}

/// The single-machine backend: one sled tree, keys prefixed by collection.
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // The lock of a store just closed (sled's flusher thread ends after
        // the handle is dropped; a hub restarted by its supervisor) is
        // released within moments: wait for it a little, not for ever.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let opened = sled::Config::new()
                .path(path)
                // 8 MiB of page cache: hub records are small and mostly held in memory anyway.
                .cache_capacity(8 << 20)
                .open();
            match opened {
                Ok(db) => return Ok(SledStore { db }),
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(source) => return Err(StoreError::Open { path: path.to_path_buf(), source }),
            }
        }
    }
}

impl Store for SledStore {
    fn load(&self, c: Collection) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(c.prefix()) {
            let (k, v) = item.map_err(StoreError::Read)?;
            let key = String::from_utf8_lossy(&k[c.prefix().len()..]).into_owned();
            out.push((key, v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        // (sled also writes its log to disk every 500 ms by itself.)
        self.db.apply_batch(sled_batch(batch)).map_err(StoreError::Write)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(StoreError::Write)?;
        Ok(())
    }
}

fn sled_batch(batch: Batch) -> sled::Batch {
    let mut b = sled::Batch::default();
    for (c, key, value) in batch.ops {
        let k = format!("{}{key}", c.prefix());
        match value {
            Some(v) => b.insert(k.as_bytes(), v),
            None => b.remove(k.as_bytes()),
        }
    }
    b
}

/// An in-memory store for unit tests of the hub's logic.
#[cfg(test)]
#[derive(Default)]
pub struct MemStore {
    map: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    pub fail_writes: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl MemStore {
    /// Everything stored, to check that a refused change wrote nothing.
    pub fn dump(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        self.map.lock().unwrap().clone()
    }
}

#[cfg(test)]
impl Store for MemStore {
    fn load(&self, c: Collection) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let map = self.map.lock().unwrap();
        Ok(map.iter().filter_map(|(k, v)| k.strip_prefix(c.prefix()).map(|k| (k.to_string(), v.clone()))).collect())
    }

    fn needs_sync(&self) -> bool {
        false
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Write(sled::Error::Unsupported("injected failure".into())));
        }
        let mut map = self.map.lock().unwrap();
        for (c, key, value) in batch.ops {
            let k = format!("{}{key}", c.prefix());
            match value {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_store_keeps_collections_apart_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("edge-hub-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = SledStore::open(&dir).unwrap();
            let mut b = Batch::default();
            b.put(Collection::Workloads, "a", b"1".to_vec());
            b.put(Collection::Nodes, "a", b"2".to_vec());
            b.put(Collection::Placements, "a/0", b"n".to_vec());
            s.commit(b).unwrap();
            let mut b = Batch::default();
            b.delete(Collection::Placements, "a/0");
            s.commit(b).unwrap();
        }
        let s = SledStore::open(&dir).unwrap();
        assert_eq!(s.load(Collection::Workloads).unwrap(), vec![("a".into(), b"1".to_vec())]);
        assert_eq!(s.load(Collection::Nodes).unwrap(), vec![("a".into(), b"2".to_vec())]);
        assert!(s.load(Collection::Placements).unwrap().is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
