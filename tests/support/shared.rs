//! The shared stores of the tests: PostgreSQL on 127.0.0.1:5432 (database
//! `test`) and Redis on 127.0.0.1:6379. A test that needs one and does not
//! find it is skipped loudly, or fails under `SESSION_PROXY_REQUIRE_SERVICES=1`.

use std::net::TcpStream;

use super::free_port;

/// `on_each_shared_store!(case, …)`: a `#[test]` for each case on each
/// store, `postgres::case` and `redis::case`, calling `case(Shared::…)`.
#[macro_export]
macro_rules! on_each_shared_store {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(#[test] fn $case() { super::$case(super::Shared::Postgres) })*
        }
        mod redis {
            $(#[test] fn $case() { super::$case(super::Shared::Redis) })*
        }
    };
}

#[derive(Clone, Copy, Debug)]
pub enum Shared {
    Postgres,
    Redis,
}

impl Shared {
    pub fn port(self) -> u16 {
        match self {
            Shared::Postgres => 5432,
            Shared::Redis => 6379,
        }
    }

    /// Store settings unique to this test, so tests do not see each other.
    pub fn store_lines(self, tag: &str) -> Vec<String> {
        let unique = format!("{tag}_{}_{}", std::process::id(), free_port());
        match self {
            Shared::Postgres => vec![
                "kind = \"postgres\"".into(),
                "url = \"postgres://postgres@127.0.0.1:5432/test\"".into(),
                format!("table = \"sessions_{unique}\""),
            ],
            Shared::Redis => vec![
                "kind = \"redis\"".into(),
                "url = \"redis://127.0.0.1:6379\"".into(),
                format!("key_prefix = \"test:{unique}:\""),
            ],
        }
    }

    pub fn available(self) -> bool {
        if TcpStream::connect(("127.0.0.1", self.port())).is_ok() {
            return true;
        }
        assert!(
            std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{self:?} is required (SESSION_PROXY_REQUIRE_SERVICES=1) but not reachable on 127.0.0.1:{}",
            self.port()
        );
        eprintln!(
            "\n!!! SKIPPED: {self:?} is not reachable on 127.0.0.1:{}; this test did not run !!!\n",
            self.port()
        );
        false
    }
}

/// A connection to the test database (PostgreSQL 127.0.0.1:5432, `test`),
/// with the runtime that drives it.
pub fn test_database() -> (tokio::runtime::Runtime, tokio_postgres::Client) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        let url = "postgres://postgres@127.0.0.1:5432/test";
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    });
    (runtime, client)
}

/// Runs `statements` on the test database.
pub fn sql(statements: &str) {
    let (runtime, client) = test_database();
    runtime.block_on(client.batch_execute(statements)).unwrap();
}

/// The rows `query` returns on the test database, each column as text
/// (NULL: `None`).
pub fn rows(query: &str) -> Vec<Vec<Option<String>>> {
    let (runtime, client) = test_database();
    let messages = runtime.block_on(client.simple_query(query)).unwrap();
    messages
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Runs one command on the test Redis, as another program would.
pub fn redis_run<T: ::redis::FromRedisValue>(command: &::redis::Cmd) -> T {
    redis_at(6379, command)
}

/// Runs one command on the Redis at 127.0.0.1:`port`.
pub fn redis_at<T: ::redis::FromRedisValue>(port: u16, command: &::redis::Cmd) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        command.query_async(&mut connection).await.unwrap()
    })
}
