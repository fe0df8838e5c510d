//! `wasi:keyvalue` (0.2.0-draft) backed by the agent's sled database.
//!
//! Each workload has its own tree (`kv/<workload>`); a bucket is a key
//! prefix inside it (`<bucket>\0<key>`), so workloads never see each other's
//! data. Writes mark the store dirty; the HTTP path flushes before it answers
//! (see `wasm::HttpService`), and a background task flushes within 200 ms
//! otherwise, so a kill -9 loses at most that window of unacknowledged writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::component::{HasData, Resource, ResourceTable, ResourceTableError};

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "edge:host/host",
        imports: { default: trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::KvError,
        },
    });
}

use generated::wasi::keyvalue;
pub use generated::wasi::keyvalue::store::Error as GuestError;

/// Largest key and value accepted, so one guest cannot bloat the node's store.
pub const MAX_KEY: usize = 1024;
pub const MAX_VALUE: usize = 1 << 20;

pub enum KvError {
    NoSuchStore,
    Other(String),
    Trap(wasmtime::Error),
}

impl From<ResourceTableError> for KvError {
    fn from(e: ResourceTableError) -> Self {
        KvError::Trap(e.into())
    }
}

impl From<sled::Error> for KvError {
    fn from(e: sled::Error) -> Self {
        KvError::Other(format!("storage error: {e}"))
    }
}

/// An open bucket: the workload's tree and the bucket's prefix.
pub struct Bucket {
    tree: sled::Tree,
    prefix: Vec<u8>,
}

impl Bucket {
    fn key(&self, key: &str) -> Result<Vec<u8>, KvError> {
        if key.len() > MAX_KEY {
            return Err(KvError::Other(format!("key of {} bytes exceeds the {MAX_KEY}-byte limit", key.len())));
        }
        let mut k = self.prefix.clone();
        k.extend_from_slice(key.as_bytes());
        Ok(k)
    }
}

/// A workload's key-value namespace, shared by all its instances on this node.
#[derive(Clone)]
pub struct Namespace {
    pub tree: sled::Tree,
    pub dirty: Arc<AtomicBool>,
}

impl Namespace {
    pub fn open(db: &sled::Db, workload: &str, dirty: Arc<AtomicBool>) -> sled::Result<Self> {
        Ok(Namespace { tree: db.open_tree(tree_name(workload))?, dirty })
    }
}

pub fn tree_name(workload: &str) -> String {
    format!("kv/{workload}")
}

/// What the generated host traits are implemented on.
pub struct KvView<'a> {
    pub ns: Option<&'a Namespace>,
    pub table: &'a mut ResourceTable,
    /// Set when this store wrote anything (the HTTP path flushes before answering).
    pub wrote: &'a mut bool,
}

impl KvView<'_> {
    fn mark(&mut self) {
        *self.wrote = true;
        if let Some(ns) = self.ns {
            ns.dirty.store(true, Ordering::Relaxed);
        }
    }
}

impl keyvalue::store::Host for KvView<'_> {
    fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        let Some(ns) = self.ns else {
            return Err(KvError::Other("key-value is not enabled for this workload (set key_value = true)".into()));
        };
        if identifier.len() > 256 || identifier.contains('\0') {
            return Err(KvError::NoSuchStore);
        }
        let mut prefix = identifier.into_bytes();
        prefix.push(0);
        Ok(self.table.push(Bucket { tree: ns.tree.clone(), prefix })?)
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<keyvalue::store::Error> {
        match err {
            KvError::NoSuchStore => Ok(keyvalue::store::Error::NoSuchStore),
            KvError::Other(s) => Ok(keyvalue::store::Error::Other(s)),
            KvError::Trap(e) => Err(e),
        }
    }
}

impl keyvalue::store::HostBucket for KvView<'_> {
    fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, KvError> {
        let b = self.table.get(&bucket)?;
        Ok(b.tree.get(b.key(&key)?)?.map(|v| v.to_vec()))
    }

    fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), KvError> {
        if value.len() > MAX_VALUE {
            return Err(KvError::Other(format!("value of {} bytes exceeds the {MAX_VALUE}-byte limit", value.len())));
        }
        let b = self.table.get(&bucket)?;
        b.tree.insert(b.key(&key)?, value)?;
        self.mark();
        Ok(())
    }

    fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        let b = self.table.get(&bucket)?;
        b.tree.remove(b.key(&key)?)?;
        self.mark();
        Ok(())
    }

    fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        let b = self.table.get(&bucket)?;
        Ok(b.tree.contains_key(b.key(&key)?)?)
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<keyvalue::store::KeyResponse, KvError> {
        /// Keys per page; the cursor is the number of keys already returned.
        const PAGE: usize = 1000;
        let b = self.table.get(&bucket)?;
        let skip = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let mut keys = Vec::new();
        let mut more = false;
        for item in b.tree.scan_prefix(&b.prefix).skip(skip) {
            let (k, _) = item?;
            if keys.len() == PAGE {
                more = true;
                break;
            }
            keys.push(String::from_utf8_lossy(&k[b.prefix.len()..]).into_owned());
        }
        let next = more.then(|| (skip + keys.len()) as u64);
        Ok(keyvalue::store::KeyResponse { keys, cursor: next })
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl keyvalue::atomics::Host for KvView<'_> {
    fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: u64) -> Result<u64, KvError> {
        let b = self.table.get(&bucket)?;
        let k = b.key(&key)?;
        let mut overflow = false;
        let new = b.tree.update_and_fetch(&k, |old| {
            let current = match old {
                Some(bytes) if bytes.len() == 8 => u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8])),
                Some(bytes) => std::str::from_utf8(bytes).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
                None => 0,
            };
            match current.checked_add(delta) {
                Some(n) => Some(n.to_le_bytes().to_vec()),
                None => {
                    overflow = true;
                    old.map(|o| o.to_vec())
                }
            }
        })?;
        if overflow {
            return Err(KvError::Other(format!("incrementing {key:?} by {delta} overflows a u64")));
        }
        self.mark();
        Ok(new.and_then(|v| v.as_ref().try_into().ok()).map(u64::from_le_bytes).unwrap_or(0))
    }
}

impl keyvalue::batch::Host for KvView<'_> {
    fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvError> {
        let b = self.table.get(&bucket)?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let v = b.tree.get(b.key(&key)?)?;
            out.push(v.map(|v| (key, v.to_vec())));
        }
        Ok(out)
    }

    fn set_many(&mut self, bucket: Resource<Bucket>, key_values: Vec<(String, Vec<u8>)>) -> Result<(), KvError> {
        let b = self.table.get(&bucket)?;
        let mut batch = sled::Batch::default();
        for (k, v) in key_values {
            if v.len() > MAX_VALUE {
                return Err(KvError::Other(format!("value of {} bytes exceeds the {MAX_VALUE}-byte limit", v.len())));
            }
            batch.insert(b.key(&k)?, v);
        }
        b.tree.apply_batch(batch)?;
        self.mark();
        Ok(())
    }

    fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Result<(), KvError> {
        let b = self.table.get(&bucket)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(b.key(&k)?);
        }
        b.tree.apply_batch(batch)?;
        self.mark();
        Ok(())
    }
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    l: &mut wasmtime::component::Linker<T>,
    f: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    keyvalue::store::add_to_linker::<_, HasKv>(l, f)?;
    keyvalue::atomics::add_to_linker::<_, HasKv>(l, f)?;
    keyvalue::batch::add_to_linker::<_, HasKv>(l, f)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyvalue::atomics::Host as _;
    use keyvalue::batch::Host as _;
    use keyvalue::store::{Host as _, HostBucket as _};

    fn ns(tag: &str) -> (Namespace, sled::Db) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        (Namespace::open(&db, tag, Arc::new(AtomicBool::new(false))).unwrap(), db)
    }

    #[test]
    fn buckets_are_separate_and_writes_mark_the_store_dirty() {
        let (n, _db) = ns("w");
        let mut table = ResourceTable::new();
        let mut wrote = false;
        let mut kv = KvView { ns: Some(&n), table: &mut table, wrote: &mut wrote };
        let a = kv.open("a".into()).ok().unwrap();
        let b = kv.open("b".into()).ok().unwrap();
        kv.set(Resource::new_borrow(a.rep()), "k".into(), b"1".to_vec()).ok().unwrap();
        assert_eq!(kv.get(Resource::new_borrow(a.rep()), "k".into()).ok().unwrap(), Some(b"1".to_vec()));
        assert_eq!(kv.get(Resource::new_borrow(b.rep()), "k".into()).ok().unwrap(), None);
        assert!(*kv.wrote && n.dirty.load(Ordering::Relaxed));
        let keys = kv.list_keys(Resource::new_borrow(a.rep()), None).ok().unwrap();
        assert_eq!(keys.keys, vec!["k"]);
    }

    #[test]
    fn increment_counts_and_refuses_overflow() {
        let (n, _db) = ns("w");
        let mut table = ResourceTable::new();
        let mut wrote = false;
        let mut kv = KvView { ns: Some(&n), table: &mut table, wrote: &mut wrote };
        let a = kv.open("".into()).ok().unwrap();
        assert_eq!(kv.increment(Resource::new_borrow(a.rep()), "visits".into(), 1).ok(), Some(1));
        assert_eq!(kv.increment(Resource::new_borrow(a.rep()), "visits".into(), 2).ok(), Some(3));
        assert!(kv.increment(Resource::new_borrow(a.rep()), "visits".into(), u64::MAX).is_err());
        let many = kv.get_many(Resource::new_borrow(a.rep()), vec!["visits".into(), "none".into()]).ok().unwrap();
        assert_eq!(many[0].as_ref().unwrap().1, 3u64.to_le_bytes().to_vec());
        assert!(many[1].is_none());
    }

    #[test]
    fn a_workload_without_key_value_gets_a_clear_error() {
        let mut table = ResourceTable::new();
        let mut wrote = false;
        let mut kv = KvView { ns: None, table: &mut table, wrote: &mut wrote };
        match kv.open("".into()) {
            Err(KvError::Other(m)) => assert!(m.contains("key_value = true")),
            _ => panic!("open should fail"),
        }
    }
}
