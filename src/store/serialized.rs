//! A store whose changes of one session take turns within this process.
//!
//! The shared stores keep other processes out on their own (Redis by
//! compare-and-set, PostgreSQL by a row lock), but many requests of this
//! process writing one session at once would make them retry or queue on
//! the server, a round trip each: a burst of parallel writes to one
//! session (a page firing a dozen XHRs) could then run out of retries.
//! Queueing those writers here first costs nothing when there is no
//! contention and turns contention into an orderly wait.
//!
//! The wait for a turn is bounded by the store's timeout too. Each writer
//! ahead holds its turn for at most that long; unbounded, the k-th of k
//! writers to a server that stopped answering would get its 503 after k
//! timeouts. Bounded, every writer has its answer within two.

use std::time::Duration;

use async_trait::async_trait;

use super::{Decide, Expiry, GiveUp, Handle, Lease, Record, Store, StoreError};
use crate::locks::{HandleLock, HandleLocks};

pub struct Serialized<S> {
    inner: S,
    locks: HandleLocks,
    /// The longest wait for a turn: the store's operation timeout.
    wait: Duration,
}

impl<S> Serialized<S> {
    pub fn new(inner: S, wait: Duration) -> Serialized<S> {
        Serialized {
            inner,
            locks: HandleLocks::default(),
            wait,
        }
    }

    async fn turn(&self, handle: &Handle) -> Result<HandleLock, StoreError> {
        self.locks
            .lock_within(handle, self.wait)
            .await
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "session {}: earlier writes of it did not finish within {:?}",
                    handle.short(),
                    self.wait
                ))
            })
    }
}

#[async_trait]
impl<S: Store> Store for Serialized<S> {
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
        self.inner.load(handle).await
    }

    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let _turn = self.turn(handle).await?;
        self.inner.modify(handle, decide).await
    }

    async fn modify_seen(
        &self,
        handle: &Handle,
        seen: &Record,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let _turn = self.turn(handle).await?;
        self.inner.modify_seen(handle, seen, decide).await
    }

    async fn touch(&self, handle: &Handle, atime: u64) -> Result<bool, StoreError> {
        self.inner.touch(handle, atime).await
    }

    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
        self.inner.delete(handle).await
    }

    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
        self.inner.list().await
    }

    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
        self.inner.delete_expired(now, expiry).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }

    async fn acquire_lease(
        &self,
        handle: &Handle,
        wait: Duration,
        ttl: Duration,
        give_up: &GiveUp,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        self.inner.acquire_lease(handle, wait, ttl, give_up).await
    }
}
