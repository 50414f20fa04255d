//! The `postgres` store: web.py's DBStore table, shared by several proxies.
//!
//! The table is web.py's, column for column (SPEC \[6\]):
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
//! JSON. A table made by hand with that DDL is used as it is; one that
//! cannot take the store's writes is an error at start. A table
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

mod errors;
mod lease;
mod statements;
pub mod tls;

pub use lease::PostgresLease;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::time::{timeout_at, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::per_thread::PerThread;
use super::{
    decide_on, max_record_bytes, too_large, touch_by_modify, Change, Decide, Expiry, Handle,
    Record, Store, StoreError,
};
use crate::locks::HandleLocks;
use errors::{corrupt, is_bad_data, is_beyond_jsonb, timed_out, unavailable, Failure};
use lease::{lease_class, LeaseSlot};
pub(crate) use statements::is_plain_identifier;
use statements::Statements;
use tls::{PostgresTls, SslMode};

/// Rows deleted by one sweep statement: small enough that no statement
/// holds many row locks or runs for long.
const SWEEP_BATCH: i64 = 1000;

/// How often `modify` starts over after losing an insert race (another
/// proxy created the same record between our read and our insert).
const MAX_INSERT_RACES: usize = 8;

/// A session store on a PostgreSQL table. Cheap to share: each thread
/// that uses it gets a pool of its own (`PerThread`).
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
    /// A record longer than this is read as corrupt, never whole.
    max_record_bytes: usize,
    timeout: Duration,
    /// Held while the table is made again after it was found dropped: the
    /// requests that found it so wait, and one of them logs it.
    remaking: tokio::sync::Mutex<()>,
    /// The first key of the two-key advisory locks of this table's leases.
    lease_class: i32,
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
        let mut store = PostgresStore::new(url, table, pool_size, timeout)?;
        let deadline = Instant::now() + timeout;
        store
            .create_table(deadline)
            .await
            .map_err(Failure::into_error)?;
        store
            .check_layout(deadline)
            .await
            .map_err(Failure::into_error)?;
        // The leases go by the table itself, not by how the config spells it.
        let name = store
            .table_name(deadline)
            .await
            .map_err(Failure::into_error)?;
        store.lease_class = lease_class(&name);
        Ok(store)
    }

    /// Runs the store's writes on the table in a transaction rolled back,
    /// with a row of a handle of its own: a table made by hand that cannot
    /// hold the store's rows (a `data` of another type than text, no unique
    /// `session_id` for the upsert, another column that must be filled, a
    /// `session_id` shorter than a handle) is an error at start, for
    /// `check` as for `run`, not a 503 on every session's first write
    /// behind a `/healthz` that answers 200.
    async fn check_layout(&self, deadline: Instant) -> Result<(), Failure> {
        let client = self.checkout(deadline).await?;
        let table = &self.table;
        let check = async {
            let layout = |error: tokio_postgres::Error| {
                if error.is_closed() {
                    return Failure::from(error);
                }
                let detail = match unavailable(&error) {
                    StoreError::Unavailable(message) => message,
                    other => other.to_string(),
                };
                Failure::Connection(StoreError::Unavailable(format!(
                    "postgres: table {table} cannot hold this store's rows (made by hand \
                     in another layout than web.py's?): {}",
                    detail.trim_start_matches("postgres: ")
                )))
            };
            let handle = Handle::of_id(&format!("layout check {:032x}", rand::random::<u128>()));
            let key = handle.as_str();
            let record = r#"{"data":{},"created":0,"atime":0,"ip":"","ver":1}"#;
            client.batch_execute("BEGIN").await?;
            let insert = client
                .prepare_cached(&self.sql.insert)
                .await
                .map_err(layout)?;
            let update = client
                .prepare_cached(&self.sql.update_if_version)
                .await
                .map_err(layout)?;
            let touch = client
                .prepare_cached(&self.sql.touch)
                .await
                .map_err(layout)?;
            let inserted = client
                .execute(&insert, &[&key, &0_i64, &record])
                .await
                .map_err(layout)?;
            client
                .query_opt(&update, &[&key, &0_i64, &record, &"1"])
                .await
                .map_err(layout)?;
            client
                .execute(&touch, &[&key, &1_i64])
                .await
                .map_err(layout)?;
            client.batch_execute("ROLLBACK").await?;
            if inserted != 1 {
                return Err(Failure::Clean(StoreError::Unavailable(format!(
                    "postgres: table {table} did not take a row of this store's"
                ))));
            }
            Ok(())
        };
        let outcome = timeout_at(deadline, check).await;
        finish(client, outcome)
    }

    /// The table's name as the server has it: `name` in the `public`
    /// schema, else `schema.name`; whichever spelling the config chose
    /// (`Sessions`, `public.sessions`), proxies sharing the table find
    /// one name, and the name of a table in `public` is the one that
    /// configs naming it `sessions` always gave the leases.
    async fn table_name(&self, deadline: Instant) -> Result<String, Failure> {
        let client = self.checkout(deadline).await?;
        let lookup = async {
            let row = client
                .query_opt(
                    "SELECT n.nspname::text, c.relname::text FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.oid = to_regclass($1)",
                    &[&self.table],
                )
                .await?;
            Ok(match row {
                Some(row) => match (row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?) {
                    (schema, name) if schema == "public" => name,
                    (schema, name) => format!("{schema}.{name}"),
                },
                // Gone again already: as the config spells it.
                None => self.table.clone(),
            })
        };
        let outcome = timeout_at(deadline, lookup).await;
        finish(client, outcome)
    }

    /// Sizes the largest record it reads for session data of at most
    /// `max_data_bytes`, as the disk store does (`store::max_record_bytes`).
    pub fn with_max_data_bytes(mut self, max_data_bytes: usize) -> PostgresStore {
        self.max_record_bytes = max_record_bytes(max_data_bytes);
        self.sql = Statements::new(&self.table, self.max_record_bytes);
        self
    }

    /// Whether the data of a row of `load`, `lock`, `page` or `list`,
    /// at `column` (the data within the bound, else NULL, then its length),
    /// was longer than the bound, so that only its length came.
    fn over_bound(&self, row: &Row, column: usize) -> bool {
        let length: Option<i32> = row.try_get(column + 1).ok().flatten();
        length.is_some_and(|length| length as usize > self.max_record_bytes)
    }

    /// The record of a row of `load` or `lock`.
    fn loaded(&self, handle: &Handle, row: &Row) -> Result<Record, StoreError> {
        if self.over_bound(row, 0) {
            return Err(too_large(handle, self.max_record_bytes));
        }
        decode(handle, text(row, 0))
    }

    /// A row of `list` or `page` (`session_id`, then the data as `load`
    /// has it) as (handle, record), or why it is not read as one.
    fn listed(&self, row: &Row) -> Result<(Handle, Record), Unlisted> {
        let handle = text(row, 0)
            .as_deref()
            .map(str::trim_end)
            .and_then(Handle::parse)
            .ok_or_else(|| Unlisted::Foreign("a row whose session_id is not a handle".into()))?;
        if self.over_bound(row, 1) {
            return Err(Unlisted::TooLarge(too_large(
                &handle,
                self.max_record_bytes,
            )));
        }
        let record =
            decode(&handle, text(row, 1)).map_err(|error| Unlisted::Foreign(error.to_string()))?;
        Ok((handle, record))
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
            sql: Statements::new(table, max_record_bytes(0)),
            max_record_bytes: max_record_bytes(0),
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
    /// a checkout, its statements, [`finish`]) and, when it found its
    /// connection closed, the table dropped or the statements prepared on
    /// its connection stale, mends that and runs it once more (on another
    /// connection: that one is in doubt), within the same deadline.
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
            // The pool drops a connection it knows closed; one whose end
            // came unseen failed this statement, and was dropped. The
            // thread's other idle connections most likely went the same
            // way (a restart, a NAT's or a pooler's idle timeout): they go
            // too, and the pool opens new ones.
            Err(Failure::Closed(error)) => {
                log::debug!("postgres: {error}: once more on a new connection");
                self.pool().await?.retain(|_, _| false);
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
            Some(row) => Ok(Some(self.loaded(handle, &row).map_err(Failure::Clean)?)),
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
                Some(row) => match self.loaded(handle, &row) {
                    Ok(record) => Some(record),
                    Err(error) => return rollback(client, Err(error)).await,
                },
                None => None,
            };
            let change = match decide_on(decide, current.as_ref()) {
                Ok(change) => change,
                Err(error) => return rollback(client, Err(error)).await,
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
    /// one statement (its own transaction), keeping a later access time
    /// stored meanwhile (a touch); the record as stored, or `None` if it
    /// is not at `ver`, or does not parse (the caller's fallback reports
    /// that), or holds what `jsonb` refuses (the fallback does without the
    /// cast).
    async fn update_if_version_on(
        &self,
        client: &ClientWrapper,
        handle: &Handle,
        ver: u64,
        record: &Record,
    ) -> Result<Option<Record>, Failure> {
        let update = client.prepare_cached(&self.sql.update_if_version).await?;
        let json = encode(record)?;
        let (atime, ver) = (unix_i64(record.atime), ver.to_string());
        let params: [&(dyn ToSql + Sync); 4] = [&handle.as_str(), &atime, &json, &ver];
        match client.query_opt(&update, &params).await {
            Ok(Some(row)) => {
                let stored = row
                    .try_get::<_, i64>(0)
                    .ok()
                    .and_then(|t| u64::try_from(t).ok());
                Ok(Some(Record {
                    atime: stored.map_or(record.atime, |stored| stored.max(record.atime)),
                    ..record.clone()
                }))
            }
            Ok(None) => Ok(None),
            Err(error) if is_bad_data(&error) || is_beyond_jsonb(&error) => Ok(None),
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
        // Each row this store cannot read is logged, by its handle: the
        // listing shows the rest.
        Ok(rows
            .iter()
            .filter_map(|row| {
                self.listed(row)
                    .map_err(|why| log::warn!("postgres: skipping {why}"))
                    .ok()
            })
            .collect())
    }

    /// Deletes up to `SWEEP_BATCH` rows idle since before `cutoff`.
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
        let mut skipped = 0;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            match self.listed(row) {
                Ok(listed) => records.push(listed),
                // Its `created` is unknown: it stays until it goes idle
                // (the `atime` column), as a record that does not parse.
                // Logged by its handle, unlike those (web.py's rows come
                // by the thousand; no program writes such records).
                Err(Unlisted::TooLarge(error)) => log::warn!("sweep: skipping {error}"),
                Err(Unlisted::Foreign(_)) => skipped += 1,
            }
        }
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
        let Change::Put(record) = decide_on(decide, Some(seen))? else {
            return self.modify(handle, decide).await;
        };
        let written = &record;
        let update = |deadline| async move {
            let client = self.checkout(deadline).await?;
            let update = self.update_if_version_on(&client, handle, seen.ver, written);
            let outcome = timeout_at(deadline, update).await;
            finish(client, outcome)
        };
        if let Some(stored) = self.run(update).await? {
            return Ok(Some(stored));
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
    /// `SWEEP_BATCH`, each its own statement and transaction. With an
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
        give_up: &super::GiveUp,
    ) -> Result<Option<Box<dyn super::Lease>>, StoreError> {
        let lease = PostgresStore::acquire_lease(self, handle, wait, ttl, give_up).await?;
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

async fn checkout(pool: &Pool, deadline: Instant) -> Result<Object, StoreError> {
    match timeout_at(deadline, pool.get()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(deadpool_postgres::PoolError::Backend(error))) => Err(unavailable(&error)),
        Ok(Err(error)) => Err(StoreError::Unavailable(format!("postgres: {error}"))),
        Err(_elapsed) => Err(timed_out()),
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

/// Why a row of `list` or `page` is not read as a record.
enum Unlisted {
    /// Longer than the bound: only its length came.
    TooLarge(StoreError),
    /// Not a record this store wrote (web.py's, or edited by hand).
    Foreign(String),
}

impl std::fmt::Display for Unlisted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unlisted::TooLarge(error) => error.fmt(f),
            Unlisted::Foreign(why) => f.write_str(why),
        }
    }
}

/// Unix seconds as PostgreSQL's bigint; times past 2^63 s do not occur.
fn unix_i64(seconds: u64) -> i64 {
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_record_error_quotes_no_data() {
        let handle = Handle::of_id("x");
        let error = decode(&handle, Some("{\"data\": \"secret-value\"}".into())).unwrap_err();
        let text = error.to_string();
        assert!(!text.contains("secret-value"), "{text}");
        assert!(!text.contains(handle.as_str()), "{text}");
    }
}
