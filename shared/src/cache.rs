//! A bounded in-memory cache whose entries expire: verified tokens,
//! authorization verdicts, hot sessions.
//!
//! Every entry carries its own expiry (`expires`), so a cached verdict never
//! outlives the token it came from. Reads pass `now` in, so callers (and
//! tests) decide what time it is; an expired entry is never returned.
//!
//! **Bound and eviction policy.** At most `capacity` entries are held. When an
//! insert of a new key finds the cache full, room is made in this order:
//! 1. the oldest inserted entry, if it has expired (with the uniform TTLs the
//!    services use, the oldest entry is also the first to expire);
//! 2. every expired entry, in one sweep, but at most once per `capacity / 2`
//!    inserts, so the O(n) sweep costs O(1) amortized per insert;
//! 3. otherwise the oldest inserted live entry (FIFO), counted as an eviction.
//!
//! Insertion order is a queue of `(key, generation)`; re-inserting or removing
//! a key leaves its old queue slot behind as a stale marker that is skipped,
//! and the queue is compacted when it grows past twice the capacity. Expiry
//! during eviction is judged against the real clock ([`Instant::now`]).
//!
//! The lock is a plain [`Mutex`], held only for a map operation, never across
//! an `.await`. Hits, misses and evictions are counted; [`CacheMetrics`]
//! exports them as `rt_cache_hits_total{cache}`, `rt_cache_misses_total{cache}`
//! and `rt_cache_evictions_total{cache}`.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::MetricsRegistry;

/// Label `cache` (which cache a figure belongs to).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    pub cache: &'static str,
}

/// The cache counters of one service, registered once per registry; each
/// cache takes its own label with [`TtlCache::with_metrics`].
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub hits: Family<CacheLabel, Counter>,
    pub misses: Family<CacheLabel, Counter>,
    pub evictions: Family<CacheLabel, Counter>,
}

impl CacheMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self::default();
        registry.register(
            "rt_cache_hits",
            "Cache lookups that found a live entry",
            metrics.hits.clone(),
        );
        registry.register(
            "rt_cache_misses",
            "Cache lookups that found nothing or an expired entry",
            metrics.misses.clone(),
        );
        registry.register(
            "rt_cache_evictions",
            "Live cache entries evicted because the cache was full",
            metrics.evictions.clone(),
        );
        metrics
    }
}

struct Entry<V> {
    value: V,
    expires: Instant,
    generation: u64,
}

struct Inner<K, V> {
    map: HashMap<K, Entry<V>>,
    /// Keys in insertion order with the generation they were inserted at; a
    /// slot whose generation no longer matches the map's entry is stale.
    order: VecDeque<(K, u64)>,
    next_generation: u64,
    /// Inserts of new keys since the last sweep of expired entries.
    since_sweep: usize,
}

/// A bounded map from `K` to `V` whose entries expire; see the module docs
/// for the eviction policy.
pub struct TtlCache<K, V> {
    inner: Mutex<Inner<K, V>>,
    capacity: usize,
    hits: Counter,
    misses: Counter,
    evictions: Counter,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// A cache holding at most `capacity` entries; 0 disables it (inserts are
    /// ignored, every lookup misses).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                next_generation: 0,
                since_sweep: 0,
            }),
            capacity,
            hits: Counter::default(),
            misses: Counter::default(),
            evictions: Counter::default(),
        }
    }

    /// Like [`TtlCache::new`], counting into `metrics` under label `cache = name`.
    pub fn with_metrics(capacity: usize, metrics: &CacheMetrics, name: &'static str) -> Self {
        let label = CacheLabel { cache: name };
        let mut cache = Self::new(capacity);
        // A Counter is a shared atomic: the clones count into the family.
        cache.hits = metrics.hits.get_or_create(&label).clone();
        cache.misses = metrics.misses.get_or_create(&label).clone();
        cache.evictions = metrics.evictions.get_or_create(&label).clone();
        cache
    }

    /// The value under `key` if it has not expired at `now`. An expired entry
    /// is removed and counts as a miss.
    pub fn get<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut inner = self.lock();
        let live = match inner.map.get(key) {
            Some(entry) if entry.expires > now => Some(entry.value.clone()),
            Some(_) => {
                inner.map.remove(key);
                None
            }
            None => None,
        };
        drop(inner);
        match live {
            Some(_) => self.hits.inc(),
            None => self.misses.inc(),
        };
        live
    }

    /// Stores `value` under `key` until `expires` (replacing any previous
    /// value), making room first if the cache is full.
    pub fn insert(&self, key: K, value: V, expires: Instant) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        let generation = inner.next_generation;
        inner.next_generation += 1;
        if let Some(entry) = inner.map.get_mut(&key) {
            *entry = Entry {
                value,
                expires,
                generation,
            };
        } else {
            if inner.map.len() >= self.capacity {
                let evicted = inner.make_room(self.capacity, Instant::now());
                if evicted > 0 {
                    self.evictions.inc_by(evicted);
                }
            }
            inner.since_sweep += 1;
            inner.map.insert(
                key.clone(),
                Entry {
                    value,
                    expires,
                    generation,
                },
            );
        }
        inner.order.push_back((key, generation));
        // Stale slots pile up when keys are re-inserted or removed: compact
        // once they outnumber the live ones (amortized O(1) per insert).
        if inner.order.len() > 2 * self.capacity + 16 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(key, generation)| {
                map.get(key)
                    .is_some_and(|entry| entry.generation == *generation)
            });
        }
    }

    /// Removes `key`, returning its value if it was present (expired or not).
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().map.remove(key).map(|entry| entry.value)
    }

    /// Keeps only the entries for which `keep` returns true (e.g. drop every
    /// verdict of a revoked user).
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.lock().map.retain(|key, entry| keep(key, &entry.value));
    }

    /// Removes every entry.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.order.clear();
    }

    /// Entries held, including expired ones not yet evicted.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Lookups that found a live entry.
    pub fn hits(&self) -> u64 {
        self.hits.get()
    }

    /// Lookups that found nothing, or an expired entry.
    pub fn misses(&self) -> u64 {
        self.misses.get()
    }

    /// Live entries evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K, V>> {
        // A panic under the lock cannot leave the map half-updated in a way
        // that matters (at worst a stale order slot), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Hash + Eq + Clone, V> Inner<K, V> {
    /// Evicts until there is room for one more entry; returns how many live
    /// (unexpired) entries had to go.
    fn make_room(&mut self, capacity: usize, now: Instant) -> u64 {
        let mut evicted_live = 0;
        while self.map.len() >= capacity {
            let Some((key, generation)) = self.order.pop_front() else {
                // Cannot happen (every entry has a slot), but never loop forever.
                break;
            };
            let expired = match self.map.get(&key) {
                Some(entry) if entry.generation == generation => entry.expires <= now,
                // A stale slot: the key was re-inserted later or removed.
                _ => continue,
            };
            if expired {
                self.map.remove(&key);
                continue;
            }
            if self.since_sweep >= (capacity / 2).max(1) {
                // Before evicting a live entry, drop whatever else has expired.
                self.since_sweep = 0;
                self.order.push_front((key, generation));
                self.map.retain(|_, entry| entry.expires > now);
                continue;
            }
            self.map.remove(&key);
            evicted_live += 1;
        }
        evicted_live
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn entries_expire() {
        let cache = TtlCache::new(10);
        let now = Instant::now();
        cache.insert("a".to_string(), 1, now + Duration::from_secs(5));
        assert_eq!(cache.get("a", now), Some(1));
        assert_eq!(cache.get("a", now + Duration::from_secs(4)), Some(1));
        // At the expiry instant the entry is gone, and it was removed.
        assert_eq!(cache.get("a", now + Duration::from_secs(5)), None);
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.get("missing", now), None);
        assert_eq!((cache.hits(), cache.misses()), (2, 2));
    }

    #[test]
    fn reinsert_replaces_value_and_expiry() {
        let cache = TtlCache::new(2);
        let now = Instant::now();
        cache.insert("a", 1, now + Duration::from_secs(1));
        cache.insert("a", 2, now + Duration::from_secs(10));
        assert_eq!(cache.get("a", now + Duration::from_secs(5)), Some(2));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.remove("a"), Some(2));
        assert!(cache.is_empty());
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let cache = TtlCache::new(3);
        for i in 0..100 {
            cache.insert(i, i, later(60));
            assert!(cache.len() <= 3);
        }
        let now = Instant::now();
        // FIFO: the newest three survive.
        assert_eq!(cache.get(&99, now), Some(99));
        assert_eq!(cache.get(&97, now), Some(97));
        assert_eq!(cache.get(&96, now), None);
        assert_eq!(cache.evictions(), 97);
        // Re-inserting the same keys over and over keeps the order queue bounded.
        for _ in 0..1_000 {
            cache.insert(99, 0, later(60));
        }
        assert!(cache.lock().order.len() <= 2 * 3 + 16);
    }

    #[test]
    fn eviction_prefers_expired_entries() {
        let cache = TtlCache::new(3);
        cache.insert("old-live", 1, later(60));
        // Expires at once: the next operation finds it expired.
        cache.insert("expired", 2, Instant::now());
        cache.insert("live", 3, later(60));
        cache.insert("new", 4, later(60));
        let now = Instant::now();
        // The expired entry made room, not the oldest live one.
        assert_eq!(cache.get("old-live", now), Some(1));
        assert_eq!(cache.get("live", now), Some(3));
        assert_eq!(cache.get("new", now), Some(4));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.evictions(), 0);
    }

    #[test]
    fn zero_capacity_disables_the_cache() {
        let cache = TtlCache::new(0);
        cache.insert(1, 1, later(60));
        assert_eq!(cache.get(&1, Instant::now()), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn retain_and_metrics() {
        let registry = MetricsRegistry::default();
        let metrics = CacheMetrics::new(&registry);
        let cache = TtlCache::with_metrics(10, &metrics, "verdicts");
        cache.insert(("alice", 1), true, later(60));
        cache.insert(("bob", 1), true, later(60));
        cache.retain(|(user, _), _| *user != "alice");
        let now = Instant::now();
        assert_eq!(cache.get(&("alice", 1), now), None);
        assert_eq!(cache.get(&("bob", 1), now), Some(true));
        let text = registry.encode();
        assert!(
            text.contains("rt_cache_hits_total{cache=\"verdicts\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rt_cache_misses_total{cache=\"verdicts\"} 1"),
            "{text}"
        );
        cache.clear();
        assert!(cache.is_empty());
    }
}
