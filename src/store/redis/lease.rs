//! The cross-instance lease of a session (`lock = true`): a key taken
//! with `SET NX PX`, refreshed while held, released by a script that
//! deletes it only while it is still ours.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::connection::Connection;
use super::scripts::Scripts;
use super::{bounded, RedisStore};
use crate::store::{GiveUp, Handle, StoreError};

impl RedisStore {
    /// Takes the cross-instance lease of `handle`, waiting at most `wait`
    /// for another holder: `SET prefix+lock:handle TOKEN NX PX lease_ttl`
    /// with a random token, refreshed every third of `lease_ttl` while
    /// held. A crashed holder's lease expires within `lease_ttl`. `give_up`
    /// ends the wait between two tries, never during one.
    pub async fn acquire_lease(
        &self,
        handle: &Handle,
        wait: Duration,
        lease_ttl: Duration,
        give_up: &GiveUp,
    ) -> Result<RedisLease, StoreError> {
        let key = format!("{}lock:{}", self.key_prefix, handle);
        let token = format!("{:032x}", rand::random::<u128>());
        let ttl_ms = u64::try_from(lease_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        let command = &redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .to_owned();
        let expires = loop {
            // The key's TTL runs from no earlier than this.
            let sent = Instant::now();
            // Safe to make again: a lease taken by a first try whose answer
            // was lost only holds this loop up until it expires.
            let answer: Value = self
                .run("lease", |mut connection| async move {
                    command.query_async(&mut connection).await
                })
                .await?;
            if matches!(answer, Value::Okay) {
                break sent + lease_ttl;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(StoreError::Busy("redis: lease wait timed out".into()));
            }
            tokio::select! {
                () = tokio::time::sleep(pause.min(deadline - now)) => {}
                () = give_up.given_up() => {
                    return Err(StoreError::Busy("redis: lease wait given up".into()))
                }
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        let connection = self.connection().await?;
        let lost = Arc::new(AtomicBool::new(false));
        let expires = Arc::new(Mutex::new(expires));
        let refresher = tokio::spawn(refresh_lease(
            connection.clone(),
            Arc::clone(&self.scripts),
            key.clone(),
            token.clone(),
            lease_ttl,
            self.timeout,
            (Arc::clone(&lost), Arc::clone(&expires)),
        ));
        Ok(RedisLease {
            connection,
            scripts: Arc::clone(&self.scripts),
            key,
            token,
            timeout: self.timeout,
            lost,
            expires,
            refresher: Some(refresher),
        })
    }
}

/// Extends the lease every third of its TTL for as long as it is held,
/// moving its known expiry on with each refresh that succeeds; stops,
/// marking it lost, when the key no longer holds our token.
async fn refresh_lease(
    connection: Connection,
    scripts: Arc<Scripts>,
    key: String,
    token: String,
    ttl: Duration,
    timeout: Duration,
    (lost, expires): (Arc<AtomicBool>, Arc<Mutex<Instant>>),
) {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    loop {
        tokio::time::sleep(ttl / 3).await;
        let mut connection = connection.clone();
        let sent = Instant::now();
        let call = scripts.lease_refresh.call(&key, |command| {
            command.arg(&token).arg(ttl_ms);
        });
        let refresh = call.invoke::<i64>(&mut connection);
        match bounded(timeout, "lease refresh", refresh).await {
            Ok(1) => *expires.lock().unwrap_or_else(|e| e.into_inner()) = sent + ttl,
            Ok(_) => {
                lost.store(true, Ordering::Relaxed);
                return;
            }
            // Try again at the next tick; the lease outlives one failure.
            Err(error) => log::warn!("{error}"),
        }
    }
}

/// A held lease (see [`RedisStore::acquire_lease`]). Dropping it releases
/// it in the background; [`RedisLease::release`] waits for that.
pub struct RedisLease {
    connection: Connection,
    scripts: Arc<Scripts>,
    key: String,
    token: String,
    timeout: Duration,
    lost: Arc<AtomicBool>,
    /// When the key expires at the latest, as far as the refreshes that
    /// succeeded tell: past it, another proxy may hold the lease.
    expires: Arc<Mutex<Instant>>,
    refresher: Option<JoinHandle<()>>,
}

impl RedisLease {
    /// False once the lease was found taken over, and once its TTL has
    /// run out since the last refresh that succeeded: while the refreshes
    /// fail (Redis out of reach), the key expires and another proxy may
    /// take it well before a refresh can tell.
    pub fn is_held(&self) -> bool {
        let expires = *self.expires.lock().unwrap_or_else(|e| e.into_inner());
        !self.lost.load(Ordering::Relaxed) && Instant::now() < expires
    }

    /// Deletes the lease if it is still ours.
    pub async fn release(mut self) -> Result<(), StoreError> {
        if let Some(refresher) = self.refresher.take() {
            refresher.abort();
        }
        release_lease(
            self.connection.clone(),
            Arc::clone(&self.scripts),
            self.key.clone(),
            self.token.clone(),
            self.timeout,
        )
        .await
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        let Some(refresher) = self.refresher.take() else {
            return;
        };
        refresher.abort();
        // Outside a runtime the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let release = release_lease(
                self.connection.clone(),
                Arc::clone(&self.scripts),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.token),
                self.timeout,
            );
            runtime.spawn(async move {
                if let Err(error) = release.await {
                    log::warn!("{error}");
                }
            });
        }
    }
}

async fn release_lease(
    mut connection: Connection,
    scripts: Arc<Scripts>,
    key: String,
    token: String,
    timeout: Duration,
) -> Result<(), StoreError> {
    let call = scripts.lease_release.call(&key, |command| {
        command.arg(&token);
    });
    let release = call.invoke::<i64>(&mut connection);
    bounded(timeout, "lease release", release).await.map(|_| ())
}

#[async_trait]
impl crate::store::Lease for RedisLease {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        RedisLease::release(*self).await
    }

    fn is_held(&self) -> bool {
        RedisLease::is_held(self)
    }
}
