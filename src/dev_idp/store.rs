//! A bounded map whose entries expire: the provider's in-memory state (pending logins, codes, tokens).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Entries live for a fixed `ttl`; at most `capacity` are kept, the oldest dropped first.
///
/// Every entry of one map has the same lifetime, so insertion order is expiry order: a queue of
/// keys finds both the expired and the oldest entries without scanning. Keys are random tokens
/// chosen by the provider, never by a client.
#[derive(Debug)]
pub(crate) struct ExpiringMap<V> {
    entries: HashMap<String, (Instant, V)>,
    /// Keys in insertion order; may name entries already removed (skipped when popped).
    order: VecDeque<(Instant, String)>,
    ttl: Duration,
    capacity: usize,
}

impl<V> ExpiringMap<V> {
    /// A map keeping entries for `ttl`, at most `capacity` (at least one) of them.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            ttl,
            capacity: capacity.max(1),
        }
    }

    /// Stores `value` under `key` until `now + ttl`, evicting expired and then oldest entries.
    pub(crate) fn insert(&mut self, key: String, value: V, now: Instant) {
        self.purge_expired(now);
        while self.order.len() >= self.capacity {
            match self.order.pop_front() {
                Some((_, oldest)) => {
                    self.entries.remove(&oldest);
                }
                None => break,
            }
        }
        let expires_at = now + self.ttl;
        self.order.push_back((expires_at, key.clone()));
        self.entries.insert(key, (expires_at, value));
    }

    /// The live entry under `key`.
    pub(crate) fn get_mut(&mut self, key: &str, now: Instant) -> Option<&mut V> {
        match self.entries.get_mut(key) {
            Some((expires_at, value)) if *expires_at > now => Some(value),
            _ => None,
        }
    }

    /// The live entry under `key`.
    pub(crate) fn get(&self, key: &str, now: Instant) -> Option<&V> {
        match self.entries.get(key) {
            Some((expires_at, value)) if *expires_at > now => Some(value),
            _ => None,
        }
    }

    /// Removes the entry under `key`, returning it if it had not expired.
    pub(crate) fn remove(&mut self, key: &str, now: Instant) -> Option<V> {
        match self.entries.remove(key) {
            Some((expires_at, value)) if expires_at > now => Some(value),
            _ => None,
        }
    }

    /// Number of entries held (expired ones not yet purged included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some((expires_at, _)) = self.order.front() {
            if *expires_at > now {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire() {
        let start = Instant::now();
        let mut map = ExpiringMap::new(Duration::from_secs(60), 10);
        map.insert("a".into(), 1, start);
        assert_eq!(map.get("a", start + Duration::from_secs(59)), Some(&1));
        assert_eq!(map.get("a", start + Duration::from_secs(60)), None);
        assert_eq!(map.remove("a", start + Duration::from_secs(61)), None);
    }

    #[test]
    fn capacity_drops_oldest() {
        let start = Instant::now();
        let mut map = ExpiringMap::new(Duration::from_secs(60), 3);
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            map.insert(key.into(), i, start);
        }
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("a", start), None);
        assert_eq!(map.get("d", start), Some(&3));
    }

    #[test]
    fn removed_entries_do_not_grow_the_queue_without_bound() {
        let start = Instant::now();
        let mut map = ExpiringMap::new(Duration::from_secs(60), 100);
        for i in 0..10_000 {
            let key = format!("k{i}");
            map.insert(key.clone(), i, start);
            assert_eq!(map.remove(&key, start), Some(i));
        }
        assert!(map.order.len() <= 100);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn insert_purges_expired() {
        let start = Instant::now();
        let mut map = ExpiringMap::new(Duration::from_secs(1), 100);
        map.insert("old".into(), 0, start);
        map.insert("new".into(), 1, start + Duration::from_secs(2));
        assert_eq!(map.len(), 1);
    }
}
