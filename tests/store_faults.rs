//! End to end: the shared stores failing under a running proxy (SPEC [5]:
//! "store unreachable on load or on write: 503 `session store
//! unavailable`, session unchanged"; README: a record that cannot be
//! decoded is logged and treated as missing).
//!
//! `shared_stores` has the store that goes away and comes back; here are
//! the faults it does not make: a store that hangs, a reply cut in the
//! middle, connections closed by the store while idle, a Redis that
//! restarts empty, a record another program garbled, and a store lost
//! while the app works on a request that changes the session. Needs PostgreSQL (127.0.0.1:5432, database `test`) and Redis
//! (127.0.0.1:6379), and `redis-server` for the restart; without them each
//! test is skipped loudly, unless `SESSION_PROXY_REQUIRE_SERVICES=1`.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::shared::{redis_at, sql, Shared};
use support::*;

/// README: "with the server hung every request has its answer within twice
/// the timeout" (1 s here: `[store] timeout = 1`); plus slack for a busy
/// 2-core machine.
const ANSWER_BOUND: Duration = Duration::from_millis(2 * 1000 + 1500);

/// A proxy on `shared` (through `relay` when given), its store timeout 1 s.
struct Setup {
    _upstream: Process,
    proxy: Process,
    config: ProxyConfig,
    namespace: Namespace,
}

fn setup(shared: Shared, tag: &str, relay: Option<&Relay>, session: &[&str]) -> Setup {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    let lines = shared.store_lines(tag);
    let namespace = Namespace::of(&lines);
    config.store = match relay {
        None => lines,
        Some(relay) => lines
            .into_iter()
            .map(|line| {
                line.replace(
                    &format!("127.0.0.1:{}", shared.port()),
                    &format!("127.0.0.1:{}", relay.port),
                )
            })
            .collect(),
    };
    config = config.store("timeout = 1").session("timeout = 600");
    for line in session {
        config = config.session(line);
    }
    let proxy = config.start_logging("warn", &config.dir.path().join("proxy.log"));
    Setup {
        _upstream: upstream,
        proxy,
        config,
        namespace,
    }
}

impl Setup {
    fn log(&self) -> String {
        std::fs::read_to_string(self.config.dir.path().join("proxy.log")).unwrap_or_default()
    }
    fn admin(&self, path: &str) -> Response {
        get(self.config.admin_port, path, &[])
    }
}

/// A test's own table or key prefix in a shared store, removed when dropped.
enum Namespace {
    Table(String),
    Keys(String),
}

impl Namespace {
    fn of(store_lines: &[String]) -> Namespace {
        let value = |key: &str| {
            store_lines
                .iter()
                .find_map(|line| line.strip_prefix(key))
                .map(|rest| {
                    rest.trim_matches(|c| c == ' ' || c == '=' || c == '"')
                        .to_string()
                })
        };
        match value("table") {
            Some(table) => Namespace::Table(table),
            None => Namespace::Keys(value("key_prefix").expect("a table or a key prefix")),
        }
    }

    /// Writes `value` over the stored record of `handle` (`None`: the
    /// column NULL), as another program might.
    fn overwrite(&self, handle: &str, value: Option<&[u8]>) {
        match self {
            Namespace::Table(table) => {
                let data = match value {
                    Some(text) => {
                        format!("'{}'", String::from_utf8_lossy(text).replace('\'', "''"))
                    }
                    None => "NULL".into(),
                };
                sql(&format!(
                    "UPDATE {table} SET data = {data} WHERE session_id = '{handle}'"
                ));
            }
            Namespace::Keys(prefix) => {
                let value = value.expect("Redis has no NULL");
                let _: () = redis_at(
                    6379,
                    ::redis::cmd("SET")
                        .arg(format!("{prefix}{handle}"))
                        .arg(value)
                        .arg("EX")
                        .arg(600),
                );
            }
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        match self {
            Namespace::Table(table) => sql(&format!("DROP TABLE IF EXISTS {table}")),
            Namespace::Keys(prefix) => {
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis_at(
                        6379,
                        ::redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{prefix}*"))
                            .arg("COUNT")
                            .arg(1000),
                    );
                    if !keys.is_empty() {
                        let _: i64 = redis_at(6379, ::redis::cmd("DEL").arg(keys));
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
    }
}

/// The value of the sample `name` (with its labels, if any) in `metrics`.
fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// Each SPEC [5] answer must come within `ANSWER_BOUND`; returns it.
fn timed_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (Response, Duration) {
    let started = Instant::now();
    let response = get(port, path, headers);
    (response, started.elapsed())
}

on_each_shared_store!(
    a_store_that_hangs_is_a_503_within_twice_the_timeout_and_holds_no_connection,
    a_reply_cut_in_the_middle_is_a_503_and_no_acknowledged_change_is_lost,
    a_store_lost_while_the_app_works_stores_nothing_and_sets_no_cookie,
    a_record_that_cannot_be_decoded_is_a_new_session_logged_by_handle_prefix,
    connections_the_store_closed_while_idle_cost_no_request_a_503,
    with_lock_connections_the_store_closed_while_idle_cost_no_request_a_503,
    connections_forgotten_on_the_way_while_idle_cost_no_request_a_503,
    with_lock_connections_forgotten_on_the_way_while_idle_cost_no_request_a_503,
    healthz_gives_up_a_black_holed_connection_under_a_store_timeout_past_its_own,
);

/// `/healthz` answers within its own 2 s, and a `[store] timeout` may be
/// longer (5 s here). A health check that finds its connection gone into
/// a black hole (a firewall or a NAT that dropped the flow: nothing ever
/// tells the connection) still lets the store's own timeout run out, so
/// that the store gives the connection up as a request would: once the
/// store answers again, `/healthz` says 200. Cut off at 2 s, the check
/// never reached that timeout, kept the dead connection, and `/healthz`
/// said 503 for good while requests were served: a load balancer that
/// heeds it would have sent the proxy nothing again.
fn healthz_gives_up_a_black_holed_connection_under_a_store_timeout_past_its_own(shared: Shared) {
    if !shared.available() {
        return;
    }
    let relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    let lines = shared.store_lines("blackhole");
    let _namespace = Namespace::of(&lines);
    config.store = lines
        .iter()
        .map(|line| {
            line.replace(
                &format!("127.0.0.1:{}", shared.port()),
                &format!("127.0.0.1:{}", relay.port),
            )
        })
        .collect();
    config = config.store("timeout = 5");
    let _proxy = config.start_logging("warn", &config.dir.path().join("proxy.log"));
    let admin_port = config.admin_port;
    let healthz = move || get(admin_port, "/healthz", &[]).status;
    assert_eq!(healthz(), 200);

    relay.stall();
    // Checks at once, so that each admin thread's connection goes silent.
    let stalled: Vec<_> = (0..8).map(|_| std::thread::spawn(healthz)).collect();
    for check in stalled {
        assert_eq!(
            check.join().unwrap(),
            503,
            "/healthz of a store gone silent"
        );
    }
    assert!(relay.wedged() > 0, "the relay stalled nothing: no test");
    relay.unstall();

    // Connections are spread over the admin threads at random: eight
    // answers in a row, all 200, have been served by each of them.
    let mut last = Vec::new();
    let healthy = eventually(Duration::from_secs(15), || {
        last = (0..8).map(|_| healthz()).collect();
        last.iter().all(|status| *status == 200)
    });
    assert!(
        healthy,
        "/healthz still {last:?} with the store answering again; the proxy's log:\n{}",
        std::fs::read_to_string(config.dir.path().join("proxy.log")).unwrap_or_default()
    );
}

/// The store closes the proxy's connections while they are idle (Redis's
/// `timeout` for idle clients, often set on managed servers; a restart
/// between two requests; a failover):
/// the proxy finds out on their next use, and no request pays for it with
/// a 503: every proxy thread's next request is served.
fn connections_the_store_closed_while_idle_cost_no_request_a_503(shared: Shared) {
    closed_while_idle(shared, &[]);
}

/// The same with `lock = true`, whose leases take a command of their own.
fn with_lock_connections_the_store_closed_while_idle_cost_no_request_a_503(shared: Shared) {
    closed_while_idle(shared, &["lock = true"]);
}

/// Something on the way to the store (a firewall or a NAT that forgets
/// idle connections, a pooler) drops the proxy's connections without a
/// word: the proxy learns of it only from the statement or command it
/// sends next on one, which never reaches the store. That one is made
/// again on a new connection: no request pays for it with a 503.
fn connections_forgotten_on_the_way_while_idle_cost_no_request_a_503(shared: Shared) {
    forgotten_while_idle(shared, &[]);
}

/// The same with `lock = true`, whose leases take connections of their own.
fn with_lock_connections_forgotten_on_the_way_while_idle_cost_no_request_a_503(shared: Shared) {
    forgotten_while_idle(shared, &["lock = true"]);
}

fn forgotten_while_idle(shared: Shared, session: &[&str]) {
    if !shared.available() {
        return;
    }
    let relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let setup = setup(shared, "forgotten", Some(&relay), session);
    let port = setup.proxy.port;
    let mut browsers: Vec<Browser> = (0..4).map(|_| Browser::new(port)).collect();
    for browser in &mut browsers {
        assert_eq!(browser.get("/count", &[]).text(), "1");
    }
    // Requests at once, so that a proxy thread holds several connections,
    // all of them forgotten below.
    let at_once: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || Browser::new(port).get("/count", &[]).status))
        .collect();
    for request in at_once {
        assert_eq!(request.join().unwrap(), 200);
    }
    relay.forget_idle();
    for (i, browser) in browsers.iter_mut().enumerate() {
        let response = browser.get("/count", &[]);
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "2"),
            "session {i}, after its connection was forgotten on the way"
        );
    }
    assert!(relay.forgotten() > 0, "no connection was forgotten in use");
}

fn closed_while_idle(shared: Shared, session: &[&str]) {
    if !shared.available() {
        return;
    }
    let mut relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let setup = setup(shared, "closed", Some(&relay), session);
    // Sessions enough that every proxy thread has a connection.
    let mut browsers: Vec<Browser> = (0..4).map(|_| Browser::new(setup.proxy.port)).collect();
    for browser in &mut browsers {
        assert_eq!(browser.get("/count", &[]).text(), "1");
    }
    relay.stop();
    relay.resume();
    for (i, browser) in browsers.iter_mut().enumerate() {
        let response = browser.get("/count", &[]);
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "2"),
            "session {i}, after the store closed the proxy's connections"
        );
    }
}

/// The store accepts connections but never answers (a server hung, or
/// behind a black hole): every request that needs it, loads and writes,
/// of one session or of several at once, and `/healthz`, get their 503
/// within twice the store timeout; no client is left hanging, the proxy
/// lets go of every connection it gave up on, and once the store answers
/// again the session is there, without a restart.
fn a_store_that_hangs_is_a_503_within_twice_the_timeout_and_holds_no_connection(shared: Shared) {
    if !shared.available() {
        return;
    }
    let relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let setup = setup(shared, "stall", Some(&relay), &[]);
    let port = setup.proxy.port;
    let mut browser = Browser::new(port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());

    relay.stall();
    // One after another first: each proxy thread's connection times out
    // and is given up, so the requests below each open a new one.
    for i in 0..4 {
        let (response, took) = timed_get(port, "/count", &[("Cookie", &cookie)]);
        assert_store_unavailable(&response, &format!("sequential request {i}"));
        assert!(took < ANSWER_BOUND, "sequential request {i}: {took:?}");
    }
    // Then many at once, loads and writes, of one session and of new ones.
    let mut requests: Vec<(&str, Vec<(&str, &str)>)> = Vec::new();
    for _ in 0..3 {
        requests.push(("/count", vec![("Cookie", &cookie)]));
    }
    for _ in 0..5 {
        requests.push(("/", vec![("X-Test-Update", r#"{"new": 1}"#)]));
    }
    let answers: Vec<(Response, Duration)> = std::thread::scope(|scope| {
        let threads: Vec<_> = requests
            .iter()
            .map(|(path, headers)| scope.spawn(move || timed_get(port, path, headers)))
            .collect();
        let health = timed_get(setup.config.admin_port, "/healthz", &[]);
        assert_eq!(health.0.status, 503, "/healthz of a hung store");
        assert!(health.1 < ANSWER_BOUND, "/healthz took {:?}", health.1);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (i, (response, took)) in answers.iter().enumerate() {
        let what = format!("request {i} ({}) while the store hangs", requests[i].0);
        assert_store_unavailable(response, &what);
        assert!(
            *took < ANSWER_BOUND,
            "{what}: answered after {took:?}; the proxy's log:\n{}",
            setup.log()
        );
    }
    assert!(relay.wedged() > 0, "the relay stalled nothing: no test");
    let errors = metric(
        &setup.admin("/metrics").text(),
        "session_proxy_store_errors_total",
    );
    assert!(
        errors >= 12.0,
        "12 requests failed, {errors} store errors counted"
    );
    // A connection that timed out is in doubt: the proxy must close it,
    // not keep it (each hung request would leave one more behind).
    let mut open = relay.wedged_open();
    let closed = eventually(Duration::from_secs(4), || {
        open = relay.wedged_open();
        open == 0
    });
    assert!(
        closed,
        "{open} hung store connections still held open by the proxy"
    );

    relay.unstall();
    let mut last = String::new();
    let back = eventually(Duration::from_secs(8), || {
        last = browser.get("/count", &[]).text();
        last != "session store unavailable"
    });
    assert!(back, "no recovery after the store answered again: {last}");
    assert_eq!(last, "2", "the session survived, nothing half-written");
    assert_eq!(setup.admin("/healthz").status, 200);
    assert_eq!(
        browser.cookie.as_deref(),
        Some(&cookie["session_id=".len()..])
    );
}

/// The store's connection closed in the middle of a reply, at a different
/// point of the request each time (the load's reply, the write's, a
/// reconnection's): the client gets a 200 or the 503, never a 500, a hang,
/// or a new session in place of its own; a change whose 200 went out is
/// never lost; and the proxy reconnects by itself.
fn a_reply_cut_in_the_middle_is_a_503_and_no_acknowledged_change_is_lost(shared: Shared) {
    if !shared.available() {
        return;
    }
    let relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let setup = setup(shared, "cut", Some(&relay), &[]);
    let mut browser = Browser::new(setup.proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    // Redis reads twice a request (the load, the write), PostgreSQL more.
    let reads = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4];
    let CutReplies {
        failed,
        stored_but_failed,
        ..
    } = count_through_cut_replies(&mut browser, &relay, &reads, ANSWER_BOUND, 1);
    eprintln!(
        "{shared:?}: {} cuts, {failed} 503s, {stored_but_failed} of them stored anyway",
        relay.cuts()
    );
    assert!(
        relay.cuts() >= 4,
        "only {} replies were cut: no test",
        relay.cuts()
    );
    assert_eq!(setup.admin("/healthz").status, 200);
    assert!(!setup.log().contains("panicked"), "{}", setup.log());
}

/// SPEC [4.5]: every change is stored before the response head goes out;
/// [5]: a store that fails on the write is a 503 and the session is left
/// unchanged. Here the store goes away while the app works on the request
/// (the load went through): the update, a regenerate, a kill and a new
/// session's first write each get the 503, the app's response and its
/// session headers are dropped, no cookie is set or cleared, and once the
/// store is back the session is as it was.
fn a_store_lost_while_the_app_works_stores_nothing_and_sets_no_cookie(shared: Shared) {
    if !shared.available() {
        return;
    }
    let mut relay = Relay::start(&format!("127.0.0.1:{}", shared.port()));
    let setup = setup(shared, "lostwrite", Some(&relay), &[]);
    let port = setup.proxy.port;
    let mut browser = Browser::new(port);
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());
    let before = browser.get("/", &[]).session();
    assert_eq!(before["data"], serde_json::json!({"a": 1}));

    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "update",
            vec![("Cookie", &cookie), ("X-Test-Update", r#"{"a": 2}"#)],
        ),
        (
            "regenerate",
            vec![("Cookie", &cookie), ("X-Test-Action", "regenerate")],
        ),
        ("kill", vec![("Cookie", &cookie), ("X-Test-Action", "kill")]),
        ("new session", vec![("X-Test-Update", r#"{"b": 1}"#)]),
    ];
    for (what, headers) in cases {
        // The load is done before the app has the request; the write is
        // not until the test lets the app answer.
        let request = Held::get(port, "/", &headers);
        request.at_the_app();
        relay.stop();
        let released = Instant::now();
        let (response, answered) = request.answered_at();
        let took = answered.duration_since(released);
        relay.resume();
        assert_store_unavailable(&response, what);
        assert!(
            took < ANSWER_BOUND,
            "{what}: {took:?} after the app answered"
        );
        let mut after = None;
        let back = eventually(Duration::from_secs(8), || {
            let response = get(port, "/", &[("Cookie", &cookie)]);
            let ok = response.status == 200;
            after = Some(response);
            ok
        });
        let after = after.unwrap();
        assert!(
            back,
            "{what}: no recovery: {} {}",
            after.status,
            after.text()
        );
        assert_eq!(
            after.headers_named("set-cookie"),
            Vec::<&str>::new(),
            "{what}"
        );
        let session = after.session();
        assert_eq!(session["new"], false, "{what}: the session is gone");
        assert_eq!(
            session["data"], before["data"],
            "{what}: the session changed"
        );
        assert_eq!(session["ver"], before["ver"], "{what}: the session changed");
    }
}

/// A record another program garbled (SET over the key, UPDATE of the row)
/// is, as README says, logged and treated as missing: the client gets a
/// new session (a 200 from the app, a new cookie), never a 500 or a 503 for
/// good; with `ignore_expiry = false`, the expired answer. The log says why
/// and names the session by its handle's prefix only: neither the id, nor
/// the whole handle, nor what the record held.
fn a_record_that_cannot_be_decoded_is_a_new_session_logged_by_handle_prefix(shared: Shared) {
    if !shared.available() {
        return;
    }
    let lenient = setup(shared, "corrupt", None, &[]);
    // The second proxy shares the first one's table or key prefix.
    let strict = {
        let mut config = ProxyConfig::new(lenient._upstream.port);
        config.store = lenient.config.store.clone();
        config = config
            .session("ignore_expiry = false")
            .session("expired_status = 440");
        let proxy = config.start_logging("warn", &config.dir.path().join("proxy.log"));
        (proxy, config)
    };
    let not_an_object: &[u8] =
        br#"{"atime":1,"created":1,"ip":"127.0.0.1","ver":1,"data":["leaked-secret"]}"#;
    let garbled: [(&str, Option<&[u8]>); 3] = match shared {
        Shared::Postgres => [
            ("junk", Some(b"gAJ9cQEu leaked-secret pickle")),
            ("NULL", None),
            ("data that is not an object", Some(not_an_object)),
        ],
        Shared::Redis => [
            ("junk", Some(b"leaked-secret garbage")),
            ("not UTF-8", Some(b"\xff\xfe leaked-secret")),
            ("data that is not an object", Some(not_an_object)),
        ],
    };
    for (what, value) in garbled {
        // Through the lenient proxy: a new session.
        let mut browser = Browser::new(lenient.proxy.port);
        browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
        let old = browser.cookie.clone().unwrap();
        lenient.namespace.overwrite(&handle_of(&old), value);
        let response = browser.get("/", &[("X-Test-Update", r#"{"b": 2}"#)]);
        assert_eq!(response.status, 200, "{what}: {}", response.text());
        let session = response.session();
        assert_eq!(session["new"], true, "{what}");
        assert_eq!(session["data"], serde_json::json!({}), "{what}");
        let new = browser.cookie.clone().unwrap();
        assert_ne!(new, old, "{what}: a new session gets a new id");
        let again = browser.get("/", &[]);
        assert_eq!(
            again.session()["data"],
            serde_json::json!({"b": 2}),
            "{what}"
        );

        let log = lenient.log();
        let short = &handle_of(&old)[..8];
        assert!(
            log.lines()
                .any(|line| line.contains(short) && line.contains("unreadable")),
            "{what}: no line says why session {short} started over:\n{log}"
        );
        for secret in [id_of(&old), &handle_of(&old), "leaked-secret"] {
            assert!(
                !log.contains(secret),
                "{what}: the log shows {secret:?}:\n{log}"
            );
        }

        // Through the strict proxy: the expired answer, the cookie cleared.
        let mut browser = Browser::new(strict.0.port);
        browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
        let old = browser.cookie.clone().unwrap();
        lenient.namespace.overwrite(&handle_of(&old), value);
        let response = browser.get("/", &[("X-Test-Update", r#"{"b": 2}"#)]);
        assert_eq!(
            (response.status, response.text().as_str()),
            (440, "Session expired"),
            "{what}"
        );
        assert_eq!(
            response.set_cookie("session_id").as_deref(),
            Some(""),
            "{what}"
        );
    }
    let metrics = lenient.admin("/metrics").text();
    assert!(
        metrics.contains(r#"session_proxy_sessions_expired_total{reason="missing"} 3"#),
        "{metrics}"
    );
    assert_eq!(lenient.admin("/healthz").status, 200);
}

/// A `redis-server` of this test's own on `port`, keeping nothing on disk.
fn redis_server(port: u16, dir: &TempDir) -> Process {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    wait_listening(port, &mut child);
    Process { child, port }
}

/// Redis killed under a running proxy and started again, empty (it keeps
/// nothing on disk): during the outage requests get the 503 and `/healthz`
/// says 503; afterwards the proxy reconnects by itself, a session stored
/// before is gone only because Redis lost it, and that is answered as a
/// missing session (a new one; with `ignore_expiry = false` the expired
/// answer), not as a failure; sessions made afterwards work.
#[test]
fn redis_restarted_empty_under_a_running_proxy() {
    if !redis_server_installed("restart") {
        return;
    }
    let dir = TempDir::new("redis-restart");
    let redis_port = free_port();
    let redis = redis_server(redis_port, &dir);
    let upstream = start_upstream();
    let configure = |session: &[&str]| {
        let mut config = ProxyConfig::new(upstream.port)
            .store("kind = \"redis\"")
            .store(&format!("url = \"redis://127.0.0.1:{redis_port}\""))
            .store("timeout = 1");
        for line in session {
            config = config.session(line);
        }
        config
    };
    let lenient = configure(&[]);
    let strict = configure(&["ignore_expiry = false", "expired_status = 440"]);
    let (_a, _b) = (lenient.start(), strict.start());
    let mut browser = Browser::new(lenient.port);
    let mut strict_browser = Browser::new(strict.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
    assert_eq!(strict_browser.get("/count", &[]).text(), "1");
    let old = browser.cookie.clone();

    drop(redis);
    let (response, took) = timed_get(
        lenient.port,
        "/count",
        &[("Cookie", &format!("session_id={}", old.clone().unwrap()))],
    );
    assert_store_unavailable(&response, "while Redis is down");
    assert!(took < ANSWER_BOUND, "{took:?}");
    assert_eq!(get(lenient.admin_port, "/healthz", &[]).status, 503);

    let _redis = redis_server(redis_port, &dir);
    let back = eventually(Duration::from_secs(8), || {
        get(lenient.admin_port, "/healthz", &[]).status == 200
    });
    assert!(back, "/healthz still 503 after Redis came back");

    let response = browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "1"),
        "the lost session is a missing one: a new session"
    );
    assert_ne!(browser.cookie, old, "the new session has a new id");
    assert_eq!(browser.get("/count", &[]).text(), "2", "and it is stored");
    let metrics = get(lenient.admin_port, "/metrics", &[]).text();
    assert!(
        metrics.contains(r#"session_proxy_sessions_expired_total{reason="missing"} 1"#),
        "{metrics}"
    );

    let response = strict_browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (440, "Session expired"),
        "with ignore_expiry = false the lost session is expired"
    );
    assert_eq!(response.set_cookie("session_id").as_deref(), Some(""));
    assert_eq!(
        strict_browser.get("/count", &[]).text(),
        "1",
        "then starts anew"
    );
}

// A table dropped under a running proxy is made again by the proxy: see
// tests/postgres_faults.rs, with the role that may not make it (the 503,
// and `/healthz` says so).

/// Another program's keys under the prefix that are not strings (a hash
/// here) are no records of this store: at a session's key, a record that
/// cannot be decoded (a new session, not a 503 on every request of it);
/// elsewhere, skipped by `sessions list` and the sweep, which they failed
/// as a whole (`WRONGTYPE`).
#[test]
fn redis_keys_of_another_type_are_not_records() {
    if !Shared::Redis.available() {
        return;
    }
    let setup = setup(
        Shared::Redis,
        "wrongtype",
        None,
        &["absolute_timeout = 3600"],
    );
    let Namespace::Keys(prefix) = &setup.namespace else {
        unreachable!("a Redis store has a key prefix");
    };
    let hash_at = |key: String| {
        let _: i64 = redis_at(
            6379,
            ::redis::cmd("HSET").arg(key).arg("field").arg("value"),
        );
    };
    let mut browser = Browser::new(setup.proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    hash_at(format!("{prefix}another-program"));
    let path = setup.config.path();
    let path = path.to_str().unwrap();
    for command in ["list", "purge-expired"] {
        let output = run_cli(&["sessions", command, "-c", path], &[]);
        assert!(output.status.success(), "sessions {command}: {output:?}");
    }
    let listed = run_cli(&["sessions", "list", "-c", path], &[]);
    let handle = handle_of(browser.cookie.as_deref().unwrap());
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&handle));

    let _: i64 = redis_at(6379, ::redis::cmd("DEL").arg(format!("{prefix}{handle}")));
    hash_at(format!("{prefix}{handle}"));
    let response = browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "1"),
        "a hash at the session's key: a new session"
    );
    assert!(
        setup.log().contains(&format!(
            "session {}: stored record unreadable",
            &handle[..8]
        )),
        "{}",
        setup.log()
    );
}
