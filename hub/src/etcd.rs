//! The hub's durable state in etcd, for several hubs sharing one store.
//!
//! Only the leader writes (see [`crate::ha`]), and every write it makes is
//! an etcd transaction that succeeds only while the leader key it created
//! still exists with that very revision: a hub that lost its lease (paused,
//! cut off) can no longer change anything, whatever it believes.
//!
//! Writes follow the hub's group commit ([`crate::durability`]):
//! [`Store::apply`] only queues a batch (it runs under the hub's lock);
//! [`Store::sync`] (on the sync thread) sends everything queued as one
//! transaction. When that is more than one transaction can hold (etcd's
//! `--max-txn-ops`, request size), the operations first go to a journal
//! under the same prefix, made valid by one last write naming its parts and
//! their digest; a new leader finishes a journal it finds before it loads
//! anything. So a change is in etcd whole or not at all.
//!
//! etcd calls run on a runtime of their own (one thread), so that neither
//! a busy API nor a blocked caller delays the lease's keep-alives.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp};

use crate::store::{Batch, Collection, Store, StoreError};

/// Where the state is kept: `etcd://host:port[,host:port…]` (plain) or
/// `etcds://…` (TLS), as `--store` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    pub tls: bool,
    pub endpoints: Vec<String>,
}

impl std::str::FromStr for EtcdUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("etcd://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("etcds://") {
            (true, r)
        } else {
            return Err(format!("{s:?}: an etcd store is etcd://host:port[,host:port…] (or etcds:// for TLS)"));
        };
        let rest = rest.trim_end_matches('/');
        let mut endpoints = Vec::new();
        for hp in rest.split(',') {
            let (host, port) =
                hp.rsplit_once(':').ok_or_else(|| format!("{s:?}: endpoint {hp:?} has no port (host:port)"))?;
            let bracketed = host.starts_with('[') && host.ends_with(']');
            if host.is_empty()
                || (!bracketed && host.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-')))
            {
                return Err(format!("{s:?}: endpoint {hp:?} has no valid host"));
            }
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: endpoint {hp:?} has no valid port"))?;
            endpoints.push(format!("{}://{hp}", if tls { "https" } else { "http" }));
        }
        Ok(EtcdUrl { tls, endpoints })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> =
            self.endpoints.iter().map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h)).collect();
        write!(f, "{}://{}", if self.tls { "etcds" } else { "etcd" }, hosts.join(","))
    }
}

/// How to reach etcd, with the options its own clients take.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub url: EtcdUrl,
    /// Keys of this hub cluster start with it (several clusters can share an etcd).
    pub prefix: String,
    /// CA (PEM) of the etcd servers' certificates (`etcdctl --cacert`).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's client-cert auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `user:password` for etcd's own auth (`etcdctl --user`).
    pub user: Option<String>,
    /// Operations one transaction may hold: the servers' `--max-txn-ops`.
    pub max_txn_ops: usize,
}

/// Bytes of keys and values one transaction carries at most (etcd refuses
/// requests over `--max-request-bytes`, 1.5 MiB by default).
const MAX_TXN_BYTES: usize = 1 << 20;
/// Deadline of every single etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to etcd and the runtime its calls run on.
#[derive(Clone)]
pub struct Etcd {
    pub client: Client,
    handle: tokio::runtime::Handle,
    pub prefix: String,
}

impl Etcd {
    /// Connects (on a runtime of its own); fails if no endpoint answers.
    pub fn connect(opts: &EtcdOptions) -> anyhow::Result<Etcd> {
        use anyhow::Context;
        if !opts.url.tls && (opts.ca.is_some() || opts.cert.is_some()) {
            anyhow::bail!("--etcd-cacert and --etcd-cert need an etcds:// store");
        }
        if opts.cert.is_some() != opts.key.is_some() {
            anyhow::bail!("--etcd-cert and --etcd-key go together");
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(user) = &opts.user {
            let (u, p) = user.split_once(':').context("--etcd-user is user:password")?;
            options = options.with_user(u, p);
        }
        if opts.url.tls {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &opts.ca {
                let pem = std::fs::read(ca).with_context(|| format!("cannot read --etcd-cacert {}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&opts.cert, &opts.key) {
                let cert = std::fs::read(c).with_context(|| format!("cannot read --etcd-cert {}", c.display()))?;
                let key = std::fs::read(k).with_context(|| format!("cannot read --etcd-key {}", k.display()))?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name("hub-etcd".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .context("start the etcd thread")?;
        let endpoints = opts.url.endpoints.clone();
        let client = run_on(&handle, async move {
            tokio::time::timeout(Duration::from_secs(10), Client::connect(endpoints, Some(options))).await
        })
        .map_err(|_| anyhow::anyhow!("no etcd endpoint of {} answered within 10 s", opts.url))?
        .with_context(|| format!("cannot connect to etcd at {}", opts.url))?;
        let etcd = Etcd { client, handle, prefix: opts.prefix.clone() };
        // A first read proves the endpoints and credentials work.
        etcd.block(|mut c| async move { c.get("\0", None).await })
            .map_err(|e| anyhow::anyhow!("etcd at {} does not answer: {e}", opts.url))?;
        Ok(etcd)
    }

    /// Runs `f` with a client on the etcd runtime and waits for it (from
    /// any thread, also a tokio worker: it blocks that thread meanwhile).
    pub fn block<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        run_on(&self.handle, f(self.client.clone()))
    }

    /// Spawns `fut` on the etcd runtime.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(fut);
    }

    pub fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }
}

fn run_on<T: Send + 'static>(handle: &tokio::runtime::Handle, fut: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().expect("the etcd runtime runs as long as the process")
}

/// The end of the range of keys that start with `prefix`.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What makes a write the leader's: its key, created at `revision`, still
/// there. [`crate::ha::Leadership`] keeps it.
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: AtomicI64,
    /// When the lease is sure to still hold, in ms since `epoch`.
    pub deadline_ms: AtomicU64,
    pub epoch: Instant,
    pub lost: AtomicBool,
    /// The etcd lease the key is bound to (0: none yet).
    pub lease: AtomicI64,
    /// The hub stops and gave up the lead: campaign no more.
    pub resigned: AtomicBool,
}

impl Fence {
    pub fn new(key: Vec<u8>) -> Fence {
        Fence {
            key,
            revision: AtomicI64::new(0),
            deadline_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            lost: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            resigned: AtomicBool::new(false),
        }
    }

    /// Whether this hub leads now: it won, has not lost, and its lease is
    /// certain to be alive (the server's expiry comes after the deadline).
    pub fn holds(&self) -> bool {
        self.revision.load(Ordering::SeqCst) > 0
            && !self.lost.load(Ordering::SeqCst)
            && (self.epoch.elapsed().as_millis() as u64) < self.deadline_ms.load(Ordering::SeqCst)
    }

    fn compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision.load(Ordering::SeqCst))
    }
}

type Op = (Vec<u8>, Option<Vec<u8>>);
type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// The hub's [`Store`] over etcd, writing only while `fence` holds.
pub struct EtcdStore {
    etcd: Etcd,
    fence: Arc<Fence>,
    queue: Mutex<Vec<Batch>>,
    max_ops: usize,
}

impl EtcdStore {
    /// The store of a hub that leads: finishes a journal left by a leader
    /// that stopped half-way, so that what is loaded is whole.
    pub fn open(etcd: Etcd, fence: Arc<Fence>, max_ops: usize) -> Result<EtcdStore, StoreError> {
        let s = EtcdStore { etcd, fence, queue: Mutex::new(Vec::new()), max_ops: max_ops.max(2) };
        s.finish_journal()?;
        Ok(s)
    }

    fn full_key(&self, c: Collection, key: &str) -> Vec<u8> {
        self.etcd.key(&format!("{}{key}", c.prefix()))
    }

    fn journal_key(&self) -> Vec<u8> {
        self.etcd.key("journal")
    }

    fn part_key(&self, n: usize) -> Vec<u8> {
        self.etcd.key(&format!("journal/{n:06}"))
    }

    fn finish_journal(&self) -> Result<(), StoreError> {
        let marker = self.get_all(self.journal_key(), false)?;
        let parts = self.get_all(self.etcd.key("journal/"), true)?;
        let unfinished = !marker.is_empty() || !parts.is_empty();
        if let Some((_, m)) = marker.into_iter().next() {
            let m: JournalMarker =
                serde_json::from_slice(&m).map_err(|source| StoreError::Corrupt { key: "journal".into(), source })?;
            let mut bytes = Vec::new();
            if parts.len() != m.parts {
                return Err(StoreError::Journal(format!("{} parts found, {} named", parts.len(), m.parts)));
            }
            for (_, p) in &parts {
                bytes.extend_from_slice(p);
            }
            if edge_api::digest::Digest::of(&bytes).hex() != m.sha256 {
                return Err(StoreError::Journal("its parts do not match their digest".into()));
            }
            let ops = decode_ops(&bytes).map_err(StoreError::Journal)?;
            tracing::warn!(ops = ops.len(), "finishing a change the previous leader left half-written");
            for chunk in chunks(ops, self.max_ops) {
                self.fenced(chunk)?;
            }
        }
        if unfinished {
            // Finished, or parts without a marker: a journal never made valid.
            self.clear_journal()?;
        }
        Ok(())
    }

    fn clear_journal(&self) -> Result<(), StoreError> {
        let (marker, parts) = (self.journal_key(), self.etcd.key("journal/"));
        let fence = self.fence.compare();
        self.call(move |mut c| {
            let (fence, marker, parts) = (fence.clone(), marker.clone(), parts.clone());
            async move {
                c.txn(Txn::new().when([fence]).and_then([
                    TxnOp::delete(marker, None),
                    TxnOp::delete(parts.clone(), Some(DeleteOptions::new().with_range(range_end(&parts)))),
                ]))
                .await
            }
        })
        .and_then(|r| if r.succeeded() { Ok(()) } else { Err(StoreError::Fenced) })
    }

    /// Every key (with `prefix`: every key under it) and its value, in
    /// key order, read at one revision.
    fn get_all(&self, start: Vec<u8>, prefix: bool) -> Result<KeyValues, StoreError> {
        if !prefix {
            let r = self.call(move |mut c| {
                let start = start.clone();
                async move { c.get(start, None).await }
            })?;
            return Ok(r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect());
        }
        let end = range_end(&start);
        let mut from = start;
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let (f, e) = (from.clone(), end.clone());
            let mut r =
                self.call(move |mut c| {
                    let (f, e) = (f.clone(), e.clone());
                    async move {
                        c.get(f, Some(GetOptions::new().with_range(e).with_limit(500).with_revision(revision))).await
                    }
                })?;
            if revision == 0 {
                revision = r.header().map_or(0, |h| h.revision());
            }
            let more = r.more();
            let kvs = r.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            out.extend(kvs.into_iter().map(|kv| kv.into_key_value()));
            if !more {
                break;
            }
        }
        Ok(out)
    }

    /// One etcd call, tried again while etcd is briefly unavailable (a
    /// member restarting, an election among its members) and this hub
    /// still leads.
    fn call<F, Fut, T>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let mut wait = Duration::from_millis(50);
        let began = Instant::now();
        loop {
            let f = f.clone();
            let r = self.etcd.block(move |c| async move {
                match tokio::time::timeout(CALL_TIMEOUT, f(c)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
                }
            });
            match r {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let leading = self.fence.holds() || self.fence.revision.load(Ordering::SeqCst) == 0;
                    if !leading {
                        return Err(StoreError::Fenced);
                    }
                    if began.elapsed() > Duration::from_secs(20) {
                        return Err(StoreError::Etcd(e));
                    }
                    tracing::warn!("etcd call failed ({e}); trying again");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Writes `ops` in one transaction, if this hub still leads.
    fn fenced(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let fence = self.fence.compare();
        let r = self.call(move |mut c| {
            let (fence, ops) = (fence.clone(), ops.clone());
            async move {
                let ops: Vec<TxnOp> = ops
                    .into_iter()
                    .map(|(k, v)| match v {
                        Some(v) => TxnOp::put(k, v, None),
                        None => TxnOp::delete(k, None),
                    })
                    .collect();
                c.txn(Txn::new().when([fence]).and_then(ops)).await
            }
        })?;
        if r.succeeded() { Ok(()) } else { Err(StoreError::Fenced) }
    }

    /// Writes `ops` whole: in one transaction if they fit, else through
    /// the journal.
    fn write_whole(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut parts = chunks(ops.clone(), self.max_ops);
        if parts.len() <= 1 {
            return self.fenced(parts.pop().unwrap_or_default());
        }
        let bytes = encode_ops(&ops);
        let pieces: Vec<&[u8]> = bytes.chunks(MAX_TXN_BYTES / 2).collect();
        for (n, piece) in pieces.iter().enumerate() {
            self.fenced(vec![(self.part_key(n), Some(piece.to_vec()))])?;
        }
        let marker = JournalMarker { parts: pieces.len(), sha256: edge_api::digest::Digest::of(&bytes).hex() };
        let marker =
            serde_json::to_vec(&marker).map_err(|source| StoreError::Corrupt { key: "journal".into(), source })?;
        // From here the change counts: a leader that stops now leaves it for the next to finish.
        self.fenced(vec![(self.journal_key(), Some(marker))])?;
        for part in parts {
            self.fenced(part)?;
        }
        self.clear_journal()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JournalMarker {
    parts: usize,
    sha256: String,
}

/// Splits `ops` into transactions of at most `max_ops` operations and
/// about [`MAX_TXN_BYTES`].
fn chunks(ops: Vec<Op>, max_ops: usize) -> Vec<Vec<Op>> {
    let mut out: Vec<Vec<Op>> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.0.len() + op.1.as_ref().map_or(0, Vec::len);
        match out.last_mut() {
            Some(last) if last.len() < max_ops && bytes + size <= MAX_TXN_BYTES => {
                bytes += size;
                last.push(op);
            }
            _ => {
                bytes = size;
                out.push(vec![op]);
            }
        }
    }
    out
}

/// The journal's format: `key length (u32 BE), key, 0 | 1 (delete, put),
/// value length, value` per operation. Its parts are `<prefix>journal/<n,
/// 6 digits>`, made valid by `<prefix>journal` = `{"parts": n, "sha256": hex}`.
pub fn encode_ops(ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in ops {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

fn decode_ops(mut b: &[u8]) -> Result<Vec<Op>, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("the journal ends inside an operation".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len(b: &mut &[u8]) -> Result<usize, String> {
        let l = take(b, 4)?;
        Ok(u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
    }
    let mut ops = Vec::new();
    while !b.is_empty() {
        let n = len(&mut b)?;
        let key = take(&mut b, n)?.to_vec();
        let value = match take(&mut b, 1)?[0] {
            0 => None,
            1 => {
                let n = len(&mut b)?;
                Some(take(&mut b, n)?.to_vec())
            }
            t => return Err(format!("unknown operation {t} in the journal")),
        };
        ops.push((key, value));
    }
    Ok(ops)
}

impl Store for EtcdStore {
    fn load(&self, c: Collection) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = self.full_key(c, "");
        let skip = start.len();
        let kvs = self.get_all(start, true)?;
        kvs.into_iter()
            .map(|(k, v)| match String::from_utf8(k[skip..].to_vec()) {
                Ok(k) => Ok((k, v)),
                Err(_) => Err(StoreError::Journal(format!("a key under {} is not UTF-8", c.prefix()))),
            })
            .collect()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if !self.fence.holds() {
            return Err(StoreError::Fenced);
        }
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(batch);
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let batches = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        // One transaction may not name a key twice: the last write of each wins.
        let mut ops: Vec<Op> = Vec::new();
        let mut at = std::collections::HashMap::new();
        for batch in batches {
            for (c, key, value) in batch.ops {
                let k = self.full_key(c, &key);
                match at.get(&k) {
                    Some(&i) => ops[i] = (k, value),
                    None => {
                        at.insert(k.clone(), ops.len());
                        ops.push((k, value));
                    }
                }
            }
        }
        self.write_whole(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_or_say_what_is_wrong() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379,etcd-1.example:2379".parse().unwrap();
        assert_eq!(u.endpoints, vec!["http://127.0.0.1:2379", "http://etcd-1.example:2379"]);
        assert_eq!(u.to_string(), "etcd://127.0.0.1:2379,etcd-1.example:2379");
        let t: EtcdUrl = "etcds://[::1]:2379".parse().unwrap();
        assert!(t.tls);
        assert_eq!(t.endpoints, vec!["https://[::1]:2379"]);
        for (bad, says) in [
            ("http://a:1", "etcd://"),
            ("etcd://a", "no port"),
            ("etcd://a:0", "no valid port"),
            ("etcd://:2379", "no valid host"),
            ("etcd://a b:1", "no valid host"),
            ("etcd://a:1,", "no port"),
        ] {
            let e = bad.parse::<EtcdUrl>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_journal_round_trips_and_refuses_what_is_cut_or_unknown() {
        let ops =
            vec![(b"/a/w/x".to_vec(), Some(b"{}".to_vec())), (b"/a/p/x/0".to_vec(), None), (vec![], Some(vec![]))];
        let bytes = encode_ops(&ops);
        assert_eq!(decode_ops(&bytes).unwrap(), ops);
        for cut in 1..bytes.len() {
            if let Ok(d) = decode_ops(&bytes[..cut]) {
                // Only a cut between whole operations decodes, to a prefix.
                assert_eq!(d[..], ops[..d.len()]);
            }
        }
        let mut bad = bytes.clone();
        bad[4 + 6] = 7;
        assert!(decode_ops(&bad).unwrap_err().contains("unknown operation"));
    }

    #[test]
    fn chunks_keep_within_ops_and_bytes() {
        let ops: Vec<Op> = (0..300).map(|i| (format!("k{i}").into_bytes(), Some(vec![0; 10_000]))).collect();
        let c = chunks(ops, 128);
        assert!(
            c.iter().all(|c| c.len() <= 128 && c.iter().map(|o| o.0.len() + 10_000).sum::<usize>() <= MAX_TXN_BYTES)
        );
        assert_eq!(c.iter().map(Vec::len).sum::<usize>(), 300);
        assert_eq!(range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(range_end(&[b'a', 0xff]), b"b".to_vec());
    }
}
