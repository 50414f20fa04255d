//! The `postgres` store: web.py's DBStore table, shared by several proxies.
//!
//! The table is web.py's, column for column (SPEC [6]):
//!
//! ```sql
//! create table sessions (
//!     session_id char(128) UNIQUE NOT NULL,
//!     atime timestamp NOT NULL default current_timestamp,
//!     data text
//! );
//! ```
//!
//! `session_id` holds the 64-character handle (`char(128)` pads it with
//! spaces; comparisons ignore the padding, and handles read back are
//! trimmed), `data` the record as JSON, `atime` the record's access time as
//! a UTC `timestamp`, so the sweep can find idle records without parsing
//! JSON. A table made by hand with that DDL is used as it is. A table
//! dropped while the proxy runs is made again by the first operation that
//! finds it gone.
//!
//! ```no_run
//! # async fn example() -> Result<(), session_proxy::store::StoreError> {
//! use std::time::Duration;
//! use session_proxy::store::postgres::PostgresStore;
//!
//! let store = PostgresStore::connect(
//!     "postgres://postgres@127.0.0.1/test", "sessions", 8, Duration::from_secs(2),
//! ).await?;
//! # Ok(()) }
//! ```
//!
//! Round trips to the server once a connection's statements are prepared
//! (the first use of each on a connection adds one): `load` 1, `touch` 1,
//! `delete` 1, `modify` 2: `BEGIN` + `SELECT … FOR UPDATE` pipelined, then
//! the write + `COMMIT` pipelined (or `ROLLBACK` when nothing changes); two
//! more when it loses the race to create a record. `modify_seen` 1: an
//! `UPDATE` of the record only if still at the version the caller loaded
//! (else as `modify`).

pub mod tls;

use std::fmt::Write;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use sha2::{Digest, Sha256};
use tokio::time::{timeout_at, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::per_thread::PerThread;
use super::{touch_by_modify, Change, Decide, Expiry, Handle, Record, Store, StoreError};
use crate::locks::{HandleLock, HandleLocks};
use tls::{PostgresTls, SslMode};

/// Rows deleted by one sweep statement: small enough that no statement
/// holds many row locks or runs for long.
const SWEEP_BATCH: i64 = 1000;

/// How often `modify` starts over after losing an insert race (another
/// proxy created the same record between our read and our insert).
const MAX_INSERT_RACES: usize = 8;

/// A session store on a PostgreSQL table. Cheap to share: each thread
/// that uses it gets a pool of its own ([`PerThread`]).
pub struct PostgresStore {
    pools: PerThread<Pool>,
    /// Makes a thread's pool (no connection is opened until it is used).
    new_pool: Box<dyn Fn() -> Result<Pool, StoreError> + Send + Sync>,
    /// How to open the connection that holds this process's leases.
    lease_config: tokio_postgres::Config,
    lease_tls: MakeRustlsConnect,
    /// That connection, opened on first use and again once closed or in
    /// doubt. Every lease of this process is an advisory lock held on it:
    /// a lease costs no connection of its own, so requests of any number
    /// of sessions hold leases side by side.
    leases: Arc<LeaseSlot>,
    /// A session-level advisory lock is re-entrant within its connection:
    /// holders of one handle's lease in this process take turns here first.
    lease_turns: HandleLocks,
    table: String,
    sql: Statements,
    timeout: Duration,
    /// Held while the table is made again after it was found dropped: the
    /// requests that found it so wait, and one of them logs it.
    remaking: tokio::sync::Mutex<()>,
    /// The first key of the two-key advisory locks of this table's leases.
    lease_class: i32,
}

/// The statements, with the table name in place. Each is prepared once per
/// connection (the pool's statement cache).
struct Statements {
    create: String,
    load: String,
    lock: String,
    insert: String,
    update: String,
    update_if_version: String,
    delete: String,
    touch: String,
    sweep_idle: String,
    page: String,
    delete_many: String,
    list: String,
    ping: String,
}

impl Statements {
    fn new(table: &str) -> Statements {
        // `timestamp` has no time zone: every atime is written and compared
        // as UTC, whatever the server's TimeZone setting.
        const ATIME: &str = "to_timestamp($2::bigint) AT TIME ZONE 'UTC'";
        // The end of a record as this store writes it, and its atime.
        const TOUCHED: &str = r#""atime":[0-9]+(,"ip":"[^"\\]*","ver":[0-9]+\}$)"#;
        const TOUCHED_ATIME: &str = r#""atime":([0-9]+),"ip":"[^"\\]*","ver":[0-9]+\}$"#;
        Statements {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 session_id char(128) UNIQUE NOT NULL, \
                 atime timestamp NOT NULL default current_timestamp, \
                 data text)"
            ),
            load: format!("SELECT data FROM {table} WHERE session_id = $1"),
            lock: format!("SELECT data FROM {table} WHERE session_id = $1 FOR UPDATE"),
            insert: format!(
                "INSERT INTO {table} (session_id, atime, data) VALUES ($1, {ATIME}, $3) \
                 ON CONFLICT (session_id) DO NOTHING"
            ),
            update: format!("UPDATE {table} SET atime = {ATIME}, data = $3 WHERE session_id = $1"),
            update_if_version: format!(
                "UPDATE {table} SET atime = {ATIME}, data = $3 \
                 WHERE session_id = $1 AND data::jsonb ->> 'ver' = $4::text"
            ),
            delete: format!("DELETE FROM {table} WHERE session_id = $1"),
            // A touch in one statement: the record's atime inside the JSON
            // and the column move together, and never backwards. The JSON
            // is edited as text, where this store writes `atime`: right
            // before the closing `"ip"` and `"ver"` (a record's field
            // order). Not through `jsonb`, which would write the data out
            // again in its own way (1e16 as 10000000000000000, -0.0 as 0):
            // a touch changes the access time only. A record in another
            // layout is not matched; the caller touches it by `modify`.
            touch: format!(
                "UPDATE {table} SET \
                 data = regexp_replace(data, '{TOUCHED}', \
                 '\"atime\":' || GREATEST(substring(data FROM '{TOUCHED_ATIME}')::bigint, \
                 $2::bigint) || '\\1'), \
                 atime = GREATEST(atime, {ATIME}) \
                 WHERE session_id = $1 AND data ~ '{TOUCHED}'"
            ),
            // Locks only the rows it deletes, skips rows another
            // transaction holds, and re-checks `atime` on rows updated since
            // its snapshot (FOR UPDATE), so a session touched meanwhile lives.
            sweep_idle: format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
                 SELECT ctid FROM {table} WHERE atime < to_timestamp($1::bigint) AT TIME ZONE 'UTC' \
                 LIMIT $2 FOR UPDATE SKIP LOCKED))"
            ),
            page: format!(
                "SELECT session_id, data FROM {table} WHERE session_id > $1 \
                 ORDER BY session_id LIMIT $2"
            ),
            delete_many: format!("DELETE FROM {table} WHERE session_id = ANY($1::bpchar[])"),
            list: format!("SELECT session_id, data FROM {table}"),
            // The table, not only the server: a table dropped (or its
            // privileges revoked) under a running proxy fails every
            // request, and `/healthz` must say so.
            ping: format!("SELECT 1 FROM {table} LIMIT 0"),
        }
    }
}

/// Why an operation on a connection failed: the connection's state is
/// unknown (it is dropped, not returned to the pool), or the store refused
/// cleanly. The last two are mended, and the operation made once more
/// ([`PostgresStore::run`]); their statement failed, so nothing of the
/// operation was written.
enum Failure {
    Connection(StoreError),
    Clean(StoreError),
    /// `undefined_table` (42P01): the table was dropped under the running
    /// proxy. Every statement on a pooled connection names only the table.
    NoTable(StoreError),
    /// A statement prepared on the connection no longer fits the table,
    /// made again in another layout ("cached plan must not change result
    /// type", 0A000).
    StalePlan(StoreError),
}

impl Failure {
    fn into_error(self) -> StoreError {
        match self {
            Failure::Connection(error)
            | Failure::Clean(error)
            | Failure::NoTable(error)
            | Failure::StalePlan(error) => error,
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Failure {
        let stale_plan = |db: &tokio_postgres::error::DbError| {
            db.code() == &SqlState::FEATURE_NOT_SUPPORTED
                && db
                    .message()
                    .starts_with("cached plan must not change result type")
        };
        match error.as_db_error() {
            Some(db) if db.code() == &SqlState::UNDEFINED_TABLE => {
                Failure::NoTable(unavailable(&error))
            }
            Some(db) if stale_plan(db) => Failure::StalePlan(unavailable(&error)),
            _ => Failure::Connection(unavailable(&error)),
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db`, with libpq's
    /// `sslmode`, `sslrootcert`, `sslcert` and `sslkey`; or libpq's
    /// `key=value` form, where
    /// `sslmode` is `disable`, `prefer` or `require` only), creates `table`
    /// if it is missing, and keeps up to `pool_size` connections per thread
    /// that uses it (and as many again for leases, shared). Every
    /// operation, connecting included, gives up after `timeout`.
    pub async fn connect(
        url: &str,
        table: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::new(url, table, pool_size, timeout)?;
        store
            .create_table(Instant::now() + timeout)
            .await
            .map_err(Failure::into_error)?;
        Ok(store)
    }

    /// The store on `url`, before any connection.
    fn new(
        url: &str,
        table: &str,
        pool_size: usize,
        timeout: Duration,
    ) -> Result<PostgresStore, StoreError> {
        if !is_plain_identifier(table) {
            return Err(StoreError::Unavailable(format!(
                "postgres: table name {table:?} is not a plain SQL identifier"
            )));
        }
        // The URL may hold a password: messages never quote it.
        let (url, tls) = PostgresTls::from_url(url)
            .map_err(|problem| StoreError::Unavailable(format!("postgres: {problem}")))?;
        let connector = tls
            .connector()
            .map_err(|problem| StoreError::Unavailable(format!("postgres: {problem}")))?;
        if tls.mode == SslMode::Unverified {
            log::warn!(
                "store.url: sslmode=require without sslrootcert: the PostgreSQL server's \
                 certificate is not verified, so anyone on the path can pose as the server; \
                 set sslmode=verify-full and sslrootcert to its CA"
            );
        }
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|_| StoreError::Unavailable("postgres: invalid url".into()))?;
        config.ssl_mode(tls.negotiated());
        config.connect_timeout(timeout);
        if config.get_application_name().is_none() {
            config.application_name("session-proxy");
        }
        let pool_size = pool_size.max(1);
        let lease_config = config.clone();
        let lease_tls = connector.clone();
        let build = move |size: usize| {
            let manager = Manager::from_config(
                config.clone(),
                connector.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .build()
                .map_err(|error| StoreError::Unavailable(format!("postgres: pool: {error}")))
        };
        Ok(PostgresStore {
            pools: PerThread::default(),
            lease_config,
            lease_tls,
            leases: Arc::new(tokio::sync::Mutex::new(None)),
            lease_turns: HandleLocks::default(),
            new_pool: Box::new(move || build(pool_size)),
            table: table.to_owned(),
            sql: Statements::new(table),
            timeout,
            remaking: tokio::sync::Mutex::new(()),
            lease_class: lease_class(table),
        })
    }

    /// Creates the table unless it exists; whether it did. Looked up
    /// first: CREATE ... IF NOT EXISTS still needs the right to create in
    /// the schema, which a role that may only use an existing table lacks.
    async fn create_table(&self, deadline: Instant) -> Result<bool, Failure> {
        let client = self.checkout(deadline).await?;
        let create = async {
            let exists = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table])
                .await?;
            if exists.try_get::<_, bool>(0)? {
                return Ok(false);
            }
            // Proxies starting together (or mending a dropped table
            // together) race on the catalog (which of these errors a loser
            // gets depends on where they met); a loser, trying again, finds
            // the table made.
            let raced = [
                SqlState::UNIQUE_VIOLATION,
                SqlState::DUPLICATE_OBJECT,
                SqlState::DUPLICATE_TABLE,
            ];
            let mut attempts = 1;
            loop {
                match client.batch_execute(&self.sql.create).await {
                    Err(error)
                        if attempts < 4 && raced.iter().any(|code| error.code() == Some(code)) =>
                    {
                        attempts += 1;
                    }
                    other => return Ok(other.map(|()| attempts == 1)?),
                }
            }
        };
        let outcome = timeout_at(deadline, create).await;
        finish(client, outcome)
    }

    /// Makes the table again, found dropped under the running proxy: the
    /// sessions it held are gone (a load finds none, which is a missing
    /// session), the ones written from now on are kept. Logged once, by
    /// the request that made it.
    async fn remake_table(&self, deadline: Instant) -> Result<(), Failure> {
        let _remaking = timeout_at(deadline, self.remaking.lock())
            .await
            .map_err(|_elapsed| Failure::Connection(timed_out()))?;
        let made = self.create_table(deadline).await.map_err(|failure| {
            let detail = match failure.into_error() {
                StoreError::Unavailable(message) => message,
                other => other.to_string(),
            };
            Failure::Connection(StoreError::Unavailable(format!(
                "postgres: table {} is missing and was not made again: {}",
                self.table,
                detail.trim_start_matches("postgres: ")
            )))
        })?;
        if made {
            log::warn!(
                "postgres: table {} was missing (dropped while the proxy ran?): made it again; \
                 the sessions it held are gone",
                self.table
            );
        }
        Ok(())
    }

    /// Runs `operation` (given its deadline, the store's timeout from now:
    /// a checkout, its statements, [`finish`]) and, when it found the
    /// table dropped or the statements prepared on its connection stale,
    /// mends that and runs it once more (on another connection: that one
    /// is in doubt), within the same deadline.
    async fn run<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: Fn(Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let deadline = Instant::now() + self.timeout;
        match operation(deadline).await {
            Err(Failure::NoTable(_)) => self
                .remake_table(deadline)
                .await
                .map_err(Failure::into_error)?,
            Err(Failure::StalePlan(_)) => {
                // Every connection of this thread's pool prepared its
                // statements for the table as it was: they all prepare
                // them again. (Other threads' pools mend on their own.)
                log::debug!(
                    "postgres: table {} changed its layout: preparing statements again",
                    self.table
                );
                self.pool().await?.manager().statement_caches.clear();
            }
            other => return other.map_err(Failure::into_error),
        }
        operation(deadline).await.map_err(Failure::into_error)
    }

    /// This thread's pool, opened on first use.
    async fn pool(&self) -> Result<Pool, StoreError> {
        self.pools.get_or_open(|| async { (self.new_pool)() }).await
    }

    /// A pooled connection, taken before `deadline`.
    async fn checkout(&self, deadline: Instant) -> Result<Object, Failure> {
        let pool = self.pool().await.map_err(Failure::Clean)?;
        checkout(&pool, deadline).await.map_err(Failure::Clean)
    }

    async fn load_on(
        &self,
        client: &ClientWrapper,
        handle: &Handle,
    ) -> Result<Option<Record>, Failure> {
        let load = client.prepare_cached(&self.sql.load).await?;
        match client.query_opt(&load, &[&handle.as_str()]).await? {
            Some(row) => Ok(Some(decode(handle, text(&row, 0)).map_err(Failure::Clean)?)),
            None => Ok(None),
        }
    }

    async fn modify_on(
        &self,
        client: &ClientWrapper,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, Failure> {
        let lock = client.prepare_cached(&self.sql.lock).await?;
        let insert = client.prepare_cached(&self.sql.insert).await?;
        let update = client.prepare_cached(&self.sql.update).await?;
        let delete = client.prepare_cached(&self.sql.delete).await?;
        let key = handle.as_str();
        // A present row is locked by FOR UPDATE until COMMIT, so its update
        // cannot lose another's. An absent row cannot be locked: two
        // proxies may both decide on "absent"; the insert then does nothing
        // for the second (ON CONFLICT), which starts over and decides again
        // on the first one's record. No advisory lock on the common path.
        for _ in 0..MAX_INSERT_RACES {
            // Pipelined: one round trip for both.
            let params: [&(dyn ToSql + Sync); 1] = [&key];
            let (begun, row) = tokio::join!(
                client.batch_execute("BEGIN"),
                client.query_opt(&lock, &params)
            );
            begun?;
            let current = match row? {
                Some(row) => match decode(handle, text(&row, 0)) {
                    Ok(record) => Some(record),
                    Err(error) => return rollback(client, Err(error)).await,
                },
                None => None,
            };
            let change = match decide(current.as_ref()) {
                Ok(change) => change,
                Err(reason) => return rollback(client, Err(StoreError::Rejected(reason))).await,
            };
            let (written, record) = match change {
                Change::Keep => return rollback(client, Ok(current)).await,
                Change::Delete if current.is_none() => return rollback(client, Ok(None)).await,
                Change::Delete => {
                    let (deleted, committed) = tokio::join!(
                        client.execute(&delete, &params),
                        client.batch_execute("COMMIT")
                    );
                    deleted?;
                    committed?;
                    return Ok(None);
                }
                Change::Put(record) => {
                    let json = encode(&record)?;
                    let atime = unix_i64(record.atime);
                    let statement = if current.is_some() { &update } else { &insert };
                    let params: [&(dyn ToSql + Sync); 3] = [&key, &atime, &json];
                    let (written, committed) = tokio::join!(
                        client.execute(statement, &params),
                        client.batch_execute("COMMIT")
                    );
                    committed?;
                    (written?, record)
                }
            };
            if written == 1 {
                return Ok(Some(record));
            }
        }
        Err(Failure::Clean(StoreError::Unavailable(
            "postgres: contention".into(),
        )))
    }

    /// Writes `record` if the stored one is still at version `ver`, in
    /// one statement (its own transaction); `false` if it is not, or does
    /// not parse (the caller's fallback reports that), or holds what
    /// `jsonb` refuses (the fallback does without the cast).
    async fn update_if_version_on(
        &self,
        client: &ClientWrapper,
        handle: &Handle,
        ver: u64,
        record: &Record,
    ) -> Result<bool, Failure> {
        let update = client.prepare_cached(&self.sql.update_if_version).await?;
        let json = encode(record)?;
        let (atime, ver) = (unix_i64(record.atime), ver.to_string());
        let params: [&(dyn ToSql + Sync); 4] = [&handle.as_str(), &atime, &json, &ver];
        match client.execute(&update, &params).await {
            Ok(written) => Ok(written == 1),
            Err(error) if is_bad_data(&error) || is_beyond_jsonb(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// The touch in one statement: `Some(true)` when done; `None` when
    /// there is no record in this store's layout (none at all, or one
    /// written otherwise), for the caller to touch it by `modify`.
    async fn touch_on(
        &self,
        client: &ClientWrapper,
        handle: &Handle,
        atime: u64,
    ) -> Result<Option<bool>, Failure> {
        let touch = client.prepare_cached(&self.sql.touch).await?;
        let touched = client
            .execute(&touch, &[&handle.as_str(), &unix_i64(atime)])
            .await?;
        Ok((touched > 0).then_some(true))
    }

    async fn delete_on(&self, client: &ClientWrapper, handle: &Handle) -> Result<bool, Failure> {
        let delete = client.prepare_cached(&self.sql.delete).await?;
        Ok(client.execute(&delete, &[&handle.as_str()]).await? > 0)
    }

    async fn list_on(&self, client: &ClientWrapper) -> Result<Vec<(Handle, Record)>, Failure> {
        let list = client.prepare_cached(&self.sql.list).await?;
        let rows = client.query(&list, &[]).await?;
        Ok(rows
            .iter()
            .filter_map(|row| readable(text(row, 0), text(row, 1)))
            .collect())
    }

    /// Deletes up to [`SWEEP_BATCH`] rows idle since before `cutoff`.
    async fn sweep_idle_batch(&self, client: &ClientWrapper, cutoff: u64) -> Result<u64, Failure> {
        let sweep = client.prepare_cached(&self.sql.sweep_idle).await?;
        Ok(client
            .execute(&sweep, &[&unix_i64(cutoff), &SWEEP_BATCH])
            .await?)
    }

    /// Reads the page of rows after `after` (by handle) and deletes those
    /// past the absolute timeout. Returns the last handle read (`None`: the
    /// end), how many were deleted, and how many rows were not this
    /// store's records. `created` never changes, so deleting
    /// by handle cannot remove a record that has meanwhile become young.
    async fn sweep_absolute_page(
        &self,
        client: &ClientWrapper,
        after: &str,
        now: u64,
        absolute: u64,
    ) -> Result<(Option<String>, u64, u64), Failure> {
        let page = client.prepare_cached(&self.sql.page).await?;
        let delete_many = client.prepare_cached(&self.sql.delete_many).await?;
        let rows = client.query(&page, &[&after, &SWEEP_BATCH]).await?;
        let last = rows
            .last()
            .and_then(|row| text(row, 0))
            .map(|session_id| session_id.trim_end().to_owned());
        let records: Vec<(Handle, Record)> = rows
            .iter()
            .filter_map(|row| record_of(text(row, 0), text(row, 1)).ok())
            .collect();
        let skipped = (rows.len() - records.len()) as u64;
        let expired: Vec<String> = records
            .into_iter()
            .filter(|(_, record)| now.saturating_sub(record.created) > absolute)
            .map(|(handle, _)| handle.as_str().to_owned())
            .collect();
        let deleted = if expired.is_empty() {
            0
        } else {
            client.execute(&delete_many, &[&expired]).await?
        };
        Ok((last, deleted, skipped))
    }

    /// Takes the cross-instance lease of `handle`, waiting at most `wait`
    /// for another holder: a session-level advisory lock, taken with
    /// `pg_try_advisory_lock` (polled, as the Redis lease is) on the one
    /// connection that holds this process's leases. The server releases it
    /// when that connection drops, so a crashed proxy's leases go with it
    /// (its TCP keep-alives are set to notice a vanished host within ~10 s).
    /// `_lease_ttl` is there for the common lease API: a lock tied to a
    /// connection needs no expiry.
    pub async fn acquire_lease(
        &self,
        handle: &Handle,
        wait: Duration,
        _lease_ttl: Duration,
    ) -> Result<PostgresLease, StoreError> {
        let deadline = Instant::now() + wait;
        let busy = || StoreError::Busy("postgres: lease wait timed out".into());
        let turn = timeout_at(deadline, self.lease_turns.lock(handle))
            .await
            .map_err(|_elapsed| busy())?;
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
                Err(_elapsed) => Err(StoreError::Unavailable("postgres: timed out".into())),
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
            tokio::time::sleep(pause.min(deadline - now)).await;
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
            .map_err(|_elapsed| StoreError::Unavailable("postgres: timed out".into()))?;
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
            Err(_elapsed) => return Err(StoreError::Unavailable("postgres: timed out".into())),
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
type LeaseSlot = tokio::sync::Mutex<Option<Arc<LeaseConnection>>>;

/// The connection that holds a process's leases, with its statements.
/// Dropping its last holder (the slot, the leases on it) closes it, and
/// the server frees its locks.
struct LeaseConnection {
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
        Err(_elapsed) => StoreError::Unavailable("postgres: timed out".into()),
    };
    // Still held, perhaps: let the connection go, and the lock with it.
    connection.poison();
    Err(failure)
}

#[async_trait]
impl Store for PostgresStore {
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
        self.run(|deadline| async move {
            let client = self.checkout(deadline).await?;
            let outcome = timeout_at(deadline, self.load_on(&client, handle)).await;
            finish(client, outcome)
        })
        .await
    }

    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        self.run(|deadline| async move {
            let client = self.checkout(deadline).await?;
            let outcome = timeout_at(deadline, self.modify_on(&client, handle, decide)).await;
            finish(client, outcome)
        })
        .await
    }

    /// One statement, one round trip, when nothing changed since `seen`
    /// was loaded; else as `modify`.
    async fn modify_seen(
        &self,
        handle: &Handle,
        seen: &Record,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let Change::Put(record) = decide(Some(seen)).map_err(StoreError::Rejected)? else {
            return self.modify(handle, decide).await;
        };
        let written = &record;
        let update = |deadline| async move {
            let client = self.checkout(deadline).await?;
            let update = self.update_if_version_on(&client, handle, seen.ver, written);
            let outcome = timeout_at(deadline, update).await;
            finish(client, outcome)
        };
        if self.run(update).await? {
            return Ok(Some(record));
        }
        self.modify(handle, decide).await
    }

    async fn touch(&self, handle: &Handle, atime: u64) -> Result<bool, StoreError> {
        let touch = |deadline| async move {
            let client = self.checkout(deadline).await?;
            let outcome = timeout_at(deadline, self.touch_on(&client, handle, atime)).await;
            finish(client, outcome)
        };
        match self.run(touch).await? {
            Some(touched) => Ok(touched),
            None => touch_by_modify(self, handle, atime).await,
        }
    }

    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
        self.run(|deadline| async move {
            let client = self.checkout(deadline).await?;
            let outcome = timeout_at(deadline, self.delete_on(&client, handle)).await;
            finish(client, outcome)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
        self.run(|deadline| async move {
            let client = self.checkout(deadline).await?;
            let outcome = timeout_at(deadline, self.list_on(&client)).await;
            finish(client, outcome)
        })
        .await
    }

    /// Idle records go by the `atime` column, in batches of
    /// [`SWEEP_BATCH`], each its own statement and transaction. With an
    /// absolute timeout, the records are then read page by page (by
    /// handle) to find their `created`; that pass reads the whole table.
    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
        let idle_cutoff = now.saturating_sub(expiry.timeout);
        let mut deleted = 0;
        loop {
            let batch = self
                .run(|deadline| async move {
                    let client = self.checkout(deadline).await?;
                    let batch = self.sweep_idle_batch(&client, idle_cutoff);
                    let outcome = timeout_at(deadline, batch).await;
                    finish(client, outcome)
                })
                .await?;
            deleted += batch;
            if batch < SWEEP_BATCH as u64 {
                break;
            }
        }
        if let Some(absolute) = expiry.absolute {
            let mut after = String::new();
            let mut foreign = 0;
            loop {
                let after_page = after.as_str();
                let page = |deadline| async move {
                    let client = self.checkout(deadline).await?;
                    let page = self.sweep_absolute_page(&client, after_page, now, absolute);
                    let outcome = timeout_at(deadline, page).await;
                    finish(client, outcome)
                };
                let (last, batch, skipped) = self.run(page).await?;
                deleted += batch;
                foreign += skipped;
                match last {
                    Some(last) => after = last,
                    None => break,
                }
            }
            // One line a round, not one a row: a table web.py filled keeps
            // its rows until they go idle.
            if foreign > 0 {
                log::warn!(
                    "sweep: skipped {foreign} rows that are not session-proxy records \
                     (web.py's, or edited by hand); they go once idle"
                );
            }
        }
        Ok(deleted)
    }

    /// Mends a dropped table as every operation does: a proxy whose
    /// `/healthz` said 503 until a request came would get none from a
    /// load balancer that heeds it.
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|deadline| async move {
            let client = self.checkout(deadline).await?;
            let ping = async { Ok(client.batch_execute(&self.sql.ping).await?) };
            let outcome = timeout_at(deadline, ping).await;
            finish(client, outcome)
        })
        .await
    }

    async fn acquire_lease(
        &self,
        handle: &Handle,
        wait: Duration,
        ttl: Duration,
    ) -> Result<Option<Box<dyn super::Lease>>, StoreError> {
        let lease = PostgresStore::acquire_lease(self, handle, wait, ttl).await?;
        Ok(Some(Box::new(lease)))
    }
}

/// The answer of an operation run on `client` within its deadline. A
/// connection whose state is unknown afterwards (an error, a timeout) is
/// dropped rather than returned to the pool; the pool opens a new one when
/// the server answers again.
fn finish<T>(
    client: Object,
    outcome: Result<Result<T, Failure>, tokio::time::error::Elapsed>,
) -> Result<T, Failure> {
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(Failure::Clean(error))) => Err(Failure::Clean(error)),
        // A transaction may be open (and failed) on it.
        Ok(Err(failure)) => {
            discard(client);
            Err(failure)
        }
        Err(_elapsed) => {
            discard(client);
            Err(Failure::Connection(timed_out()))
        }
    }
}

fn timed_out() -> StoreError {
    StoreError::Unavailable("postgres: timed out".into())
}

async fn checkout(pool: &Pool, deadline: Instant) -> Result<Object, StoreError> {
    match timeout_at(deadline, pool.get()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(deadpool_postgres::PoolError::Backend(error))) => Err(unavailable(&error)),
        Ok(Err(error)) => Err(StoreError::Unavailable(format!("postgres: {error}"))),
        Err(_elapsed) => Err(StoreError::Unavailable("postgres: timed out".into())),
    }
}

/// Ends the open transaction, then answers `outcome`.
async fn rollback<T>(client: &ClientWrapper, outcome: Result<T, StoreError>) -> Result<T, Failure> {
    client.batch_execute("ROLLBACK").await?;
    outcome.map_err(Failure::Clean)
}

/// Takes a connection out of its pool; dropping it closes it.
fn discard(client: Object) {
    drop(Object::take(client));
}

/// A text column of `row`; `None` for NULL or a column of another type
/// (a table made by hand), which must not panic.
fn text(row: &Row, column: usize) -> Option<String> {
    row.try_get(column).ok().flatten()
}

fn decode(handle: &Handle, data: Option<String>) -> Result<Record, StoreError> {
    let data = data.ok_or_else(|| corrupt(handle, "data is NULL or not text".into()))?;
    serde_json::from_str(&data).map_err(|error| {
        // serde's message may quote the data; keep only where it broke.
        corrupt(
            handle,
            format!(
                "invalid record JSON ({:?} error at line {} column {})",
                error.classify(),
                error.line(),
                error.column()
            ),
        )
    })
}

fn encode(record: &Record) -> Result<String, Failure> {
    serde_json::to_string(record).map_err(|error| {
        Failure::Clean(StoreError::Unavailable(format!(
            "postgres: cannot encode record: {error}"
        )))
    })
}

/// A listed row as (handle, record), or `None` (logged) if either is not
/// what this store writes: `sessions list` shows the rest.
fn readable(session_id: Option<String>, data: Option<String>) -> Option<(Handle, Record)> {
    record_of(session_id, data)
        .map_err(|why| log::warn!("postgres: skipping {why}"))
        .ok()
}

/// A row as (handle, record), or why it is not one this store wrote.
fn record_of(session_id: Option<String>, data: Option<String>) -> Result<(Handle, Record), String> {
    let handle = session_id
        .as_deref()
        .map(str::trim_end)
        .and_then(Handle::parse)
        .ok_or("a row whose session_id is not a handle")?;
    let record = decode(&handle, data).map_err(|error| error.to_string())?;
    Ok((handle, record))
}

fn corrupt(handle: &Handle, detail: String) -> StoreError {
    StoreError::Corrupt {
        handle: handle.short().to_owned(),
        detail,
    }
}

/// A short message: the server's primary message or the I/O or TLS failure
/// with its causes ("error performing TLS handshake" alone says not why),
/// never the statement's parameters.
fn unavailable(error: &tokio_postgres::Error) -> StoreError {
    let message = match error.as_db_error() {
        Some(db) => format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            certificate_hint(db)
        ),
        None => {
            let mut message = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                let _ = write!(message, ": {inner}");
                cause = inner.source();
            }
            message
        }
    };
    StoreError::Unavailable(format!("postgres: {message}"))
}

/// What to do when the server refuses a login for want of the right
/// client certificate (pg_hba.conf's `cert` method); else nothing.
fn certificate_hint(db: &tokio_postgres::error::DbError) -> &'static str {
    if db.code() != &SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        return "";
    }
    if db.message().contains("requires a valid client certificate") {
        "; the server takes a client certificate: name it and its key in the store URL's \
         sslcert and sslkey (README, \"TLS\")"
    } else if db
        .message()
        .starts_with("certificate authentication failed")
    {
        "; the certificate's CN must be the URL's user name (or be mapped to it in the \
         server's pg_ident.conf)"
    } else {
        ""
    }
}

/// The stored data is not JSON, or its atime not a number.
fn is_bad_data(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::INVALID_TEXT_REPRESENTATION)
        || error.code() == Some(&SqlState::INVALID_PARAMETER_VALUE)
}

/// The stored data is JSON that `jsonb` cannot hold: a string with
/// `\u0000` in it, which `text` and JSON allow. Only the one-statement
/// write casts to `jsonb`; the locking `modify` reads the text.
fn is_beyond_jsonb(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNTRANSLATABLE_CHARACTER)
}

/// Unix seconds as PostgreSQL's bigint; times past 2^63 s do not occur.
fn unix_i64(seconds: u64) -> i64 {
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

/// `name` or `schema.name`, each an unquoted SQL identifier, so it can be
/// put into statements as it is (and means what web.py's name means).
fn is_plain_identifier(table: &str) -> bool {
    let part = |name: &str| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= 63
    };
    match table.split_once('.') {
        Some((schema, name)) => part(schema) && part(name),
        None => part(table),
    }
}

/// The first advisory-lock key of `table`'s leases, so two tables (or
/// another application's locks on other classes) never share a lease.
fn lease_class(table: &str) -> i32 {
    let digest = Sha256::digest(format!("session-proxy lease {table}").as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

#[async_trait]
impl super::Lease for PostgresLease {
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

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(is_plain_identifier("sessions"));
        assert!(is_plain_identifier("app.web_sessions2"));
        assert!(!is_plain_identifier("sessions; drop table x"));
        assert!(!is_plain_identifier("2sessions"));
        assert!(!is_plain_identifier("a.b.c"));
        assert!(!is_plain_identifier(""));
    }

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

    #[test]
    fn a_corrupt_record_error_quotes_no_data() {
        let handle = Handle::of_id("x");
        let error = decode(&handle, Some("{\"data\": \"secret-value\"}".into())).unwrap_err();
        let text = error.to_string();
        assert!(!text.contains("secret-value"), "{text}");
        assert!(!text.contains(handle.as_str()), "{text}");
    }
}
