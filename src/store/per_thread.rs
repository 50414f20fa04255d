//! One connection (or pool) per thread that uses the store.
//!
//! A Redis or PostgreSQL connection is driven by a task on the runtime that
//! opened it. Shared by every proxy thread, each command would hop from the
//! request's thread to the driver's and back: two thread wake-ups per round
//! trip, which cost more CPU than the rest of the request (BENCHMARKS.md,
//! "Where the time goes"). Opened by the thread that uses it, the driver runs on
//! that thread's runtime, next to the requests it serves.
//!
//! Correctness never depends on which thread's value a caller gets: a
//! value is `Send + Sync` and works from any thread, a task that moved
//! between threads merely misses the saving.

use std::future::Future;
use std::sync::Arc;
use std::thread::ThreadId;

use dashmap::DashMap;
use tokio::sync::OnceCell;

use crate::hashing::FirstWordHashing;

pub struct PerThread<T> {
    /// Looked up on every command: thread ids are this process's own.
    values: DashMap<ThreadId, Arc<OnceCell<T>>, FirstWordHashing>,
}

impl<T> Default for PerThread<T> {
    fn default() -> Self {
        PerThread {
            values: DashMap::default(),
        }
    }
}

impl<T: Clone> PerThread<T> {
    /// This thread's value, opened by `open` on first use. A failed open
    /// is tried again by the next caller.
    pub async fn get_or_open<E, F, Fut>(&self, open: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let thread = std::thread::current().id();
        let cell = match self.values.get(&thread) {
            Some(cell) => match cell.get() {
                Some(value) => return Ok(value.clone()),
                None => Arc::clone(&cell),
            },
            None => Arc::clone(&self.values.entry(thread).or_default()),
        };
        // Concurrent first uses on one thread open once.
        cell.get_or_try_init(open).await.cloned()
    }

    /// Forgets the calling thread's value (found broken): its next use
    /// opens a new one. Holders of a clone keep theirs.
    pub fn forget(&self) {
        self.values.remove(&std::thread::current().id());
    }

    /// How many threads have a value (or are opening one).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.values.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_thread_opens_once_and_retries_after_a_failure() {
        let values = PerThread::<usize>::default();
        let opened = AtomicUsize::new(0);
        let failed: Result<usize, &str> = values.get_or_open(|| async { Err("down") }).await;
        assert!(failed.is_err());
        for _ in 0..3 {
            let value = values
                .get_or_open(|| async { Ok::<_, &str>(opened.fetch_add(1, Ordering::Relaxed)) })
                .await
                .unwrap();
            assert_eq!(value, 0);
        }
        assert_eq!(opened.load(Ordering::Relaxed), 1);
        assert_eq!(values.len(), 1);
    }

    #[test]
    fn each_thread_gets_its_own_value() {
        let values = Arc::new(PerThread::<ThreadId>::default());
        let seen: Vec<ThreadId> = (0..3)
            .map(|_| {
                let values = Arc::clone(&values);
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    runtime.block_on(
                        values.get_or_open(|| async { Ok::<_, ()>(std::thread::current().id()) }),
                    )
                })
            })
            .map(|thread| thread.join().unwrap().unwrap())
            .collect();
        assert_eq!(values.len(), 3);
        assert!(seen[0] != seen[1] && seen[1] != seen[2] && seen[0] != seen[2]);
    }
}
