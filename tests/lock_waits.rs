//! End to end: a request that waits for its session's turn (`lock = true`)
//! and whose client leaves meanwhile never reaches the app, gives up its
//! place, and is a 499 in the access log and the metrics; a request whose
//! client stays is served as without `lock` (README, "lock = true").
//!
//! The lease waits (two proxies on one Redis or PostgreSQL) need the real
//! services on 127.0.0.1, as tests/shared_stores.rs.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::recorder::*;
use support::shared::Shared;
use support::*;

/// A proxy with `lock = true` on `store`, logging to a file of its own.
/// The app's clock (and the wait for a turn with it) far beyond how long
/// a test holds a turn.
fn locking_proxy(app: &Recorder, store: &[String]) -> (ProxyConfig, Process, PathBuf) {
    let mut config = ProxyConfig::new(app.port)
        .session("lock = true")
        .upstream("read_timeout = 30");
    config.store = store.to_vec();
    let log = config.dir.path().join("access.log");
    let config = config.server(&format!("access_log = {:?}", log.display().to_string()));
    let proxy = config.start();
    (config, proxy, log)
}

fn memory_store() -> Vec<String> {
    vec!["kind = \"memory\"".into()]
}

/// A session's cookie header, from the app's `/login`.
fn login(port: u16) -> String {
    let response = get(port, "/login", &[]);
    let cookie = response.set_cookie("session_id").expect("a session cookie");
    format!("session_id={cookie}")
}

/// The session's turn, held by a request the app holds until the test
/// lets it go: what waits for the turn meanwhile does not depend on how
/// fast the machine is.
fn hold_the_turn(app: &Recorder, port: u16, jar: &str) -> Held {
    let holder = Held::get(port, "/slow", &[("Cookie", jar)]);
    holder.at_the_app();
    assert!(app.saw("/slow"));
    holder
}

/// Sends a request of the session through `proxy` on a connection of its
/// own, and hangs up once it waits for its turn there (`in_flight`
/// requests in all on that proxy).
fn wait_then_hang_up(proxy: &ProxyConfig, path: &str, jar: &str, in_flight: usize) {
    let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {jar}\r\n\r\n");
    client.write_all(head.as_bytes()).unwrap();
    wait_in_flight(proxy.admin_port, in_flight);
}

fn answered_4xx(admin_port: u16) -> f64 {
    metric(admin_port, "session_proxy_responses_total{class=\"4xx\"}")
}

/// The access log's status for `request` (its request line), once written.
fn logged_status(log: &Path, request: &str) -> Option<u16> {
    let quoted = format!("\"{request}\" ");
    let mut status = None;
    eventually(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        status = text
            .lines()
            .find_map(|line| line.split_once(&quoted))
            .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok());
        status.is_some()
    });
    status
}

/// The session's turn is held through `holder_port`; a request waits for
/// it through `waiter_port` and its client hangs up. Nothing of it reaches
/// the app; it is counted a 499 while the turn is still held, not when
/// it comes; the session's next request is served as soon as the turn is
/// free.
fn a_waiting_request_whose_client_left_never_reaches_the_app(
    app: &Recorder,
    holder_port: u16,
    waiter: &ProxyConfig,
    log: &Path,
) {
    let jar = login(holder_port);
    let holder = hold_the_turn(app, holder_port, &jar);
    // The holder is in flight there too when it is the same proxy.
    let in_flight = if holder_port == waiter.port { 2 } else { 1 };
    wait_then_hang_up(waiter, "/second", &jar, in_flight);

    assert!(
        eventually(Duration::from_secs(10), || answered_4xx(waiter.admin_port)
            == 1.0),
        "the request left waiting is not counted while the turn is held"
    );
    assert_eq!(holder.answer().status, 200);

    let started = Instant::now();
    let third = get(waiter.port, "/third", &[("Cookie", &jar)]);
    assert_eq!(third.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(!app.saw("/second"), "{:?}", app.requests());
    assert_eq!(answered_4xx(waiter.admin_port), 1.0);
    assert_eq!(logged_status(log, "GET /second HTTP/1.1"), Some(499));
}

#[test]
fn a_request_whose_client_left_while_it_waited_for_its_turn_never_reaches_the_app() {
    let app = session_app();
    let (config, proxy, log) = locking_proxy(&app, &memory_store());
    a_waiting_request_whose_client_left_never_reaches_the_app(&app, proxy.port, &config, &log);
}

/// The request behind the one that left goes as soon as the turn is free.
#[test]
fn a_request_whose_client_left_gives_up_its_place_in_the_queue() {
    let app = session_app();
    let (config, proxy, _log) = locking_proxy(&app, &memory_store());
    let jar = login(proxy.port);
    let holder = hold_the_turn(&app, proxy.port, &jar);
    let mut left = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let head = format!("GET /second HTTP/1.1\r\nHost: x\r\nCookie: {jar}\r\n\r\n");
    left.write_all(head.as_bytes()).unwrap();
    // Each waits for the turn, in this order, before the first hangs up.
    wait_in_flight(config.admin_port, 2);
    let (port, third_jar) = (proxy.port, jar.clone());
    let behind = std::thread::spawn(move || {
        let response = get(port, "/third", &[("Cookie", &third_jar)]);
        (response.status, Instant::now())
    });
    wait_in_flight(config.admin_port, 3);
    drop(left);
    assert!(
        eventually(Duration::from_secs(10), || answered_4xx(config.admin_port)
            == 1.0),
        "the request left waiting is not counted while the turn is held"
    );

    assert_eq!(holder.answer().status, 200);
    let freed = Instant::now();
    let (status, served) = behind.join().unwrap();
    assert_eq!(status, 200);
    assert!(served.saturating_duration_since(freed) < Duration::from_secs(1));
    assert!(!app.saw("/second"), "{:?}", app.requests());
    assert_eq!(answered_4xx(config.admin_port), 1.0);
}

/// A request with a body: the body is not read before the turn comes
/// (pingora passes it on), but the client's close is seen all the same,
/// whether it sent its whole body or not. One whose client stays is served
/// with its body whole.
#[test]
fn a_waiting_request_with_a_body_is_dropped_if_its_client_leaves_and_served_whole_if_not() {
    let app = session_app();
    let (config, proxy, log) = locking_proxy(&app, &memory_store());
    let jar = login(proxy.port);
    let holder = hold_the_turn(&app, proxy.port, &jar);
    let post = |path: &str, length: usize| {
        let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nCookie: {jar}\r\nContent-Length: {length}\r\n\r\nhello"
        );
        client.write_all(head.as_bytes()).unwrap();
        client
    };
    let whole = post("/whole", 5);
    let partial = post("/partial", 10);
    let (port, stays_jar) = (proxy.port, jar.clone());
    // Its body in a write of its own: bytes on the socket, no end.
    let stays = std::thread::spawn(move || {
        try_request(port, "POST", "/stays", &[("Cookie", &stays_jar)], b"hello").unwrap()
    });
    // The holder and the three wait for the turn.
    wait_in_flight(config.admin_port, 4);
    drop(whole);
    drop(partial);

    assert!(
        eventually(Duration::from_secs(10), || answered_4xx(config.admin_port)
            == 2.0),
        "the requests left waiting are not counted while the turn is held"
    );
    assert_eq!(holder.answer().status, 200);
    assert_eq!(stays.join().unwrap().status, 200);
    let seen = app.requests();
    let stayed = seen.iter().find(|seen| seen.target == "/stays");
    assert_eq!(stayed.map(|seen| seen.body.as_slice()), Some(&b"hello"[..]));
    assert!(!app.saw("/whole") && !app.saw("/partial"), "{seen:?}");
    assert_eq!(logged_status(&log, "POST /whole HTTP/1.1"), Some(499));
    assert_eq!(logged_status(&log, "POST /partial HTTP/1.1"), Some(499));
}

/// Two requests of the session in one write, the first waiting for its
/// turn: the second is in pingora's buffer, not on the socket, and the
/// wait reads neither. The first is served when its turn comes, and the
/// connection closes after it, as without `lock` (pingora reads no
/// pipelined request; README, deviations).
#[test]
fn pipelined_requests_that_wait_for_their_turn_are_served_as_without_lock() {
    let app = session_app();
    let (_config, proxy, _log) = locking_proxy(&app, &memory_store());
    let jar = login(proxy.port);
    let holder = hold_the_turn(&app, proxy.port, &jar);
    let pair = format!(
        "GET /one HTTP/1.1\r\nHost: x\r\nCookie: {jar}\r\n\r\n\
         GET /two HTTP/1.1\r\nHost: x\r\nCookie: {jar}\r\n\r\n"
    );
    let port = proxy.port;
    let exchange =
        std::thread::spawn(move || raw_exchange(port, pair.as_bytes(), Duration::from_secs(30)));
    assert!(
        !eventually(Duration::from_secs(1), || app.saw("/one")),
        "served before its turn"
    );
    assert_eq!(holder.answer().status, 200);
    let answer = exchange.join().unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer:?}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    let seen: Vec<String> = app.requests().into_iter().map(|seen| seen.target).collect();
    assert_eq!(seen, ["/login", "/slow", "/one"]);
}

/// A request pipelined in a write of its own, after the first, whose bytes
/// come while the first waits: pingora fails the first when such bytes come
/// while the app works on it (`400`, the connection closed); while it waits
/// for its turn, the same, before the app sees it.
#[test]
fn bytes_after_a_request_fail_it_alike_whether_it_waits_for_its_turn_or_the_app() {
    let app = session_app();
    let (config, proxy, _log) = locking_proxy(&app, &memory_store());
    // The next request's bytes come once the first is at the app, or
    // waits for its turn (`until`).
    let pipelined = |first: &str, until: &dyn Fn()| {
        let mut client = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        client.write_all(first.as_bytes()).unwrap();
        until();
        let _ = client.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut client, &mut answer);
        raw_status(&answer)
    };
    // Upstream: no session, no turn; the app holds it until the end.
    let signals = TempDir::new("working");
    let (arrived, release) = (
        signals.path().join("arrived"),
        signals.path().join("release"),
    );
    let working = format!(
        "GET /working HTTP/1.1\r\nHost: x\r\nX-Test-Arrived: {}\r\nX-Test-Wait-For: {}\r\n\r\n",
        arrived.display(),
        release.display()
    );
    let at_the_app = pipelined(&working, &|| {
        assert!(eventually(Duration::from_secs(20), || arrived.exists()));
    });
    assert!(app.saw("/working"));

    let jar = login(proxy.port);
    let holder = hold_the_turn(&app, proxy.port, &jar);
    let in_flight = || metric(config.admin_port, "session_proxy_requests_in_flight");
    assert!(
        eventually(Duration::from_secs(10), || in_flight() == 1.0),
        "the refused /working still in flight"
    );
    let waiting = pipelined(
        &format!("GET /waiting HTTP/1.1\r\nHost: x\r\nCookie: {jar}\r\n\r\n"),
        // The holder and it.
        &|| wait_in_flight(config.admin_port, 2),
    );
    std::fs::write(&release, b"").unwrap();
    assert_eq!(holder.answer().status, 200);
    assert_eq!((at_the_app, waiting), (Some(400), Some(400)));
    assert!(
        !app.saw("/waiting") && !app.saw("/next"),
        "{:?}",
        app.requests()
    );
}

/// The lease's wait (two proxies on one shared store, the turn held
/// through the other): the same as the in-process wait, and the lease
/// given up is not left taken.
fn a_request_whose_client_left_while_it_waited_for_the_lease_never_reaches_the_app(shared: Shared) {
    if !shared.available() {
        return;
    }
    let app = session_app();
    let store = shared.store_lines("lockgone");
    let _table = TableDroppedAtEnd::of(&store);
    let (_holder_config, holder, _) = locking_proxy(&app, &store);
    let (waiter_config, _waiter, log) = locking_proxy(&app, &store);
    a_waiting_request_whose_client_left_never_reaches_the_app(
        &app,
        holder.port,
        &waiter_config,
        &log,
    );
}

/// The PostgreSQL table of `store` lines, if any, dropped with the guard.
struct TableDroppedAtEnd(Option<String>);

impl TableDroppedAtEnd {
    fn of(store: &[String]) -> TableDroppedAtEnd {
        let table = store.iter().find_map(|line| {
            let name = line.strip_prefix("table = ")?;
            Some(name.trim_matches('"').to_string())
        });
        TableDroppedAtEnd(table)
    }
}

impl Drop for TableDroppedAtEnd {
    fn drop(&mut self) {
        if let Some(table) = &self.0 {
            support::shared::sql(&format!("DROP TABLE IF EXISTS {table}"));
        }
    }
}

mod postgres {
    #[test]
    fn a_request_whose_client_left_while_it_waited_for_the_lease_never_reaches_the_app() {
        super::a_request_whose_client_left_while_it_waited_for_the_lease_never_reaches_the_app(
            super::Shared::Postgres,
        )
    }
}

mod redis {
    #[test]
    fn a_request_whose_client_left_while_it_waited_for_the_lease_never_reaches_the_app() {
        super::a_request_whose_client_left_while_it_waited_for_the_lease_never_reaches_the_app(
            super::Shared::Redis,
        )
    }
}
