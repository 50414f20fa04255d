//! Where session records live.
//!
//! One small async trait, [`Store`], implemented by each backend in its own
//! module; none of them knows anything of HTTP. Every write goes through
//! [`Store::modify`], which hands the caller the latest stored version and
//! stores what the caller decides, atomically: two concurrent changes of
//! one record never lose each other.

pub mod disk;
pub mod memory;
mod per_thread;
pub mod postgres;
pub mod redis;
pub mod serialized;
mod sweeper;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{Config, StoreKind};

pub use crate::session::cookie::Handle;
pub use crate::session::data::SessionData;
/// The path `postgres::tls` had as a file of its own, which config validation uses.
pub use serialized::Serialized;
pub use sweeper::sweep_forever;

/// A stored session, as SPEC \[6\] lays it out. Its text fields are shared,
/// not copied, by a clone: the memory store hands out one per load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub data: SessionData,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last access that was written.
    pub atime: u64,
    /// The client IP at creation.
    pub ip: Arc<str>,
    /// 1 once first stored; +1 with every change of data or id.
    pub ver: u64,
}

impl Record {
    /// The version of the record's next change: one more, and after the
    /// last (`u64::MAX`, which only another program writes) 1 again, a
    /// fresh count. Saturating kept `u64::MAX` for every change after
    /// it, so a write checked against the version it loaded (every
    /// store's `modify_seen`, a regenerate's delete of the old id) no
    /// longer saw another's change in between, and lost it.
    pub fn next_ver(&self) -> u64 {
        self.ver.checked_add(1).unwrap_or(1)
    }
}

/// When a record is expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Idle seconds: expired when `now - atime > timeout`.
    pub timeout: u64,
    /// Seconds from creation, if any: expired when `now - created > absolute`.
    pub absolute: Option<u64>,
}

impl Expiry {
    pub fn is_expired(&self, record: &Record, now: u64) -> bool {
        now.saturating_sub(record.atime) > self.timeout
            || self
                .absolute
                .is_some_and(|absolute| now.saturating_sub(record.created) > absolute)
    }
}

/// What a [`Store::modify`] caller decides, given the latest stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store this record, inserting or replacing.
    Put(Record),
    /// Delete the record.
    Delete,
    /// Leave the store as it is.
    Keep,
}

/// Decides a [`Change`] from the latest stored record (`None`: absent).
/// It may be called more than once (optimistic backends retry on a
/// conflict), so it must not have side effects. An `Err` refuses the change:
/// nothing is written and `modify` returns [`StoreError::Rejected`].
pub type Decide<'a> = &'a (dyn Fn(Option<&Record>) -> Result<Change, String> + Send + Sync);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend did not answer, or answered with an error.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("corrupt session record {handle}: {detail}")]
    Corrupt { handle: String, detail: String },
    /// Another process holds the session's lease and did not let go in time.
    #[error("session busy: {0}")]
    Busy(String),
    /// The caller's [`Decide`] refused the change; nothing was written.
    #[error("change refused: {0}")]
    Rejected(String),
}

/// A hold on one session across proxy processes (`lock = true` on a
/// shared store). Dropping it without `release` frees it too, later: a
/// crashed holder's lease ends with its connection or its TTL.
#[async_trait]
pub trait Lease: Send + Sync {
    async fn release(self: Box<Self>) -> Result<(), StoreError>;

    /// False once the hold is known lost, or may be: a Redis lease taken
    /// over, or past its TTL since its last refresh that succeeded; a
    /// PostgreSQL lock whose connection closed.
    /// Another proxy may be serving the session meanwhile.
    fn is_held(&self) -> bool;
}

/// Ends a [`Store::acquire_lease`] wait early: its caller no longer wants
/// the lease (the request's client left). The wait ends at its next pause
/// between attempts, never during one: an attempt cut short may have taken
/// the lease unseen, which would then stay taken (a Redis key until it
/// expires, a PostgreSQL lock as long as its connection lives).
#[derive(Default)]
pub struct GiveUp(tokio::sync::Notify);

impl GiveUp {
    pub fn give_up(&self) {
        // A permit: a wait that is not pausing right now ends at its next pause.
        self.0.notify_one();
    }

    /// Resolves once [`GiveUp::give_up`] is called, or at once if it was.
    pub async fn given_up(&self) {
        self.0.notified().await;
    }
}

/// A session store. Handles are the store keys; raw ids never reach it.
#[async_trait]
pub trait Store: Send + Sync {
    /// The record of `handle`, if stored (expired or not: expiry is the
    /// caller's decision).
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError>;

    /// Atomically applies `decide` to the latest stored version of
    /// `handle`. Returns the record as stored afterwards (`None`: absent).
    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError>;

    /// [`Store::modify`] for a caller that has just loaded `seen`: a store
    /// that can check in its write step that the record is still at
    /// `seen.ver` decides on `seen` and skips its own read; when the record
    /// changed meanwhile, `decide` is given the latest version, as always.
    /// (Every change of data bumps `ver`; a touch moves only `atime`, and
    /// a decision writes its own.)
    async fn modify_seen(
        &self,
        handle: &Handle,
        _seen: &Record,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        self.modify(handle, decide).await
    }

    /// Writes a new access time (a touch changes neither data nor `ver`).
    /// Does nothing if the record is gone; `false` then.
    async fn touch(&self, handle: &Handle, atime: u64) -> Result<bool, StoreError> {
        touch_by_modify(self, handle, atime).await
    }

    /// Deletes `handle`; `true` if it was stored.
    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError>;

    /// Every stored record, for `session-proxy sessions` (not the request path).
    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError>;

    /// Deletes the records expired at `now`; returns how many.
    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError>;

    /// Succeeds when the backend answers (for `check` and at start).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Succeeds when the backend can serve every session (`/healthz`): the
    /// same as `ping`, but for a Redis Cluster, whose masters fail one by
    /// one (a proxy starts and serves the others' sessions with one down,
    /// but is not healthy).
    async fn health(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    /// Waits at most `wait` for an exclusive lease on `handle`, held for
    /// `ttl` at least and kept while its holder lives; `give_up` ends the
    /// wait early (`Busy`). `None`: the store is not shared between
    /// processes and the in-process lock is enough.
    async fn acquire_lease(
        &self,
        _handle: &Handle,
        _wait: Duration,
        _ttl: Duration,
        _give_up: &GiveUp,
    ) -> Result<Option<Box<dyn Lease>>, StoreError> {
        Ok(None)
    }
}

/// The largest stored record any store reads, for session data of at
/// most `max_data_bytes`: four times that, and at least 4 MiB, so that
/// records written under a larger limit before a restart still load. A
/// larger one is read as corrupt (a missing session, logged), never whole:
/// a record is trusted for integrity, not for size.
pub(crate) fn max_record_bytes(max_data_bytes: usize) -> usize {
    max_data_bytes.saturating_mul(4).max(4 << 20)
}

/// The error of a stored record larger than `limit` bytes.
pub(crate) fn too_large(handle: &Handle, limit: usize) -> StoreError {
    StoreError::Corrupt {
        handle: handle.short().to_owned(),
        detail: format!("larger than {limit} bytes"),
    }
}

/// Runs `decide` on `current`; a `Put` over a stored record keeps the
/// later of the two access times. A decision made with a `now` read a
/// moment before another writer's (another thread's, another proxy's)
/// would otherwise move the session's idle expiry back. Every store's
/// write goes through here; the version-checked writes of the shared
/// stores also keep a later atime that a touch stored since `current`
/// was read (in their statement or script).
pub(crate) fn decide_on(
    decide: Decide<'_>,
    current: Option<&Record>,
) -> Result<Change, StoreError> {
    match decide(current).map_err(StoreError::Rejected)? {
        Change::Put(mut record) => {
            if let Some(current) = current {
                record.atime = record.atime.max(current.atime);
            }
            Ok(Change::Put(record))
        }
        other => Ok(other),
    }
}

/// A touch as a [`Store::modify`], for stores without a cheaper way:
/// `atime` moves forward only, and a record that is gone stays gone
/// (`false`).
pub async fn touch_by_modify<S: Store + ?Sized>(
    store: &S,
    handle: &Handle,
    atime: u64,
) -> Result<bool, StoreError> {
    let decide = |current: Option<&Record>| {
        Ok(match current {
            Some(record) => Change::Put(Record {
                atime: atime.max(record.atime),
                ..record.clone()
            }),
            None => Change::Keep,
        })
    };
    store
        .modify(handle, &decide)
        .await
        .map(|stored| stored.is_some())
}

/// Opens the store the config names: creates the disk store's directory,
/// sizes the memory store, connects to PostgreSQL or Redis. Called once
/// at start-up (and by `check` and `sessions`).
pub async fn open(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    let store = &config.store;
    let timeout = Duration::from_secs(store.timeout);
    Ok(match store.kind {
        // A directory check and create at start-up: blocking is fine here.
        StoreKind::Disk => Arc::new(
            disk::DiskStore::open(&store.path, store.fsync)?
                .with_max_data_bytes(config.session.max_data_bytes),
        ),
        StoreKind::Memory => Arc::new(memory::MemoryStore::new(store.max_entries)),
        StoreKind::Postgres => {
            let max_data_bytes = config.session.max_data_bytes;
            // Per thread: each proxy thread has a pool of its own.
            let threads = config.server.threads.max(1);
            let pool_size = match store.pool_size {
                0 => 4,
                size => size.div_ceil(threads),
            };
            let postgres =
                postgres::PostgresStore::connect(&store.url, &store.table, pool_size, timeout)
                    .await?
                    .with_max_data_bytes(max_data_bytes);
            Arc::new(Serialized::new(postgres, timeout))
        }
        StoreKind::Redis => {
            let (url, prefix) = (&store.url, &store.key_prefix);
            let ttl = config.session.timeout;
            let redis = redis::RedisStore::connect(url, prefix, timeout, ttl)
                .await?
                .with_max_data_bytes(config.session.max_data_bytes);
            Arc::new(Serialized::new(redis, timeout))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte for byte what the stores held when the data was a
    /// `serde_json::Map`: records written before load, and are written
    /// back the same.
    #[test]
    fn a_record_keeps_its_stored_format() {
        let text = r#"{"data":{"count":1,"last":"a \"b\"","x":{"y":[1,2.5]}},"created":1700000000,"atime":1700000100,"ip":"127.0.0.1","ver":42}"#;
        let record: Record = serde_json::from_str(text).unwrap();
        assert_eq!(
            record.data.as_str(),
            r#"{"count":1,"last":"a \"b\"","x":{"y":[1,2.5]}}"#
        );
        assert_eq!(&*record.ip, "127.0.0.1");
        assert_eq!(serde_json::to_string(&record).unwrap(), text);
    }

    #[test]
    fn a_record_edited_by_hand_loads_and_is_written_compact() {
        let text = "{\n  \"data\": { \"count\": 1 },\n  \"created\": 1, \"atime\": 2,\n  \"ip\": \"::1\", \"ver\": 3\n}";
        let record: Record = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"data":{"count":1},"created":1,"atime":2,"ip":"::1","ver":3}"#
        );
    }

    #[test]
    fn a_record_whose_data_is_not_an_object_does_not_load() {
        let text = r#"{"data":[1],"created":1,"atime":2,"ip":"::1","ver":3}"#;
        assert!(serde_json::from_str::<Record>(text).is_err());
    }
}
