//! A copy-on-write hash map split into shards, so that the next store
//! snapshot can share everything a batch of updates did not touch.
//!
//! Cloning a [`ShardedMap`] copies only the shard pointers. The first write
//! to a shard after a clone copies that one shard (`Arc::make_mut`); later
//! writes in the same batch mutate it in place. Updating one workload among
//! 10,000 therefore copies a few hundred entries per index, not the store.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash};
use std::sync::Arc;

/// Enough shards that a shard stays small at tens of thousands of entries,
/// few enough that cloning the shard table is negligible.
const SHARDS: usize = 64;

/// Picks the shard. Fixed keys so a key always lands in the same shard.
type ShardHasher = BuildHasherDefault<DefaultHasher>;

#[derive(Debug)]
pub(crate) struct ShardedMap<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
}

impl<K, V> Clone for ShardedMap<K, V> {
    fn clone(&self) -> Self {
        ShardedMap {
            shards: self.shards.clone(),
        }
    }
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
        }
    }
}

fn shard_of<Q: Hash + ?Sized>(key: &Q) -> usize {
    (ShardHasher::default().hash_one(key) % SHARDS as u64) as usize
}

impl<K: Hash + Eq + Clone, V: Clone> ShardedMap<K, V> {
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[shard_of(key)].get(key)
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = shard_of(&key);
        Arc::make_mut(&mut self.shards[shard]).insert(key, value)
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = shard_of(key);
        // Avoid copying a shared shard that does not hold the key.
        if !self.shards[shard].contains_key(key) {
            return None;
        }
        Arc::make_mut(&mut self.shards[shard]).remove(key)
    }

    /// Mutable access to one entry, inserting `default()` when absent; the
    /// entry is removed again when `f` leaves it empty per `is_empty`.
    pub(crate) fn update<Q>(
        &mut self,
        key: &Q,
        default: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
        is_empty: impl FnOnce(&V) -> bool,
    ) where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized + ToOwned<Owned = K>,
    {
        let shard = Arc::make_mut(&mut self.shards[shard_of(key)]);
        let value = match shard.get_mut(key) {
            Some(v) => v,
            None => shard.entry(key.to_owned()).or_insert_with(default),
        };
        f(value);
        if is_empty(value) {
            shard.remove(key);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }

    /// How many shards `self` and `other` share (for tests of incrementality).
    #[cfg(test)]
    pub(crate) fn shared_shards(&self, other: &Self) -> usize {
        self.shards
            .iter()
            .zip(&other.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_shares_until_written_and_then_copies_one_shard() {
        let mut a: ShardedMap<String, u32> = ShardedMap::default();
        for i in 0..1000 {
            a.insert(format!("k{i}"), i);
        }
        let mut b = a.clone();
        assert_eq!(b.shared_shards(&a), SHARDS);
        b.insert("k7".into(), 70);
        assert_eq!(b.shared_shards(&a), SHARDS - 1);
        assert_eq!(a.get("k7"), Some(&7));
        assert_eq!(b.get("k7"), Some(&70));
        // Removing an absent key copies nothing.
        b.remove("absent");
        assert_eq!(b.shared_shards(&a), SHARDS - 1);
        assert_eq!(b.remove("k8"), Some(8));
        assert_eq!(a.len(), 1000);
        assert_eq!(b.len(), 999);
    }

    #[test]
    fn update_inserts_and_drops_empty_entries() {
        let mut m: ShardedMap<String, Vec<u32>> = ShardedMap::default();
        m.update("x", Vec::new, |v| v.push(1), Vec::is_empty);
        assert_eq!(m.get("x"), Some(&vec![1]));
        m.update("x", Vec::new, |v| v.clear(), Vec::is_empty);
        assert!(!m.contains_key("x"));
        assert_eq!(m.len(), 0);
    }
}
