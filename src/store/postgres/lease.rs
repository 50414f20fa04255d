//! The `postgres` store's lease of a session across proxies: a
//! session-level advisory lock. A process holds all its leases on one
//! connection kept for them, and the server frees them when it closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::time::{timeout_at, Instant};
use tokio_postgres::types::ToSql;

use super::errors::{timed_out, unavailable};
use super::PostgresStore;
use crate::locks::HandleLock;
use crate::store::{GiveUp, Handle, Lease, StoreError};

impl PostgresStore {
    /// Takes the cross-instance lease of `handle`, waiting at most `wait`
    /// for another holder: a session-level advisory lock, taken with
    /// `pg_try_advisory_lock` (polled, as the Redis lease is) on the one
    /// connection that holds this process's leases. The server releases it
    /// when that connection drops, so a crashed proxy's leases go with it
    /// (its TCP keep-alives are set to notice a vanished host within ~10 s).
    /// `_lease_ttl` is there for the common lease API: a lock tied to a
    /// connection needs no expiry. `give_up` ends the wait between two
    /// tries, never during one: a try cut short may hold the lock unseen,
    /// for as long as the connection lives.
    pub async fn acquire_lease(
        &self,
        handle: &Handle,
        wait: Duration,
        _lease_ttl: Duration,
        give_up: &GiveUp,
    ) -> Result<PostgresLease, StoreError> {
        let deadline = Instant::now() + wait;
        let busy = || StoreError::Busy("postgres: lease wait timed out".into());
        let given_up = || StoreError::Busy("postgres: lease wait given up".into());
        let turn = tokio::select! {
            turn = timeout_at(deadline, self.lease_turns.lock(handle)) => {
                turn.map_err(|_elapsed| busy())?
            }
            () = give_up.given_up() => return Err(given_up()),
        };
        let key = self.lease_key(handle);
        let mut pause = Duration::from_millis(2);
        loop {
            let connection = self.lease_connection().await?;
            let params: [&(dyn ToSql + Sync); 2] = [&key.0, &key.1];
            let attempt = connection.client.query_one(&connection.try_lock, &params);
            let locked = match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(row)) => row
                    .try_get::<_, bool>(0)
                    .map_err(|error| unavailable(&error)),
                Ok(Err(error)) => Err(unavailable(&error)),
                Err(_elapsed) => Err(timed_out()),
            };
            match locked {
                Ok(true) => {
                    return Ok(PostgresLease {
                        connection: Some(connection),
                        key,
                        timeout: self.timeout,
                        _turn: turn,
                    })
                }
                Ok(false) => {}
                Err(error) => {
                    // The lock may have been taken all the same.
                    connection.poison();
                    return Err(error);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(busy());
            }
            tokio::select! {
                () = tokio::time::sleep(pause.min(deadline - now)) => {}
                () = give_up.given_up() => return Err(given_up()),
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The connection that holds this process's leases, opened if there is
    /// none usable.
    async fn lease_connection(&self) -> Result<Arc<LeaseConnection>, StoreError> {
        // Bounded, as `Serialized` bounds a turn: with the server gone, the
        // k-th of k callers must not wait out k attempts to open it.
        let mut slot = tokio::time::timeout(self.timeout, self.leases.lock())
            .await
            .map_err(|_elapsed| timed_out())?;
        if let Some(connection) = slot.as_ref().filter(|connection| connection.usable()) {
            return Ok(Arc::clone(connection));
        }
        let open = async {
            let (client, connection) = self.lease_config.connect(self.lease_tls.clone()).await?;
            // Given up (timed out) from here on, the connection is closed.
            let task = ConnectionTask(tokio::spawn(async move {
                let _ = connection.await;
            }));
            // The keep-alives make the server drop the locks of a host that
            // vanished without a FIN.
            client
                .batch_execute(
                    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
                     SET tcp_keepalives_count = 3",
                )
                .await?;
            let try_lock = client
                .prepare("SELECT pg_try_advisory_lock($1, $2)")
                .await?;
            let unlock = client.prepare("SELECT pg_advisory_unlock($1, $2)").await?;
            Ok::<_, tokio_postgres::Error>(LeaseConnection {
                client,
                try_lock,
                unlock,
                poisoned: AtomicBool::new(false),
                slot: Arc::downgrade(&self.leases),
                _task: task,
            })
        };
        let connection = match tokio::time::timeout(self.timeout, open).await {
            Ok(Ok(connection)) => Arc::new(connection),
            Ok(Err(error)) => return Err(unavailable(&error)),
            Err(_elapsed) => return Err(timed_out()),
        };
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// The advisory lock keys of `handle`'s lease: this table's class and
    /// 32 bits of the handle. A collision only makes two sessions share a
    /// lease now and then.
    fn lease_key(&self, handle: &Handle) -> (i32, i32) {
        let objid = u32::from_str_radix(&handle.as_str()[..8], 16).unwrap_or(0);
        (self.lease_class, i32::from_ne_bytes(objid.to_ne_bytes()))
    }
}

/// Where a process keeps the connection for its new leases.
pub(super) type LeaseSlot = tokio::sync::Mutex<Option<Arc<LeaseConnection>>>;

/// The connection that holds a process's leases, with its statements.
/// Dropping its last holder (the slot, the leases on it) closes it, and
/// the server frees its locks.
pub(super) struct LeaseConnection {
    client: tokio_postgres::Client,
    try_lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    /// A lock or unlock on it failed: whether the lock is held is unknown,
    /// so new leases go to a new connection, and this one closes (freeing
    /// whatever it holds) once the leases still on it are released.
    poisoned: AtomicBool,
    /// The slot it was opened for, which it leaves when poisoned.
    slot: Weak<LeaseSlot>,
    _task: ConnectionTask,
}

impl LeaseConnection {
    fn usable(&self) -> bool {
        !self.client.is_closed() && !self.poisoned.load(Ordering::Relaxed)
    }

    /// Takes no new leases from now on, and leaves the slot at once, not
    /// when the next lease opens a connection in its place: with a lock
    /// perhaps still held on it (an unlock that timed out), the lease
    /// stays taken, for every proxy, as long as the connection is open.
    fn poison(self: &Arc<Self>) {
        self.poisoned.store(true, Ordering::Relaxed);
        let Some(slot) = self.slot.upgrade() else {
            return;
        };
        let connection = Arc::downgrade(self);
        let leave = move |held: &mut Option<Arc<LeaseConnection>>| {
            if held
                .as_ref()
                .is_some_and(|held| std::ptr::eq(Arc::as_ptr(held), connection.as_ptr()))
            {
                *held = None;
            }
        };
        let left = slot.try_lock().map(|mut held| leave(&mut held)).is_ok();
        // Else the slot is being looked at, or filled anew, by another
        // caller: it is left in the background, not waited for here.
        if !left {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { leave(&mut *slot.lock().await) });
            }
        }
    }
}

/// The task that drives a connection, ended when dropped. Left alone, a
/// connection given up with a reply outstanding (a server that hangs)
/// waits for that reply for ever: its socket stays open, and with it the
/// server's session and every advisory lock the session holds.
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A held lease (see [`PostgresStore::acquire_lease`]). Dropping it without
/// [`PostgresLease::release`] releases it in the background.
pub struct PostgresLease {
    connection: Option<Arc<LeaseConnection>>,
    key: (i32, i32),
    timeout: Duration,
    _turn: HandleLock,
}

impl PostgresLease {
    /// Frees the lock.
    pub async fn release(mut self) -> Result<(), StoreError> {
        match self.connection.take() {
            Some(connection) => unlock(connection, self.key, self.timeout).await,
            None => Ok(()),
        }
    }
}

impl Drop for PostgresLease {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (key, timeout) = (self.key, self.timeout);
                runtime.spawn(async move {
                    if let Err(error) = unlock(connection, key, timeout).await {
                        log::warn!("{error}");
                    }
                });
            }
            // Outside a runtime: the connection goes, and the lock with it.
            Err(_) => connection.poison(),
        }
    }
}

async fn unlock(
    connection: Arc<LeaseConnection>,
    key: (i32, i32),
    timeout: Duration,
) -> Result<(), StoreError> {
    let params: [&(dyn ToSql + Sync); 2] = [&key.0, &key.1];
    let unlock = connection.client.query_one(&connection.unlock, &params);
    let failure = match tokio::time::timeout(timeout, unlock).await {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(error)) => unavailable(&error),
        Err(_elapsed) => timed_out(),
    };
    // Still held, perhaps: let the connection go, and the lock with it.
    connection.poison();
    Err(failure)
}

/// The first advisory-lock key of `table`'s leases, so two tables (or
/// another application's locks on other classes) never share a lease.
pub(super) fn lease_class(table: &str) -> i32 {
    let digest = Sha256::digest(format!("session-proxy lease {table}").as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

#[async_trait]
impl Lease for PostgresLease {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        PostgresLease::release(*self).await
    }

    /// The server frees the lock with its connection.
    fn is_held(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| !connection.client.is_closed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that lets the lease connection in, then never answers
    /// (its `SET`): opening it times out, and the connection is closed,
    /// not left waiting for that answer for ever with its socket open.
    #[tokio::test]
    async fn a_lease_connection_given_up_while_opening_is_closed() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut length = [0u8; 4];
            socket.read_exact(&mut length).unwrap();
            let mut startup = vec![0u8; u32::from_be_bytes(length) as usize - 4];
            socket.read_exact(&mut startup).unwrap();
            // AuthenticationOk, ReadyForQuery (idle).
            socket
                .write_all(b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I")
                .unwrap();
            // Whatever comes next goes unanswered, until the client closes.
            let mut buffer = [0u8; 1024];
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let closed = loop {
                match socket.read(&mut buffer) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(_) => break false,
                }
            };
            closed_tx.send(closed).unwrap();
        });
        let url = format!("postgres://someone@127.0.0.1:{port}/db");
        let store = PostgresStore::new(&url, "sessions", 1, Duration::from_millis(300)).unwrap();
        let opened = store.lease_connection().await;
        assert!(opened.is_err(), "the server never answered");
        let closed = tokio::task::spawn_blocking(move || closed_rx.recv().unwrap())
            .await
            .unwrap();
        assert!(closed, "the connection given up is still open after 5 s");
    }
}
