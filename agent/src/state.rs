//! The agent's durable state, in sled under `DATA_DIR/state`.
//!
//! Architecture invariant: whatever the agent acknowledges (a desired-state
//! message, an instance transition it reports) has been flushed to disk
//! first, so a kill -9 or a power cut loses nothing it has admitted to. The
//! desired state is stored as the hub's signed envelope, verbatim, and is
//! verified again when it is read back.

use std::path::{Path, PathBuf};

use edge_api::keys::{PublicKey, SigningKey};
use edge_api::model::Phase;
use edge_api::seal::KemKeyPair;
use edge_api::token::JoinToken;
use edge_api::wire::Assignment;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("could not open the agent state at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("agent state I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("corrupt agent state record {key:?}: {detail}")]
    Corrupt { key: String, detail: String },
}

/// One replica the agent runs, as it survives restarts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InstanceRecord {
    pub assignment: Assignment,
    pub phase: Phase,
    pub restarts: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: Option<edge_api::model::Reason>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// Whether the last finished run succeeded (for the restart policy).
    #[serde(default)]
    pub last_succeeded: Option<bool>,
    /// How many runs in a row failed or ended; drives the back-off.
    #[serde(default)]
    pub streak: u32,
    /// Wall-clock time when the back-off ends, if backing off.
    #[serde(default)]
    pub backoff_until_ms: Option<u64>,
}

pub struct State {
    db: sled::Db,
    meta: sled::Tree,
    instances: sled::Tree,
}

const NODE_KEY: &str = "node_key";
const KEM_KEY: &str = "kem_key";
const CREDENTIAL: &str = "credential";
const NODE_NAME: &str = "node_name";
const HUB_KEY: &str = "hub_key";
const JOIN_TOKEN: &str = "join_token";
const API_URL: &str = "api_url";
const SESSION: &str = "session";
const DESIRED: &str = "desired";

impl State {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state");
        let config = sled::Config::new()
            .path(&path)
            // 1 MiB of page cache: the agent's records are few and small, and
            // every MiB counts on a 1 GiB device.
            .cache_capacity(1 << 20)
            // Flushes are explicit (before every acknowledgement); no
            // background timer writing on its own schedule.
            .flush_every_ms(None);
        let db = open_locked(&config).map_err(|source| StateError::Open { path: path.clone(), source })?;
        let meta = db.open_tree("meta")?;
        let instances = db.open_tree("instances")?;
        Ok(State { db, meta, instances })
    }

    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    fn get_str(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(self.meta.get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The node's identity key, created (and flushed) on first use.
    pub fn node_key(&self) -> Result<SigningKey, StateError> {
        if let Some(v) = self.meta.get(NODE_KEY)? {
            return SigningKey::from_pkcs8(&v)
                .map_err(|e| StateError::Corrupt { key: NODE_KEY.into(), detail: e.to_string() });
        }
        let k =
            SigningKey::generate().map_err(|e| StateError::Corrupt { key: NODE_KEY.into(), detail: e.to_string() })?;
        self.meta.insert(NODE_KEY, k.pkcs8())?;
        self.flush()?;
        Ok(k)
    }

    /// The node's X25519 key (what the hub seals to), created on first use.
    pub fn kem_key(&self) -> Result<KemKeyPair, StateError> {
        if let Some(v) = self.meta.get(KEM_KEY)? {
            return KemKeyPair::from_bytes(&v)
                .map_err(|e| StateError::Corrupt { key: KEM_KEY.into(), detail: e.to_string() });
        }
        let k =
            KemKeyPair::generate().map_err(|e| StateError::Corrupt { key: KEM_KEY.into(), detail: e.to_string() })?;
        self.meta.insert(KEM_KEY, k.seed().as_slice())?;
        self.flush()?;
        Ok(k)
    }

    /// The node's own MQTT password, issued by the hub at enrolment.
    pub fn credential(&self) -> Result<Option<String>, StateError> {
        self.get_str(CREDENTIAL)
    }

    /// Keeps the node's credential and forgets the bootstrap token: from now
    /// on the node logs in as itself.
    pub fn set_credential(&self, c: &str) -> Result<(), StateError> {
        self.meta.insert(CREDENTIAL, c.as_bytes())?;
        self.meta.remove(JOIN_TOKEN)?;
        self.flush()
    }

    pub fn clear_credential(&self) -> Result<(), StateError> {
        self.meta.remove(CREDENTIAL)?;
        self.flush()
    }

    pub fn node_name(&self) -> Result<Option<String>, StateError> {
        self.get_str(NODE_NAME)
    }

    pub fn set_node_name(&self, name: &str) -> Result<(), StateError> {
        self.meta.insert(NODE_NAME, name.as_bytes())?;
        self.flush()
    }

    /// Starts a new session: a counter that orders this run's messages after
    /// every earlier run's, even when the clock is wrong.
    pub fn next_session(&self) -> Result<u64, StateError> {
        let next = self
            .meta
            .update_and_fetch(SESSION, |old| {
                let n = old.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .and_then(|b| b.as_ref().try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        self.flush()?;
        Ok(next)
    }

    pub fn hub_key(&self) -> Result<Option<PublicKey>, StateError> {
        match self.get_str(HUB_KEY)? {
            None => Ok(None),
            Some(s) => PublicKey::from_hex(&s)
                .map(Some)
                .map_err(|e| StateError::Corrupt { key: HUB_KEY.into(), detail: e.to_string() }),
        }
    }

    /// The bootstrap token kept until the node has its own credential. One
    /// in a format this build no longer speaks is forgotten.
    pub fn join_token(&self) -> Result<Option<JoinToken>, StateError> {
        match self.get_str(JOIN_TOKEN)? {
            None => Ok(None),
            Some(s) => match s.parse() {
                Ok(t) => Ok(Some(t)),
                Err(e) => {
                    tracing::warn!("forgetting a stored join token: {e}");
                    self.meta.remove(JOIN_TOKEN)?;
                    Ok(None)
                }
            },
        }
    }

    pub fn set_join_token(&self, t: &JoinToken) -> Result<(), StateError> {
        self.meta.insert(JOIN_TOKEN, t.to_string().as_bytes())?;
        self.flush()
    }

    /// Records enrolment: the pinned hub key and where its API is.
    pub fn set_enrolled(&self, hub: &PublicKey, api_url: &str) -> Result<(), StateError> {
        self.meta.insert(HUB_KEY, hub.hex().as_bytes())?;
        self.meta.insert(API_URL, api_url.as_bytes())?;
        self.flush()
    }

    pub fn api_url(&self) -> Result<Option<String>, StateError> {
        self.get_str(API_URL)
    }

    /// The last accepted desired-state envelope, verbatim.
    pub fn desired(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.meta.get(DESIRED)?.map(|v| v.to_vec()))
    }

    pub fn set_desired(&self, envelope: &[u8]) -> Result<(), StateError> {
        self.meta.insert(DESIRED, envelope)?;
        self.flush()
    }

    pub fn instances(&self) -> Result<Vec<(String, InstanceRecord)>, StateError> {
        let mut out = Vec::new();
        for item in self.instances.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let rec = serde_json::from_slice(&v)
                .map_err(|e| StateError::Corrupt { key: key.clone(), detail: e.to_string() })?;
            out.push((key, rec));
        }
        Ok(out)
    }

    pub fn put_instance(&self, key: &str, rec: &InstanceRecord) -> Result<(), StateError> {
        let v = serde_json::to_vec(rec).map_err(|e| StateError::Corrupt { key: key.into(), detail: e.to_string() })?;
        self.instances.insert(key, v)?;
        self.flush()
    }

    /// The database itself, for the key-value namespaces of workloads.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Deletes a workload's key-value namespace (the workload left this node).
    pub fn drop_key_value(&self, workload: &str) -> Result<(), StateError> {
        self.db.drop_tree(crate::keyvalue::tree_name(workload))?;
        self.flush()
    }

    pub fn remove_instance(&self, key: &str) -> Result<(), StateError> {
        self.instances.remove(key)?;
        self.flush()
    }
}

/// Opens the database, waiting briefly for its file lock: sled's I/O
/// threads can hold it for a moment after the previous handle in this
/// process was dropped. A lock held longer belongs to another process, and
/// the error says so.
fn open_locked(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(sled::Error::Io(std::io::Error::other(format!(
                        "{e} (is another edge-agent running with this --data-dir?)"
                    ))));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_sessions_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("edge-agent-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (key, s1) = {
            let s = State::open(&dir).unwrap();
            let k = s.node_key().unwrap();
            s.set_desired(b"envelope").unwrap();
            (k.public(), s.next_session().unwrap())
        };
        let s = State::open(&dir).unwrap();
        assert_eq!(s.node_key().unwrap().public(), key);
        assert_eq!(s.kem_key().unwrap().public(), s.kem_key().unwrap().public());
        assert_eq!(s.next_session().unwrap(), s1 + 1);
        assert_eq!(s.desired().unwrap().as_deref(), Some(&b"envelope"[..]));
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_credential_replaces_the_join_token() {
        let dir = std::env::temp_dir().join(format!("edge-agent-state-cred-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = State::open(&dir).unwrap();
        let hub = SigningKey::generate().unwrap();
        let t = JoinToken::generate(&hub.public()).unwrap();
        s.set_join_token(&t).unwrap();
        assert_eq!(s.join_token().unwrap(), Some(t));
        s.set_credential("c").unwrap();
        assert_eq!((s.credential().unwrap().as_deref(), s.join_token().unwrap()), (Some("c"), None));
        s.meta.insert(JOIN_TOKEN, b"EJ1.old.format".as_slice()).unwrap();
        assert_eq!(s.join_token().unwrap(), None, "an old-format token is forgotten, not fatal");
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_data_dir_in_use_is_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("edge-agent-state-busy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let held = State::open(&dir).unwrap();
        let err = State::open(&dir).err().expect("a second open must fail while the first is held").to_string();
        assert!(err.contains("another edge-agent"), "{err}");
        assert!(err.contains("edge-agent-state-busy"), "names the path: {err}");
        drop(held);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
