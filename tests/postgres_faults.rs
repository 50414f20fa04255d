//! End to end: faults of the PostgreSQL store alone, under a running
//! proxy (`store_faults` has those both shared stores share): its table
//! dropped, or made again by another program in another layout, and the
//! connection that holds the leases of `lock = true` hung or cut while a
//! lease is held.
//!
//! Needs PostgreSQL (127.0.0.1:5432, database `test`); without it each
//! test is skipped loudly, unless `SESSION_PROXY_REQUIRE_SERVICES=1`.

mod support;

use std::time::{Duration, Instant};

use support::shared::{rows, sql, Shared};
use support::*;

/// README: "with the server hung every request has its answer within twice
/// the timeout" (1 s here: `[store] timeout = 1`); plus slack for a busy
/// 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_millis(2 * 1000 + 1500);

/// A proxy on a table of its own (through `relay` when given), its store
/// timeout 1 s, logging at WARN to `proxy.log`.
struct Setup {
    upstream: Process,
    proxy: Process,
    config: ProxyConfig,
    table: String,
}

fn setup(tag: &str, relay: Option<&Relay>, extra: &[(&str, &str)]) -> Setup {
    let upstream = start_upstream();
    let lines = Shared::Postgres.store_lines(tag);
    let table = lines
        .iter()
        .find_map(|line| line.strip_prefix("table = "))
        .expect("a table")
        .trim_matches('"')
        .to_string();
    let mut config = ProxyConfig::new(upstream.port);
    config.store = lines
        .into_iter()
        .map(|line| match relay {
            Some(relay) => line.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port)),
            None => line,
        })
        .collect();
    config = config.store("timeout = 1").session("timeout = 600");
    for (section, line) in extra {
        config = match *section {
            "server" => config.server(line),
            "session" => config.session(line),
            "store" => config.store(line),
            other => panic!("no section {other}"),
        };
    }
    let proxy = config.start_logging("warn", &config.dir.path().join("proxy.log"));
    Setup {
        upstream,
        proxy,
        config,
        table,
    }
}

impl Setup {
    fn log(&self) -> String {
        std::fs::read_to_string(self.config.dir.path().join("proxy.log")).unwrap_or_default()
    }

    fn admin(&self, path: &str) -> Response {
        get(self.config.admin_port, path, &[])
    }

    /// Log lines that say the table was made again.
    fn remade_lines(&self) -> usize {
        let needle = format!("table {} was missing", self.table);
        self.log()
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }
}

impl Drop for Setup {
    /// The proxy first: it would make the table again.
    fn drop(&mut self) {
        let _ = self.proxy.child.kill();
        let _ = self.proxy.child.wait();
        sql(&format!("DROP TABLE IF EXISTS {}", self.table));
    }
}

/// `table`'s columns as (name, type, nullable, default), and whether
/// `session_id` is UNIQUE: web.py's layout is
/// `session_id char(128) UNIQUE NOT NULL, atime timestamp NOT NULL default
/// current_timestamp, data text`.
fn assert_web_py_layout(table: &str) {
    let columns = rows(&format!(
        "SELECT column_name, data_type, character_maximum_length::text, is_nullable, \
         column_default FROM information_schema.columns WHERE table_name = '{table}' \
         ORDER BY ordinal_position"
    ));
    let text = |s: &str| Some(s.to_string());
    assert_eq!(
        columns,
        vec![
            vec![
                text("session_id"),
                text("character"),
                text("128"),
                text("NO"),
                None
            ],
            vec![
                text("atime"),
                text("timestamp without time zone"),
                None,
                text("NO"),
                text("CURRENT_TIMESTAMP")
            ],
            vec![text("data"), text("text"), None, text("YES"), None],
        ],
        "the table made again is not web.py's"
    );
    let unique = rows(&format!(
        "SELECT count(*)::text FROM pg_index i JOIN pg_attribute a \
         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = '{table}'::regclass AND i.indisunique \
         AND a.attname = 'session_id' AND i.indnatts = 1"
    ));
    assert_eq!(unique, vec![vec![text("1")]], "session_id is not UNIQUE");
}

/// How many rows `table` has.
fn row_count(table: &str) -> usize {
    rows(&format!("SELECT count(*)::text FROM {table}"))[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// A response the app served for a new session: a 200 that sets a cookie.
fn assert_new_session(response: &Response, what: &str) {
    assert_eq!(response.status, 200, "{what}: {}", response.text());
    let cookie = response.set_cookie("session_id");
    assert!(
        cookie.as_deref().is_some_and(|value| !value.is_empty()),
        "{what}: no session cookie set"
    );
}

/// A table dropped under a running proxy (by hand, by a migration gone
/// wrong) is made again by the proxy, as at start (SPEC [6]: "created if
/// missing"), by the first request that finds it gone: that request and
/// the ones after are served. The sessions the table held went with it, so
/// a client of one gets a new session (a missing record), not a 503 until
/// a restart; the table is web.py's again, `/healthz` says 200, sessions
/// written afterwards are kept, and one WARN line names the table.
/// Every statement was prepared on the proxy's connections before the drop.
#[test]
fn a_table_dropped_under_a_running_proxy_is_made_again() {
    if !Shared::Postgres.available() {
        return;
    }
    let setup = setup("drop", None, &[]);
    let port = setup.proxy.port;
    // Sessions enough that every proxy thread has connections with every
    // statement prepared: loads, inserts, updates, touches.
    let mut browsers: Vec<Browser> = (0..4).map(|_| Browser::new(port)).collect();
    for browser in &mut browsers {
        assert_eq!(browser.get("/count", &[]).text(), "1");
        assert_eq!(browser.get("/count", &[]).text(), "2");
        assert_eq!(browser.get("/", &[]).status, 200);
    }
    let old = browsers[0].cookie.clone().unwrap();

    sql(&format!("DROP TABLE {}", setup.table));
    let response = browsers[0].get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "1"),
        "the first request after the drop: its session went with the table"
    );
    assert_new_session(&response, "the first request after the drop");
    assert_ne!(browsers[0].cookie.as_deref(), Some(old.as_str()));
    let fresh = get(port, "/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    assert_new_session(&fresh, "a new session after the drop");
    assert_web_py_layout(&setup.table);
    assert_eq!(setup.admin("/healthz").status, 200);
    for (i, browser) in browsers.iter_mut().enumerate() {
        let response = browser.get("/count", &[]);
        let expected = if i == 0 { "2" } else { "1" };
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, expected),
            "session {i} after the drop"
        );
    }
    assert_eq!(
        browsers[0].get("/count", &[]).text(),
        "3",
        "a session written after the drop is kept"
    );
    assert_eq!(row_count(&setup.table), 5, "the sessions written since");
    assert_eq!(
        setup.remade_lines(),
        1,
        "one WARN line for the table made again:\n{}",
        setup.log()
    );
    for secret in [id_of(&old), &handle_of(&old)] {
        assert!(!setup.log().contains(secret), "{}", setup.log());
    }
}

/// `/healthz` alone mends the table too: a proxy behind a load balancer
/// that heeds `/healthz` gets no request while it says 503, so it must not
/// wait for one to make the table again.
#[test]
fn healthz_alone_makes_a_dropped_table_again() {
    if !Shared::Postgres.available() {
        return;
    }
    let setup = setup("drophz", None, &[]);
    let mut browser = Browser::new(setup.proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(setup.admin("/healthz").status, 200);
    sql(&format!("DROP TABLE {}", setup.table));
    assert_eq!(setup.admin("/healthz").status, 200, "{}", setup.log());
    assert_web_py_layout(&setup.table);
    assert_eq!(setup.remade_lines(), 1, "{}", setup.log());
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
}

/// Many requests find the table dropped at once, on two proxies that share
/// it: they race to make it (PostgreSQL answers a loser `unique_violation`
/// or `duplicate_table`, which means it is made) and every one is served;
/// each proxy logs it at most once.
#[test]
fn requests_that_find_the_table_dropped_at_once_are_all_served() {
    if !Shared::Postgres.available() {
        return;
    }
    let first = setup("drops", None, &[]);
    // The second proxy shares the first one's table.
    let second = {
        let mut config = ProxyConfig::new(first.upstream.port);
        config.store = first.config.store.clone();
        let proxy = config.start_logging("warn", &config.dir.path().join("proxy.log"));
        (proxy, config)
    };
    let ports = [first.proxy.port, second.0.port];
    for round in 0..3 {
        let mut browsers: Vec<Browser> = (0..12).map(|i| Browser::new(ports[i % 2])).collect();
        for browser in &mut browsers {
            assert_eq!(browser.get("/count", &[]).text(), "1", "round {round}");
        }
        sql(&format!("DROP TABLE {}", first.table));
        let answers: Vec<(Response, Duration)> = std::thread::scope(|scope| {
            let threads: Vec<_> = browsers
                .iter_mut()
                .map(|browser| {
                    scope.spawn(move || {
                        let started = Instant::now();
                        (browser.get("/count", &[]), started.elapsed())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for (i, (response, took)) in answers.iter().enumerate() {
            let what = format!("round {round}, request {i}");
            assert_eq!(
                (response.status, response.text().as_str()),
                (200, "1"),
                "{what}; the proxy's log:\n{}",
                first.log()
            );
            assert_new_session(response, &what);
            assert!(*took < ANSWER_BOUND, "{what}: {took:?}");
        }
        assert_web_py_layout(&first.table);
        assert_eq!(row_count(&first.table), 12, "round {round}");
    }
    let second_log =
        std::fs::read_to_string(second.1.dir.path().join("proxy.log")).unwrap_or_default();
    let needle = format!("table {} was missing", first.table);
    let lines = first.remade_lines() + second_log.matches(&needle).count();
    assert!(
        (3..=6).contains(&lines),
        "3 drops, two proxies: {lines} lines say the table was made again:\n{}\n{second_log}",
        first.log()
    );
}

/// Another program drops the table and makes it again in a layout of its
/// own (`data varchar`): the statements the proxy prepared on its
/// connections no longer fit it (PostgreSQL: "cached plan must not change
/// result type"). They are prepared again, and no request pays for it with
/// a 503. One connection a proxy thread, each used by sessions enough that
/// it surely prepared its statements for the old table.
#[test]
fn a_table_made_again_in_another_layout_costs_no_request_a_503() {
    if !Shared::Postgres.available() {
        return;
    }
    let setup = setup("layout", None, &[("store", "pool_size = 2")]);
    let port = setup.proxy.port;
    let mut browsers: Vec<Browser> = (0..8).map(|_| Browser::new(port)).collect();
    for browser in &mut browsers {
        assert_eq!(browser.get("/count", &[]).text(), "1");
        assert_eq!(browser.get("/count", &[]).text(), "2");
    }
    sql(&format!(
        "DROP TABLE {table}; CREATE TABLE {table} (session_id char(128) UNIQUE NOT NULL, \
         atime timestamp NOT NULL default current_timestamp, data varchar)",
        table = setup.table
    ));
    for (i, browser) in browsers.iter_mut().enumerate() {
        let response = browser.get("/count", &[]);
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "1"),
            "session {i}, the table made again, empty: a new session; the proxy's log:\n{}",
            setup.log()
        );
        assert_new_session(&response, "after the table was made again");
        assert_eq!(browser.get("/count", &[]).text(), "2", "session {i}");
    }
    assert_eq!(setup.admin("/healthz").status, 200);
    assert_eq!(row_count(&setup.table), 8);
    assert_eq!(setup.remade_lines(), 0, "the proxy made no table");
}

/// The proxy's role may use the table but not create one (no CREATE on the
/// schema, PostgreSQL 15's default for `public`): a table dropped under the
/// running proxy fails every request with the 503 and `/healthz` says 503
/// too, not `ok` because the server still answers `SELECT 1`; the log says
/// what is missing. Once the table is back, both recover without a restart.
#[test]
fn a_dropped_table_the_role_may_not_make_is_a_503_and_healthz_says_so() {
    if !Shared::Postgres.available() {
        return;
    }
    let role = format!("sp_user_{}_{}", std::process::id(), free_port());
    sql(&format!("CREATE ROLE {role} LOGIN"));
    struct DropRole(String);
    impl Drop for DropRole {
        fn drop(&mut self) {
            sql(&format!(
                "DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}",
                self.0
            ));
        }
    }
    let _role = DropRole(role.clone());
    let may_create = rows(&format!(
        "SELECT has_schema_privilege('{role}', 'public', 'CREATE')::text"
    ));
    assert_eq!(
        may_create[0][0].as_deref(),
        Some("false"),
        "a new role may create in schema public here: no test"
    );
    let lines = Shared::Postgres.store_lines("norole");
    let table = lines[2]
        .strip_prefix("table = ")
        .unwrap()
        .trim_matches('"')
        .to_string();
    let make_table = || {
        sql(&format!(
            "CREATE TABLE {table} (session_id char(128) UNIQUE NOT NULL, \
             atime timestamp NOT NULL default current_timestamp, data text); \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}"
        ))
    };
    make_table();
    let mut setup = setup(
        "norole",
        None,
        &[
            (
                "store",
                &format!("url = \"postgres://{role}@127.0.0.1:5432/test\""),
            ),
            ("store", &format!("table = \"{table}\"")),
        ],
    );
    setup.table = table.clone();
    let mut browser = Browser::new(setup.proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    sql(&format!("DROP TABLE {table}"));
    let response = browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (503, "session store unavailable"),
        "the table dropped"
    );
    assert_eq!(response.headers_named("set-cookie"), Vec::<&str>::new());
    let fresh = get(setup.proxy.port, "/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    assert_eq!(fresh.status, 503, "a new session, the table dropped");
    assert_eq!(
        setup.admin("/healthz").status,
        503,
        "/healthz, the table dropped"
    );
    let log = setup.log();
    assert!(
        log.contains(&format!("table {table} is missing and was not made again")),
        "{log}"
    );

    make_table();
    assert_eq!(setup.admin("/healthz").status, 200);
    let response = browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "1"),
        "the session went with the table: a new one"
    );
    assert_eq!(setup.remade_lines(), 0, "{}", setup.log());
}

/// The advisory locks PostgreSQL holds for the leases (`lock = true`) on
/// `table`: the class is the first 32 bits of SHA-256 of
/// `session-proxy lease TABLE` (src/store/postgres/lease.rs, `lease_class`).
fn held_leases(table: &str) -> usize {
    rows(&format!(
        "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objsubid = 2 AND classid::bigint = ('x' || substr(encode(sha256(\
         convert_to('session-proxy lease {table}', 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint"
    ))[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// A request of `cookie`'s session that the app holds (its session's
/// lease held meanwhile) until the test lets it go, on a thread of its own.
/// Once it is at the app its session is loaded: a fault from then on
/// meets its save, however fast or slow the machine.
fn held_request(port: u16, cookie: &str) -> Held {
    Held::get(
        port,
        "/count",
        &[("Cookie", &format!("session_id={cookie}"))],
    )
}

/// With `lock = true`, the store hangs (every connection through the relay
/// goes silent, the one that holds the leases too) while a request holds
/// its session's lease: every request gets its 503 within twice the store
/// timeout (the holder once its app answered; a request of the same
/// session queues behind it, as `lock = true` means), no client hangs, and
/// the proxy lets go of every connection it gave up on. The lease
/// connection among them: PostgreSQL frees a session-level lock only when
/// its connection ends, so one kept open (wedged, its unlock unanswered)
/// would keep the lease held for ever, in `pg_locks`, for this proxy and
/// every other. Once the store answers again the same session is served,
/// its lease taken and given back again.
#[test]
fn with_lock_a_store_that_hangs_while_a_lease_is_held_leaves_no_lease_behind() {
    if !Shared::Postgres.available() {
        return;
    }
    let relay = Relay::start("127.0.0.1:5432");
    let setup = setup("lhang", Some(&relay), &[("session", "lock = true")]);
    let port = setup.proxy.port;
    let mut holder = Browser::new(port);
    assert_eq!(holder.get("/count", &[]).text(), "1");
    let mut others: Vec<Browser> = (0..3).map(|_| Browser::new(port)).collect();
    for browser in &mut others {
        assert_eq!(browser.get("/count", &[]).text(), "1");
    }
    assert_eq!(held_leases(&setup.table), 0, "leases given back");
    let cookie = holder.cookie.clone().unwrap();
    let holding = held_request(port, &cookie);
    holding.at_the_app();
    assert_eq!(
        held_leases(&setup.table),
        1,
        "the held request's lease is not in pg_locks: no test"
    );
    relay.stall();
    let queued = std::thread::spawn(move || {
        let started = Instant::now();
        let cookie = format!("session_id={cookie}");
        (
            get(port, "/count", &[("Cookie", &cookie)]),
            started.elapsed(),
        )
    });
    // The queued request waits for the holder's turn; the holder's app
    // answers, and its save meets the hung store.
    wait_in_flight(setup.config.admin_port, 2);
    let released = Instant::now();
    holding.release();
    let answers: Vec<(Response, Duration)> = std::thread::scope(|scope| {
        let mut threads: Vec<_> = others
            .iter_mut()
            .map(|browser| {
                scope.spawn(move || {
                    let started = Instant::now();
                    (browser.get("/count", &[]), started.elapsed())
                })
            })
            .collect();
        threads.push(scope.spawn(move || {
            let started = Instant::now();
            let update = [("X-Test-Update", r#"{"new": 1}"#)];
            (get(port, "/", &update), started.elapsed())
        }));
        let started = Instant::now();
        let health = get(setup.config.admin_port, "/healthz", &[]);
        assert_eq!(health.status, 503, "/healthz of a hung store");
        assert!(started.elapsed() < ANSWER_BOUND, "{:?}", started.elapsed());
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (i, (response, took)) in answers.iter().enumerate() {
        let what = format!("request {i} while the store hangs");
        assert_eq!(
            (response.status, response.text().as_str()),
            (503, "session store unavailable"),
            "{what}"
        );
        assert!(
            *took < ANSWER_BOUND,
            "{what}: {took:?}; the proxy's log:\n{}",
            setup.log()
        );
    }
    let (response, answered) = holding.answered_at();
    assert_eq!(response.status, 503, "the holder: {}", response.text());
    let took = answered.duration_since(released);
    assert!(
        took < ANSWER_BOUND,
        "the holder answered {took:?} after its app did"
    );
    let (response, took) = queued.join().unwrap();
    assert_eq!(
        response.status,
        503,
        "the holder's session, queued: {}",
        response.text()
    );
    assert!(
        took < 2 * ANSWER_BOUND,
        "the holder's session, queued: {took:?}"
    );
    assert!(relay.wedged() > 0, "the relay stalled nothing: no test");
    let mut open = relay.wedged_open();
    let closed = eventually(Duration::from_secs(4), || {
        open = relay.wedged_open();
        open == 0
    });
    assert!(
        closed,
        "{open} hung store connections still held open by the proxy; pg_locks holds {} \
         of its leases",
        held_leases(&setup.table)
    );

    relay.unstall();
    let mut last = String::new();
    let back = eventually(Duration::from_secs(8), || {
        last = holder.get("/count", &[]).text();
        last != "session store unavailable"
    });
    assert!(back, "no recovery after the store answered again: {last}");
    assert_eq!(
        last,
        "2",
        "the holder's session, served again; the proxy's log:\n{}",
        setup.log()
    );
    assert_eq!(holder.get("/count", &[]).text(), "3", "its lease again");
    for (i, browser) in others.iter_mut().enumerate() {
        assert_eq!(browser.get("/count", &[]).text(), "2", "session {i}");
    }
    assert_eq!(setup.admin("/healthz").status, 200);
    assert!(
        eventually(Duration::from_secs(2), || held_leases(&setup.table) == 0),
        "leases left in pg_locks: {}",
        held_leases(&setup.table)
    );
}

/// With `lock = true`, every connection to the store is cut (the one that
/// holds the leases too) while a request holds its session's lease: that
/// request, whose change would be stored without the lease, gets `503
/// session busy` and stores nothing (README); PostgreSQL frees the lock
/// with the connection; and the next requests open a lease connection anew
/// by themselves, without a 503.
#[test]
fn with_lock_the_lease_connection_cut_while_a_lease_is_held_is_opened_anew() {
    if !Shared::Postgres.available() {
        return;
    }
    let mut relay = Relay::start("127.0.0.1:5432");
    let setup = setup("lcut", Some(&relay), &[("session", "lock = true")]);
    let port = setup.proxy.port;
    let mut holder = Browser::new(port);
    assert_eq!(holder.get("/count", &[]).text(), "1");
    let mut other = Browser::new(port);
    assert_eq!(other.get("/count", &[]).text(), "1");
    for round in 0..3 {
        let before: u64 = holder.get("/count", &[]).text().parse().unwrap();
        let holding = held_request(port, holder.cookie.as_deref().unwrap());
        holding.at_the_app();
        assert_eq!(
            held_leases(&setup.table),
            1,
            "round {round}: the held request's lease is not in pg_locks: no test"
        );
        relay.stop();
        relay.resume();
        // The app answers a while after the cut, as one at work would:
        // the proxy's side of the lease connection has seen it end.
        std::thread::sleep(Duration::from_millis(1000));
        let released = Instant::now();
        let (response, answered) = holding.answered_at();
        let took = answered.duration_since(released);
        assert_eq!(
            (response.status, response.text().as_str()),
            (
                503,
                "session busy: an earlier request of this session has not finished"
            ),
            "round {round}: the lease lost while the app worked"
        );
        assert!(took < ANSWER_BOUND, "{took:?} after its app answered");
        assert!(
            eventually(Duration::from_secs(2), || held_leases(&setup.table) == 0),
            "round {round}: the lock outlived its connection"
        );
        let response = holder.get("/count", &[]);
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, (before + 1).to_string().as_str()),
            "round {round}: the holder's session after the cut (its change not stored); \
             the proxy's log:\n{}",
            setup.log()
        );
        let response = other.get("/count", &[]);
        assert_eq!(response.status, 200, "round {round}: another session");
    }
    assert_eq!(held_leases(&setup.table), 0);
}

/// With `lock = true`, the store hangs while a request holds its lease,
/// and no other request comes: the holder's write and then its unlock time
/// out. The connection that holds the lock must close all the same (not
/// wait in the proxy for its next lease to be replaced), so that the lock
/// goes: another proxy, which reaches the store, serves the session
/// while this one's path to the store still hangs.
#[test]
fn with_lock_a_lease_whose_unlock_timed_out_goes_with_its_connection() {
    if !Shared::Postgres.available() {
        return;
    }
    let relay = Relay::start("127.0.0.1:5432");
    let setup = setup("lunlock", Some(&relay), &[("session", "lock = true")]);
    let direct = {
        let mut config = ProxyConfig::new(setup.upstream.port);
        config.store = setup
            .config
            .store
            .iter()
            .map(|line| line.replace(&format!(":{}/", relay.port), ":5432/"))
            .collect();
        config = config.session("lock = true");
        let proxy = config.start_logging("warn", &config.dir.path().join("proxy.log"));
        (proxy, config)
    };
    let mut holder = Browser::new(setup.proxy.port);
    assert_eq!(holder.get("/count", &[]).text(), "1");
    let cookie = holder.cookie.clone().unwrap();
    let holding = held_request(setup.proxy.port, &cookie);
    holding.at_the_app();
    assert_eq!(
        held_leases(&setup.table),
        1,
        "the held request's lease is not in pg_locks: no test"
    );
    relay.stall();
    let released = Instant::now();
    let (response, answered) = holding.answered_at();
    assert_eq!(response.status, 503, "the holder: {}", response.text());
    let took = answered.duration_since(released);
    assert!(took < ANSWER_BOUND, "{took:?} after its app answered");
    let freed = eventually(Duration::from_secs(4), || {
        relay.wedged_open() == 0 && held_leases(&setup.table) == 0
    });
    assert!(
        freed,
        "{} hung connections held open, {} leases in pg_locks; the proxy's log:\n{}",
        relay.wedged_open(),
        held_leases(&setup.table),
        setup.log()
    );
    let mut elsewhere = Browser::new(direct.0.port);
    elsewhere.cookie = Some(cookie);
    let started = Instant::now();
    let response = elsewhere.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "2"),
        "the session through another proxy"
    );
    assert!(started.elapsed() < ANSWER_BOUND, "{:?}", started.elapsed());
}
