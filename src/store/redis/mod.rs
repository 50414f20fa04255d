//! The `redis` store: one key per session, standalone or Redis Cluster,
//! shared by several proxies.
//!
//! `key_prefix + handle` holds the record as JSON, with a TTL of the idle
//! timeout (and a second, see `key_ttl`) set on every write and refreshed
//! by every touch, so Redis expires idle sessions itself (SPEC \[6\]).
//! With several comma-separated URLs the store talks to a Redis Cluster;
//! every command names one key, so it works there unchanged.
//!
//! ```no_run
//! # async fn example() -> Result<(), session_proxy::store::StoreError> {
//! use std::time::Duration;
//! use session_proxy::store::redis::RedisStore;
//!
//! let store = RedisStore::connect(
//!     "redis://127.0.0.1:6379", "session:", Duration::from_secs(2), 86400,
//! ).await?;
//! # Ok(()) }
//! ```
//!
//! Writes are optimistic: `modify` reads the record, decides in Rust, and a
//! script writes only if the key still holds what was read; on a conflict
//! the script answers the newer value (read as `load` reads it, up to a
//! byte past the bound) and the decision is made again.
//! Round trips: `load` 1, `touch` 1, `delete` 1, `modify` 2 (1 when
//! nothing changes; +1 per conflict; the first use of a script on a server
//! adds 1, to send it whole), `modify_seen` 1 (the write checks the version the
//! caller loaded; else as `modify`, less its read).
//!
//! Beside this file: `scripts` (the Lua scripts those writes run),
//! `connection` (one server or a cluster, behind one type), `lease` (the
//! cross-instance lease of `lock = true`) and `cluster` (which masters
//! serve the slots, for `/healthz`, `sessions` and the sweep).

mod cluster;
mod connection;
mod lease;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, RedisResult, Value};
use serde::Serialize;

use super::per_thread::PerThread;
use super::{
    decide_on, max_record_bytes, too_large, Change, Decide, Expiry, Handle, Record, SessionData,
    Store, StoreError,
};
use cluster::{failing_ids, masters_of, ClusterMaster, CLUSTER_SLOTS};
use connection::{Connection, Dialer, Node};
use scripts::{LuaCall, Scripts};

pub use lease::RedisLease;

/// How often `modify` decides again after losing a race before it gives up.
const MAX_ATTEMPTS: u32 = 64;

/// The first pause before a call a cluster refused is made again (see
/// `run`): about a gossip round between two nodes on one network.
const CLUSTER_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Keys asked for by one SCAN step.
const SCAN_COUNT: usize = 500;

/// The longest TTL given a key, about 68 years: Redis refuses a `SET EX`
/// or `EXPIRE` whose expiry in milliseconds would pass an i64 ("invalid
/// expire time"), so an idle timeout of that order (a config's way of
/// saying "never") would fail every write.
const MAX_TTL_SECONDS: u64 = i32::MAX as u64;

/// A session store on Redis or a Redis Cluster. Cheap to share: each
/// thread that uses it gets its own connection (`PerThread`), which
/// multiplexes that thread's requests and reconnects by itself.
pub struct RedisStore {
    dialer: Dialer,
    connections: PerThread<Connection>,
    key_prefix: String,
    timeout: Duration,
    idle_ttl: u64,
    scripts: Arc<Scripts>,
    /// A record longer than this is read as corrupt, never whole.
    max_record_bytes: usize,
}

/// What a listing's read of one key found.
enum Listed {
    /// The key's value, within the bound.
    Value(String),
    /// A value longer than the bound, read no further than a byte past it.
    TooLarge,
    /// No record: gone, empty, not UTF-8, or a key of another type.
    Nothing,
}

/// The stored layout: a [`Record`] with `atime` first, so the `TOUCH` script finds
/// it without decoding the rest. Reading accepts any field order.
#[derive(Serialize)]
struct Stored<'a> {
    atime: u64,
    created: u64,
    ip: &'a str,
    ver: u64,
    data: &'a SessionData,
}

impl RedisStore {
    /// Connects to `urls`: one `redis://host:port[/db]` URL for a standalone
    /// server, several (comma-separated) for the nodes of a Redis Cluster.
    /// Records live under `key_prefix + handle` until the idle timeout
    /// `idle_timeout` (in seconds; 0: no TTL) has passed since their last
    /// write, and a second more (see `key_ttl`). Every command gives up after
    /// `timeout`; a lost connection is re-established by the next commands.
    pub async fn connect(
        urls: &str,
        key_prefix: &str,
        timeout: Duration,
        idle_timeout: u64,
    ) -> Result<RedisStore, StoreError> {
        let store = RedisStore {
            dialer: Dialer::for_urls(urls, timeout)?,
            connections: PerThread::default(),
            key_prefix: key_prefix.to_owned(),
            timeout,
            idle_ttl: key_ttl(idle_timeout),
            scripts: Arc::new(Scripts::new()),
            max_record_bytes: max_record_bytes(0),
        };
        store.ping().await?;
        Ok(store)
    }

    /// Sizes the largest record it reads for session data of at most
    /// `max_data_bytes`, as the disk store does (`store::max_record_bytes`).
    pub fn with_max_data_bytes(mut self, max_data_bytes: usize) -> RedisStore {
        self.max_record_bytes = max_record_bytes(max_data_bytes);
        self
    }

    /// Whether [`RedisStore::connect`] can read `urls`, without connecting:
    /// config validation asks, so that a URL it would refuse is a config
    /// error (exit 2), not a store that seems unreachable (exit 1).
    pub fn check_urls(urls: &str) -> Result<(), StoreError> {
        Dialer::for_urls(urls, Duration::from_secs(1)).map(|_| ())
    }

    /// Awaits a call on the calling thread's connection for at most the
    /// timeout. A call that times out leaves that connection in doubt: the
    /// server may have vanished behind a black hole, or a firewall or NAT
    /// dropped the flow, and nothing ever tells the connection (the crate
    /// reconnects on an error, never on silence; a kernel gives up on
    /// unacknowledged data after some 15 minutes). It is forgotten, so the
    /// next call dials anew, as the PostgreSQL store drops a connection
    /// that timed out.
    async fn bounded<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let outcome = tokio::time::timeout(self.timeout, call).await;
        if outcome.is_err() {
            self.connections.forget();
        }
        answer(operation, outcome)
    }

    /// Runs `call` on the calling thread's connection, the wait for that
    /// connection included, within the timeout: while the server hangs,
    /// the requests of a thread that gave its connection up wait in turn
    /// for each other's attempts to open one, and each waited out them
    /// all (5 s, with a timeout of 1 s).
    ///
    /// A call that failed for the connection's sake is made once more,
    /// within the same timeout, on the connection the crate opens in its
    /// place: the crate learns that the server closed a connection (its
    /// `timeout` for idle clients, a restart) only from the next command on
    /// it, and hands a failed reconnection to the next command too, so each
    /// proxy thread's first request afterwards got a 503 from a server that
    /// answers.
    ///
    /// A call a cluster refused without running it (`MOVED`, `ASK`,
    /// `TRYAGAIN`, `CLUSTERDOWN`) once the crate's own redirections ran out
    /// is made again, after a pause that doubles each time, until the
    /// timeout: while a slot moves, its two masters can send a client back
    /// and forth (`MOVED` from each to the other) until both are told who
    /// owns it, and gossip takes its time to tell the rest.
    ///
    /// Only commands that are safe to repeat go through here: reads, writes
    /// that check what the key holds first (or set what they set), and the
    /// lease's `SET NX`.
    async fn run<T, F, Fut>(&self, operation: &str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let Ok(connection) = tokio::time::timeout_at(deadline, self.connection()).await else {
            return Err(StoreError::Unavailable(format!(
                "redis {operation}: timed out waiting for a connection"
            )));
        };
        let connection = connection?;
        let attempt = || tokio::time::timeout_at(deadline, call(connection.clone()));
        let mut outcome = attempt().await;
        if matches!(&outcome, Ok(Err(error)) if error.is_unrecoverable_error()) {
            outcome = attempt().await;
        }
        let mut pause = CLUSTER_RETRY_PAUSE;
        while matches!(&outcome, Ok(Err(error)) if error.is_cluster_error())
            && tokio::time::Instant::now() + pause < deadline
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(CLUSTER_RETRY_PAUSE * 16);
            outcome = attempt().await;
        }
        if outcome.is_err() {
            self.connections.forget();
        }
        answer(operation, outcome)
    }

    /// The calling thread's connection, opened on first use.
    async fn connection(&self) -> Result<Connection, StoreError> {
        self.connections
            .get_or_open(|| self.dialer.open(self.timeout))
            .await
    }

    fn key(&self, handle: &Handle) -> String {
        format!("{}{}", self.key_prefix, handle)
    }

    /// The handle of a key found by SCAN, if it is one of ours (lease keys
    /// and strangers under the prefix are not).
    fn handle_of(&self, key: &str) -> Option<Handle> {
        key.strip_prefix(&self.key_prefix).and_then(Handle::parse)
    }

    /// The value of `handle`'s key, if any; a value that is not UTF-8
    /// (another program's, under the prefix) is a corrupt record, and so
    /// is one longer than `max_record_bytes`, of which no more is read.
    /// `GETRANGE` in place of `GET`, a plain command still: an empty
    /// value reads as none (it is no record either way).
    async fn get(&self, handle: &Handle, key: &str) -> Result<Option<String>, StoreError> {
        // Built in place: `arg` answers a borrow, which `to_owned` would copy.
        let mut command = redis::cmd("GETRANGE");
        command.arg(key).arg(0).arg(self.last_byte_read());
        let command = &command;
        let value = self
            .run("get", |mut connection| async move {
                match command
                    .query_async::<Option<Vec<u8>>>(&mut connection)
                    .await
                {
                    Err(error) if error.code() == Some("WRONGTYPE") => Ok(Err(())),
                    other => other.map(Ok),
                }
            })
            .await?;
        match value {
            Ok(Some(bytes)) if bytes.is_empty() => Ok(None),
            Ok(Some(bytes)) if bytes.len() > self.max_record_bytes => {
                Err(too_large(handle, self.max_record_bytes))
            }
            Ok(value) => value.map(|bytes| utf8(handle, bytes)).transpose(),
            // Not a string (another program's, under the prefix): as
            // corrupt a record as one that does not parse, rather than a
            // 503 on every request of the session.
            Err(()) => Err(StoreError::Corrupt {
                handle: handle.short().to_owned(),
                detail: "the key holds another type than a string".into(),
            }),
        }
    }

    /// The index of the last byte a read of a value asks for (`GETRANGE 0
    /// last`): one past the bound, to see it passed.
    fn last_byte_read(&self) -> i64 {
        i64::try_from(self.max_record_bytes).unwrap_or(i64::MAX)
    }

    /// Writes `new` (`None`: deletes) if `handle`'s `key` still holds
    /// `expected`. `Ok(None)` when written, else `Ok(Some(what the key
    /// holds now))`, read as `get` reads it.
    async fn compare_and_set(
        &self,
        handle: &Handle,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<Option<Option<String>>, StoreError> {
        let call = self.scripts.compare_and_set.call(key, |command| {
            command
                .arg(expected.unwrap_or(""))
                .arg(new.unwrap_or(""))
                .arg(self.idle_ttl)
                .arg(self.last_byte_read());
        });
        self.written(handle, self.call_write(&call).await?)
    }

    /// Writes `record` if `handle`'s `key` holds a record at version `ver`,
    /// keeping a later atime stored since (a touch). `Ok(Ok(the record as
    /// stored))` when written, else `Ok(Err(what the key holds now))`, read
    /// as `get` reads it.
    async fn set_if_version(
        &self,
        handle: &Handle,
        key: &str,
        ver: u64,
        record: &Record,
    ) -> Result<Result<Record, Option<String>>, StoreError> {
        let new = encode(record)?;
        let call = self.scripts.set_if_version.call(key, |command| {
            command
                .arg(ver)
                .arg(&new)
                .arg(self.idle_ttl)
                .arg(self.last_byte_read());
        });
        match self.call_write(&call).await? {
            // Written with the stored atime, later than the record's.
            Value::Array(kept) => {
                let atime = match kept.as_slice() {
                    [Value::BulkString(digits)] => std::str::from_utf8(digits)
                        .ok()
                        .and_then(|digits| digits.parse().ok()),
                    _ => None,
                };
                let atime = atime.ok_or_else(|| {
                    StoreError::Unavailable("redis: unexpected script answer".into())
                })?;
                Ok(Ok(Record {
                    atime,
                    ..record.clone()
                }))
            }
            answer => Ok(match self.written(handle, answer)? {
                None => Ok(record.clone()),
                Some(current) => Err(current),
            }),
        }
    }

    /// A write script's answer: `Ok(None)` when it wrote, else
    /// `Ok(Some(what the key holds now))` (`Some(None)`: absent or empty),
    /// up to a byte past the bound, which makes it corrupt as `get` finds
    /// it: so is a value that is not UTF-8.
    fn written(
        &self,
        handle: &Handle,
        answer: Value,
    ) -> Result<Option<Option<String>>, StoreError> {
        match answer {
            Value::Int(1) => Ok(None),
            Value::Int(0) => Ok(Some(None)),
            // Before the UTF-8 check: the cut may split a character.
            Value::BulkString(bytes) if bytes.len() > self.max_record_bytes => {
                Err(too_large(handle, self.max_record_bytes))
            }
            Value::BulkString(bytes) => utf8(handle, bytes).map(|current| Some(Some(current))),
            _ => Err(StoreError::Unavailable(
                "redis: unexpected script answer".into(),
            )),
        }
    }

    /// Runs a write script; its answer as Redis gave it.
    async fn call_write(&self, call: &LuaCall) -> Result<Value, StoreError> {
        self.run("write", |mut connection| async move {
            call.invoke(&mut connection).await
        })
        .await
    }

    /// Decides on `stored` (what the key held when last read) and writes
    /// if the key still holds it, deciding again on what it holds instead.
    async fn modify_from(
        &self,
        handle: &Handle,
        key: &str,
        mut stored: Option<String>,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            let current = match &stored {
                Some(value) => Some(decode(handle, value, self.max_record_bytes)?),
                None => None,
            };
            let (new, outcome) = match decide_on(decide, current.as_ref())? {
                Change::Keep => return Ok(current),
                Change::Delete if stored.is_none() => return Ok(None),
                Change::Delete => (None, None),
                Change::Put(record) => (Some(encode(&record)?), Some(record)),
            };
            match self
                .compare_and_set(handle, key, stored.as_deref(), new.as_deref())
                .await?
            {
                None => return Ok(outcome),
                Some(newer) => stored = newer,
            }
            // Many writers on one key: spread them out a little.
            if attempt >= 2 {
                let spread = 1 + rand::random::<u64>() % (1 << attempt.min(5));
                tokio::time::sleep(Duration::from_millis(spread)).await;
            }
        }
        Err(StoreError::Unavailable("redis: contention".into()))
    }

    /// Every master of the cluster that is not failing, or the one server.
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let Connection::Cluster(mut connection) = self.connection().await? else {
            return Ok(vec![Node::Standalone]);
        };
        let masters = self.cluster_masters(&mut connection).await?;
        Ok(masters
            .into_iter()
            .filter(|master| !master.failing)
            .map(|master| Node::ClusterMaster {
                host: master.host,
                port: master.port,
            })
            .collect())
    }

    /// The masters of the cluster, addressed as the crate addresses them:
    /// by `CLUSTER SLOTS`'s endpoint, which is a host name with
    /// `cluster-preferred-endpoint-type hostname` where `CLUSTER NODES`
    /// names the IP (so every SCAN and `/healthz` failed on such a cluster:
    /// the crate has no connection by that name). `CLUSTER NODES` says
    /// which of them are failing.
    async fn cluster_masters(
        &self,
        connection: &mut ClusterConnection,
    ) -> Result<Vec<ClusterMaster>, StoreError> {
        let random = || RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let slots = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
        let slots = self
            .bounded("cluster slots", connection.route_command(slots, random()))
            .await?;
        let nodes = redis::cmd("CLUSTER").arg("NODES").to_owned();
        let nodes = self
            .bounded("cluster nodes", connection.route_command(nodes, random()))
            .await?;
        let nodes: String = redis::from_redis_value(nodes)
            .map_err(|_| StoreError::Unavailable("redis: unreadable CLUSTER NODES".into()))?;
        Ok(masters_of(&slots, &failing_ids(&nodes)))
    }

    /// One SCAN step on `node`: the next cursor ("0": done) and this
    /// store's keys.
    async fn scan(&self, node: &Node, cursor: &str) -> Result<(String, Vec<String>), StoreError> {
        let pattern = format!("{}*", glob_escape(&self.key_prefix));
        let command = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .to_owned();
        let answer = self.run_on(node, command).await?;
        let (cursor, keys): (String, Vec<Vec<u8>>) = redis::from_redis_value(answer)
            .map_err(|_| StoreError::Unavailable("redis: unreadable SCAN answer".into()))?;
        // A key whose name is not UTF-8 is another program's (a handle is
        // hex): read as text, it failed the whole page, so `sessions list`
        // and every sweep.
        let keys = keys
            .into_iter()
            .filter_map(|key| String::from_utf8(key).ok())
            .collect();
        Ok((cursor, keys))
    }

    async fn run_on(&self, node: &Node, command: Cmd) -> Result<Value, StoreError> {
        let mut connection = self.connection().await?;
        match (&mut connection, node.routing()) {
            (Connection::Cluster(cluster), Some(routing)) => {
                self.bounded("scan", cluster.route_command(command, routing))
                    .await
            }
            _ => {
                self.bounded("scan", command.query_async(&mut connection))
                    .await
            }
        }
    }

    /// The values of `keys`, all on `node`, in one round trip, each read
    /// as `get` reads it: up to one byte past the bound.
    async fn get_all(&self, node: &Node, keys: &[String]) -> Result<Vec<Listed>, StoreError> {
        let mut pipeline = redis::pipe();
        // A key of another type answers WRONGTYPE, which otherwise fails
        // the whole page: `sessions list` and every sweep.
        pipeline.ignore_errors();
        for key in keys {
            pipeline
                .cmd("GETRANGE")
                .arg(key)
                .arg(0)
                .arg(self.last_byte_read());
        }
        let mut connection = self.connection().await?;
        let values: Vec<Value> = match (&mut connection, node.routing()) {
            (Connection::Cluster(cluster), Some(RoutingInfo::SingleNode(route))) => {
                let read = cluster.route_pipeline(pipeline, 0, keys.len(), route);
                self.bounded("get", read).await?
            }
            _ => {
                self.bounded("get", pipeline.query_async(&mut connection))
                    .await?
            }
        };
        // Values that are not text (not UTF-8, or keys of another type)
        // are another program's under the prefix: skipped, as are records
        // that do not parse. An empty value (or none: GETRANGE answers
        // alike) is no record.
        values
            .into_iter()
            .map(|value| match value {
                Value::Nil | Value::ServerError(_) => Ok(Listed::Nothing),
                Value::BulkString(bytes) if bytes.is_empty() => Ok(Listed::Nothing),
                // Before the UTF-8 check: the cut may split a character.
                Value::BulkString(bytes) if bytes.len() > self.max_record_bytes => {
                    Ok(Listed::TooLarge)
                }
                Value::BulkString(bytes) => Ok(String::from_utf8(bytes)
                    .map(Listed::Value)
                    .unwrap_or(Listed::Nothing)),
                _ => Err(StoreError::Unavailable("redis: unreadable value".into())),
            })
            .collect()
    }

    /// Calls `visit(handle, key, value)` for every record of this store,
    /// node by node, one SCAN page at a time; `value` is `Err` (corrupt)
    /// for one longer than the bound, of which no more was read.
    async fn for_each_record<F>(&self, mut visit: F) -> Result<(), StoreError>
    where
        F: FnMut(Handle, String, Result<String, StoreError>),
    {
        for node in self.nodes().await? {
            let mut cursor = "0".to_owned();
            loop {
                let (next, keys) = self.scan(&node, &cursor).await?;
                // Lease keys and strangers under the prefix are not read.
                let (handles, keys): (Vec<Handle>, Vec<String>) = keys
                    .into_iter()
                    .filter_map(|key| Some((self.handle_of(&key)?, key)))
                    .unzip();
                if !keys.is_empty() {
                    let values = self.get_all(&node, &keys).await?;
                    for ((handle, key), value) in handles.into_iter().zip(keys).zip(values) {
                        match value {
                            Listed::Value(value) => visit(handle, key, Ok(value)),
                            Listed::TooLarge => {
                                let error = too_large(&handle, self.max_record_bytes);
                                visit(handle, key, Err(error));
                            }
                            Listed::Nothing => {}
                        }
                    }
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

/// The TTL a record's key gets at each write, for an idle timeout of
/// `idle_timeout` seconds: a second more. A record is idle-expired once
/// `now - atime > timeout` in whole seconds (SPEC \[4.3\]), so it serves
/// through the whole second `atime + timeout`, which ends a second after
/// that; the write that sets the TTL comes a fraction of a second after the
/// second `atime` began. A TTL of the timeout alone ended sessions up to a
/// second early. 0 stays 0 (no TTL); at most about 68 years, which longer
/// ones are cut to.
fn key_ttl(idle_timeout: u64) -> u64 {
    match idle_timeout {
        0 => 0,
        timeout => timeout.saturating_add(1).min(MAX_TTL_SECONDS),
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
        match self.get(handle, &self.key(handle)).await? {
            Some(value) => decode(handle, &value, self.max_record_bytes).map(Some),
            None => Ok(None),
        }
    }

    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let key = self.key(handle);
        let stored = self.get(handle, &key).await?;
        self.modify_from(handle, &key, stored, decide).await
    }

    /// One round trip when nothing changed since `seen` was loaded: the
    /// write checks the version instead of a read before it.
    async fn modify_seen(
        &self,
        handle: &Handle,
        seen: &Record,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let key = self.key(handle);
        let Change::Put(record) = decide_on(decide, Some(seen))? else {
            // Deletes and keeps are not what this shortcut is for.
            return self.modify(handle, decide).await;
        };
        match self.set_if_version(handle, &key, seen.ver, &record).await? {
            Ok(stored) => Ok(Some(stored)),
            Err(stored) => self.modify_from(handle, &key, stored, decide).await,
        }
    }

    async fn touch(&self, handle: &Handle, atime: u64) -> Result<bool, StoreError> {
        let key = self.key(handle);
        let call = &self.scripts.touch.call(&key, |command| {
            command.arg(atime).arg(self.idle_ttl);
        });
        let touch =
            |mut connection: Connection| async move { call.invoke::<i64>(&mut connection).await };
        match self.run("touch", touch).await? {
            0 => return Ok(false),
            touched if touched > 0 => return Ok(true),
            _ => {}
        }
        // Not this store's layout (written by hand or by another tool).
        super::touch_by_modify(self, handle, atime).await
    }

    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
        let command = &redis::cmd("DEL").arg(self.key(handle)).to_owned();
        let deleted: i64 = self
            .run("delete", |mut connection| async move {
                command.query_async(&mut connection).await
            })
            .await?;
        Ok(deleted > 0)
    }

    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
        let mut records = Vec::new();
        self.for_each_record(|handle, _, value| {
            match value.and_then(|value| decode(&handle, &value, self.max_record_bytes)) {
                Ok(record) => records.push((handle, record)),
                Err(error) => log::warn!("redis: skipping {error}"),
            }
        })
        .await?;
        Ok(records)
    }

    /// Redis expires idle records by their TTL; with an absolute timeout
    /// every key is scanned (each master of a cluster) and the records past
    /// either timeout are deleted, each only if unchanged since it was read.
    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
        if expiry.absolute.is_none() {
            return Ok(0);
        }
        let mut expired = Vec::new();
        self.for_each_record(|handle, key, value| match value {
            // Its `created` is unknown: it stays (until its TTL, if it has
            // one), as a record that does not parse. Logged by its handle,
            // unlike those: no program writes such records in numbers.
            Err(error) => log::warn!("sweep: skipping {error}"),
            Ok(value) => {
                if decode(&handle, &value, self.max_record_bytes)
                    .is_ok_and(|record| expiry.is_expired(&record, now))
                {
                    expired.push((handle, key, value));
                }
            }
        })
        .await?;
        let mut deleted = 0;
        for (handle, key, value) in expired {
            match self
                .compare_and_set(&handle, &key, Some(&value), None)
                .await
            {
                Ok(None) => deleted += 1,
                // Changed since it was read: not expired as it is now.
                Ok(Some(_)) => {}
                // Changed into a value past the bound (or not text): left,
                // as the listing leaves one.
                Err(error @ StoreError::Corrupt { .. }) => log::warn!("sweep: skipping {error}"),
                Err(error) => return Err(error),
            }
        }
        Ok(deleted)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let command = &redis::cmd("PING").to_owned();
        self.run::<Value, _, _>("ping", |mut connection| async move {
            command.query_async(&mut connection).await
        })
        .await
        .map(|_| ())
    }

    /// On a cluster: every slot has a master, and every master that holds
    /// slots answers a PING on this thread's connection to it. The crate's
    /// own PING goes to the masters it is connected to, so it kept
    /// answering while a third of the sessions got the 503.
    async fn health(&self) -> Result<(), StoreError> {
        let Connection::Cluster(mut connection) = self.connection().await? else {
            return self.ping().await;
        };
        let masters = self.cluster_masters(&mut connection).await?;
        let served: u32 = masters.iter().map(|master| master.slots).sum();
        if served < CLUSTER_SLOTS {
            let missing = CLUSTER_SLOTS - served;
            return Err(StoreError::Unavailable(format!(
                "redis cluster: {missing} of {CLUSTER_SLOTS} slots have no master"
            )));
        }
        for master in masters {
            let ping = redis::cmd("PING").to_owned();
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: master.host.clone(),
                port: master.port,
            });
            // Not `run`: a master that refuses is no reason for this
            // thread to open its connections to the others again (the
            // crate mends that one); one that times out is, as anywhere.
            let operation = format!("cluster master {}:{}", master.host, master.port);
            self.bounded(&operation, connection.route_command(ping, route))
                .await?;
        }
        Ok(())
    }

    async fn acquire_lease(
        &self,
        handle: &Handle,
        wait: Duration,
        ttl: Duration,
        give_up: &super::GiveUp,
    ) -> Result<Option<Box<dyn super::Lease>>, StoreError> {
        let lease = RedisStore::acquire_lease(self, handle, wait, ttl, give_up).await?;
        Ok(Some(Box::new(lease)))
    }
}

/// Awaits a Redis call for at most `timeout`; any failure is `Unavailable`
/// with a short message naming the operation.
async fn bounded<T>(
    timeout: Duration,
    operation: &str,
    call: impl std::future::Future<Output = RedisResult<T>>,
) -> Result<T, StoreError> {
    answer(operation, tokio::time::timeout(timeout, call).await)
}

fn answer<T>(
    operation: &str,
    outcome: Result<RedisResult<T>, tokio::time::error::Elapsed>,
) -> Result<T, StoreError> {
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            // By characters: the server's text is not ours, and a cut
            // inside a multi-byte character would panic.
            let message: String = error.to_string().chars().take(160).collect();
            Err(StoreError::Unavailable(format!(
                "redis {operation}: {message}"
            )))
        }
        Err(_elapsed) => Err(StoreError::Unavailable(format!(
            "redis {operation}: timed out"
        ))),
    }
}

/// A stored value as text; one that is not UTF-8 is a corrupt record.
fn utf8(handle: &Handle, bytes: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|_| StoreError::Corrupt {
        handle: handle.short().to_owned(),
        detail: "record is not UTF-8".into(),
    })
}

fn encode(record: &Record) -> Result<String, StoreError> {
    let stored = Stored {
        atime: record.atime,
        created: record.created,
        ip: &record.ip,
        ver: record.ver,
        data: &record.data,
    };
    serde_json::to_string(&stored)
        .map_err(|error| StoreError::Unavailable(format!("redis: cannot encode record: {error}")))
}

/// The record `value` holds; one longer than `limit` bytes is corrupt, as
/// a bounded read (`get`, a listing's, a write script's answer) finds it.
fn decode(handle: &Handle, value: &str, limit: usize) -> Result<Record, StoreError> {
    if value.len() > limit {
        return Err(too_large(handle, limit));
    }
    serde_json::from_str(value).map_err(|error| StoreError::Corrupt {
        handle: handle.short().to_owned(),
        // serde's message may quote the data; keep only where it broke.
        detail: format!(
            "invalid record JSON ({:?} error at line {} column {})",
            error.classify(),
            error.line(),
            error.column()
        ),
    })
}

/// `text` as a SCAN MATCH pattern that matches only itself.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_layout_puts_atime_first_and_reads_back() {
        let record = Record {
            data: serde_json::from_str(r#"{"atime":1,"count":2}"#).unwrap(),
            created: 10,
            atime: 20,
            ip: "127.0.0.1".into(),
            ver: 3,
        };
        let value = encode(&record).unwrap();
        assert!(value.starts_with(r#"{"atime":20,"#), "{value}");
        assert_eq!(
            decode(&Handle::of_id("x"), &value, usize::MAX).unwrap(),
            record
        );
    }

    #[test]
    fn a_long_error_of_the_server_is_cut_by_characters() {
        // Two-byte characters at either parity: whatever the crate puts
        // before the text, one of them straddles byte 160, where a cut
        // by bytes panicked.
        for lead in ["", "x"] {
            let text = format!("{lead}{}", "é".repeat(200));
            let error = redis::RedisError::from((redis::ErrorKind::Client, "refused", text));
            let Err(StoreError::Unavailable(message)) = answer::<()>("get", Ok(Err(error))) else {
                panic!("not Unavailable");
            };
            assert!(message.starts_with("redis get: "), "{message}");
            assert!(
                message.chars().count() <= "redis get: ".len() + 160,
                "{message}"
            );
        }
    }

    #[test]
    fn glob_characters_in_the_prefix_are_escaped() {
        assert_eq!(glob_escape("s*[1]?:"), r"s\*\[1\]\?:");
    }
}
