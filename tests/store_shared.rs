//! The shared stores against real servers: PostgreSQL at 127.0.0.1:5432,
//! Redis at 127.0.0.1:6379, and a Redis Cluster each test run starts for
//! itself. A missing server skips its tests loudly, or fails them with
//! `SESSION_PROXY_REQUIRE_SERVICES=1` (CI). Every test uses its own table or
//! key prefix, removed at the end.

#[path = "support/store_cases.rs"]
#[macro_use]
mod store_cases;
#[path = "support/redis_cluster.rs"]
mod redis_cluster;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use session_proxy::store::postgres::PostgresStore;
use session_proxy::store::redis::RedisStore;
use session_proxy::store::{Change, Expiry, GiveUp, Handle, Record, Serialized, Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use redis_cluster::{redis_cli, Cluster};

const POSTGRES_ADDR: &str = "127.0.0.1:5432";
const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS_ADDR: &str = "127.0.0.1:6379";
/// The store timeout of the fault tests, which measure it.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The store timeout elsewhere: generous, as this 2-core machine may be
/// busy with builds while the concurrency tests run.
const PATIENT: Duration = Duration::from_secs(15);
const IDLE_TTL: u64 = 3600;

// ---------------------------------------------------------------------------
// Services: present, or a loud skip.

/// Whether `name` answers at `addr`. When it does not: a failure under
/// `SESSION_PROXY_REQUIRE_SERVICES=1`, else a loud skip.
async fn service_up(name: &str, addr: &str) -> bool {
    let reachable = matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    );
    if !reachable {
        let required = std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() == Ok("1");
        assert!(
            !required,
            "{name} not reachable at {addr} and SESSION_PROXY_REQUIRE_SERVICES=1"
        );
        eprintln!(
            "\n******** SKIPPED: {name} not reachable at {addr} (set \
             SESSION_PROXY_REQUIRE_SERVICES=1 to make this a failure) ********\n"
        );
    }
    reachable
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Runs `work` to completion on a runtime of its own: for clean-up in
/// `Drop`, which may run inside (or outside) the test's runtime.
fn block_on_fresh<F: std::future::Future<Output = ()> + Send + 'static>(work: F) {
    let _ = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(work);
        }
    })
    .join();
}

/// A fresh place on a shared server (a table, a key prefix) to make stores
/// on: what a test written once for both servers may ask of it.
trait Server: Sized {
    type Store: Store + 'static;

    /// `None` when the server is absent: a loud skip, or a failure under
    /// `SESSION_PROXY_REQUIRE_SERVICES=1`.
    async fn new() -> Option<Self>;

    /// The server's address, for a relay in front of it.
    fn addr(&self) -> &'static str;

    /// A store on it, as a proxy has.
    async fn store(&self) -> Self::Store;

    /// A store on it that reaches the server through 127.0.0.1:`port` (a
    /// relay) and gives up after `timeout`.
    async fn store_via(&self, port: u16, timeout: Duration) -> Self::Store;
}

/// `on_both_servers!(#[tokio::test(…)] postgres_NAME, redis_NAME, |server| { … })`:
/// one test body, run as `postgres_NAME` on a fresh [`PgTable`] and as
/// `redis_NAME` on a fresh [`RedisPrefix`], each skipped when its server is
/// absent. The body sees `server` only as a [`Server`].
macro_rules! on_both_servers {
    (@on $fixture:ty, |$server:ident| $body:block) => {
        async fn case<S: Server>($server: S) $body
        if let Some(server) = <$fixture as Server>::new().await {
            case(server).await;
        }
    };
    ($(#[$attr:meta])* $postgres:ident, $redis:ident, |$server:ident| $body:block) => {
        $(#[$attr])*
        async fn $postgres() {
            on_both_servers!(@on PgTable, |$server| $body);
        }

        $(#[$attr])*
        async fn $redis() {
            on_both_servers!(@on RedisPrefix, |$server| $body);
        }
    };
}

/// A fresh table name, dropped with the guard.
struct PgTable {
    name: String,
}

impl Server for PgTable {
    type Store = PostgresStore;

    async fn new() -> Option<PgTable> {
        service_up("PostgreSQL", POSTGRES_ADDR)
            .await
            .then(|| PgTable {
                name: unique("sessions_test"),
            })
    }

    fn addr(&self) -> &'static str {
        POSTGRES_ADDR
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect(POSTGRES_URL, &self.name, 4, PATIENT)
            .await
            .expect("connect to PostgreSQL")
    }

    async fn store_via(&self, port: u16, timeout: Duration) -> PostgresStore {
        let url = format!("postgres://postgres@127.0.0.1:{port}/test");
        PostgresStore::connect(&url, &self.name, 2, timeout)
            .await
            .expect("connect to PostgreSQL through the relay")
    }
}

impl Drop for PgTable {
    fn drop(&mut self) {
        let drop_table = format!("DROP TABLE IF EXISTS {}", self.name);
        block_on_fresh(async move {
            if let Ok(client) = sql_client().await {
                let _ = client.batch_execute(&drop_table).await;
            }
        });
    }
}

/// A plain connection, for looking at and arranging the table directly.
async fn sql_client() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(POSTGRES_URL, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A fresh key prefix, whose keys are deleted with the guard.
struct RedisPrefix {
    prefix: String,
    urls: String,
}

impl Server for RedisPrefix {
    type Store = RedisStore;

    async fn new() -> Option<RedisPrefix> {
        service_up("Redis", REDIS_ADDR).await.then(|| RedisPrefix {
            prefix: format!("{}:", unique("test_session")),
            urls: format!("redis://{REDIS_ADDR}"),
        })
    }

    fn addr(&self) -> &'static str {
        REDIS_ADDR
    }

    async fn store(&self) -> RedisStore {
        RedisStore::connect(&self.urls, &self.prefix, PATIENT, IDLE_TTL)
            .await
            .expect("connect to Redis")
    }

    async fn store_via(&self, port: u16, timeout: Duration) -> RedisStore {
        let url = format!("redis://127.0.0.1:{port}");
        RedisStore::connect(&url, &self.prefix, timeout, IDLE_TTL)
            .await
            .expect("connect to Redis through the relay")
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let pattern = format!("{}*", self.prefix);
        let url = format!("redis://{REDIS_ADDR}");
        block_on_fresh(async move {
            let Ok(mut connection) = redis_connection(&url).await else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut connection)
                .await
                .unwrap_or_default();
            for key in keys {
                let _: Result<i64, _> = redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut connection)
                    .await;
            }
        });
    }
}

async fn redis_connection(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

// ---------------------------------------------------------------------------
// The suite every store runs (tests/support/store_cases.rs). Its cases use
// fresh handles in a store shared by all of them, so they share one table
// (per test run) or one key prefix (whose keys expire by TTL).

store_cases!(postgres_cases, async { postgres_for_cases().await });
store_cases!(redis_cases, async { redis_for_cases().await });

/// `None` (the case is skipped, loudly) when the server is absent, unless
/// `SESSION_PROXY_REQUIRE_SERVICES=1`.
async fn postgres_for_cases() -> Option<Arc<dyn Store>> {
    if !service_up("PostgreSQL", POSTGRES_ADDR).await {
        return None;
    }
    static TABLE: OnceLock<String> = OnceLock::new();
    static STALE_DROPPED: AtomicBool = AtomicBool::new(false);
    // The table of this run, named by its start, so a later run can drop
    // what runs of more than an hour ago left (the harness has no teardown).
    let table =
        TABLE.get_or_init(|| format!("store_cases_{}_{:08x}", now(), rand::random::<u32>()));
    if !STALE_DROPPED.swap(true, Ordering::SeqCst) {
        drop_stale_case_tables(now() - 3600).await;
    }
    let store = PostgresStore::connect(POSTGRES_URL, table, 4, PATIENT)
        .await
        .expect("connect to PostgreSQL");
    Some(Arc::new(store))
}

async fn drop_stale_case_tables(started_before: u64) {
    let Ok(client) = sql_client().await else {
        return;
    };
    let Ok(rows) = client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'store\\_cases\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let started = name.split('_').nth(2).and_then(|t| t.parse::<u64>().ok());
        if started.is_some_and(|started| started < started_before) {
            let _ = client
                .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                .await;
        }
    }
}

async fn redis_for_cases() -> Option<Arc<dyn Store>> {
    if !service_up("Redis", REDIS_ADDR).await {
        return None;
    }
    let url = format!("redis://{REDIS_ADDR}");
    let store = RedisStore::connect(&url, "session_proxy_store_cases:", PATIENT, IDLE_TTL)
        .await
        .expect("connect to Redis");
    Some(Arc::new(store))
}

// ---------------------------------------------------------------------------
// Records and the behaviours every shared store must show.

fn record(data: Value, created: u64, atime: u64) -> Record {
    let Value::Object(data) = data else {
        panic!("session data must be an object")
    };
    Record {
        data: data.into(),
        created,
        atime,
        ip: "192.0.2.7".into(),
        ver: 1,
    }
}

/// `record` with `key` set to `value` in its data.
fn with(mut record: Record, key: &str, value: Value) -> Record {
    let mut data = record.data.to_map().expect("stored data reads back");
    data.insert(key.to_owned(), value);
    record.data = data.into();
    record
}

fn now() -> u64 {
    session_proxy::session::now()
}

fn handle(n: usize) -> Handle {
    Handle::of_id(&format!("test-session-{n}-{}", rand::random::<u64>()))
}

async fn put(store: &dyn Store, handle: &Handle, record: &Record) {
    let decide = |_: Option<&Record>| Ok(Change::Put(record.clone()));
    store.modify(handle, &decide).await.expect("put");
}

/// The read-modify-write a proxy does for `count += 1`, atomic by `modify`.
async fn increment(store: &dyn Store, handle: &Handle) -> Result<Option<Record>, StoreError> {
    let decide = |current: Option<&Record>| {
        let next = current
            .cloned()
            .unwrap_or_else(|| record(json!({"count": 0}), now(), now()));
        let count = count_of(&next);
        let mut next = with(next, "count", json!(count + 1));
        next.ver += u64::from(current.is_some());
        Ok(Change::Put(next))
    };
    store.modify(handle, &decide).await
}

fn count_of(record: &Record) -> u64 {
    record.data.to_map().expect("stored data reads back")["count"]
        .as_u64()
        .expect("a count")
}

/// `n` concurrent increments of one absent record, alternating between two
/// store instances (two proxies): every one counts.
async fn increments_from_two_instances_all_count(
    first: Arc<dyn Store>,
    second: Arc<dyn Store>,
    n: usize,
) {
    let handle = handle(0);
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let store = if i % 2 == 0 { &first } else { &second };
        let (store, handle) = (Arc::clone(store), handle.clone());
        tasks.spawn(async move { increment(store.as_ref(), &handle).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("increment");
    }
    let stored = first.load(&handle).await.unwrap().expect("stored");
    assert_eq!(count_of(&stored), n as u64);
    assert_eq!(stored.ver, n as u64, "ver grows by one per change");
}

/// Concurrent writers of different keys of one session (two proxies): all
/// keys survive.
async fn writes_of_different_keys_all_survive(first: Arc<dyn Store>, second: Arc<dyn Store>) {
    let handle = handle(1);
    put(first.as_ref(), &handle, &record(json!({}), now(), now())).await;
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let store = Arc::clone(if i % 2 == 0 { &first } else { &second });
        let handle = handle.clone();
        tasks.spawn(async move {
            let decide = |current: Option<&Record>| {
                let next = current.cloned().ok_or("gone")?;
                Ok(Change::Put(with(next, &format!("key{i}"), json!(i))))
            };
            store.modify(&handle, &decide).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("write");
    }
    let stored = second.load(&handle).await.unwrap().expect("stored");
    assert_eq!(stored.data.to_map().unwrap().len(), 20, "{:?}", stored.data);
}

/// Load, modify, touch, delete and list, as the trait promises.
async fn round_trip(store: &dyn Store) {
    let handle = handle(2);
    let t = now();
    assert_eq!(store.load(&handle).await.unwrap(), None);
    let first = record(
        json!({"user": "ada", "n": 1.5, "nested": {"a": [1, 2]}}),
        t,
        t,
    );
    put(store, &handle, &first).await;
    assert_eq!(store.load(&handle).await.unwrap(), Some(first.clone()));

    // Keep writes nothing; a refusal writes nothing and says why.
    let keep = |_: Option<&Record>| Ok(Change::Keep);
    assert_eq!(
        store.modify(&handle, &keep).await.unwrap(),
        Some(first.clone())
    );
    let refuse = |_: Option<&Record>| Err("too big".to_owned());
    assert!(matches!(
        store.modify(&handle, &refuse).await,
        Err(StoreError::Rejected(reason)) if reason == "too big"
    ));

    // A touch moves atime forward only, and leaves data and ver.
    store.touch(&handle, t + 100).await.unwrap();
    store.touch(&handle, t + 50).await.unwrap();
    let touched = store.load(&handle).await.unwrap().expect("still there");
    assert_eq!(
        touched,
        Record {
            atime: t + 100,
            ..first.clone()
        }
    );

    let listed = store.list().await.unwrap();
    assert_eq!(listed, vec![(handle.clone(), touched.clone())]);

    // An update of the record just loaded, touched or not since.
    let given = std::sync::Mutex::new(Vec::new());
    let bumped = store
        .modify_seen(&handle, &touched, &bump_noting(&given))
        .await
        .unwrap();
    let expected = Record {
        ver: touched.ver + 1,
        ..touched.clone()
    };
    assert_eq!(bumped.as_ref(), Some(&expected));
    assert_eq!(store.load(&handle).await.unwrap(), Some(expected));
    assert_eq!(given.into_inner().unwrap(), vec![Some(touched)]);

    let delete = |_: Option<&Record>| Ok(Change::Delete);
    assert_eq!(store.modify(&handle, &delete).await.unwrap(), None);
    assert_eq!(store.load(&handle).await.unwrap(), None);
    put(store, &handle, &first).await;
    assert!(store.delete(&handle).await.unwrap());
    assert!(!store.delete(&handle).await.unwrap());
    store.touch(&handle, t).await.unwrap();
    assert_eq!(
        store.load(&handle).await.unwrap(),
        None,
        "a touch creates nothing"
    );
    store.ping().await.unwrap();
}

// ---------------------------------------------------------------------------
// A TCP relay the fault tests cut and restore.

/// Forwards 127.0.0.1:`port` to `target` until stopped or frozen.
/// Stopping closes every relayed connection and refuses new ones, as a dead
/// server does; freezing keeps every connection open but carries nothing
/// more, as a hung server or a cut cable does.
struct Relay {
    port: u16,
    target: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
    connections: Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl Relay {
    async fn start(target: &str) -> Relay {
        let target = target.parse().expect("target address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let mut relay = Relay {
            port,
            target,
            frozen: tokio::sync::watch::channel(false).0,
            accept: None,
            connections: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target;
        let frozen = self.frozen.clone();
        let connections = Arc::clone(&self.connections);
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut frozen = frozen.subscribe();
                let relayed = async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let freeze = async {
                        let _ = frozen.wait_for(|frozen| *frozen).await;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        () = freeze => {}
                    }
                    // Hold both ends open, silent, until stopped.
                    std::future::pending::<()>().await;
                };
                connections
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .spawn(relayed);
            }
        }));
    }

    /// Returns once the port refuses and every relayed connection is
    /// closed: an abort only takes effect when the runtime gets to the
    /// task, and a command sent before that would still get through.
    async fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        let mut connections = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }

    fn freeze(&mut self) {
        self.frozen.send_replace(true);
    }

    /// Closes whatever is open (frozen or not) and forwards again.
    async fn restart(&mut self) {
        self.stop().await;
        self.frozen.send_replace(false);
        // The closed listener's port may take a moment to be free again.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            let socket = TcpSocket::new_v4().expect("socket");
            socket.set_reuseaddr(true).expect("reuseaddr");
            match socket.bind(([127, 0, 0, 1], self.port).into()) {
                Ok(()) => break socket.listen(64).expect("listen"),
                Err(error) if Instant::now() > deadline => panic!("rebind relay port: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for Relay {
    /// The relayed connections go with the last handle on their set.
    fn drop(&mut self) {
        if let Some(accept) = &self.accept {
            accept.abort();
        }
    }
}

/// How the relay fails the store.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Stopped,
    Frozen,
}

/// With the relay failed, `op` fails as Unavailable within the store's
/// timeout (plus scheduling slack); once the relay is back, it succeeds
/// again on the same store.
async fn survives<F, Fut>(relay: &mut Relay, fault: Fault, op: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    op().await.expect("works through the relay");
    match fault {
        Fault::Stopped => relay.stop().await,
        Fault::Frozen => relay.freeze(),
    }
    for _ in 0..2 {
        let started = Instant::now();
        let outcome = op().await;
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{fault:?}: {outcome:?}"
        );
        let elapsed = started.elapsed();
        assert!(
            elapsed < TIMEOUT + Duration::from_secs(1),
            "{fault:?}: failed after {elapsed:?}"
        );
    }
    relay.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match op().await {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                eprintln!("{fault:?}: not yet recovered: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{fault:?}: no recovery after the relay came back: {error}"),
        }
    }
}

/// Forwards 127.0.0.1:`port` to `target`. `wedge` silences every
/// connection open at that moment for good, both ends held open (a peer
/// gone behind a black hole, a firewall or NAT that dropped the flow), while
/// connections made afterwards are forwarded as before: the server itself
/// answers.
struct WedgingRelay {
    port: u16,
    wedged: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl WedgingRelay {
    async fn start(target: &str) -> WedgingRelay {
        let target: SocketAddr = target.parse().expect("target address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let wedged = tokio::sync::watch::channel(0u64).0;
        let epochs = wedged.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut epoch = epochs.subscribe();
                let born = *epoch.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let wedged = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        _ = epoch.wait_for(|epoch| *epoch > born) => true,
                    };
                    if wedged {
                        // Silent for good, both ends still open.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        WedgingRelay {
            port,
            wedged,
            accept,
        }
    }

    fn wedge(&self) {
        self.wedged.send_modify(|epoch| *epoch += 1);
    }
}

impl Drop for WedgingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// ---------------------------------------------------------------------------
// Both servers: each test written once (`on_both_servers!`).

on_both_servers!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_round_trip,
    redis_round_trip,
    |server| {
        round_trip(&server.store().await).await;
    }
);

on_both_servers!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_increments_from_two_instances_all_count,
    redis_increments_from_two_instances_all_count,
    |server| {
        let (first, second) = (server.store().await, server.store().await);
        increments_from_two_instances_all_count(Arc::new(first), Arc::new(second), 50).await;
    }
);

on_both_servers!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_writes_of_different_keys_all_survive,
    redis_writes_of_different_keys_all_survive,
    |server| {
        let (first, second) = (server.store().await, server.store().await);
        writes_of_different_keys_all_survive(Arc::new(first), Arc::new(second)).await;
    }
);

/// A record whose data holds numbers `jsonb` writes out in its own way.
fn record_with_unusual_numbers(t: u64) -> Record {
    record(
        json!({"big": 1e16, "negative_zero": -0.0, "huge": 1e300}),
        t,
        t,
    )
}

on_both_servers!(
    /// SPEC [4.4]: a touch writes the access time and leaves the data (and
    /// `ver`) as they are. The data is kept as the JSON text it was written
    /// as (`fuzz_regressions`: a float must come back the float it was).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_a_touch_leaves_the_data_as_written,
    redis_a_touch_leaves_the_data_as_written,
    |server| {
        let store = server.store().await;
        let handle = handle(22);
        let t = now() - 1000;
        let stored = record_with_unusual_numbers(t);
        let text = stored.data.as_str();
        assert!(
            text.contains(":1e+16") && text.contains(":1e+300") && text.contains(":-0.0"),
            "{text}"
        );
        put(&store, &handle, &stored).await;
        assert!(store.touch(&handle, t + 500).await.unwrap());
        let touched = store.load(&handle).await.unwrap().expect("stored");
        assert_eq!((touched.atime, touched.ver), (t + 500, stored.ver));
        assert_eq!(touched.data.as_str(), stored.data.as_str());
    }
);

on_both_servers!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_fails_within_the_timeout_while_cut_off_and_recovers_by_itself,
    redis_fails_within_the_timeout_while_cut_off_and_recovers_by_itself,
    |server| {
        let mut relay = Relay::start(server.addr()).await;
        let store = server.store_via(relay.port, TIMEOUT).await;
        let handle = handle(7);
        let write_and_read = || async {
            increment(&store, &handle).await?;
            store.load(&handle).await.map(|_| ())
        };
        for fault in [Fault::Stopped, Fault::Frozen] {
            survives(&mut relay, fault, write_and_read).await;
            survives(&mut relay, fault, || store.ping()).await;
        }
    }
);

/// Once the connection in use hangs, the store fails within its timeout
/// (as `survives` checks) and then gets through to the server again on a
/// new connection, without the old one coming back.
async fn a_hung_connection_is_replaced(store: &dyn Store, relay: &WedgingRelay, handle: &Handle) {
    increment(store, handle)
        .await
        .expect("works through the relay");
    relay.wedge();
    let started = Instant::now();
    let outcome = store.load(handle).await;
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.load(handle).await {
            Ok(Some(record)) => {
                assert_eq!(count_of(&record), 1);
                break;
            }
            other if Instant::now() < deadline => {
                eprintln!("not yet recovered: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!(
                "the server answers new connections, but the store still fails \
                 10 s after its connection hung: {other:?}"
            ),
        }
    }
}

on_both_servers!(
    // One thread, so that the store has one connection (per thread) to lose.
    #[tokio::test(flavor = "current_thread")]
    postgres_replaces_a_connection_that_hangs,
    redis_replaces_a_connection_that_hangs,
    |server| {
        let relay = WedgingRelay::start(server.addr()).await;
        let store = server.store_via(relay.port, TIMEOUT).await;
        a_hung_connection_is_replaced(&store, &relay, &handle(31)).await;
    }
);

on_both_servers!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_lease_serializes_blind_read_modify_writes,
    redis_lease_serializes_blind_read_modify_writes,
    |server| {
        let stores = [
            Arc::new(server.store().await),
            Arc::new(server.store().await),
        ];
        let handle = handle(9);
        let mut tasks = JoinSet::new();
        for i in 0..20 {
            let (store, handle) = (Arc::clone(&stores[i % 2]), handle.clone());
            tasks.spawn(async move {
                // Through `Store`, as the proxy takes it. The TTL is for
                // Redis: a PostgreSQL lock lasts as long as its connection.
                let lease = store
                    .acquire_lease(
                        &handle,
                        Duration::from_secs(10),
                        Duration::from_secs(2),
                        &GiveUp::default(),
                    )
                    .await?
                    .expect("a store that leases");
                blind_increment(store.as_ref(), &handle).await?;
                lease.release().await
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task").expect("leased increment");
        }
        let stored = stores[0].load(&handle).await.unwrap().expect("stored");
        assert_eq!(count_of(&stored), 20);
    }
);

on_both_servers!(
    // A lease wait given up (the proxy's client left) ends before its
    // time, and whatever try was under way takes nothing for good: a
    // lease left behind would hold the session up for its TTL (Redis) or
    // for as long as the connection lives (PostgreSQL).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    postgres_a_lease_wait_given_up_ends_early_and_leaves_nothing_held,
    redis_a_lease_wait_given_up_ends_early_and_leaves_nothing_held,
    |server| {
        let (first, second) = (server.store().await, server.store().await);
        let handle = handle(41);
        let ttl = Duration::from_secs(30);
        let held = first
            .acquire_lease(&handle, Duration::ZERO, ttl, &GiveUp::default())
            .await
            .unwrap()
            .expect("a store that leases");
        let give_up = GiveUp::default();
        let started = Instant::now();
        let (waited, ()) = tokio::join!(
            second.acquire_lease(&handle, Duration::from_secs(10), ttl, &give_up),
            async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                give_up.give_up();
            }
        );
        assert!(matches!(waited, Err(StoreError::Busy(_))));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        held.release().await.unwrap();
        // Free at once: one try, no wait.
        second
            .acquire_lease(&handle, Duration::ZERO, ttl, &GiveUp::default())
            .await
            .expect("nothing left held by the wait given up")
            .expect("a store that leases")
            .release()
            .await
            .unwrap();
    }
);

/// A read, a pause and a write that ignores what is stored by then: what
/// `lock = true` protects (an app's own read-modify-write across requests).
async fn blind_increment(store: &dyn Store, handle: &Handle) -> Result<(), StoreError> {
    let read = store.load(handle).await?;
    let count = read.as_ref().map_or(0, count_of);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let next = read.unwrap_or_else(|| record(json!({}), now(), now()));
    put(store, handle, &with(next, "count", json!(count + 1))).await;
    Ok(())
}

// ---------------------------------------------------------------------------
// PostgreSQL

const WEB_PY_DDL: &str = "create table {table} (
    session_id char(128) UNIQUE NOT NULL,
    atime timestamp NOT NULL default current_timestamp,
    data text
);";

async fn columns(table: &str) -> Vec<(String, String, Option<i32>)> {
    let client = sql_client().await.unwrap();
    client
        .query(
            "SELECT column_name::text, data_type::text, character_maximum_length \
             FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

fn web_py_columns() -> Vec<(String, String, Option<i32>)> {
    vec![
        ("session_id".into(), "character".into(), Some(128)),
        ("atime".into(), "timestamp without time zone".into(), None),
        ("data".into(), "text".into(), None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_uses_a_table_made_with_web_py_ddl_untouched() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let client = sql_client().await.unwrap();
    client
        .batch_execute(&WEB_PY_DDL.replace("{table}", &table.name))
        .await
        .unwrap();
    let store = table.store().await;
    assert_eq!(columns(&table.name).await, web_py_columns());

    let handle = handle(3);
    let t = now();
    let stored = record(json!({"count": 1}), t, t);
    put(&store, &handle, &stored).await;

    // char(128) pads the 64-character handle; the store sees it trimmed.
    let row = client
        .query_one(
            &format!(
                "SELECT session_id, data, extract(epoch FROM atime)::bigint FROM {}",
                table.name
            ),
            &[],
        )
        .await
        .unwrap();
    let session_id: String = row.get(0);
    assert_eq!(session_id.len(), 128);
    assert_eq!(session_id.trim_end(), handle.as_str());
    let data: String = row.get(1);
    assert_eq!(serde_json::from_str::<Record>(&data).unwrap(), stored);
    assert_eq!(
        row.get::<_, i64>(2),
        t as i64,
        "atime column is the record's, in UTC"
    );

    assert_eq!(store.load(&handle).await.unwrap(), Some(stored.clone()));
    assert_eq!(store.list().await.unwrap(), vec![(handle, stored)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_works_for_a_role_that_may_only_use_the_existing_table() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let client = sql_client().await.unwrap();
    client
        .batch_execute(&WEB_PY_DDL.replace("{table}", &table.name))
        .await
        .unwrap();
    let role = Role::new(&client, &table.name).await;
    let url = format!("postgres://{}@127.0.0.1:5432/test", role.name);
    let store = PostgresStore::connect(&url, &table.name, 2, PATIENT)
        .await
        .expect("no CREATE needed for an existing table");
    round_trip(&store).await;
}

/// A table made by hand that cannot hold the store's rows (a `jsonb`
/// `data`, no unique `session_id` for the store's upsert, another column
/// that must be filled, a `session_id` too short for a handle) is an error
/// at start, naming the table and what the server said: `check` says so
/// and `run` does not start. Such a table was taken, `check` printed `ok`
/// and `/healthz` answered 200, while every session's first write got a
/// 503. Tables that differ from web.py's in ways the store can live with
/// (`text` key, `timestamptz`, more columns with defaults) still serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_table_that_cannot_hold_sessions_is_an_error_at_start() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let client = sql_client().await.unwrap();
    let layouts = [
        (
            "session_id char(128) UNIQUE NOT NULL, atime timestamp NOT NULL, data jsonb",
            false,
        ),
        (
            "session_id char(128) NOT NULL, atime timestamp NOT NULL, data text",
            false,
        ),
        (
            "session_id char(128) UNIQUE NOT NULL, atime timestamp NOT NULL, data text, \
             user_id int NOT NULL",
            false,
        ),
        (
            "session_id varchar(40) UNIQUE NOT NULL, atime timestamp NOT NULL, data text",
            false,
        ),
        (
            "id serial PRIMARY KEY, session_id text UNIQUE NOT NULL, \
             atime timestamptz NOT NULL DEFAULT now(), data varchar, note text DEFAULT ''",
            true,
        ),
    ];
    for (i, (columns, serves)) in layouts.into_iter().enumerate() {
        let name = format!("{}_{i}", table.name);
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns})"
            ))
            .await
            .unwrap();
        let opened = PostgresStore::connect(POSTGRES_URL, &name, 2, PATIENT).await;
        match (opened, serves) {
            (Ok(store), true) => round_trip(&store).await,
            (Err(StoreError::Unavailable(message)), false) => {
                assert!(message.contains(&name), "{columns}: {message}");
            }
            (Ok(_), false) => panic!("{columns}: taken, though it cannot hold a session"),
            (Err(error), _) => panic!("{columns}: {error}"),
        }
        let empty = client
            .query_one(&format!("SELECT count(*) = 0 FROM {name}"), &[])
            .await
            .unwrap();
        assert!(empty.get::<_, bool>(0), "{columns}: the check left a row");
        client
            .batch_execute(&format!("DROP TABLE {name}"))
            .await
            .unwrap();
    }
}

/// A login role allowed to read and write one table and nothing else
/// (PostgreSQL 15 and later give no one CREATE on `public` by default);
/// dropped with the guard.
struct Role {
    name: String,
}

impl Role {
    async fn new(client: &tokio_postgres::Client, table: &str) -> Role {
        let name = unique("session_proxy_role");
        client
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {name}"
            ))
            .await
            .unwrap();
        Role { name }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let drop_role = format!(
            "DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}",
            name = self.name
        );
        block_on_fresh(async move {
            if let Ok(client) = sql_client().await {
                let _ = client.batch_execute(&drop_role).await;
            }
        });
    }
}

/// Proxies starting together on a missing table race to create it; every
/// one of them must come up (CI once failed with "type already exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_proxies_starting_together_all_get_the_table() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    for round in 0..20 {
        let name = format!("{}_{round}", table.name);
        let starts: Vec<_> = (0..16)
            .map(|_| {
                let name = name.clone();
                tokio::spawn(async move {
                    PostgresStore::connect(POSTGRES_URL, &name, 1, PATIENT)
                        .await
                        .map(|_| ())
                })
            })
            .collect();
        for start in starts {
            start.await.unwrap().unwrap();
        }
        let client = sql_client().await.unwrap();
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_creates_the_web_py_table_when_missing() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let _first = table.store().await;
    let _second = table.store().await;
    assert_eq!(columns(&table.name).await, web_py_columns());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_touch_keeps_the_atime_column_current() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let handle = handle(4);
    let t = now() - 1000;
    put(&store, &handle, &record(json!({}), t, t)).await;
    store.touch(&handle, t + 500).await.unwrap();
    let client = sql_client().await.unwrap();
    let column = format!(
        "SELECT extract(epoch FROM atime)::bigint FROM {}",
        table.name
    );
    let atime: i64 = client.query_one(&column, &[]).await.unwrap().get(0);
    assert_eq!(atime, (t + 500) as i64);
    // A touch that lands late (decided before, or by a proxy whose clock
    // lags) moves neither the record's atime nor the column's back: the
    // sweep reads the column.
    store.touch(&handle, t + 200).await.unwrap();
    let atime: i64 = client.query_one(&column, &[]).await.unwrap().get(0);
    assert_eq!(atime, (t + 500) as i64);
    let stored = store.load(&handle).await.unwrap().unwrap();
    assert_eq!(stored.atime, t + 500);
}

/// A record whose atime is past PostgreSQL's bigint (u64 allows it; the
/// store never writes one, a hand or another tool may) loads, and is
/// touched like any other: the touch read the atime as a bigint and
/// failed, a 503 on every request of the session with `touch_interval = 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_touch_of_a_record_whose_atime_is_past_bigint() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let handle = handle(6);
    let data = format!(
        r#"{{"data":{{}},"created":1,"atime":{},"ip":"192.0.2.7","ver":1}}"#,
        u64::MAX
    );
    let client = sql_client().await.unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {} (session_id, data) VALUES ($1, $2)",
                table.name
            ),
            &[&handle.as_str(), &data],
        )
        .await
        .unwrap();
    let touched = store.touch(&handle, now()).await;
    assert!(matches!(touched, Ok(true)), "{touched:?}");
    let loaded = store.load(&handle).await.unwrap().expect("still stored");
    assert_eq!(loaded.atime, u64::MAX, "an atime never moves backwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_row_that_is_not_a_record_is_corrupt() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let handle = handle(5);
    let client = sql_client().await.unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {} (session_id, data) VALUES ($1, 'gAJ9cQEu secret pickle')",
                table.name
            ),
            &[&handle.as_str()],
        )
        .await
        .unwrap();
    for outcome in [
        store.load(&handle).await.map(|_| ()),
        increment(&store, &handle).await.map(|_| ()),
        store.touch(&handle, now()).await.map(|_| ()),
    ] {
        match outcome {
            Err(StoreError::Corrupt {
                handle: named,
                detail,
            }) => {
                assert_eq!(named, handle.short());
                assert!(!detail.contains("secret"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert_eq!(store.list().await.unwrap(), vec![], "list skips it");
    store.ping().await.unwrap();
    assert!(store.delete(&handle).await.unwrap());
}

/// As the disk store reads a record file: a stored record longer than
/// the bound for the config's `max_data_bytes` (4 MiB for 4,096) is
/// corrupt, which the proxy takes for a missing session, and is not read
/// whole; one of the bound's length loads.
async fn a_record_over_the_size_bound_is_corrupt(store: &dyn Store) {
    const BOUND: usize = 4 << 20;
    let (t, empty) = (now(), json!({"count": 0, "pad": ""}));
    let base = serde_json::to_string(&record(empty, t, t)).unwrap().len();
    let of_length =
        |length: usize| record(json!({"count": 0, "pad": "x".repeat(length - base)}), t, t);
    let (within, over) = (handle(40), handle(41));
    put(store, &within, &of_length(BOUND)).await;
    put(store, &over, &of_length(BOUND + 1)).await;
    assert_eq!(store.load(&within).await.unwrap(), Some(of_length(BOUND)));
    for outcome in [
        store.load(&over).await.map(|_| ()),
        increment(store, &over).await.map(|_| ()),
    ] {
        match outcome {
            Err(StoreError::Corrupt { handle, detail }) => {
                assert_eq!(handle, over.short());
                assert_eq!(detail, format!("larger than {BOUND} bytes"));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert!(store.delete(&over).await.unwrap());
    assert!(store.delete(&within).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_record_over_the_size_bound_is_corrupt() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await.with_max_data_bytes(4096);
    a_record_over_the_size_bound_is_corrupt(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_record_over_the_size_bound_is_corrupt() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await.with_max_data_bytes(4096);
    a_record_over_the_size_bound_is_corrupt(&store).await;
}

/// As a load finds it, `list` and the sweep find a stored record longer
/// than the bound corrupt: skipped (logged), the others listed and swept.
/// The sweep cannot read its `created`, so it leaves it, as a record that
/// does not parse; one of the bound's length is listed and swept.
async fn listings_skip_a_record_over_the_size_bound(store: &dyn Store) {
    const BOUND: usize = 4 << 20;
    let (t, long_ago) = (now(), now() - 90_000);
    let empty = json!({"count": 0, "pad": ""});
    let base = serde_json::to_string(&record(empty, long_ago, t))
        .unwrap()
        .len();
    let of_length = |length: usize| {
        let data = json!({"count": 0, "pad": "x".repeat(length - base)});
        record(data, long_ago, t)
    };
    let (within, over, young) = (handle(42), handle(43), handle(44));
    put(store, &within, &of_length(BOUND)).await;
    put(store, &over, &of_length(BOUND + 1)).await;
    put(store, &young, &record(json!({}), t, t)).await;
    let mut listed: Vec<Handle> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|(handle, _)| handle)
        .collect();
    let mut expected = vec![within.clone(), young.clone()];
    for handles in [&mut listed, &mut expected] {
        handles.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    }
    assert_eq!(listed, expected);
    let expiry = Expiry {
        timeout: 3600,
        absolute: Some(86_400),
    };
    assert_eq!(store.delete_expired(t, expiry).await.unwrap(), 1);
    assert_eq!(store.load(&within).await.unwrap(), None);
    assert!(store.load(&young).await.unwrap().is_some());
    assert!(matches!(
        store.load(&over).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(store.delete(&over).await.unwrap());
    assert!(store.delete(&young).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listings_skip_a_record_over_the_size_bound() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await.with_max_data_bytes(4096);
    listings_skip_a_record_over_the_size_bound(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_listings_skip_a_record_over_the_size_bound() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await.with_max_data_bytes(4096);
    listings_skip_a_record_over_the_size_bound(&store).await;
}

/// A relay to `target` that counts the bytes the server sends through it.
struct CountingRelay {
    port: u16,
    from_server: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl CountingRelay {
    async fn start(target: &str) -> CountingRelay {
        let target: SocketAddr = target.parse().expect("target address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let from_server = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&from_server);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let down = async {
                        let mut buffer = vec![0; 64 << 10];
                        while let Ok(read @ 1..) = server_read.read(&mut buffer).await {
                            counted.fetch_add(read as u64, Ordering::SeqCst);
                            if client_write.write_all(&buffer[..read]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
                        _ = down => {}
                    }
                });
            }
        });
        CountingRelay {
            port,
            from_server,
            accept,
        }
    }

    fn bytes_from_server(&self) -> u64 {
        self.from_server.load(Ordering::SeqCst)
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A write that finds the key changed since it was read gets what the key
/// holds now in its script's answer, read no further than the bound, as
/// `load` reads it: a value far past it (another program's) is corrupt, as
/// `load` finds it, and about the bound crosses the wire, not the value.
/// Both conflicting writes: `modify_seen`'s version-checked one (a
/// request's update) and `modify`'s compare-and-set (the sweep's delete
/// too). The cut at the bound splits a character; nothing is written, and
/// other records are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_write_that_conflicts_with_a_value_over_the_size_bound_reads_no_further() {
    const BOUND: usize = 4 << 20;
    const HUGE: usize = 64 << 20;
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let relay = CountingRelay::start(REDIS_ADDR).await;
    let store = prefix
        .store_via(relay.port, PATIENT)
        .await
        .with_max_data_bytes(4096);
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let (over, other) = (handle(45), handle(46));
    let key = format!("{}{}", prefix.prefix, over);
    let t = now();
    let small = record(json!({"count": 0}), t, t);
    put(&store, &other, &small).await;
    put(&store, &over, &small).await;
    let seen = store.load(&over).await.unwrap().unwrap();
    // In this store's layout at a later version, so that the version check
    // fails on it; two-byte characters from an odd offset to the cut.
    let mut huge = format!(
        r#"{{"atime":{t},"created":{t},"ip":"192.0.2.7","ver":{},"data":{{"pad":""#,
        seen.ver + 1
    );
    if (BOUND + 1 - huge.len()).is_multiple_of(2) {
        huge.push('x');
    }
    huge.push_str(&"é".repeat((HUGE - huge.len()) / 2));
    huge.push_str(r#""}}"#);
    // Blocking: a decision is synchronous, and one stores the value.
    let set_huge = || {
        let mut connection = connection.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg(&huge)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
            })
        })
    };
    let bump = |current: Option<&Record>| {
        Ok(Change::Put(Record {
            ver: current.map_or(1, |current| current.ver + 1),
            ..small.clone()
        }))
    };
    // Changed between the read and the write: the first decision, after
    // `modify`'s read, stores the huge value.
    let first = AtomicBool::new(true);
    let bump_after_a_change = |current: Option<&Record>| {
        if first.swap(false, Ordering::SeqCst) {
            set_huge();
        }
        bump(current)
    };

    set_huge();
    let sent = relay.bytes_from_server();
    let seen_write = store.modify_seen(&over, &seen, &bump).await;
    let seen_sent = relay.bytes_from_server() - sent;

    // Its own record again (a write would read the huge value first).
    assert!(store.delete(&over).await.unwrap());
    put(&store, &over, &small).await;
    let sent = relay.bytes_from_server();
    let compared_write = store.modify(&over, &bump_after_a_change).await;
    let compared_sent = relay.bytes_from_server() - sent;

    for (write, outcome, sent) in [
        ("modify_seen", seen_write, seen_sent),
        ("modify", compared_write, compared_sent),
    ] {
        match outcome {
            Err(StoreError::Corrupt { handle, detail }) => {
                assert_eq!(handle, over.short(), "{write}");
                assert_eq!(detail, format!("larger than {BOUND} bytes"), "{write}");
            }
            other => panic!("{write}: expected Corrupt, got {other:?}"),
        }
        assert!(
            sent < 2 * BOUND as u64,
            "{write}: {sent} bytes came from Redis for a {HUGE}-byte value"
        );
    }
    let length: usize = redis::cmd("STRLEN")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(length, huge.len(), "the value was left as it was");
    assert_eq!(store.load(&other).await.unwrap(), Some(small.clone()));
    assert!(store.delete(&over).await.unwrap());
    assert!(store.delete(&other).await.unwrap());
}

/// What a conflicting write finds in the key is read as `load` reads it:
/// an empty value is no record (the decision is made again on none), and
/// one that is not UTF-8 is corrupt, not a store failure (a 503 on every
/// update of the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_write_that_conflicts_reads_the_key_as_load_does() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let handle = handle(47);
    let key = format!("{}{}", prefix.prefix, handle);
    let t = now();
    let seen = record(json!({"a": 1}), t, t);
    let given = std::sync::Mutex::new(Vec::new());
    let bump = bump_noting(&given);
    for value in [&b""[..], &b"\xff\xfe not UTF-8"[..]] {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(value)
            .query_async(&mut connection)
            .await
            .unwrap();
        given.lock().unwrap().clear();
        let written = store.modify_seen(&handle, &seen, &bump).await;
        if value.is_empty() {
            assert_eq!(written.unwrap(), None);
            assert_eq!(*given.lock().unwrap(), vec![Some(seen.clone()), None]);
        } else {
            assert!(
                matches!(written, Err(StoreError::Corrupt { .. })),
                "{written:?}"
            );
        }
        let stored: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(stored, value, "the value was left as it was");
    }
}

/// A table made by hand with a `timestamptz` atime, on a server whose
/// `TimeZone` is not UTC (Debian's initdb takes the host's): a write
/// checked against the version it loaded keeps the later atime a touch
/// stored meanwhile, and wrote it into the record as the column's epoch,
/// which for a `timestamptz` holding the store's UTC wall-clock time is
/// off by the zone's offset: an hour back in Paris, so a session touched
/// by another proxy during an update's request lost that hour of its
/// idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_update_keeps_a_touch_in_a_timestamptz_column_off_utc() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let client = sql_client().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {} (session_id char(128) UNIQUE NOT NULL, \
             atime timestamptz NOT NULL DEFAULT now(), data text)",
            table.name
        ))
        .await
        .unwrap();
    let role = Role::new(&client, &table.name).await;
    client
        .batch_execute(&format!(
            "ALTER ROLE {} SET TimeZone = 'Europe/Paris'",
            role.name
        ))
        .await
        .unwrap();
    let url = format!("postgres://{}@127.0.0.1:5432/test", role.name);
    let store = PostgresStore::connect(&url, &table.name, 2, PATIENT)
        .await
        .unwrap();
    let handle = handle(6);
    let t = now();
    put(&store, &handle, &record(json!({"n": 1}), t, t)).await;
    let seen = store.load(&handle).await.unwrap().unwrap();
    // Another proxy's touch, between this request's load and its write.
    assert!(store.touch(&handle, t + 100).await.unwrap());
    let update = |current: Option<&Record>| {
        let current = current.expect("stored").clone();
        Ok(Change::Put(Record {
            atime: t + 1,
            ver: current.ver + 1,
            ..with(current, "n", json!(2))
        }))
    };
    store.modify_seen(&handle, &seen, &update).await.unwrap();
    let stored = store.load(&handle).await.unwrap().unwrap();
    assert_eq!(stored.data.to_map().unwrap()["n"], json!(2));
    assert_eq!(stored.atime, t + 100, "the touch's atime, as stored");
}

/// A decision that bumps `ver`, noting every record it was given.
fn bump_noting(
    given: &std::sync::Mutex<Vec<Option<Record>>>,
) -> impl Fn(Option<&Record>) -> Result<Change, String> + Send + Sync + '_ {
    move |current| {
        given.lock().unwrap().push(current.cloned());
        Ok(match current {
            Some(current) => Change::Put(Record {
                ver: current.ver + 1,
                ..current.clone()
            }),
            None => Change::Keep,
        })
    }
}

/// As `redis_a_write_on_an_unchanged_version_is_one_step`: the version
/// is checked in the update itself, so data changed behind the store's
/// back at the same version is overwritten without a read; a row that is
/// not JSON falls back to the read, which reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_on_an_unchanged_version_is_one_step() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let client = sql_client().await.unwrap();
    let handle = handle(6);
    let t = now();
    let seen = record(json!({"a": 1}), t, t);
    put(&store, &handle, &seen).await;
    let changed = client
        .execute(
            &format!(
                "UPDATE {} SET data = replace(data, '\"a\":1', '\"a\":9') WHERE session_id = $1",
                table.name
            ),
            &[&handle.as_str()],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);

    let given = std::sync::Mutex::new(Vec::new());
    let bump = bump_noting(&given);
    store.modify_seen(&handle, &seen, &bump).await.unwrap();
    assert_eq!(*given.lock().unwrap(), vec![Some(seen.clone())]);
    assert_eq!(store.load(&handle).await.unwrap().unwrap().data, seen.data);

    client
        .execute(
            &format!(
                "UPDATE {} SET data = 'not json' WHERE session_id = $1",
                table.name
            ),
            &[&handle.as_str()],
        )
        .await
        .unwrap();
    let outcome = store.modify_seen(&handle, &seen, &bump).await;
    assert!(
        matches!(outcome, Err(StoreError::Corrupt { .. })),
        "{outcome:?}"
    );
}

/// `jsonb` refuses `\u0000`, which JSON and the `text` column hold: a
/// record with one is written and touched without the cast instead,
/// rather than a 503 on every later write of its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_record_holding_a_nul_character_stays_writable() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let handle = handle(20);
    let t = now() - 1000;
    let seen = record(json!({"a": "x\u{0}y"}), t, t);
    put(&store, &handle, &seen).await;
    let given = std::sync::Mutex::new(Vec::new());
    let bump = bump_noting(&given);
    let written = store.modify_seen(&handle, &seen, &bump).await.unwrap();
    assert_eq!(written.map(|record| record.ver), Some(2));
    store.touch(&handle, t + 500).await.unwrap();
    let stored = store.load(&handle).await.unwrap().expect("stored");
    assert_eq!((stored.ver, stored.atime), (2, t + 500));
    assert_eq!(stored.data, seen.data);
}

/// Nor does `jsonb` hold a number past `numeric` (`1e200000`: "value
/// overflows numeric format") or nesting deeper than the server's stack
/// ("stack depth limit exceeded"), which the proxy reads and keeps as
/// written: such a record (written by hand, or by another program) is
/// written without the cast too, where every write of its session was a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_record_holding_what_jsonb_cannot_stays_writable() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let deep = format!(r#"{{"x":{}1{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    for (n, data) in [r#"{"n":1e200000}"#, &deep].into_iter().enumerate() {
        let handle = handle(30 + n);
        let t = now() - 1000;
        let seen = Record {
            data: serde_json::from_str(data).expect("the proxy reads it"),
            ..record(json!({}), t, t)
        };
        put(&store, &handle, &seen).await;
        let given = std::sync::Mutex::new(Vec::new());
        let bump = bump_noting(&given);
        let written = store.modify_seen(&handle, &seen, &bump).await;
        assert_eq!(written.unwrap().map(|record| record.ver), Some(2));
        let stored = store.load(&handle).await.unwrap().expect("stored");
        assert_eq!((stored.ver, stored.data), (2, seen.data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sweeps_expired_records_in_batches() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let store = table.store().await;
    let client = sql_client().await.unwrap();
    let t = now();
    let insert = format!(
        "INSERT INTO {} (session_id, atime, data) \
         SELECT md5(n::text || $1) || md5(n::text), to_timestamp($2::bigint) AT TIME ZONE 'UTC', \
                json_build_object('data', json_build_object(), 'created', $2::bigint, \
                                  'atime', $2::bigint, 'ip', '', 'ver', 1)::text \
         FROM generate_series(1, $3::int) AS n",
        table.name
    );
    let idle = (t - 7200) as i64;
    client
        .execute(&insert, &[&"idle", &idle, &2500])
        .await
        .unwrap();
    client
        .execute(&insert, &[&"live", &(t as i64), &10])
        .await
        .unwrap();
    // Touched recently but created long ago: only an absolute timeout ends it.
    let old = handle(6);
    put(&store, &old, &record(json!({}), t - 90_000, t)).await;

    let idle_only = Expiry {
        timeout: 3600,
        absolute: None,
    };
    assert_eq!(store.delete_expired(t, idle_only).await.unwrap(), 2500);
    assert_eq!(store.list().await.unwrap().len(), 11);
    assert_eq!(store.delete_expired(t, idle_only).await.unwrap(), 0);

    let with_absolute = Expiry {
        timeout: 3600,
        absolute: Some(86_400),
    };
    assert_eq!(store.delete_expired(t, with_absolute).await.unwrap(), 1);
    assert_eq!(store.load(&old).await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_dead_server_at_start_is_an_error_within_the_timeout() {
    if !service_up("PostgreSQL", POSTGRES_ADDR).await {
        return;
    }
    let mut relay = Relay::start(POSTGRES_ADDR).await;
    relay.stop().await;
    let started = Instant::now();
    let url = format!("postgres://postgres@127.0.0.1:{}/test", relay.port);
    let outcome = PostgresStore::connect(&url, "unused", 2, TIMEOUT).await;
    assert!(matches!(outcome, Err(StoreError::Unavailable(_))));
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_is_exclusive_across_instances() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let (first, second) = (table.store().await, table.store().await);
    let handle = handle(8);
    let wait = Duration::from_millis(300);
    let ttl = Duration::from_secs(5);

    let held = first
        .acquire_lease(&handle, wait, ttl, &GiveUp::default())
        .await
        .unwrap();
    let started = Instant::now();
    assert!(matches!(
        second
            .acquire_lease(&handle, wait, ttl, &GiveUp::default())
            .await,
        Err(StoreError::Busy(_))
    ));
    assert!(started.elapsed() >= wait && started.elapsed() < wait + TIMEOUT);
    // Another session's lease is free meanwhile.
    let other = second
        .acquire_lease(&handle_b(), wait, ttl, &GiveUp::default())
        .await
        .unwrap();
    other.release().await.unwrap();

    held.release().await.unwrap();
    let taken = second
        .acquire_lease(&handle, wait, ttl, &GiveUp::default())
        .await
        .unwrap();
    // Dropped without release (a crashed holder): its connection goes, and
    // the lock with it.
    drop(taken);
    first
        .acquire_lease(&handle, Duration::from_secs(2), ttl, &GiveUp::default())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// The table is the same however the config spells its name (schema
/// qualified or not, in capitals or not: PostgreSQL folds unquoted names to
/// lower case), and so is its sessions' lease: proxies whose configs spell
/// it differently shared the table but took the leases of `lock = true`
/// under different advisory-lock keys (one per spelling), so requests of
/// one session ran through both at once and lost increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_is_exclusive_whatever_the_spelling_of_the_table() {
    let Some(table) = PgTable::new().await else {
        return;
    };
    let first = table.store().await;
    let spelled = format!("public.{}", table.name.to_uppercase());
    let second = PostgresStore::connect(POSTGRES_URL, &spelled, 4, PATIENT)
        .await
        .expect("connect to PostgreSQL");
    let handle = handle(9);
    let wait = Duration::from_millis(300);
    let ttl = Duration::from_secs(5);

    let held = first
        .acquire_lease(&handle, wait, ttl, &GiveUp::default())
        .await
        .unwrap();
    assert!(
        matches!(
            second
                .acquire_lease(&handle, wait, ttl, &GiveUp::default())
                .await,
            Err(StoreError::Busy(_))
        ),
        "{spelled} and {} took the same session's lease at once",
        table.name
    );
    held.release().await.unwrap();
}

fn handle_b() -> Handle {
    handle(99)
}

// ---------------------------------------------------------------------------
// Redis

async fn ttl_of(key: &str) -> i64 {
    let mut connection = redis_connection(&format!("redis://{REDIS_ADDR}"))
        .await
        .unwrap();
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// When `key` expires, in Unix milliseconds (Redis 7's `PEXPIRETIME`).
async fn pexpiretime_of(key: &str) -> i64 {
    let mut connection = redis_connection(&format!("redis://{REDIS_ADDR}"))
        .await
        .unwrap();
    redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// `modify_seen` checks the version in the write itself: a record whose
/// data changed behind the store's back at the same version (which no
/// writer of ours does) is overwritten on the strength of the version
/// alone, showing there was no read; one in another layout is read first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_write_on_an_unchanged_version_is_one_step() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let handle = handle(11);
    let key = format!("{}{}", prefix.prefix, handle);
    let t = now();
    let seen = record(json!({"a": 1}), t, t);
    put(&store, &handle, &seen).await;

    let raw: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let behind_our_back = raw.replace(r#""a":1"#, r#""a":9"#);
    assert_ne!(raw, behind_our_back);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&behind_our_back)
        .query_async(&mut connection)
        .await
        .unwrap();

    let given = std::sync::Mutex::new(Vec::new());
    let bump = bump_noting(&given);
    store.modify_seen(&handle, &seen, &bump).await.unwrap();
    assert_eq!(*given.lock().unwrap(), vec![Some(seen.clone())]);

    // The same record in another field order: not this store's layout,
    // so the version cannot be checked in the write; it is read first.
    let reordered = format!(
        r#"{{"ver":{},"data":{{"a":5}},"ip":"{}","created":{},"atime":{}}}"#,
        seen.ver + 1,
        seen.ip,
        seen.created,
        seen.atime
    );
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&reordered)
        .query_async(&mut connection)
        .await
        .unwrap();
    given.lock().unwrap().clear();
    let seen_now = Record {
        ver: seen.ver + 1,
        ..seen.clone()
    };
    let stored = store.modify_seen(&handle, &seen_now, &bump).await.unwrap();
    let latest = Record {
        data: json!({"a": 5}).as_object().unwrap().clone().into(),
        ..seen_now.clone()
    };
    assert_eq!(
        given.lock().unwrap().len(),
        2,
        "decided on seen, then on the read"
    );
    assert_eq!(given.lock().unwrap()[1], Some(latest.clone()));
    assert_eq!(
        stored,
        Some(Record {
            ver: latest.ver + 1,
            ..latest
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_every_write_sets_the_ttl_and_touch_refreshes_it() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let handle = handle(10);
    let key = format!("{}{}", prefix.prefix, handle);
    // Written within the second `t`, its atime: the key must then live
    // through the whole second `t + timeout` (SPEC [4.3]), which a TTL of
    // `timeout` from the write misses by what was left of second `t`.
    let (t, stored) = loop {
        let t = now();
        let stored = record(json!({"a": 1}), t, t);
        put(&store, &handle, &stored).await;
        if now() == t {
            break (t, stored);
        }
    };
    let expires_ms = pexpiretime_of(&key).await;
    let last_second_ends_ms = (t + IDLE_TTL + 1) as i64 * 1000;
    assert!(
        expires_ms >= last_second_ends_ms,
        "the key expires {} ms before the end of the second atime + timeout",
        last_second_ends_ms - expires_ms
    );
    let ttl = ttl_of(&key).await;
    assert!(
        (IDLE_TTL as i64..=IDLE_TTL as i64 + 1).contains(&ttl),
        "{ttl}"
    );

    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let _: i64 = redis::cmd("EXPIRE")
        .arg(&key)
        .arg(5)
        .query_async(&mut connection)
        .await
        .unwrap();
    store.touch(&handle, t + 10).await.unwrap();
    assert!(ttl_of(&key).await > 5, "touch refreshes the TTL");
    assert_eq!(
        store.load(&handle).await.unwrap(),
        Some(Record {
            atime: t + 10,
            ..stored.clone()
        })
    );

    // An older atime changes nothing but still refreshes the TTL.
    let _: i64 = redis::cmd("EXPIRE")
        .arg(&key)
        .arg(5)
        .query_async(&mut connection)
        .await
        .unwrap();
    store.touch(&handle, t).await.unwrap();
    assert!(ttl_of(&key).await > 5);
    assert_eq!(store.load(&handle).await.unwrap().unwrap().atime, t + 10);
}

/// `[session] timeout = 9223372036854775807` (never, in effect) passes
/// `check`; Redis refuses an expiry that far, so the TTL is cut to one it
/// takes instead of every write failing with a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_idle_timeout_beyond_what_redis_takes_still_stores() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = RedisStore::connect(&prefix.urls, &prefix.prefix, PATIENT, i64::MAX as u64)
        .await
        .expect("connect to Redis");
    let handle = handle(11);
    let key = format!("{}{}", prefix.prefix, handle);
    let t = now();
    let stored = record(json!({"a": 1}), t, t);
    put(&store, &handle, &stored).await;
    assert!(store.touch(&handle, t + 1).await.unwrap());
    assert!(ttl_of(&key).await > 60 * 365 * 86_400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_touch_handles_a_record_written_in_another_layout() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let handle = handle(11);
    let t = now();
    let stored = record(json!({"atime": 1}), t, t);
    // serde's field order: data (with its own "atime") first.
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{}{}", prefix.prefix, handle))
        .arg(serde_json::to_string(&stored).unwrap())
        .query_async(&mut connection)
        .await
        .unwrap();
    store.touch(&handle, t + 7).await.unwrap();
    assert_eq!(
        store.load(&handle).await.unwrap(),
        Some(Record {
            atime: t + 7,
            ..stored
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_value_that_is_not_a_record_is_corrupt_and_not_listed() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let handle = handle(12);
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    for (key, value) in [
        (format!("{}{}", prefix.prefix, handle), "secret garbage"),
        (format!("{}not-a-handle", prefix.prefix), "{}"),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    match store.load(&handle).await {
        Err(StoreError::Corrupt {
            handle: named,
            detail,
        }) => {
            assert_eq!(named, handle.short());
            assert!(!detail.contains("secret"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        increment(&store, &handle).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(store.list().await.unwrap(), vec![]);
}

/// README: "A stored record that cannot be decoded is logged and treated
/// as missing". A value that is not even UTF-8 (written by another
/// program under the prefix) is such a record too: `Corrupt`, not
/// `Unavailable`, which the proxy answers with a 503 on every request of
/// the session until the key expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_value_that_is_not_utf8_is_corrupt() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let handle = handle(23);
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{}{}", prefix.prefix, handle))
        .arg(&b"\xff\xfe not UTF-8"[..])
        .query_async(&mut connection)
        .await
        .unwrap();
    let loaded = store.load(&handle).await;
    assert!(
        matches!(loaded, Err(StoreError::Corrupt { .. })),
        "{loaded:?}"
    );
    let changed = increment(&store, &handle).await;
    assert!(
        matches!(changed, Err(StoreError::Corrupt { .. })),
        "{changed:?}"
    );
}

/// Another program's key under the prefix whose name is not UTF-8 is no
/// record of this store: `sessions list` and the sweep (which scans with an
/// absolute timeout) go past it. Read as text, it failed their whole SCAN
/// page, so every listing and every sweep round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_key_name_that_is_not_utf8_is_skipped_by_list_and_sweep() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let t = now();
    let (kept, old) = (handle(24), handle(25));
    put(&store, &kept, &record(json!({}), t, t)).await;
    put(&store, &old, &record(json!({}), t - 90_000, t)).await;
    let mut stranger = prefix.prefix.as_bytes().to_vec();
    stranger.extend_from_slice(b"\xff\xfe");
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&stranger[..])
        .arg("another program's")
        .query_async(&mut connection)
        .await
        .unwrap();
    let listed = store.list().await;
    let with_absolute = Expiry {
        timeout: 3600,
        absolute: Some(86_400),
    };
    let swept = store.delete_expired(t, with_absolute).await;
    // The prefix's clean-up reads key names as text: this one goes here.
    let deleted: i64 = redis::cmd("DEL")
        .arg(&stranger[..])
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the stranger was there all along");
    let mut listed: Vec<String> = listed
        .expect("list goes past the stranger")
        .into_iter()
        .map(|(handle, _)| handle.to_string())
        .collect();
    listed.sort();
    let mut expected = vec![kept.to_string(), old.to_string()];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(swept.expect("the sweep goes past the stranger"), 1);
    assert_eq!(store.load(&old).await.unwrap(), None);
    assert!(store.load(&kept).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sweep_deletes_records_past_the_absolute_timeout() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let t = now();
    let (old, young) = (handle(13), handle(14));
    put(&store, &old, &record(json!({}), t - 90_000, t)).await;
    put(&store, &young, &record(json!({}), t - 60, t)).await;
    let idle_only = Expiry {
        timeout: 3600,
        absolute: None,
    };
    assert_eq!(
        store.delete_expired(t, idle_only).await.unwrap(),
        0,
        "TTL's job"
    );
    let with_absolute = Expiry {
        timeout: 3600,
        absolute: Some(86_400),
    };
    assert_eq!(store.delete_expired(t, with_absolute).await.unwrap(), 1);
    assert_eq!(store.load(&old).await.unwrap(), None);
    assert!(store.load(&young).await.unwrap().is_some());
}

/// Writers of one session take turns in the process (`Serialized`, as
/// `store::open` wraps Redis and PostgreSQL) before they reach the server.
/// With the server hung, a wait for a turn gives up within the timeout
/// too: no writer waits out the timeouts of all those ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_writers_of_one_session_all_fail_within_two_timeouts_while_it_hangs() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let mut relay = Relay::start(REDIS_ADDR).await;
    let redis = prefix.store_via(relay.port, TIMEOUT).await;
    let store = Arc::new(Serialized::new(redis, TIMEOUT));
    let handle = handle(21);
    increment(&*store, &handle).await.unwrap();
    relay.freeze();
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for _ in 0..5 {
        let (store, handle) = (Arc::clone(&store), handle.clone());
        writers.spawn(async move { (increment(&*store, &handle).await, started.elapsed()) });
    }
    while let Some(joined) = writers.join_next().await {
        let (outcome, elapsed) = joined.unwrap();
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(
            elapsed < 2 * TIMEOUT + Duration::from_secs(1),
            "a writer failed after {elapsed:?}"
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_is_exclusive_refreshed_while_held_and_expires_after_a_crash() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let (first, second) = (prefix.store().await, prefix.store().await);
    let handle = handle(16);
    let wait = Duration::from_millis(200);
    // Refreshed every third of it: a refresh may come up to two thirds of
    // it late (a loaded machine, this test process's runtime busy) before
    // the lease is lost. 300 ms left 200 ms of slack.
    let ttl = Duration::from_millis(1500);

    let held = first
        .acquire_lease(&handle, wait, ttl, &GiveUp::default())
        .await
        .unwrap();
    // Held well past its TTL: the refreshes keep it.
    tokio::time::sleep(2 * ttl).await;
    assert!(held.is_held());
    let started = Instant::now();
    assert!(matches!(
        second
            .acquire_lease(&handle, wait, ttl, &GiveUp::default())
            .await,
        Err(StoreError::Busy(_))
    ));
    assert!(started.elapsed() >= wait);
    held.release().await.unwrap();
    second
        .acquire_lease(&handle, wait, ttl, &GiveUp::default())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    // A holder that crashed: its lease key, unrefreshed, expires. The
    // clock starts before the key is set, so a slow test cannot find it
    // expired sooner.
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let started = Instant::now();
    let _: () = redis::cmd("SET")
        .arg(format!("{}lock:{}", prefix.prefix, handle))
        .arg("crashed-holder")
        .arg("PX")
        .arg(300)
        .query_async(&mut connection)
        .await
        .unwrap();
    let lease = first
        .acquire_lease(&handle, Duration::from_secs(2), ttl, &GiveUp::default())
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Dropping releases in the background.
    drop(lease);
    second
        .acquire_lease(&handle, Duration::from_secs(1), ttl, &GiveUp::default())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert_eq!(
        second.list().await.unwrap(),
        vec![],
        "lease keys are not sessions"
    );
}

/// A holder stalled past its lease's TTL has lost it, maybe to another
/// request of the session: its release must not end that one's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_lease_lost_to_another_holder_is_left_to_it_at_release() {
    let Some(prefix) = RedisPrefix::new().await else {
        return;
    };
    let store = prefix.store().await;
    let handle = handle(17);
    let held = store
        .acquire_lease(
            &handle,
            Duration::from_millis(200),
            Duration::from_secs(5),
            &GiveUp::default(),
        )
        .await
        .unwrap();
    let key = format!("{}lock:{}", prefix.prefix, handle);
    let mut connection = redis_connection(&prefix.urls).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("the-next-holder")
        .arg("PX")
        .arg(5000)
        .query_async(&mut connection)
        .await
        .unwrap();
    held.release().await.unwrap();
    let left: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(left.as_deref(), Some("the-next-holder"));
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Redis Cluster, started by the test

// The cluster: tests/support/redis_cluster.rs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_round_trip_increments_sweep_and_lease() {
    let Some(cluster) = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster start")
    else {
        return;
    };
    let urls = cluster.urls();
    let connect = || RedisStore::connect(&urls, "session:", PATIENT, IDLE_TTL);
    let (first, second) = (connect().await.unwrap(), connect().await.unwrap());
    round_trip(&first).await;

    let (first, second) = (Arc::new(first), Arc::new(second));
    increments_from_two_instances_all_count(first.clone(), second.clone(), 50).await;
    writes_of_different_keys_all_survive(first.clone(), second.clone()).await;

    // Records land on every master; list and the sweep scan them all,
    // and skip one longer than the bound (4 MiB), read by GETRANGE on its
    // master as a load reads it.
    let t = now();
    for n in 0..30 {
        let created = if n < 10 { t - 90_000 } else { t };
        put(
            first.as_ref(),
            &handle(100 + n),
            &record(json!({}), created, t),
        )
        .await;
    }
    let oversized = record(json!({"pad": "x".repeat(4 << 20)}), t - 90_000, t);
    let oversized_handle = handle(200);
    put(first.as_ref(), &oversized_handle, &oversized).await;
    let per_master: Vec<usize> = cluster
        .ports
        .iter()
        .map(|&port| {
            redis_cli(port, &["--scan", "--pattern", "session:*"])
                .lines()
                .count()
        })
        .collect();
    assert!(per_master.iter().all(|&n| n > 0), "{per_master:?}");
    assert_eq!(second.list().await.unwrap().len(), 32);
    let with_absolute = Expiry {
        timeout: 3600,
        absolute: Some(86_400),
    };
    assert_eq!(second.delete_expired(t, with_absolute).await.unwrap(), 10);
    assert_eq!(first.list().await.unwrap().len(), 22);
    assert!(matches!(
        first.load(&oversized_handle).await,
        Err(StoreError::Corrupt { .. })
    ));

    let handle = handle(18);
    let lease = first
        .acquire_lease(
            &handle,
            Duration::from_millis(100),
            Duration::from_secs(1),
            &GiveUp::default(),
        )
        .await
        .unwrap();
    assert!(second
        .acquire_lease(
            &handle,
            Duration::from_millis(100),
            Duration::from_secs(1),
            &GiveUp::default()
        )
        .await
        .is_err());
    lease.release().await.unwrap();
    second.ping().await.unwrap();
}
