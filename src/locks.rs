//! One async mutex per session handle, for as long as someone holds or
//! awaits it: the requests of one session in turn (`lock = true`), and the
//! read-decide-write of a store that must not race itself.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::hashing::FirstWordHashing;
use crate::session::cookie::Handle;

type Table = Arc<DashMap<Handle, Arc<Mutex<()>>, FirstWordHashing>>;

/// The table holds only handles in use: an entry goes with its last
/// holder or waiter, a cancelled wait included.
#[derive(Default)]
pub struct HandleLocks {
    table: Table,
}

/// A handle's turn (or the wait for it). Dropping it lets the next one in.
pub struct HandleLock {
    guard: Option<OwnedMutexGuard<()>>,
    mutex: Option<Arc<Mutex<()>>>,
    handle: Handle,
    table: Table,
}

impl HandleLocks {
    /// Waits for `handle`'s turn, however long it takes.
    pub async fn lock(&self, handle: &Handle) -> HandleLock {
        let mut lock = self.entry(handle);
        // If this wait is cancelled, `lock` is dropped and tidies the table.
        if let Some(mutex) = lock.mutex.clone() {
            lock.guard = Some(mutex.lock_owned().await);
        }
        lock
    }

    /// `handle`'s turn if it is free now; `None` when someone holds it.
    pub fn try_lock(&self, handle: &Handle) -> Option<HandleLock> {
        let mut lock = self.entry(handle);
        // On failure `lock` is dropped, and leaves the holder's entry be.
        let guard = lock.mutex.clone()?.try_lock_owned().ok()?;
        lock.guard = Some(guard);
        Some(lock)
    }

    /// Waits at most `wait` for `handle`'s turn; `None` when it does not come.
    pub async fn lock_within(&self, handle: &Handle, wait: Duration) -> Option<HandleLock> {
        tokio::time::timeout(wait, self.lock(handle)).await.ok()
    }

    /// Handles held or awaited now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn entry(&self, handle: &Handle) -> HandleLock {
        // Cloned under the shard lock, like the count check in `drop`.
        let mutex = self.table.entry(handle.clone()).or_default().clone();
        HandleLock {
            guard: None,
            mutex: Some(mutex),
            handle: handle.clone(),
            table: self.table.clone(),
        }
    }
}

impl Drop for HandleLock {
    fn drop(&mut self) {
        drop(self.guard.take());
        drop(self.mutex.take());
        // Only the table's own reference left: nobody holds or awaits it.
        self.table
            .remove_if(&self.handle, |_, mutex| Arc::strong_count(mutex) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first() {
        let locks = HandleLocks::default();
        let handle = Handle::of_id("a");
        let first = locks.lock(&handle).await;
        assert!(locks
            .lock_within(&handle, Duration::from_millis(20))
            .await
            .is_none());
        drop(first);
        assert!(locks
            .lock_within(&handle, Duration::from_millis(20))
            .await
            .is_some());
    }

    #[tokio::test]
    async fn other_handles_do_not_wait() {
        let locks = HandleLocks::default();
        let _a = locks.lock(&Handle::of_id("a")).await;
        assert!(locks
            .lock_within(&Handle::of_id("b"), Duration::from_millis(20))
            .await
            .is_some());
    }

    #[tokio::test]
    async fn a_turn_is_taken_without_waiting_only_when_it_is_free() {
        let locks = HandleLocks::default();
        let handle = Handle::of_id("a");
        let held = locks.try_lock(&handle).expect("a free turn");
        assert!(locks.try_lock(&handle).is_none());
        assert_eq!(locks.len(), 1, "a failed try leaves the holder's entry");
        drop(held);
        assert!(locks.is_empty());
        assert!(locks.try_lock(&handle).is_some());
    }

    #[tokio::test]
    async fn the_table_empties_when_the_last_holder_or_waiter_leaves() {
        let locks = HandleLocks::default();
        let handle = Handle::of_id("a");
        let held = locks.lock(&handle).await;
        assert!(locks
            .lock_within(&handle, Duration::from_millis(10))
            .await
            .is_none());
        assert_eq!(locks.len(), 1);
        drop(held);
        assert!(locks.is_empty());
    }
}
