//! Remembering single-use values (request ids, signature nonces) until they
//! expire, so a captured request or signature is not accepted twice.
//! Bounded: when full, new values are refused (fail closed) rather than old
//! ones forgotten early.

use std::collections::{BTreeSet, HashMap};

/// 100k entries: far more than a hub serves fetches or an agent receives
/// requests within one expiry window; a flood beyond it is refused.
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug)]
pub struct NonceCache {
    seen: HashMap<String, u64>,
    by_expiry: BTreeSet<(u64, String)>,
    capacity: usize,
}

impl Default for NonceCache {
    fn default() -> Self {
        NonceCache::with_capacity(DEFAULT_CAPACITY)
    }
}

impl NonceCache {
    pub fn with_capacity(capacity: usize) -> Self {
        NonceCache { seen: HashMap::new(), by_expiry: BTreeSet::new(), capacity }
    }

    /// Records `nonce` as used until `expires_ms`; refuses one seen before,
    /// or one that has already expired at `now_ms`.
    pub fn insert(&mut self, nonce: &str, expires_ms: u64, now_ms: u64) -> Result<(), String> {
        while let Some((t, n)) = self.by_expiry.first().cloned() {
            if t > now_ms {
                break;
            }
            self.by_expiry.pop_first();
            self.seen.remove(&n);
        }
        if expires_ms <= now_ms {
            return Err("expired".into());
        }
        if self.seen.contains_key(nonce) {
            return Err("already used (a replay?)".into());
        }
        if self.seen.len() >= self.capacity {
            return Err(format!("too many requests in flight (more than {})", self.capacity));
        }
        self.seen.insert(nonce.to_string(), expires_ms);
        self.by_expiry.insert((expires_ms, nonce.to_string()));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_accepted_once_until_it_expires_and_the_cache_stays_bounded() {
        let mut c = NonceCache::with_capacity(2);
        assert!(c.insert("a", 100, 0).is_ok());
        assert!(c.insert("a", 100, 50).unwrap_err().contains("already used"));
        assert!(c.insert("b", 100, 50).is_ok());
        assert!(c.insert("c", 100, 50).unwrap_err().contains("too many"), "full: fail closed");
        assert!(c.insert("old", 10, 50).unwrap_err().contains("expired"));
        // After expiry the entries are gone (and a replay would fail its own expiry check).
        assert!(c.insert("c", 200, 100).is_ok());
        assert_eq!(c.len(), 1);
    }
}
