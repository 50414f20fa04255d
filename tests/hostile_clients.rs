//! End to end: clients that send too much, too many, too slowly, or not at
//! all. Each limit answers a clear 4xx (or closes an idle connection),
//! the proxy serves on, and oversized input never reaches the upstream.
//!
//! The limits (SECURITY.md lists them with their defaults):
//! - request head: 64 KiB (ours, 431); 1 MiB and 256 header lines (pingora's, 400);
//! - cookies: at most 4 session-cookie candidates are verified per request;
//! - update header: `max_data_bytes * 2 + 1024` bytes (502, the upstream's fault);
//! - `server.header_timeout`: from a head's first byte to its end (408, closed);
//! - `server.keepalive_timeout`: an idle connection is closed;
//! - `server.body_timeout`: a request body that stops coming (408, closed).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// A proxy in front of the echoing upstream.
fn proxy(configure: impl FnOnce(ProxyConfig) -> ProxyConfig) -> (Process, Process, ProxyConfig) {
    let upstream = start_upstream();
    let config = configure(ProxyConfig::new(upstream.port));
    let proxy = config.start();
    (upstream, proxy, config)
}

/// A proxy in front of an upstream that counts the requests it gets (and
/// its config, which owns the store's directory).
fn counted_proxy(
    configure: impl FnOnce(ProxyConfig) -> ProxyConfig,
) -> (CountingUpstream, Process, ProxyConfig) {
    let upstream = CountingUpstream::start();
    let config = configure(ProxyConfig::new(upstream.port));
    let proxy = config.start();
    (upstream, proxy, config)
}

fn request_with(headers: &[(String, String)]) -> Vec<u8> {
    let mut head = String::from("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn assert_still_serving(port: u16) {
    assert_eq!(get(port, "/", &[]).status, 200, "the proxy serves on");
}

fn metric(admin_port: u16, name: &str) -> f64 {
    let text = get(admin_port, "/metrics", &[]).text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Reads one response (head, then a Content-Length body) off a kept-alive
/// connection.
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut status = None;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if status.is_none() {
            status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
        } else if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((status.unwrap_or(0), body))
}

/// Waits for the proxy to close `stream`; how long it took since `started`,
/// or `None` if it was still open `within` after it. A test that bounds
/// the time from below starts the clock before the proxy can start its
/// own (before the connect, before the last request is sent): a test
/// thread slow to get here then only finds the close later.
fn closed_within(stream: &mut impl Read, started: Instant, within: Duration) -> Option<Duration> {
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => panic!("unexpected data from an idle connection"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(started.elapsed())
            }
            Err(_) if started.elapsed() >= within => return None,
            Err(_) => {}
        }
    }
}

// ---- Request head size and count ----

#[test]
fn a_100_kb_header_is_refused_with_431_before_the_upstream() {
    let (upstream, proxy, _config) = counted_proxy(|c| c);
    let big = vec![("X-Big".to_string(), "b".repeat(100 * 1024))];
    let answer = raw_exchange(proxy.port, &request_with(&big), Duration::from_secs(10));
    assert_refused_before_upstream(&answer, 431, &proxy, &upstream);
    assert!(String::from_utf8_lossy(&answer).ends_with("request header too large"));
}

/// The proxy answered `status` itself, the upstream saw nothing, and the
/// proxy still serves.
fn assert_refused_before_upstream(
    answer: &[u8],
    status: u16,
    proxy: &Process,
    upstream: &CountingUpstream,
) {
    assert_eq!(
        raw_status(answer),
        Some(status),
        "{:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    assert_eq!(upstream.count(), 0);
    assert_still_serving_counted(proxy, upstream);
}

fn assert_still_serving_counted(proxy: &Process, upstream: &CountingUpstream) {
    let before = upstream.count();
    assert_eq!(get(proxy.port, "/", &[]).status, 200, "the proxy serves on");
    assert_eq!(upstream.count(), before + 1);
}

#[test]
fn a_head_just_under_64_kib_is_served() {
    let (_upstream, proxy, _config) = proxy(|c| c);
    let headers = vec![("X-Big".to_string(), "b".repeat(60 * 1024))];
    let answer = raw_exchange(proxy.port, &request_with(&headers), Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(200));
}

/// A head of a hundred fields, `wire` bytes long as sent.
fn head_of_many_fields(wire: usize) -> Vec<u8> {
    let mut headers: Vec<(String, String)> = (0..100)
        .map(|i| (format!("X-P{i:03}"), "p".repeat(600)))
        .collect();
    let short = wire - request_with(&headers).len();
    headers[99].1.push_str(&"p".repeat(short));
    let head = request_with(&headers);
    assert_eq!(head.len(), wire);
    head
}

#[test]
fn the_64_kib_bound_counts_every_byte_of_every_field() {
    // 64 KiB of head: the last CRLF is not counted, the ": " and CRLF of
    // each field are.
    let (upstream, proxy, _config) = counted_proxy(|c| c);
    let at_the_bound = head_of_many_fields(64 * 1024 + 2);
    let answer = raw_exchange(proxy.port, &at_the_bound, Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(200));
    let over = head_of_many_fields(64 * 1024 + 3);
    let answer = raw_exchange(proxy.port, &over, Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(431));
    assert_eq!(
        upstream.count(),
        1,
        "the head over the bound never reached the app"
    );
}

#[test]
fn a_head_over_one_mib_is_refused_with_400_by_pingora() {
    let (upstream, proxy, _config) = counted_proxy(|c| c);
    let headers: Vec<(String, String)> = (0..20)
        .map(|i| (format!("X-Big-{i}"), "b".repeat(60 * 1024)))
        .collect();
    let answer = raw_exchange(proxy.port, &request_with(&headers), Duration::from_secs(10));
    assert_refused_before_upstream(&answer, 400, &proxy, &upstream);
}

#[test]
fn a_thousand_headers_are_refused_with_400() {
    let (upstream, proxy, _config) = counted_proxy(|c| c);
    let headers: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("X-H{i}"), i.to_string()))
        .collect();
    let answer = raw_exchange(proxy.port, &request_with(&headers), Duration::from_secs(10));
    assert_refused_before_upstream(&answer, 400, &proxy, &upstream);
}

#[test]
fn two_hundred_headers_are_served() {
    let (_upstream, proxy, _config) = proxy(|c| c);
    let headers: Vec<(String, String)> = (0..200)
        .map(|i| (format!("X-H{i}"), i.to_string()))
        .collect();
    let answer = raw_exchange(proxy.port, &request_with(&headers), Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(200));
}

#[test]
fn malformed_heads_are_refused_with_400() {
    let (upstream, proxy, _config) = counted_proxy(|c| c);
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\0b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let answer = raw_exchange(proxy.port, raw, Duration::from_secs(10));
        assert_eq!(
            raw_status(&answer),
            Some(400),
            "{:?} -> {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(upstream.count(), 0);
    assert_still_serving_counted(&proxy, &upstream);
}

// ---- Cookies ----

#[test]
fn a_64_kb_cookie_header_of_thousands_of_pairs_is_handled_in_bounds() {
    let (_upstream, proxy, config) = proxy(|c| c);
    let mut pairs: Vec<String> = Vec::new();
    for i in 0..3000 {
        if i % 7 == 0 {
            // Forged copies of the session cookie, each as long as a real one.
            pairs.push(format!("session_id={:0>43}.{:0>22}", i, i));
        }
        pairs.push(format!("c{i}=v"));
    }
    let cookie = pairs.join("; ");
    assert!(
        (55_000..64 * 1024 - 200).contains(&cookie.len()),
        "{}",
        cookie.len()
    );
    let response = get(proxy.port, "/", &[("Cookie", &cookie)]);
    assert_eq!(response.status, 200);
    assert_eq!(response.session()["new"], true, "no forgery verifies");
    let forwarded = response.upstream_header("cookie").unwrap();
    assert!(!forwarded.contains("session_id"));
    assert_eq!(
        forwarded.split("; ").count(),
        3000,
        "every other cookie goes on"
    );
    assert_eq!(
        metric(config.admin_port, "session_proxy_forged_cookies_total"),
        1.0,
        "one request, one forgery"
    );
}

#[test]
fn only_the_first_four_session_cookies_are_checked() {
    let (_upstream, proxy, _config) = proxy(|c| c);
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let genuine = browser.cookie.clone().unwrap();
    let junk = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("session_id={:0>43}.{:0>22}", i, i))
            .collect()
    };
    let mut late = junk(4);
    late.push(format!("session_id={genuine}"));
    let mut early = junk(3);
    early.push(format!("session_id={genuine}"));
    early.extend(junk(700));
    let late = get(proxy.port, "/", &[("Cookie", &late.join("; "))]);
    assert_eq!(
        late.session()["new"],
        true,
        "a fifth candidate is not verified"
    );
    let early = get(proxy.port, "/", &[("Cookie", &early.join("; "))]);
    assert_eq!(early.session()["data"], serde_json::json!({"a": 1}));
}

#[test]
fn a_cookie_header_over_the_head_limit_is_431() {
    let (upstream, proxy, _config) = counted_proxy(|c| c);
    let cookie: Vec<String> = (0..8000).map(|i| format!("c{i}=value{i}")).collect();
    let headers = vec![("Cookie".to_string(), cookie.join("; "))];
    let answer = raw_exchange(proxy.port, &request_with(&headers), Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(431));
    assert_eq!(upstream.count(), 0);
}

// ---- The update header ----

#[test]
fn an_update_longer_than_twice_max_data_bytes_plus_1024_is_refused() {
    let (_upstream, proxy, config) = proxy(|c| c.session("max_data_bytes = 64"));
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let before = parsed_records(&config.sessions_dir());
    // Deletes only, so the data would fit: the raw length alone decides.
    let update = |len: usize| {
        let head = r#"{"a":null"#;
        format!("{head}{}}}", " ".repeat(len - head.len() - 1))
    };
    let limit = 64 * 2 + 1024;
    let over = browser.get("/", &[("X-Test-Update", &update(limit + 1))]);
    assert_eq!(over.status, 502);
    assert_eq!(over.text(), "invalid session update from upstream");
    assert_eq!(
        parsed_records(&config.sessions_dir())[0].1,
        before[0].1,
        "unchanged"
    );
    let at = browser.get("/", &[("X-Test-Update", &update(limit))]);
    assert_eq!(at.status, 200);
    assert_eq!(
        parsed_records(&config.sessions_dir())[0].1.data.as_str(),
        "{}"
    );
}

// ---- Slow and idle clients ----

#[test]
fn a_client_sending_its_head_a_byte_at_a_time_gets_408_and_is_cut_off() {
    let (upstream, proxy, _config) = counted_proxy(|c| c.server("header_timeout = 2"));
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "s".repeat(200)
    );
    let started = Instant::now();
    let mut cut_off = None;
    // 4 bytes a second: the whole head would take a minute.
    for byte in head.as_bytes() {
        if stream.write_all(&[*byte]).is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        let mut peek = [0u8; 1];
        if stream.peek(&mut peek).is_ok() {
            cut_off = Some(started.elapsed());
            break;
        }
    }
    let cut_off = cut_off.expect("the slow client was never cut off");
    assert!(cut_off < Duration::from_secs(10), "{cut_off:?}");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert_refused_before_upstream(&answer, 408, &proxy, &upstream);
}

#[test]
fn a_head_in_pieces_within_the_header_timeout_is_served() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("header_timeout = 3"));
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in [
        "GET / HT",
        "TP/1.1\r\nHost: x\r\n",
        "Connection: close\r\n\r\n",
    ] {
        stream.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert_eq!(raw_status(&answer), Some(200));
}

#[test]
fn a_slow_request_body_is_not_cut_by_the_header_timeout() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("header_timeout = 1"));
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n")
        .unwrap();
    for byte in b"slowly" {
        std::thread::sleep(Duration::from_millis(400));
        stream.write_all(&[*byte]).unwrap();
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert_eq!(raw_status(&answer), Some(200));
    assert!(String::from_utf8_lossy(&answer).contains(r#""body": "slowly""#));
}

#[test]
fn a_request_body_that_stops_coming_gets_408_after_body_timeout() {
    // Fixed ports of 19300-19399, as tests/http2.rs's.
    let recorder = support::recorder::Recorder::on_port(19362);
    let mut config = ProxyConfig::new(recorder.port)
        .server("body_timeout = 2")
        .upstream("read_timeout = 60");
    (config.port, config.admin_port) = (19360, 19361);
    let _proxy = config.start();

    let mut stream = TcpStream::connect(("127.0.0.1", config.port)).unwrap();
    // The clock starts before the proxy can start its own.
    let started = Instant::now();
    stream
        .write_all(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert_eq!(raw_status(&answer), Some(408), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(started.elapsed() < Duration::from_secs(15), "never closed");
    // The app got the head and half a body: never a whole request.
    assert!(recorder.requests().is_empty());
    assert!(
        recorder.text().ends_with("\r\n\r\nhello"),
        "{}",
        recorder.text()
    );
}

/// A client connection kept alive across requests.
struct KeptAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeptAlive {
    fn open(port: u16) -> KeptAlive {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        KeptAlive {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends one request head; the response's status.
    fn status_of(&mut self, head: &[u8]) -> u16 {
        self.writer.write_all(head).unwrap();
        read_response(&mut self.reader).unwrap().0
    }

    /// Sends one request head and reads its response, then leaves the
    /// connection idle: how long from the request's sending until the
    /// proxy closes it (at least the idle time, however slow the test).
    fn closed_after_last(&mut self, head: &[u8]) -> Duration {
        let started = Instant::now();
        assert_eq!(self.status_of(head), 200);
        self.reader
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        closed_within(&mut self.reader, started, Duration::from_secs(15))
            .expect("the idle connection was never closed")
    }
}

const PLAIN_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("keepalive_timeout = 2"));
    let mut client = KeptAlive::open(proxy.port);
    assert_eq!(client.status_of(PLAIN_GET), 200);
    // Reused within the timeout: served; then left idle: closed, not at
    // once, and not never.
    std::thread::sleep(Duration::from_millis(1000));
    let closed = client.closed_after_last(PLAIN_GET);
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}"
    );
}

#[test]
fn a_response_slower_than_keepalive_timeout_keeps_its_connection() {
    // The idle clock stays armed while a request is served: firing then
    // must neither cut the response nor the next request, and the clock
    // must start again once the connection is idle. The pauses between
    // requests are a quarter of keepalive_timeout (a test thread slow to
    // wake must not make them idle times that run out), the response
    // takes twice as long as it; the app's own clock (read_timeout) is
    // far beyond.
    let (_upstream, proxy, _config) = proxy(|c| {
        c.server("keepalive_timeout = 2")
            .upstream("read_timeout = 30")
    });
    let mut client = KeptAlive::open(proxy.port);
    assert_eq!(client.status_of(PLAIN_GET), 200);
    std::thread::sleep(Duration::from_millis(500));
    let slow = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Test-Sleep-Ms: 4000\r\n\r\n";
    assert_eq!(client.status_of(slow), 200);
    std::thread::sleep(Duration::from_millis(500));
    let closed = client.closed_after_last(PLAIN_GET);
    assert!(
        closed >= Duration::from_millis(1500) && closed < Duration::from_secs(10),
        "closed after {closed:?}"
    );
}

/// A client that stops reading its response held its connection, and the
/// upstream's (which the proxy stops reading in turn), for ever: pingora
/// sets no downstream write timeout. Each write now waits at most
/// `send_timeout`.
#[test]
fn a_client_that_stops_reading_its_response_is_cut_off_after_send_timeout() {
    let (_upstream, proxy, config) = proxy(|c| c.server("send_timeout = 1"));
    // More than the socket buffers between upstream and client hold.
    let body_bytes: usize = 64 << 20;
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let head = format!("GET /big HTTP/1.1\r\nHost: x\r\nX-Test-Body-Bytes: {body_bytes}\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // Taken, then let go: however long the buffers take to fill.
    wait_in_flight(config.admin_port, 1);
    let let_go = eventually(Duration::from_secs(30), || {
        held_connections(proxy.port) == 0
    });
    assert!(
        let_go,
        "the connection of a client that reads nothing is still held"
    );

    // Whatever was buffered, then the end: not the whole body.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut received, mut buffer) = (0, vec![0u8; 1 << 16]);
    let ended = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(read) => received += read,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(
        ended && received < body_bytes,
        "closed: {ended}, {received} of {body_bytes} bytes of body received"
    );
    assert_still_serving(proxy.port);
}

/// A response without a body (to `HEAD`, a `204`, a `304`) is a head
/// only, and pingora times the writes of a body, not of a head: a client
/// that asked for such responses one after the other and read none held
/// its connection (and its request in flight, which a SIGTERM waits for)
/// for ever once the socket buffers were full. `send_timeout` bounds every
/// write.
#[test]
fn a_client_that_stops_reading_responses_without_body_is_cut_off_after_send_timeout() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("send_timeout = 1"));
    let pad = "p".repeat(60_000);
    let head = format!("HEAD /x HTTP/1.1\r\nHost: x\r\nX-Test-Header: X-Pad: {pad}\r\n\r\n");
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let raw = stream.try_clone().unwrap();
    assert!(send_until_a_response_stalls(
        &mut stream,
        &raw,
        proxy.port,
        head.as_bytes()
    ));
    let closed = eventually(Duration::from_secs(8), || held_connections(proxy.port) == 0);
    assert!(
        closed,
        "the connection of a client that reads nothing is still held"
    );
    assert_still_serving(proxy.port);
}

#[test]
fn a_connection_that_never_sends_a_request_is_closed_after_keepalive_timeout() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("keepalive_timeout = 2"));
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let closed = closed_within(&mut stream, started, Duration::from_secs(15))
        .expect("the silent connection was never closed");
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}"
    );
    assert_still_serving(proxy.port);
}

/// The admin listener's connections are on the same clocks. pingora's own
/// bound there is 60 s per read, so a scraper's connection left idle stayed
/// a minute, and a head sent a byte every 59 s for ever: each holds a file
/// descriptor of the process that serves the clients.
#[test]
fn idle_and_slow_admin_connections_are_cut_off_like_the_proxys() {
    let (_upstream, proxy, config) =
        proxy(|c| c.server("keepalive_timeout = 2\nheader_timeout = 2"));
    let mut scraper = KeptAlive::open(config.admin_port);
    assert_eq!(
        scraper.status_of(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        200
    );
    // Reused within the timeout: served; then left idle.
    std::thread::sleep(Duration::from_millis(1000));
    let closed = scraper.closed_after_last(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}"
    );

    let mut slow = TcpStream::connect(("127.0.0.1", config.admin_port)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match slow.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) if started.elapsed() > Duration::from_secs(15) => {
                panic!("the unfinished admin head was never cut off")
            }
            // A byte a second keeps the head coming.
            Err(_) => {
                let _ = slow.write_all(b"X");
                std::thread::sleep(Duration::from_millis(900));
            }
        }
    }
    assert_eq!(raw_status(&answer), Some(408));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_still_serving(proxy.port);
    assert_eq!(get(config.admin_port, "/healthz", &[]).status, 200);
}

// ---- Unusual request forms ----

/// Each of these requests is one request of its session (SPEC [4]): the
/// session is resumed, the app's update is stored, and the cookie stays.
#[test]
fn unusual_request_forms_resume_their_session_and_store_its_update() {
    let (_upstream, proxy, _config) = proxy(|c| c);
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"n":0}"#)]);
    let cookie = format!("Cookie: session_id={}", browser.cookie.clone().unwrap());
    let forms = [
        ("HEAD /page HTTP/1.1\r\nHost: x\r\nConnection: close", ""),
        ("OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close", ""),
        (
            "GET http://x/page HTTP/1.1\r\nHost: x\r\nConnection: close",
            "",
        ),
        ("GET /page HTTP/1.0", ""),
        (
            "POST /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Expect: 100-continue\r\nContent-Length: 2",
            "ok",
        ),
    ];
    for (n, (head, body)) in forms.into_iter().enumerate() {
        let update = format!("X-Test-Update: {{\"n\":{}}}", n + 1);
        let raw = format!("{head}\r\n{cookie}\r\n{update}\r\n\r\n{body}");
        let answer = raw_exchange(proxy.port, raw.as_bytes(), Duration::from_secs(5));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("HTTP/1.1 200 OK\r\n"), "{head}: {answer}");
        assert!(!answer.contains("Set-Cookie"), "{head}: {answer}");
        let after = browser.get("/", &[]).session();
        assert_eq!(after["new"], false, "{head}");
        assert_eq!(after["data"], serde_json::json!({"n": n + 1}), "{head}");
    }
}

// ---- Spoofed session headers ----

#[test]
fn session_headers_named_with_underscores_are_stripped_in_every_spelling() {
    let (_upstream, proxy, _config) = proxy(|mut c| {
        c.headers = vec![
            "session = \"X_App_Session\"".into(),
            "update = \"X_App_Update\"".into(),
            "action = \"X_App_Action\"".into(),
        ];
        c
    });
    let response = get(
        proxy.port,
        "/",
        &[
            ("X-App-Session", "forged"),
            ("x_app_session", "forged"),
            ("X-APP-UPDATE", "{}"),
            ("X-App-Action", "kill"),
        ],
    );
    assert_eq!(response.status, 200);
    let canonical = |name: &str| name.to_ascii_lowercase().replace('_', "-");
    let ours: Vec<(String, String)> = response
        .upstream_headers()
        .into_iter()
        .filter(|(name, _)| canonical(name).starts_with("x-app-"))
        .collect();
    assert_eq!(ours.len(), 1, "only the proxy's token: {ours:?}");
    assert_eq!(canonical(&ours[0].0), "x-app-session");
    assert_ne!(ours[0].1, "forged");
}

/// lighttpd gives its CGI, FastCGI and SCGI apps each header as `HTTP_`
/// and the name with every character but a letter or digit as `_`: a
/// client's `X.Session` is the app's `HTTP_X_SESSION` there, as surely
/// as `X_Session` is under any CGI/WSGI server.
#[test]
fn session_and_forwarding_headers_are_stripped_in_every_cgi_spelling() {
    let (_upstream, proxy, _config) = proxy(|c| c.session("bypass = [\"/static/\"]"));
    let spoofs = [
        ("X.Session", "forged"),
        ("x~session", "forged"),
        ("X!Session.Update", "{}"),
        ("X-Session'Action", "kill"),
        ("X.Forwarded.For", "203.0.113.7"),
        ("X|Forwarded|Proto", "https"),
    ];
    let cgi_name = |name: &str| {
        name.to_ascii_uppercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    };
    for path in ["/page", "/static/app.css"] {
        let response = get(proxy.port, path, &spoofs);
        assert_eq!(response.status, 200);
        let mut seen: Vec<(String, String)> = response
            .upstream_headers()
            .into_iter()
            .map(|(name, value)| (cgi_name(&name), value))
            .filter(|(name, _)| name.starts_with("X_SESSION") || name.starts_with("X_FORWARDED"))
            .collect();
        seen.sort();
        let names: Vec<&str> = seen.iter().map(|(name, _)| name.as_str()).collect();
        match path {
            "/page" => assert_eq!(names, ["X_FORWARDED_FOR", "X_SESSION"], "{seen:?}"),
            _ => assert_eq!(names, ["X_FORWARDED_FOR"], "{path}: {seen:?}"),
        }
        assert_eq!(seen[0].1, "127.0.0.1");
        assert!(seen.iter().all(|(_, value)| value != "forged"), "{seen:?}");
    }
}

/// httpoxy (CVE-2016-5385 and its kin): a CGI app's server turns a
/// client's `Proxy` header into `HTTP_PROXY`, which many HTTP libraries
/// read as the proxy for the app's own outgoing requests, to a host the
/// client names. No client has a reason to send it.
#[test]
fn a_client_proxy_header_never_reaches_the_app() {
    let (_upstream, proxy, _config) = proxy(|c| c.session("bypass = [\"/static/\"]"));
    let sent = [
        ("Proxy", "http://203.0.113.7:3128"),
        ("PROXY", "http://203.0.113.8:3128"),
    ];
    for path in ["/page", "/static/app.css"] {
        let response = get(proxy.port, path, &sent);
        assert_eq!(response.status, 200);
        let seen: Vec<(String, String)> = response
            .upstream_headers()
            .into_iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("proxy"))
            .collect();
        assert_eq!(seen, [], "{path}");
    }
}

/// What the upstream saw of the forwarding headers, in any spelling.
fn forwarding_headers(response: &Response) -> Vec<(String, String)> {
    response
        .upstream_headers()
        .into_iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .filter(|(name, _)| name.replace('_', "-").starts_with("x-forwarded-"))
        .collect()
}

#[test]
fn a_client_cannot_forge_who_it_is_to_the_app() {
    let (_upstream, proxy, _config) = proxy(|c| c.session("bypass = [\"/static/\"]"));
    let forged = [
        ("X-Forwarded-For", "203.0.113.7"),
        ("X_Forwarded_For", "203.0.113.8"),
        ("X-Forwarded-Proto", "https"),
        ("x_forwarded_proto", "https"),
    ];
    for path in ["/page", "/static/app.css"] {
        let response = get(proxy.port, path, &forged);
        assert_eq!(response.status, 200);
        // No X-Forwarded-Proto on a plain listener: none is `http`.
        let expected = [("x-forwarded-for".to_string(), "127.0.0.1".to_string())];
        assert_eq!(forwarding_headers(&response), expected, "{path}");
    }
}

/// The other headers by which proxies name the client, its address, its
/// host or its scheme, which frameworks read (Rails `X-Forwarded-Host`
/// for the URLs it builds, legacy PHP `HTTP_CLIENT_IP` first for the
/// client's address, Spring `Forwarded`): from a client, forgeries.
const IDENTITY_HEADERS: [(&str, &str); 10] = [
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Ssl", "on"),
    ("X.Forwarded.Server", "evil.example"),
    ("Forwarded", "for=203.0.113.7;host=evil.example;proto=https"),
    ("X-Real-IP", "203.0.113.7"),
    ("X_Real_IP", "203.0.113.8"),
    ("Client-IP", "203.0.113.9"),
    ("True-Client-IP", "203.0.113.10"),
    ("X-Cluster-Client-IP", "203.0.113.11"),
];

/// What the upstream saw of [`IDENTITY_HEADERS`], in any spelling.
fn identity_headers(response: &Response) -> Vec<(String, String)> {
    let variable = |name: &str| name.to_ascii_lowercase().replace(['_', '.'], "-");
    let sent: Vec<String> = IDENTITY_HEADERS.iter().map(|(n, _)| variable(n)).collect();
    response
        .upstream_headers()
        .into_iter()
        .filter(|(name, _)| sent.contains(&variable(name)))
        .collect()
}

#[test]
fn a_client_cannot_forge_its_address_host_or_scheme_in_other_headers() {
    let (_upstream, proxy, _config) = proxy(|c| c.session("bypass = [\"/static/\"]"));
    for path in ["/page", "/static/app.css"] {
        let response = get(proxy.port, path, &IDENTITY_HEADERS);
        assert_eq!(response.status, 200);
        assert_eq!(identity_headers(&response), [], "{path}");
        let expected = [("x-forwarded-for".to_string(), "127.0.0.1".to_string())];
        assert_eq!(forwarding_headers(&response), expected, "{path}");
    }
}

#[test]
fn a_trusted_proxys_identity_headers_reach_the_app() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("trusted_proxies = [\"127.0.0.0/8\"]"));
    let response = get(proxy.port, "/", &IDENTITY_HEADERS);
    assert_eq!(response.status, 200);
    assert_eq!(identity_headers(&response).len(), IDENTITY_HEADERS.len());
}

#[test]
fn a_trusted_proxy_in_front_extends_the_chain() {
    let (_upstream, proxy, _config) = proxy(|c| c.server("trusted_proxies = [\"127.0.0.0/8\"]"));
    let response = get(
        proxy.port,
        "/",
        &[
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
        ],
    );
    let mut seen = forwarding_headers(&response);
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "x-forwarded-for".to_string(),
                "198.51.100.1, 203.0.113.7, 127.0.0.1".to_string()
            ),
            ("x-forwarded-proto".to_string(), "https".to_string()),
        ]
    );
    let response = get(proxy.port, "/", &[]);
    assert_eq!(
        forwarding_headers(&response),
        [("x-forwarded-for".to_string(), "127.0.0.1".to_string())]
    );
}

#[test]
fn an_ipv4_client_of_a_dual_stack_listener_is_named_as_ipv4() {
    let (_upstream, proxy, _config) = proxy(|mut c| {
        c.listen_host = "[::]".into();
        c.server("trusted_proxies = [\"127.0.0.1\"]")
    });
    let response = get(proxy.port, "/", &[("X-Forwarded-For", "203.0.113.7")]);
    assert_eq!(
        forwarding_headers(&response),
        [(
            "x-forwarded-for".to_string(),
            "203.0.113.7, 127.0.0.1".to_string()
        )]
    );
}

/// Clients that break off, or send a head we refuse, are their own
/// business: no ERROR line for them (pingora writes one for each, and any
/// client can make as many as it likes), only a DEBUG one; an upstream
/// that fails still gets its ERROR.
#[test]
fn clients_that_break_off_leave_no_error_line_in_the_log() {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port).server("header_timeout = 1");
    // Four times the impatient client's answer takes: that one must not
    // become a 504 on a loaded machine.
    config.upstream = vec!["read_timeout = 2".into()];
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("info,pingora_proxy=debug,session_proxy=debug", &log);
    let port = proxy.port;

    // A head that never ends (408), one over our limit (431), and half a
    // head, then a close.
    let unfinished = raw_exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(raw_status(&unfinished), Some(408));
    let oversized = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    let answer = raw_exchange(port, oversized.as_bytes(), Duration::from_secs(5));
    assert_eq!(raw_status(&answer), Some(431));
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    drop(half);
    // The same on the admin listener: a head that never ends, and half a head.
    let unfinished = raw_exchange(
        config.admin_port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(raw_status(&unfinished), Some(408));
    let mut half = TcpStream::connect(("127.0.0.1", config.admin_port)).unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
    drop(half);
    // A whole request, its client gone while the upstream takes its time.
    let mut impatient = TcpStream::connect(("127.0.0.1", port)).unwrap();
    impatient
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Test-Sleep-Ms: 500\r\n\r\n")
        .unwrap();
    // Gone once the proxy has its request, well before the answer.
    wait_in_flight(config.admin_port, 1);
    drop(impatient);
    // An upstream that never answers: the proxy's 504 is worth an ERROR.
    assert_eq!(get(port, "/", &[("X-Test-Fault", "hang")]).status, 504);
    std::thread::sleep(Duration::from_millis(600));
    drop(proxy);

    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.iter().all(|line| line.contains("Upstream")),
        "a client's doing logged as an error:\n{text}"
    );
    assert!(
        !errors.is_empty(),
        "the upstream's failure was not logged as an error:\n{text}"
    );
    let debug = |needle: &str| {
        text.lines()
            .filter(|l| l.contains(" DEBUG ") && l.contains(needle))
            .count()
    };
    // The 408 and the half head; the 431 and the client gone before its answer.
    assert!(debug("Fail to proxy: Downstream") >= 2, "{text}");
    assert!(
        debug("request failed, not the proxy's doing (Status(431))") >= 1,
        "{text}"
    );
    assert!(
        debug("request failed, not the proxy's doing (ClientGone)") >= 1,
        "{text}"
    );
}

/// With `lock = true` a client that sends many requests of its own session
/// at once gets `503 session busy` for those that waited too long for their
/// turn: its own doing, so no ERROR line (any client can cause as many).
#[test]
fn a_client_crowding_its_own_locked_session_gets_503_and_no_error_line() {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port).session("lock = true");
    // A turn is awaited for connect_timeout + read_timeout + 1 = 5 s; each
    // answer takes half of read_timeout, so that a loaded machine does
    // not make the first a 504 as well.
    config.upstream = vec!["connect_timeout = 1".into(), "read_timeout = 3".into()];
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("info", &log);
    let mut browser = Browser::new(proxy.port);
    assert_eq!(
        browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]).status,
        200
    );
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());

    // Six requests of 1.5 s each, one at a time: the last two wait > 5 s.
    let port = proxy.port;
    let statuses: Vec<u16> = (0..6)
        .map(|_| {
            let cookie = cookie.clone();
            std::thread::spawn(move || {
                get(
                    port,
                    "/",
                    &[("Cookie", &cookie), ("X-Test-Sleep-Ms", "1500")],
                )
                .status
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect();
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    drop(proxy);

    // Only the 503s: on a machine loaded enough for a 1.5 s answer to
    // outlast read_timeout, that 504 is rightly an ERROR.
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" ERROR ") && l.contains("503"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
