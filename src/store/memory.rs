//! An in-process store, bounded by `max_entries`; lost on restart.
//!
//! Records live in a [`DashMap`], so a `modify` runs its decision under the
//! lock of one shard and requests of different sessions rarely meet. When
//! the store is full, inserting a new session evicts an old one: among the
//! [`EVICTION_SAMPLE`] longest-stored sessions, the one least recently
//! accessed goes; the others get a second chance at the back of the line
//! (the "clock" approximation of least-recently-used).
//!
//! Both the map and the eviction line hold a session by the 32 bytes of
//! its handle, not by its 64 hex digits: at 10^6 sessions every byte kept
//! per session is a megabyte.
//!
//! ```
//! use session_proxy::store::memory::MemoryStore;
//! let store = MemoryStore::new(100_000);
//! assert_eq!(store.evictions(), 0);
//! ```

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use super::{decide_on, Change, Decide, Expiry, Handle, Record, Store, StoreError};
use crate::hashing::FirstWordHashing;

/// How many of the longest-stored sessions an eviction compares.
pub const EVICTION_SAMPLE: usize = 16;

/// How often an insert retries when the store is full and nothing can be
/// evicted yet (other inserts hold every free slot but have not queued
/// their handle). Each retry yields to the runtime first.
const FULL_RETRIES: usize = 64;

/// A handle as the store keeps it: [`Handle::to_bytes`].
type Key = [u8; 32];

/// Hashed by its first eight bytes ([`crate::hashing`]).
type Records = DashMap<Key, Record, FirstWordHashing>;

pub struct MemoryStore {
    records: Records,
    /// Handles in the order they were first stored: the eviction
    /// candidates, oldest first. It may also hold handles deleted since
    /// (skipped when met, dropped by `compact`), and it is locked only
    /// while no shard of `records` is write-locked by the same thread.
    arrivals: Mutex<VecDeque<Key>>,
    /// Slots taken in `records`: reserved before an insert, released after
    /// a removal, so `records` never holds more than `max_entries`.
    /// (`DashMap::len` would read-lock every shard, one of which an insert
    /// is holding.)
    taken: AtomicUsize,
    max_entries: usize,
    evictions: AtomicU64,
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> MemoryStore {
        MemoryStore {
            records: Records::default(),
            arrivals: Mutex::new(VecDeque::new()),
            taken: AtomicUsize::new(0),
            max_entries,
            evictions: AtomicU64::new(0),
        }
    }

    /// How many sessions were evicted to make room since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// How many sessions are stored, counting one whose insert or removal
    /// is under way: never more than `max_entries`. (It reads one counter;
    /// `DashMap::len` would lock every shard and, adding them up one by
    /// one while others change, can overcount.)
    pub fn len(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a slot for a new record, if one is free.
    fn reserve(&self) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < self.max_entries).then_some(taken + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }

    /// The eviction line. A panic elsewhere while it was locked leaves it
    /// usable (it is only a list of candidates), so poisoning is ignored.
    fn arrivals(&self) -> MutexGuard<'_, VecDeque<Key>> {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a newly stored handle as an eviction candidate. Must not be
    /// called while holding a shard of `records` (lock order: line, shard).
    fn arrived(&self, key: Key) {
        let mut arrivals = self.arrivals();
        arrivals.push_back(key);
        if arrivals.len() > 2 * self.taken.load(Ordering::Acquire) + 1024 {
            self.compact(&mut arrivals);
        }
    }

    /// Drops deleted and duplicate handles from the eviction line, so it
    /// stays within a small multiple of the stored sessions.
    fn compact(&self, arrivals: &mut VecDeque<Key>) {
        let mut seen = HashSet::with_capacity(arrivals.len());
        arrivals.retain(|key| self.records.contains_key(key) && seen.insert(*key));
    }

    /// Evicts the least recently accessed of the longest-stored sessions;
    /// `false` if there was none to evict.
    fn evict_one(&self) -> bool {
        let mut arrivals = self.arrivals();
        let mut candidates: Vec<(Key, (u64, u64))> = Vec::with_capacity(EVICTION_SAMPLE);
        while candidates.len() < EVICTION_SAMPLE {
            let Some(key) = arrivals.pop_front() else {
                break;
            };
            // Deleted handles leave the line here; duplicates (a handle
            // deleted and stored again) are compared once.
            let seen = self
                .records
                .get(&key)
                .map(|record| (record.atime, record.ver));
            if let Some(seen) = seen {
                if !candidates.iter().any(|(other, _)| *other == key) {
                    candidates.push((key, seen));
                }
            }
        }
        let oldest = candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, (atime, _)))| *atime)
            .map(|(index, _)| index);
        let Some(oldest) = oldest else {
            return false;
        };
        let (victim, seen) = candidates.swap_remove(oldest);
        arrivals.extend(candidates.into_iter().map(|(key, _)| key));
        drop(arrivals);

        if !self.evict_unless_used(victim, seen) && self.records.contains_key(&victim) {
            self.arrived(victim);
        }
        true
    }

    /// Evicts `victim` only if it was neither accessed nor written since
    /// it was `seen` as (`atime`, `ver`): `atime` counts whole seconds,
    /// `ver` catches a write within the same one. A session in use is not
    /// evicted; its caller puts it at the back of the line instead.
    fn evict_unless_used(&self, victim: Key, seen: (u64, u64)) -> bool {
        let evicted = self
            .records
            .remove_if(&victim, |_, record| (record.atime, record.ver) == seen)
            .is_some();
        if evicted {
            self.release();
            self.evictions.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "memory store full: evicted session {}",
                Handle::from_bytes(&victim).short()
            );
        }
        evicted
    }
}

/// What one attempt of `modify` came to.
enum Attempt {
    Done(Option<Record>),
    /// A new record was stored: its handle joins the eviction line.
    Inserted(Record),
    /// A new record needs a slot and the store is full.
    Full,
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
        // A clone shares the record's data and IP: no copy, no allocation.
        Ok(self
            .records
            .get(&handle.to_bytes())
            .map(|record| record.clone()))
    }

    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let key = handle.to_bytes();
        for _ in 0..FULL_RETRIES {
            // The entry holds the shard's write lock: the decision sees the
            // latest record and nobody changes it before we store ours.
            // Nothing in this block awaits.
            let attempt = match self.records.entry(key) {
                Entry::Occupied(mut entry) => match decide_on(decide, Some(entry.get()))? {
                    Change::Put(record) => {
                        entry.insert(record.clone());
                        Attempt::Done(Some(record))
                    }
                    Change::Delete => {
                        entry.remove();
                        self.release();
                        Attempt::Done(None)
                    }
                    Change::Keep => Attempt::Done(Some(entry.get().clone())),
                },
                Entry::Vacant(entry) => match decide(None).map_err(StoreError::Rejected)? {
                    Change::Put(record) if self.reserve() => {
                        entry.insert(record.clone());
                        Attempt::Inserted(record)
                    }
                    Change::Put(_) => Attempt::Full,
                    Change::Delete | Change::Keep => Attempt::Done(None),
                },
            };
            match attempt {
                Attempt::Done(stored) => return Ok(stored),
                Attempt::Inserted(record) => {
                    self.arrived(key);
                    return Ok(Some(record));
                }
                // The shard is unlocked again: make room, then decide anew
                // (the record may have been stored meanwhile).
                Attempt::Full => {
                    if !self.evict_one() {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "memory store is full ({} sessions) and none could be evicted",
            self.max_entries
        )))
    }

    async fn touch(&self, handle: &Handle, atime: u64) -> Result<bool, StoreError> {
        // In place: no clone, no decision.
        let Some(mut record) = self.records.get_mut(&handle.to_bytes()) else {
            return Ok(false);
        };
        record.atime = record.atime.max(atime);
        Ok(true)
    }

    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
        let removed = self.records.remove(&handle.to_bytes()).is_some();
        if removed {
            self.release();
        }
        Ok(removed)
    }

    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
        Ok(self
            .records
            .iter()
            .map(|entry| (Handle::from_bytes(entry.key()), entry.value().clone()))
            .collect())
    }

    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
        // Collect first (read locks), then remove one by one, checking
        // again under the write lock: a session refreshed in between stays.
        let expired: Vec<Key> = self
            .records
            .iter()
            .filter(|entry| expiry.is_expired(entry.value(), now))
            .map(|entry| *entry.key())
            .collect();
        let mut removed = 0;
        for key in expired {
            if self
                .records
                .remove_if(&key, |_, record| expiry.is_expired(record, now))
                .is_some()
            {
                self.release();
                removed += 1;
            }
        }
        if removed > 0 {
            let mut arrivals = self.arrivals();
            if arrivals.len() > 2 * self.taken.load(Ordering::Acquire) + 1024 {
                self.compact(&mut arrivals);
            }
        }
        Ok(removed)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(n: usize) -> Handle {
        Handle::of_id(&format!("memory-unit-{n}"))
    }

    fn record(atime: u64) -> Record {
        Record {
            data: Default::default(),
            created: atime,
            atime,
            ip: "127.0.0.1".into(),
            ver: 1,
        }
    }

    async fn put(store: &MemoryStore, handle: &Handle, atime: u64) {
        let decide = move |_: Option<&Record>| Ok(Change::Put(record(atime)));
        store.modify(handle, &decide).await.unwrap();
    }

    #[tokio::test]
    async fn a_session_written_since_it_was_picked_for_eviction_stays() {
        let store = MemoryStore::new(10);
        let picked = handle(1);
        put(&store, &picked, 7).await;
        let seen = (7, 1);
        // A write in the same second: the same atime, a newer version.
        let decide = |_: Option<&Record>| {
            Ok(Change::Put(Record {
                ver: 2,
                ..record(7)
            }))
        };
        store.modify(&picked, &decide).await.unwrap();
        assert!(!store.evict_unless_used(picked.to_bytes(), seen));
        assert!(store.load(&picked).await.unwrap().is_some());
        assert!(store.evict_unless_used(picked.to_bytes(), (7, 2)));
        assert!(store.load(&picked).await.unwrap().is_none());
        assert_eq!(store.evictions(), 1);
    }

    #[tokio::test]
    async fn the_eviction_line_is_compacted_after_churn() {
        let store = MemoryStore::new(10);
        for round in 0..5_000 {
            let handle = handle(round);
            put(&store, &handle, 1).await;
            store.delete(&handle).await.unwrap();
        }
        assert!(store.arrivals().len() <= 1024 + 1);
        assert_eq!(store.taken.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_store_of_zero_entries_refuses_inserts_without_hanging() {
        let store = MemoryStore::new(0);
        let decide = |_: Option<&Record>| Ok(Change::Put(record(1)));
        let result = store.modify(&handle(1), &decide).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn slots_are_released_by_every_kind_of_removal() {
        let store = MemoryStore::new(3);
        put(&store, &handle(1), 1).await;
        put(&store, &handle(2), 1).await;
        put(&store, &handle(3), 100).await;
        store.delete(&handle(1)).await.unwrap();
        let delete = |_: Option<&Record>| Ok(Change::Delete);
        store.modify(&handle(2), &delete).await.unwrap();
        let expiry = Expiry {
            timeout: 10,
            absolute: None,
        };
        assert_eq!(store.delete_expired(200, expiry).await.unwrap(), 1);
        assert_eq!(store.taken.load(Ordering::Acquire), 0);
        for n in 10..13 {
            put(&store, &handle(n), 1).await;
        }
        assert_eq!(store.evictions(), 0);
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_accessed_not_the_first_stored() {
        let store = MemoryStore::new(2);
        put(&store, &handle(1), 1).await;
        put(&store, &handle(2), 5).await;
        store.touch(&handle(1), 9).await.unwrap();
        assert!(store.evict_one());
        assert!(store.records.contains_key(&handle(1).to_bytes()));
        assert!(!store.records.contains_key(&handle(2).to_bytes()));
    }
}
