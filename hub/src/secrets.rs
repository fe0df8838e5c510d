//! Secrets: kept encrypted at rest, sent only sealed to the nodes that use them.
//!
//! At rest each secret's values (a JSON object) are encrypted with
//! ChaCha20-Poly1305 under a 256-bit key held in a file outside the state
//! database (`DATA_DIR/secrets.key`, or `--secrets-key-file` on another
//! disk, a tmpfs filled from a KMS, a systemd credential): a copy of the
//! database alone reveals names, keys and sizes, never values. The record's
//! name and version are the AEAD's associated data, so a ciphertext moved to
//! another record, or an old version put back, does not open.
//!
//! In flight, the values go inside each assignment that uses them, sealed
//! with HPKE to the target node's X25519 key ([`edge_api::seal`]). Sealing
//! is deterministic in (hub key, node key, name, version, values), so an
//! unchanged secret gives a byte-identical desired state and nothing is
//! republished or restarted; the boxes are cached for the same reason.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use edge_api::model::{Labels, Secret, SecretView};
use edge_api::seal::{KemPublicKey, Sealed};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

/// A secret as the hub stores it: names and sizes in clear, values encrypted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    pub version: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Key → size of its value in bytes.
    pub keys: BTreeMap<String, u64>,
    /// ChaCha20-Poly1305 nonce and ciphertext (with tag) of the values, hex.
    pub nonce: String,
    pub ciphertext: String,
}

impl SecretRecord {
    pub fn view(&self, used_by: Vec<String>) -> SecretView {
        SecretView {
            name: self.name.clone(),
            labels: self.labels.clone(),
            version: self.version,
            keys: self.keys.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            used_by,
        }
    }
}

/// The hub's secrets key, and the boxes it has sealed.
pub struct SecretKeys {
    at_rest: LessSafeKey,
    /// Derives the randomness of deterministic seals (never the AEAD key itself).
    derive: [u8; 32],
    sealed: Mutex<HashMap<SealedId, Sealed>>,
}

/// A sealed box's identity: (node, secret, version, node key, digest of the
/// stored ciphertext: a secret deleted and made again restarts at version 1).
type SealedId = (String, String, u64, [u8; 32], [u8; 32]);

/// Sealed boxes kept before the cache is emptied and refilled.
const SEALED_CACHE: usize = 4096;

fn aad(name: &str, version: u64) -> Vec<u8> {
    let mut v = b"edge-secret-at-rest-v1\0".to_vec();
    v.extend_from_slice(name.as_bytes());
    v.push(0);
    v.extend_from_slice(&version.to_be_bytes());
    v
}

impl SecretKeys {
    fn from_bytes(key: &[u8; 32]) -> Self {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte ChaCha20-Poly1305 key");
        let d = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), b"edge-secret-seal-v1");
        let mut derive = [0u8; 32];
        derive.copy_from_slice(d.as_ref());
        SecretKeys { at_rest: LessSafeKey::new(unbound), derive, sealed: Mutex::new(HashMap::new()) }
    }

    /// A fresh key, for tests.
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut k).expect("the system random source");
        Self::from_bytes(&k)
    }

    /// Reads the key file, or makes it (0600) when it is missing and no
    /// secret needs it yet. Missing while secrets exist is an error: a new
    /// key would silently make every stored secret unreadable.
    pub fn load_or_create(path: &Path, secrets_stored: usize) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    anyhow::bail!(
                        "the secrets key {} is readable by other users (mode {:o}): chmod 600 it",
                        path.display(),
                        mode & 0o777
                    );
                }
                let bytes = edge_api::hex::decode(text.trim())
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| anyhow::anyhow!("the secrets key {} is not 64 hex digits", path.display()))?;
                let mut k = [0u8; 32];
                k.copy_from_slice(&bytes);
                Ok(Self::from_bytes(&k))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && secrets_stored == 0 => {
                let mut k = [0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut k)
                    .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                crate::write_private(path, format!("{}\n", edge_api::hex::encode(&k)).as_bytes())?;
                Ok(Self::from_bytes(&k))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                "the secrets key {} is missing but the hub stores {secrets_stored} secret(s) encrypted with it: \
                 restore the file (or pass --secrets-key-file), or the secrets cannot be read",
                path.display()
            ),
            Err(e) => Err(anyhow::anyhow!("cannot read the secrets key {}: {e}", path.display())),
        }
    }

    /// Encrypts a secret's values into a record of `version`.
    pub fn encrypt(&self, s: &Secret, version: u64, created_ms: u64, now_ms: u64) -> Result<SecretRecord, String> {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SystemRandom::new().fill(&mut nonce).map_err(|_| "the system random source failed".to_string())?;
        let mut buf = serde_json::to_vec(&s.data).map_err(|e| e.to_string())?;
        self.at_rest
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&s.metadata.name, version)),
                &mut buf,
            )
            .map_err(|_| "encryption failed".to_string())?;
        Ok(SecretRecord {
            name: s.metadata.name.clone(),
            labels: s.metadata.labels.clone(),
            version,
            created_ms,
            updated_ms: now_ms,
            keys: s.data.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect(),
            nonce: edge_api::hex::encode(&nonce),
            ciphertext: edge_api::hex::encode(&buf),
        })
    }

    /// The values of a record (JSON bytes of key → value), checked against
    /// the record's name, version and key list.
    pub fn decrypt(&self, rec: &SecretRecord) -> Result<Vec<u8>, String> {
        let what = || format!("secret {:?} (version {})", rec.name, rec.version);
        let nonce: [u8; NONCE_LEN] = edge_api::hex::decode(&rec.nonce)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("{}: the stored nonce is malformed", what()))?;
        let mut buf = edge_api::hex::decode(&rec.ciphertext)
            .ok_or_else(|| format!("{}: the stored ciphertext is not hex", what()))?;
        let plain = self
            .at_rest
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad(&rec.name, rec.version)), &mut buf)
            .map_err(|_| format!("{} does not decrypt: wrong secrets key, or the record was altered", what()))?;
        let data: BTreeMap<String, String> =
            serde_json::from_slice(plain).map_err(|_| format!("{}: the decrypted values are malformed", what()))?;
        let sizes: BTreeMap<String, u64> = data.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
        if sizes != rec.keys {
            return Err(format!("{}: its key list does not match its values (altered record)", what()));
        }
        Ok(plain.to_vec())
    }

    /// Whether a record holds exactly these values.
    pub fn same_values(&self, rec: &SecretRecord, data: &BTreeMap<String, String>) -> bool {
        self.decrypt(rec)
            .ok()
            .and_then(|p| serde_json::from_slice::<BTreeMap<String, String>>(&p).ok())
            .is_some_and(|d| &d == data)
    }
}

/// Seals secrets to nodes for the controller.
pub trait SealSecret {
    /// The record's values sealed to `node`'s key.
    fn seal(&self, node: &str, kem: &KemPublicKey, rec: &SecretRecord) -> Result<Sealed, String>;
}

impl SealSecret for SecretKeys {
    fn seal(&self, node: &str, kem: &KemPublicKey, rec: &SecretRecord) -> Result<Sealed, String> {
        let mut stored = [0u8; 32];
        stored.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, rec.ciphertext.as_bytes()).as_ref());
        let id = (node.to_string(), rec.name.clone(), rec.version, kem.0, stored);
        if let Some(s) = self.sealed.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(s.clone());
        }
        let plain = self.decrypt(rec)?;
        let info = edge_api::seal::secret_info(node, &rec.name, rec.version);
        let sealed = edge_api::seal::seal_deterministic(&self.derive, kem, &info, &plain)
            .map_err(|e| format!("cannot seal secret {:?} to node {node}: {e}", rec.name))?;
        let mut cache = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= SEALED_CACHE {
            cache.clear();
        }
        cache.insert(id, sealed.clone());
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::model::SecretMetadata;
    use edge_api::seal::KemKeyPair;

    fn secret(name: &str, pairs: &[(&str, &str)]) -> Secret {
        Secret {
            api_version: "edge/v1".into(),
            kind: "Secret".into(),
            metadata: SecretMetadata { name: name.into(), labels: Labels::new() },
            data: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn records_hold_no_plaintext_and_open_only_as_themselves() {
        let keys = SecretKeys::random();
        let rec = keys.encrypt(&secret("db", &[("password", "hunter2")]), 1, 5, 5).unwrap();
        let stored = serde_json::to_string(&rec).unwrap();
        assert!(!stored.contains("hunter2") && !stored.contains(&edge_api::hex::encode(b"hunter2")));
        assert_eq!(keys.decrypt(&rec).unwrap(), br#"{"password":"hunter2"}"#);
        assert!(keys.same_values(&rec, &secret("db", &[("password", "hunter2")]).data));
        assert!(!keys.same_values(&rec, &secret("db", &[("password", "x")]).data));

        // Moved to another name, rolled to another version, a flipped bit,
        // a key list that lies, another hub's key: none opens.
        let renamed = SecretRecord { name: "other".into(), ..rec.clone() };
        let bumped = SecretRecord { version: 2, ..rec.clone() };
        let mut ct = edge_api::hex::decode(&rec.ciphertext).unwrap();
        ct[3] ^= 1;
        let flipped = SecretRecord { ciphertext: edge_api::hex::encode(&ct), ..rec.clone() };
        let lying = SecretRecord { keys: [("password".to_string(), 3)].into(), ..rec.clone() };
        for bad in [&renamed, &bumped, &flipped, &lying] {
            assert!(keys.decrypt(bad).is_err(), "{bad:?}");
        }
        assert!(SecretKeys::random().decrypt(&rec).is_err());
    }

    #[test]
    fn sealing_is_deterministic_per_node_and_opens_only_there() {
        let keys = SecretKeys::random();
        let rec = keys.encrypt(&secret("db", &[("password", "hunter2")]), 3, 5, 5).unwrap();
        let a = KemKeyPair::generate().unwrap();
        let b = KemKeyPair::generate().unwrap();
        let to_a = keys.seal("a", &a.public(), &rec).unwrap();
        // The same input seals to the same box, from the cache or not.
        assert_eq!(to_a, keys.seal("a", &a.public(), &rec).unwrap());
        keys.sealed.lock().unwrap().clear();
        assert_eq!(to_a, keys.seal("a", &a.public(), &rec).unwrap());
        let info = edge_api::seal::secret_info("a", "db", 3);
        assert_eq!(a.open(&info, &to_a).unwrap(), br#"{"password":"hunter2"}"#);
        // Node b cannot open a's box, nor can a open it as another node's or version's.
        assert!(b.open(&info, &to_a).is_err());
        assert!(a.open(&edge_api::seal::secret_info("b", "db", 3), &to_a).is_err());
        assert!(a.open(&edge_api::seal::secret_info("a", "db", 2), &to_a).is_err());
        assert_ne!(to_a, keys.seal("b", &b.public(), &rec).unwrap());

        // Deleted and made again with other values, a secret restarts at
        // its first version: the box holds the new values, not cached old ones.
        let first = keys.encrypt(&secret("db", &[("password", "old")]), 1, 5, 5).unwrap();
        let again = keys.encrypt(&secret("db", &[("password", "new")]), 1, 6, 6).unwrap();
        let info = edge_api::seal::secret_info("a", "db", 1);
        assert_eq!(a.open(&info, &keys.seal("a", &a.public(), &first).unwrap()).unwrap(), br#"{"password":"old"}"#);
        assert_eq!(a.open(&info, &keys.seal("a", &a.public(), &again).unwrap()).unwrap(), br#"{"password":"new"}"#);
    }

    #[test]
    fn the_key_file_is_made_once_kept_private_and_required_once_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("edge-secrets-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("secrets.key");
        let k1 = SecretKeys::load_or_create(&path, 0).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let rec = k1.encrypt(&secret("db", &[("a", "b")]), 1, 0, 0).unwrap();
        let k2 = SecretKeys::load_or_create(&path, 1).unwrap();
        assert!(k2.decrypt(&rec).is_ok(), "the same key is read back");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretKeys::load_or_create(&path, 1).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(&path, "not hex").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SecretKeys::load_or_create(&path, 1).err().unwrap().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = SecretKeys::load_or_create(&path, 2).err().unwrap().to_string();
        assert!(e.contains("missing") && e.contains("2 secret"), "{e}");
        assert!(!path.exists(), "no new key replaces a lost one");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
