//! The background task that deletes expired records (SPEC \[6\]).

use std::sync::Arc;
use std::time::Duration;

use super::{Expiry, Store};
use crate::metrics::Metrics;

/// Calls [`Store::delete_expired`] every `interval`, for ever: an error is
/// logged, counted in `store_errors_total`, and the next round tried; even
/// a panic inside the store ends only that round. The first round runs at
/// once, so records that expired while the proxy was down go early.
pub async fn sweep_forever(
    store: Arc<dyn Store>,
    expiry: Expiry,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    // `tokio::time::interval` panics on zero; a config should never ask
    // for it, but a sweeper must not die of it.
    let mut ticks = tokio::time::interval(interval.max(Duration::from_secs(1)));
    // After a slow round, wait a whole interval rather than catching up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match sweep_once(&store, expiry).await {
            Some(deleted) => metrics.sessions_swept.inc_by(deleted),
            None => metrics.store_errors.inc(),
        }
    }
}

/// One round: how many records it deleted, `None` if it failed.
async fn sweep_once(store: &Arc<dyn Store>, expiry: Expiry) -> Option<u64> {
    let now = crate::session::now();
    // A task of its own, so that a panic in the store surfaces as a
    // `JoinError` here instead of unwinding through the sweeper.
    let round = {
        let store = Arc::clone(store);
        tokio::spawn(async move { store.delete_expired(now, expiry).await })
    };
    let failure = match round.await {
        Ok(Ok(0)) => {
            log::debug!("sweep: no expired sessions");
            return Some(0);
        }
        Ok(Ok(count)) => {
            log::info!("sweep: deleted {count} expired sessions");
            return Some(count);
        }
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    log::warn!("sweep failed, will retry: {failure}");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Decide, Handle, Record, StoreError};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Fails its first sweep, panics in its second, counts the others.
    #[derive(Default)]
    struct Flaky {
        rounds: AtomicU64,
    }

    #[async_trait]
    impl Store for Flaky {
        async fn load(&self, _: &Handle) -> Result<Option<Record>, StoreError> {
            Ok(None)
        }
        async fn modify(&self, _: &Handle, _: Decide<'_>) -> Result<Option<Record>, StoreError> {
            Ok(None)
        }
        async fn delete(&self, _: &Handle) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
            Ok(Vec::new())
        }
        async fn delete_expired(&self, _: u64, _: Expiry) -> Result<u64, StoreError> {
            match self.rounds.fetch_add(1, Ordering::SeqCst) {
                0 => Err(StoreError::Unavailable("down".to_owned())),
                1 => panic!("a store bug"),
                _ => Ok(1),
            }
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_sweeper_survives_errors_and_panics() {
        let store = Arc::new(Flaky::default());
        let expiry = Expiry {
            timeout: 60,
            absolute: None,
        };
        let metrics = Arc::new(Metrics::new());
        let sweeper = tokio::spawn(sweep_forever(
            store.clone(),
            expiry,
            Duration::ZERO,
            metrics.clone(),
        ));
        // Rounds at 0 s, 1 s and 2 s (a zero interval is taken as 1 s).
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(!sweeper.is_finished());
        assert_eq!(store.rounds.load(Ordering::SeqCst), 3);
        assert_eq!(metrics.store_errors.get(), 2, "the error and the panic");
        assert_eq!(
            metrics.sessions_swept.get(),
            1,
            "the third round's one record"
        );
        sweeper.abort();
    }
}
