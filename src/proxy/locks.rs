//! `lock = true`: the requests of one session run one at a time, so a
//! read-modify-write in the app never loses an update.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::session::cookie::Handle;

/// One mutex per session that has a request in flight; entries go away
/// with their last holder, so the table is as large as the concurrency.
#[derive(Default)]
pub struct SessionLocks {
    held: Arc<DashMap<Handle, Arc<Mutex<()>>>>,
}

/// Held for the whole request; dropping it lets the next one in.
pub struct SessionLock {
    guard: Option<OwnedMutexGuard<()>>,
    handle: Handle,
    held: Arc<DashMap<Handle, Arc<Mutex<()>>>>,
}

impl SessionLocks {
    /// Waits at most `wait` for the session's turn; `None` when it does not come.
    pub async fn acquire(&self, handle: &Handle, wait: Duration) -> Option<SessionLock> {
        let mutex = self.held.entry(handle.clone()).or_default().clone();
        let guard = tokio::time::timeout(wait, mutex.lock_owned()).await.ok();
        let lock = SessionLock {
            guard,
            handle: handle.clone(),
            held: self.held.clone(),
        };
        // On timeout `lock` is dropped here and tidies the table as well.
        lock.guard.is_some().then_some(lock)
    }

    /// Sessions with a request holding or awaiting their lock.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the table's own reference left: nobody holds or awaits it.
        self.held
            .remove_if(&self.handle, |_, mutex| Arc::strong_count(mutex) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_request_waits_for_the_first() {
        let locks = SessionLocks::default();
        let handle = Handle::of_id("a");
        let first = locks.acquire(&handle, Duration::from_secs(1)).await;
        assert!(first.is_some());
        assert!(locks
            .acquire(&handle, Duration::from_millis(20))
            .await
            .is_none());
        drop(first);
        assert!(locks
            .acquire(&handle, Duration::from_millis(20))
            .await
            .is_some());
    }

    #[tokio::test]
    async fn other_sessions_do_not_wait() {
        let locks = SessionLocks::default();
        let _a = locks
            .acquire(&Handle::of_id("a"), Duration::from_secs(1))
            .await
            .unwrap();
        assert!(locks
            .acquire(&Handle::of_id("b"), Duration::from_millis(20))
            .await
            .is_some());
    }

    #[tokio::test]
    async fn the_table_empties_when_the_last_holder_leaves() {
        let locks = SessionLocks::default();
        let handle = Handle::of_id("a");
        let held = locks
            .acquire(&handle, Duration::from_secs(1))
            .await
            .unwrap();
        let timed_out = locks.acquire(&handle, Duration::from_millis(10)).await;
        assert!(timed_out.is_none());
        assert_eq!(locks.len(), 1);
        drop(held);
        assert!(locks.is_empty());
    }
}
