//! A map that remembers what changed in it since it was last settled: the
//! hub's state is edited in place, and a change writes (and, if the write
//! fails, takes back) only what it touched, never a copy of the whole.
//!
//! Reads go through `Deref` to the `BTreeMap`; every write goes through a
//! method here, which keeps the value the key had before the open change
//! (the first time the key is touched). There is no `DerefMut`, so the
//! compiler finds any write that would bypass the record.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Deref;

#[derive(Clone, Debug)]
pub struct Tracked<K: Ord + Clone, V: Clone> {
    map: BTreeMap<K, V>,
    /// The value each key touched since the last settle had before it
    /// (`None`: it was absent).
    before: BTreeMap<K, Option<V>>,
}

impl<K: Ord + Clone, V: Clone> Default for Tracked<K, V> {
    fn default() -> Self {
        Tracked { map: BTreeMap::new(), before: BTreeMap::new() }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for Tracked<K, V> {
    /// Equal contents; what is open is not compared.
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Ord + Clone, V: Clone> Deref for Tracked<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<'a, K: Ord + Clone, V: Clone> IntoIterator for &'a Tracked<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for Tracked<K, V> {
    /// A settled map (nothing open).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Tracked { map: iter.into_iter().collect(), before: BTreeMap::new() }
    }
}

impl<K: Ord + Clone, V: Clone> Tracked<K, V> {
    fn touch(&mut self, k: &K) {
        if !self.before.contains_key(k) {
            self.before.insert(k.clone(), self.map.get(k).cloned());
        }
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.touch(&k);
        self.map.insert(k, v)
    }

    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (key, v) = self.map.remove_entry(k)?;
        self.before.entry(key).or_insert_with(|| Some(v.clone()));
        Some(v)
    }

    /// The value to edit in place (recorded as touched even if left as is).
    pub fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let key = self.map.get_key_value(k)?.0.clone();
        self.touch(&key);
        self.map.get_mut(k)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let gone: Vec<K> = self.map.iter().filter(|(k, v)| !keep(k, v)).map(|(k, _)| k.clone()).collect();
        for k in gone {
            self.remove(&k);
        }
    }

    pub fn clear(&mut self) {
        self.retain(|_, _| false);
    }

    /// Whether nothing is open.
    pub fn is_settled(&self) -> bool {
        self.before.is_empty()
    }

    /// The keys touched since the last settle, changed or not.
    pub fn touched(&self) -> impl Iterator<Item = &K> + '_ {
        self.before.keys()
    }

    /// What a touched key held before the open change (`None`: absent).
    pub fn before(&self, k: &K) -> Option<Option<&V>> {
        self.before.get(k).map(Option::as_ref)
    }

    /// Accepts what changed: nothing is open any more.
    pub fn settle(&mut self) {
        self.before.clear();
    }

    /// Takes back every change since the last settle.
    pub fn revert(&mut self) {
        for (k, v) in std::mem::take(&mut self.before) {
            match v {
                Some(v) => self.map.insert(k, v),
                None => self.map.remove(&k),
            };
        }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> Tracked<K, V> {
    /// The keys that differ from before the open change, with their value
    /// now (`None`: removed). Touched but unchanged keys are left out.
    pub fn changes(&self) -> impl Iterator<Item = (&K, Option<&V>)> + '_ {
        self.before.iter().filter_map(|(k, was)| {
            let now = self.map.get(k);
            (now != was.as_ref()).then_some((k, now))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_what_differs_and_revert_restores_everything() {
        let mut m: Tracked<String, u32> =
            [("a".to_string(), 1), ("b".to_string(), 2), ("c".to_string(), 3)].into_iter().collect();
        assert_eq!(m.changes().count(), 0);
        *m.get_mut("a").unwrap() += 10;
        *m.get_mut("b").unwrap() += 0; // touched, unchanged
        m.remove("c");
        m.insert("d".into(), 4);
        m.insert("e".into(), 5);
        m.remove("e"); // added and removed: no change
        let changes: Vec<(String, Option<u32>)> = m.changes().map(|(k, v)| (k.clone(), v.copied())).collect();
        assert_eq!(changes, vec![("a".into(), Some(11)), ("c".into(), None), ("d".into(), Some(4))]);
        assert_eq!(m.touched().count(), 5);
        assert_eq!(m.before(&"a".to_string()), Some(Some(&1)));
        assert_eq!(m.before(&"d".to_string()), Some(None));
        m.revert();
        let back: Vec<(String, u32)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(back, vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]);
        assert_eq!(m.touched().count(), 0);
        m.retain(|k, _| k != "b");
        m.settle();
        assert_eq!(m.changes().count(), 0);
        assert_eq!(m.len(), 2);
        m.clear();
        assert_eq!(m.changes().count(), 2);
    }
}
