//! HTTP/2 to clients on the TLS listeners (`[server] http2`), end to end.
//! The app still gets HTTP/1.1: every session behaviour must hold over h2,
//! and every h2 request must reach the app as exactly one well-framed
//! HTTP/1.1 request, or not at all.
//!
//! Two clients: the `h2` crate (over tokio-rustls), a real client for
//! well-formed requests; and a raw one that writes frames byte by byte,
//! for what no h2 library would send (connection headers, upper-case
//! names, CR in a value).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use support::recorder::*;
use support::test_ca::TestCa;
use support::*;

/// An HTTPS proxy with a certificate for 127.0.0.1, in front of `upstream_port`.
fn https_proxy(ca: &TestCa, upstream_port: u16) -> ProxyConfig {
    let (cert, key) = ca.issue("proxy", &["localhost", "127.0.0.1"]);
    ProxyConfig::new(upstream_port)
        .server(&format!("tls_cert = {:?}", cert.display().to_string()))
        .server(&format!("tls_key = {:?}", key.display().to_string()))
        .session("secure = true")
}

// ---- the h2 crate's client ----

type H2 = h2::client::SendRequest<Bytes>;

/// An h2 connection to the proxy; the connection's task runs beside.
async fn h2_connect(ca: &TestCa, port: u16) -> (H2, tokio::task::JoinHandle<()>) {
    h2_connect_with(ca, port, h2::client::Builder::new()).await
}

async fn h2_connect_with(
    ca: &TestCa,
    port: u16,
    builder: h2::client::Builder,
) -> (H2, tokio::task::JoinHandle<()>) {
    let connector = tokio_rustls::TlsConnector::from(ca.client(&[b"h2", b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, connection) = builder.handshake(tls).await.expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, task)
}

/// One request on `h2`; the response read whole.
async fn h2_request(
    h2: &H2,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, h2::Error> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("https://127.0.0.1{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut h2 = h2.clone().ready().await?;
    let (answer, mut send_body) = h2.send_request(request.body(()).unwrap(), body.is_empty())?;
    if !body.is_empty() {
        send_body.send_data(Bytes::copy_from_slice(body), true)?;
    }
    let answer = answer.await?;
    let status = answer.status().as_u16();
    let headers = answer
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let mut stream = answer.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk?;
        let _ = stream.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

async fn h2_get(h2: &H2, path: &str, headers: &[(&str, &str)]) -> Response {
    h2_request(h2, "GET", path, headers, b"")
        .await
        .unwrap_or_else(|e| panic!("GET {path} over h2: {e}"))
}

// ---- a raw client: frames as the test writes them ----

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What became of a stream of the raw client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
}

struct RawH2 {
    stream: StreamOwned<ClientConnection, TcpStream>,
    /// The server's SETTINGS, as (identifier, value).
    settings: Vec<(u16, u32)>,
    /// Bytes read by `drain` and not yet split into frames.
    inbox: Vec<u8>,
}

impl RawH2 {
    fn connect(ca: &TestCa, port: u16) -> RawH2 {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let connection = ClientConnection::new(ca.client(&[b"h2"]), name).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut stream = StreamOwned::new(connection, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).unwrap();
        }
        assert_eq!(stream.conn.alpn_protocol(), Some(&b"h2"[..]));
        let mut raw = RawH2 {
            stream,
            settings: Vec::new(),
            inbox: Vec::new(),
        };
        raw.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        raw.frame(SETTINGS, 0, 0, &[]);
        raw
    }

    fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
        let _ = self.stream.flush();
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.write(&frame_bytes(kind, flags, stream, payload));
    }

    /// A request head of `fields` (pseudo-headers first, as given), as
    /// literals without indexing, split over CONTINUATION frames of 16 KiB.
    fn headers(&mut self, stream: u32, fields: &[(&[u8], &[u8])], end_stream: bool) {
        let block = header_block(fields);
        let mut chunks = block.chunks(16_384).peekable();
        let mut kind = HEADERS;
        let mut flags = if end_stream { END_STREAM } else { 0 };
        while let Some(chunk) = chunks.next() {
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            self.frame(kind, flags, stream, chunk);
            kind = CONTINUATION;
            flags = 0;
        }
    }

    /// A GET of `path` on stream 1 with `extra` fields, ended.
    fn get(&mut self, path: &str, extra: &[(&[u8], &[u8])]) -> Outcome {
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"127.0.0.1"),
            (b":path", path.as_bytes()),
        ];
        fields.extend_from_slice(extra);
        self.headers(1, &fields, true);
        self.outcome(1)
    }

    fn next_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        self.stream.read_exact(&mut head).ok()?;
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; length];
        self.stream.read_exact(&mut payload).ok()?;
        if head[3] == SETTINGS && head[4] & 0x1 == 0 {
            for setting in payload.chunks(6) {
                let id = u16::from_be_bytes([setting[0], setting[1]]);
                let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                self.settings.push((id, value));
            }
        }
        Some((head[3], head[4], stream, payload))
    }

    /// Reads frames until stream `id` is answered or reset, or the
    /// connection ends.
    fn outcome(&mut self, id: u32) -> Outcome {
        while let Some((kind, flags, stream, payload)) = self.next_frame() {
            match kind {
                HEADERS if stream == id => {
                    let padded = flags & 0x8 != 0;
                    let block = &payload[usize::from(padded)..];
                    return Outcome::Status(hpack_status(block));
                }
                RST_STREAM if stream == id => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                _ => {}
            }
        }
        Outcome::Closed
    }

    /// Whether the proxy closes the connection within `within`.
    fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        self.stream
            .sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// The frames the proxy sends within `within`, and whether it closed the
/// connection meanwhile (reading as they come, so that a client that
/// floods never blocks a proxy that writes).
impl RawH2 {
    fn drain(&mut self, within: Duration) -> (Vec<(u8, u32, Vec<u8>)>, bool) {
        let deadline = Instant::now() + within;
        self.stream
            .sock
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut buf = [0u8; 16_384];
        let mut closed = false;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => closed = true,
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => closed = true,
            }
            if closed || Instant::now() >= deadline {
                break;
            }
        }
        let mut frames = Vec::new();
        while self.inbox.len() >= 9 {
            let length = u32::from_be_bytes([0, self.inbox[0], self.inbox[1], self.inbox[2]]);
            let end = 9 + length as usize;
            if self.inbox.len() < end {
                break;
            }
            let stream = u32::from_be_bytes(self.inbox[5..9].try_into().unwrap()) & 0x7fff_ffff;
            frames.push((self.inbox[3], stream, self.inbox[9..end].to_vec()));
            self.inbox.drain(..end);
        }
        (frames, closed)
    }
}

/// The error code of the GOAWAY among `frames`, if there is one.
fn goaway_code(frames: &[(u8, u32, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|(kind, _, _)| *kind == GOAWAY)
        .map(|(_, _, payload)| u32::from_be_bytes(payload[4..8].try_into().unwrap()))
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// `fields` as HPACK literals without indexing.
fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_string(&mut block, name);
        hpack_string(&mut block, value);
    }
    block
}

const PROTOCOL_ERROR: u32 = 0x1;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn hpack_int(out: &mut Vec<u8>, mut value: usize, prefix_bits: u32, first: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, text: &[u8]) {
    hpack_int(out, text.len(), 7, 0);
    out.extend_from_slice(text);
}

/// The `:status` of a response's header block, as h2's encoder writes it:
/// an index into the static table, or a literal with the name `:status`
/// (static index 8) and a Huffman-coded value.
fn hpack_status(block: &[u8]) -> u16 {
    match block[0] {
        0x88 => 200,
        0x89 => 204,
        0x8a => 206,
        0x8b => 304,
        0x8c => 400,
        0x8d => 404,
        0x8e => 500,
        0x48 | 0x08 | 0x18 => {
            let length = usize::from(block[1] & 0x7f);
            let value = &block[2..2 + length];
            let digits = match block[1] & 0x80 {
                0 => String::from_utf8(value.to_vec()).unwrap(),
                _ => huffman_digits(value),
            };
            digits.parse().unwrap()
        }
        other => panic!("unexpected :status encoding {other:#x}"),
    }
}

/// Three digits in HPACK's Huffman code (RFC 7541 appendix B): `0`-`2`
/// are 5 bits (0-2), `3`-`9` 6 bits (0x19-0x1f).
fn huffman_digits(bytes: &[u8]) -> String {
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let mut at = 0;
    let mut digits = String::new();
    while digits.len() < 3 {
        let five = (0..5).fold(0u8, |v, i| v << 1 | bit(at + i));
        at += 5;
        let digit = match five {
            0..=2 => five,
            _ => {
                let six = five << 1 | bit(at);
                at += 1;
                six - 0x19 + 3
            }
        };
        digits.push(char::from(b'0' + digit));
    }
    digits
}

/// The header lines of the first request in `raw`, as `name: value`.
fn head_lines(raw: &str) -> Vec<String> {
    let head = raw.split("\r\n\r\n").next().unwrap();
    head.split("\r\n").skip(1).map(str::to_string).collect()
}

fn named<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

// ---- ALPN ----

#[test]
fn the_https_listener_offers_h2_and_http_1_1() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();

    let h2 = RawH2::connect(&ca, config.port);
    assert_eq!(h2.stream.conn.alpn_protocol(), Some(&b"h2"[..]));
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut h1 = ClientConnection::new(ca.client(&[b"http/1.1"]), name).unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", config.port)).unwrap();
    while h1.is_handshaking() {
        h1.complete_io(&mut tcp).unwrap();
    }
    assert_eq!(h1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[test]
fn prior_knowledge_h2c_on_a_plain_listener_is_refused() {
    let recorder = Recorder::start();
    let config = ProxyConfig::new(recorder.port);
    let _proxy = config.start();

    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    let answer = raw_exchange(config.port, &preface, Duration::from_secs(5));
    // An HTTP/1.1 refusal: never a SETTINGS frame.
    assert_eq!(raw_status(&answer), Some(400), "{answer:?}");
    assert!(recorder.text().is_empty(), "{}", recorder.text());
}

// ---- the session work over h2 ----

#[tokio::test]
async fn sessions_work_over_h2() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let first = h2_get(&h2, "/count", &[]).await;
    assert_eq!((first.status, first.text().as_str()), (200, "1"));
    let cookie = first.set_cookie("session_id").expect("a session cookie");
    assert!(first.header("set-cookie").unwrap().contains("; Secure"));
    assert!(first.header("x-session-update").is_none());

    let jar = format!("session_id={cookie}");
    let second = h2_get(&h2, "/count", &[("cookie", &jar)]).await;
    assert_eq!(second.text(), "2");
    let seen = h2_get(&h2, "/x", &[("cookie", &jar)]).await;
    assert_eq!(seen.session()["data"]["count"], 2);
    assert_eq!(
        seen.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(
        seen.upstream_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(seen.upstream_header("host").as_deref(), Some("127.0.0.1"));
    assert!(seen.upstream_header("cookie").is_none(), "{seen:?}");
}

/// Polls `condition` (which may block) for up to `within`, off the runtime.
async fn eventually_off_runtime(
    within: Duration,
    condition: impl FnMut() -> bool + Send + 'static,
) -> bool {
    tokio::task::spawn_blocking(move || eventually(within, condition))
        .await
        .unwrap()
}

/// A GET of `path` with the session's cookie, sent; the stream is the
/// client's to reset.
async fn h2_send_get(h2: &H2, path: &str, jar: &str) -> h2::SendStream<Bytes> {
    let request = http::Request::builder()
        .uri(format!("https://127.0.0.1{path}"))
        .header("cookie", jar)
        .body(())
        .unwrap();
    let mut sender = h2.clone().ready().await.unwrap();
    let (_answer, stream) = sender.send_request(request, true).unwrap();
    stream
}

/// With `lock = true`, a request that waits for its session's turn and
/// whose stream is reset (`RST_STREAM CANCEL`), or whose connection closes,
/// never reaches the app, gives up its place, and is a 499 (README,
/// "lock = true"). Its body, if any, is not read for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_a_waiting_stream_reset_or_closed_never_reaches_the_app() {
    let ca = TestCa::new();
    let app = session_app();
    // The app's clock (and the wait for a turn with it) far beyond how
    // long the test holds the turn.
    let config = https_proxy(&ca, app.port)
        .session("lock = true")
        .store("kind = \"memory\"")
        .upstream("read_timeout = 30");
    let log = config.dir.path().join("access.log");
    let config = config.server(&format!("access_log = {:?}", log.display().to_string()));
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let login = h2_get(&h2, "/login", &[]).await;
    let jar = format!(
        "session_id={}",
        login.set_cookie("session_id").expect("a cookie")
    );
    // The turn, held by a request the app holds until the test lets it go.
    let signals = TempDir::new("turn");
    let (arrived, release) = (
        signals.path().join("arrived"),
        signals.path().join("release"),
    );
    let holder = {
        let (h2, jar) = (h2.clone(), jar.clone());
        let held = [
            ("cookie", jar),
            ("x-test-arrived", arrived.display().to_string()),
            ("x-test-wait-for", release.display().to_string()),
        ];
        tokio::spawn(async move {
            let held: Vec<(&str, &str)> = held.iter().map(|(n, v)| (*n, v.as_str())).collect();
            h2_get(&h2, "/slow", &held).await
        })
    };
    let app = std::sync::Arc::new(app);
    assert!(eventually_off_runtime(Duration::from_secs(20), move || arrived.exists()).await);

    let mut reset = h2_send_get(&h2, "/reset", &jar).await;
    let (closing, closing_task) = h2_connect(&ca, config.port).await;
    let _closed = h2_send_get(&closing, "/closed", &jar).await;
    // The holder and both wait for the turn.
    let admin = config.admin_port;
    let in_flight = move || metric(admin, "session_proxy_requests_in_flight") == 3.0;
    assert!(eventually_off_runtime(Duration::from_secs(20), in_flight).await);
    reset.send_reset(h2::Reason::CANCEL);
    closing_task.abort();
    drop(closing);

    let admin = config.admin_port;
    let answered_4xx = move || metric(admin, "session_proxy_responses_total{class=\"4xx\"}");
    assert!(
        eventually_off_runtime(Duration::from_secs(10), move || answered_4xx() == 2.0).await,
        "the requests left waiting are not counted while the turn is held"
    );
    assert!(!holder.is_finished(), "the turn came early");
    std::fs::write(&release, b"").unwrap();
    assert_eq!(holder.await.unwrap().status, 200);
    let started = Instant::now();
    assert_eq!(h2_get(&h2, "/third", &[("cookie", &jar)]).await.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !app.saw("/reset") && !app.saw("/closed"),
        "{:?}",
        app.requests()
    );

    let logged = move || std::fs::read_to_string(&log).unwrap_or_default();
    let statuses = eventually_off_runtime(Duration::from_secs(10), move || {
        let text = logged();
        ["/reset", "/closed"].iter().all(|path| {
            text.lines()
                .any(|line| line.contains(&format!("GET {path} ")) && line.contains("\" 499 "))
        })
    });
    assert!(statuses.await, "no 499 in the access log for both");
}

/// A stream its client resets while the app works on the request is a
/// 499, as an HTTP/1 client that hangs up then (tests/access_log.rs), not
/// a 400: the client gave up, it sent nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_while_the_app_works_is_logged_as_499() {
    let ca = TestCa::new();
    let app = session_app();
    let config = https_proxy(&ca, app.port);
    let log = config.dir.path().join("access.log");
    let config = config.server(&format!("access_log = {:?}", log.display().to_string()));
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let request = http::Request::builder()
        .uri("https://127.0.0.1/working")
        .header("x-test-sleep-ms", "1500")
        .body(())
        .unwrap();
    let mut sender = h2.clone().ready().await.unwrap();
    let (_answer, mut stream) = sender.send_request(request, true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.send_reset(h2::Reason::CANCEL);

    let logged = eventually_off_runtime(Duration::from_secs(10), move || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("\"GET /working HTTP/2.0\" ")
    });
    assert!(logged.await, "no line for the request reset");
    let text = std::fs::read_to_string(config.dir.path().join("access.log")).unwrap();
    assert!(text.contains("\"GET /working HTTP/2.0\" 499 "), "{text}");
}

#[tokio::test]
async fn split_cookie_fields_reach_the_app_as_one_header_without_the_session_cookie() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).session(r#"bypass = ["/static/"]"#);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let cookie = h2_get(&h2, "/count", &[])
        .await
        .set_cookie("session_id")
        .unwrap();
    let jar = format!("session_id={cookie}");

    // The session cookie in the middle field of three.
    let fields = [("cookie", "a=1"), ("cookie", &jar), ("cookie", "b=2; c=3")];
    let counted = h2_get(&h2, "/count", &fields).await;
    assert_eq!(counted.text(), "2", "the session cookie was not found");
    let seen = h2_get(&h2, "/x", &fields).await;
    let cookies: Vec<String> = seen
        .upstream_headers()
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
    assert_eq!(seen.session()["data"]["count"], 2);

    // Without the session cookie, and on a bypassed path.
    for path in ["/x", "/static/x"] {
        let seen = h2_get(&h2, path, &[("cookie", "a=1"), ("cookie", "b=2")]).await;
        let cookies: Vec<String> = seen
            .upstream_headers()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(cookies, ["a=1; b=2"], "{path}");
    }
    let bypassed = h2_get(&h2, "/static/x", &[("cookie", "a=1"), ("cookie", &jar)]).await;
    assert_eq!(
        bypassed.upstream_header("cookie").as_deref(),
        Some("a=1"),
        "the session cookie reached a bypassed path"
    );
    assert!(bypassed.session().is_null());
}

/// An empty `cookie` field joined as it came would put an empty pair in
/// the app's `Cookie` (`a=1; ; b=2`), and Python's `SimpleCookie` (Bottle,
/// and apps that use it directly) stops reading at it: `b` would be lost.
#[tokio::test]
async fn empty_cookie_fields_leave_no_empty_pair_in_the_joined_header() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let cookies = |seen: &Response| -> Vec<String> {
        seen.upstream_headers()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .map(|(_, v)| v)
            .collect()
    };

    let fields = [("cookie", "a=1"), ("cookie", ""), ("cookie", " b=2;")];
    let seen = h2_get(&h2, "/x", &fields).await;
    assert_eq!(cookies(&seen), ["a=1; b=2"]);
    let seen = h2_get(&h2, "/x", &[("cookie", ""), ("cookie", " ")]).await;
    assert!(cookies(&seen).is_empty(), "{:?}", cookies(&seen));
}

/// HTTP/1 heads are bounded at 256 lines (pingora); an HTTP/2 request at
/// 256 fields, its `cookie` fields aside, which a client may send one per
/// cookie. Before, some 1 700 empty fields reached the app.
#[tokio::test]
async fn more_than_256_header_fields_are_431_and_cookie_fields_do_not_count() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let names: Vec<String> = (0..300).map(|n| format!("x-h{n}")).collect();
    let fields = |count: usize| -> Vec<(&str, &str)> {
        names[..count]
            .iter()
            .map(|name| (name.as_str(), ""))
            .collect()
    };

    let refused = h2_get(&h2, "/x", &fields(300)).await;
    assert_eq!(refused.status, 431, "{}", refused.text());
    let mut within = fields(200);
    let crumbs: Vec<String> = (0..100).map(|n| format!("c{n}=v")).collect();
    within.extend(crumbs.iter().map(|crumb| ("cookie", crumb.as_str())));
    let served = h2_get(&h2, "/x", &within).await;
    assert_eq!(served.status, 200, "{}", served.text());
}

#[tokio::test]
async fn instructions_are_applied_and_stripped_over_h2() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let first = h2_get(&h2, "/x", &[("x-test-update", r#"{"user":"ann"}"#)]).await;
    let cookie = first.set_cookie("session_id").unwrap();
    assert!(first.header("x-session-update").is_none());
    let jar = format!("session_id={cookie}");

    let regenerated = h2_get(
        &h2,
        "/x",
        &[("cookie", &jar), ("x-test-action", "regenerate")],
    )
    .await;
    assert!(regenerated.header("x-session-action").is_none());
    let renewed = regenerated.set_cookie("session_id").unwrap();
    assert!(!renewed.is_empty() && renewed != cookie);
    let jar = format!("session_id={renewed}");
    let seen = h2_get(&h2, "/x", &[("cookie", &jar)]).await;
    assert_eq!(seen.session()["data"]["user"], "ann");

    let killed = h2_get(&h2, "/x", &[("cookie", &jar), ("x-test-action", "kill")]).await;
    assert_eq!(killed.set_cookie("session_id").as_deref(), Some(""));
    let after = h2_get(&h2, "/x", &[("cookie", &jar)]).await;
    assert_eq!(after.session()["new"], true);

    let invalid = h2_get(&h2, "/x", &[("x-test-update", "[1]")]).await;
    assert_eq!(invalid.status, 502);
}

/// A body the app cuts off ends its stream with a reset, never with
/// END_STREAM: that is how an h2 client tells a whole body from a part,
/// and a chunked one from the app has no length to check it by.
#[tokio::test]
async fn a_body_the_app_cuts_short_resets_the_stream() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let chunked = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n wo",
    );
    for headers in [
        vec![("x-test-fault", "raw"), ("x-test-raw", chunked.as_str())],
        vec![("x-test-fault", "truncate")],
    ] {
        let answer = h2_request(&h2, "GET", "/", &headers, b"").await;
        assert!(
            answer.is_err(),
            "{headers:?}: a cut body ended as if whole: {answer:?}"
        );
    }
    // The connection serves on.
    assert_eq!(h2_get(&h2, "/x", &[]).await.status, 200);
}

#[tokio::test]
async fn an_expired_session_gets_the_expired_answer_over_h2() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port)
        .session("ignore_expiry = false")
        .session("expired_status = 403");
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let cookie = h2_get(&h2, "/count", &[])
        .await
        .set_cookie("session_id")
        .unwrap();
    // A session gone from the store has expired.
    for path in stored_files(&config.sessions_dir()) {
        std::fs::remove_file(path).unwrap();
    }
    let expired = h2_get(
        &h2,
        "/count",
        &[("cookie", &format!("session_id={cookie}"))],
    )
    .await;
    assert_eq!(
        (expired.status, expired.text().as_str()),
        (403, "Session expired")
    );
    assert_eq!(expired.set_cookie("session_id").as_deref(), Some(""));
    assert_eq!(expired.header("cache-control"), Some("no-store"));
    // To HEAD, the same head and no DATA: pingora's h2 server leaves that
    // to its caller, where HTTP/1.1 drops the body itself.
    let cookie_header = format!("session_id={cookie}");
    let head = h2_request(&h2, "HEAD", "/count", &[("cookie", &cookie_header)], b"")
        .await
        .unwrap();
    assert_eq!(head.status, 403);
    assert!(
        head.body.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&head.body)
    );
}

#[tokio::test]
async fn spoofed_session_headers_are_stripped_over_h2() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).session(r#"bypass = ["/static/"]"#);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let spoofs = [
        ("x-session", "forged"),
        ("x_session", "forged"),
        ("x-session-update", "{}"),
        ("x_session_action", "kill"),
        ("x_forwarded_for", "6.6.6.6"),
        ("x.session", "forged"),
        ("x.forwarded.for", "6.6.6.6"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "http"),
    ];
    for path in ["/x", "/static/x"] {
        let seen = h2_get(&h2, path, &spoofs).await;
        let headers = seen.upstream_headers();
        let names: Vec<String> = headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        for spoof in [
            "x_session",
            "x-session-update",
            "x_session_action",
            "x_forwarded_for",
            "x.session",
            "x.forwarded.for",
        ] {
            assert!(!names.contains(&spoof.to_string()), "{path}: {spoof}");
        }
        let tokens: Vec<&String> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-session"))
            .map(|(_, v)| v)
            .collect();
        match path {
            "/x" => assert!(tokens.len() == 1 && tokens[0] != "forged", "{tokens:?}"),
            _ => assert!(tokens.is_empty(), "{tokens:?}"),
        }
        assert_eq!(
            seen.upstream_header("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            seen.upstream_header("x-forwarded-proto").as_deref(),
            Some("https")
        );
    }
}

/// Trailers are headers after the body: the session headers' names there
/// would reach an app that merges trailers into the headers (HTTP/1's are
/// dropped too: tests/smuggling.rs).
#[tokio::test]
async fn request_trailers_never_reach_the_app_over_h2() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;
    let request = http::Request::post("https://127.0.0.1/t")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut h2 = h2.ready().await.unwrap();
    let (answer, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(b"hello"), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    for name in ["x-session", "x_session", "x-session-action"] {
        trailers.insert(name, http::HeaderValue::from_static("forged"));
    }
    body.send_trailers(trailers).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);

    let seen = recorder.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].body, b"hello");
    let tokens = seen[0].all("x-session");
    assert!(
        tokens.len() == 1 && tokens[0].starts_with("eyJ"),
        "{seen:?}"
    );
    assert!(!recorder.text().contains("forged"), "{}", recorder.text());
}

#[tokio::test]
async fn a_path_that_could_leave_its_bypass_prefix_gets_the_session_over_h2() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).session(r#"bypass = ["/static/"]"#);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    assert!(h2_get(&h2, "/static/app.css", &[])
        .await
        .session()
        .is_null());
    for path in [
        "/static/../admin",
        "/static/%2e%2e/admin",
        "/static/..;/admin",
    ] {
        let seen = h2_get(&h2, path, &[]).await;
        assert_eq!(seen.json()["path"], path, "the path was changed");
        assert!(!seen.session().is_null(), "{path} was bypassed");
    }
}

// ---- the h2 -> HTTP/1.1 downgrade ----

#[tokio::test]
async fn a_body_reaches_the_app_with_one_framing_and_connection_close() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let sized = h2_request(&h2, "POST", "/a", &[("content-length", "5")], b"hello")
        .await
        .unwrap();
    assert_eq!(sized.status, 200);
    let unsized_ = h2_request(&h2, "POST", "/b", &[], b"world").await.unwrap();
    assert_eq!(unsized_.status, 200);
    let head = h2_request(&h2, "HEAD", "/c", &[], b"").await.unwrap();
    assert_eq!(head.status, 200);

    let conns = recorder.connection_texts();
    assert_eq!(conns.len(), 3, "{conns:?}");
    let sized = &conns[0];
    assert!(sized.starts_with("POST /a HTTP/1.1\r\n"), "{sized}");
    let lines = head_lines(sized);
    assert_eq!(named(&lines, "content-length"), ["5"], "{sized}");
    assert!(named(&lines, "transfer-encoding").is_empty(), "{sized}");
    assert_eq!(named(&lines, "connection"), ["close"], "{sized}");
    assert!(sized.ends_with("\r\n\r\nhello"), "{sized}");

    let unsized_ = &conns[1];
    let lines = head_lines(unsized_);
    assert_eq!(
        named(&lines, "transfer-encoding"),
        ["chunked"],
        "{unsized_}"
    );
    assert!(named(&lines, "content-length").is_empty(), "{unsized_}");
    assert_eq!(named(&lines, "connection"), ["close"], "{unsized_}");
    assert!(
        unsized_.ends_with("\r\n\r\n5\r\nworld\r\n0\r\n\r\n"),
        "{unsized_}"
    );

    let head = &conns[2];
    assert!(head.starts_with("HEAD /c HTTP/1.1\r\n"), "{head}");
    assert_eq!(named(&head_lines(head), "connection"), ["close"], "{head}");
}

#[tokio::test]
async fn a_content_length_the_data_frames_disagree_with_never_frames_a_request() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    // Pooled connections after a body: a short body must still not be
    // followed by anything on that connection.
    let config = https_proxy(&ca, recorder.port).upstream("reuse_after_body = true");
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let short = h2_request(&h2, "POST", "/short", &[("content-length", "10")], b"12345").await;
    let long = h2_request(
        &h2,
        "POST",
        "/long",
        &[("content-length", "3")],
        b"1234567890",
    )
    .await;
    for (what, outcome) in [("short", short), ("long", long)] {
        let reason = outcome.err().and_then(|e| e.reason());
        assert_eq!(reason, Some(h2::Reason::PROTOCOL_ERROR), "{what} body");
    }
    let next = h2_get(&h2, "/next", &[]).await;
    assert_eq!(next.status, 200);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let conns = recorder.connection_texts();
    for path in ["/short", "/long"] {
        let request_line = format!("POST {path} HTTP/1.1\r\n");
        let Some(start) = conns
            .iter()
            .find_map(|c| c.find(&request_line).map(|at| &c[at..]))
        else {
            continue; // refused before the app was called: fine too
        };
        // From the bad request on, its head alone: not a byte of a body
        // that disagrees with its length, and the connection not reused
        // for /next. (/next may come before it on a pooled connection: the
        // stream of a refused body can still be on its way upstream when
        // /next has been served.)
        assert!(start.ends_with("\r\n\r\n"), "{start:?}");
        assert!(!start.contains("/next"), "reused after {path}: {start:?}");
    }
}

#[test]
fn connection_specific_headers_are_refused_and_never_reach_the_app() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();

    let fields: [(&[u8], &[u8]); 6] = [
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"upgrade", b"websocket"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"gzip"),
    ];
    for field in fields {
        let mut h2 = RawH2::connect(&ca, config.port);
        let outcome = h2.get("/x", &[field]);
        assert_eq!(outcome, Outcome::Reset(PROTOCOL_ERROR), "{field:?}");
    }
    assert!(recorder.text().is_empty(), "{}", recorder.text());
}

#[test]
fn malformed_names_and_values_are_refused_and_never_reach_the_app() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();

    let fields: [(&[u8], &[u8]); 6] = [
        (b"X-Upper", b"1"),
        (b"x-cr", b"a\rb"),
        (b"x-lf", b"a\r\nx-injected: 1"),
        (b"x-nul", b"a\0b"),
        (b"x sp", b"1"),
        (b":x-session", b"forged"),
    ];
    for field in fields {
        let mut h2 = RawH2::connect(&ca, config.port);
        let outcome = h2.get("/x", &[field]);
        assert!(
            matches!(
                outcome,
                Outcome::GoAway(_) | Outcome::Reset(_) | Outcome::Closed
            ),
            "{field:?}: {outcome:?}"
        );
    }
    assert!(recorder.text().is_empty(), "{}", recorder.text());
}

#[test]
fn the_app_gets_the_authority_as_host_and_a_disagreeing_host_is_refused() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    assert_eq!(
        h2.get("/x", &[(b"host", b"evil.example")]),
        Outcome::Status(400)
    );
    assert!(recorder.text().is_empty(), "{}", recorder.text());

    let mut h2 = RawH2::connect(&ca, config.port);
    assert_eq!(
        h2.get("/agree", &[(b"host", b"127.0.0.1")]),
        Outcome::Status(200)
    );
    let mut h2 = RawH2::connect(&ca, config.port);
    let host_only: [(&[u8], &[u8]); 5] = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/host-only"),
        (b"host", b"app.example"),
        (b"x-a", b"1"),
    ];
    h2.headers(1, &host_only, true);
    assert_eq!(h2.outcome(1), Outcome::Status(200));

    let all = recorder.text();
    let agree = &all[all.find("GET /agree").unwrap()..];
    assert_eq!(named(&head_lines(agree), "host"), ["127.0.0.1"], "{all}");
    let host_only = &all[all.find("GET /host-only").unwrap()..];
    assert_eq!(
        named(&head_lines(host_only), "host"),
        ["app.example"],
        "{all}"
    );
}

#[test]
fn a_path_not_starting_with_a_slash_is_refused() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port).session(r#"bypass = ["/static/"]"#);
    let _proxy = config.start();

    for path in ["x", "static/x", "*", "http://127.0.0.1/x", "?a=1"] {
        let mut h2 = RawH2::connect(&ca, config.port);
        let outcome = h2.get(path, &[]);
        assert!(
            matches!(
                outcome,
                Outcome::Status(400) | Outcome::Reset(PROTOCOL_ERROR)
            ),
            "{path}: {outcome:?}"
        );
        // With `host` in place of `:authority` (no URI authority to check it).
        let mut h2 = RawH2::connect(&ca, config.port);
        let host_only: [(&[u8], &[u8]); 4] = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", path.as_bytes()),
            (b"host", b"127.0.0.1"),
        ];
        h2.headers(1, &host_only, true);
        let outcome = h2.outcome(1);
        assert!(
            matches!(
                outcome,
                Outcome::Status(400) | Outcome::Reset(PROTOCOL_ERROR)
            ),
            "{path} with host: {outcome:?}"
        );
    }
    assert!(recorder.text().is_empty(), "{}", recorder.text());
}

// ---- limits ----

#[test]
fn the_h2_limits_are_announced_and_a_huge_header_list_is_431() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    let big = vec![b'a'; 70 * 1024];
    let outcome = h2.get("/x", &[(b"x-big", &big)]);
    assert_eq!(outcome, Outcome::Status(431));
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    assert!(
        h2.settings.contains(&(MAX_CONCURRENT_STREAMS, 100)),
        "{:?}",
        h2.settings
    );
    assert!(
        h2.settings.contains(&(MAX_HEADER_LIST_SIZE, 65536)),
        "{:?}",
        h2.settings
    );

    assert!(recorder.text().is_empty());

    // Just under the h2 bound: served (h2 counts 32 bytes a field where
    // we count 4, so ours is never the tighter).
    let mut h2 = RawH2::connect(&ca, config.port);
    let fields: Vec<(Vec<u8>, Vec<u8>)> = (0..4)
        .map(|i| (format!("x-pad-{i}").into_bytes(), vec![b'b'; 16_250]))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
    assert_eq!(h2.get("/x", &refs), Outcome::Status(200));
}

#[test]
fn a_client_gets_at_most_100_streams_at_once() {
    let ca = TestCa::new();
    let recorder = Recorder::start();
    let config = https_proxy(&ca, recorder.port);
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    // Requests whose bodies never come: each stream stays open.
    for n in 0..101u32 {
        let fields: [(&[u8], &[u8]); 5] = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", b"127.0.0.1"),
            (b":path", b"/held"),
            (b"content-length", b"1"),
        ];
        h2.headers(2 * n + 1, &fields, false);
    }
    const REFUSED_STREAM: u32 = 0x7;
    assert_eq!(h2.outcome(201), Outcome::Reset(REFUSED_STREAM));
}

#[test]
fn an_h2_header_block_left_unfinished_is_cut_off_after_header_timeout() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).server("header_timeout = 1");
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    // HEADERS without END_HEADERS: the CONTINUATION never comes.
    let mut block = vec![0x00];
    hpack_string(&mut block, b":method");
    hpack_string(&mut block, b"GET");
    // The clock starts before the proxy's can.
    let started = Instant::now();
    h2.frame(HEADERS, END_STREAM, 1, &block);
    assert!(h2.closed_within(Duration::from_secs(5)));
    assert!(started.elapsed() >= Duration::from_millis(800));
}

#[tokio::test]
async fn an_h2_connection_outlives_header_timeout_between_its_requests() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port)
        .server("header_timeout = 1")
        .server("keepalive_timeout = 10");
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    assert_eq!(h2_get(&h2, "/x", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let again = h2_request(&h2, "GET", "/x", &[], b"").await;
    assert_eq!(again.expect("the connection was cut").status, 200);
    // A response slower than header_timeout, too.
    let slow = h2_request(&h2, "GET", "/x", &[("x-test-sleep-ms", "2000")], b"").await;
    assert_eq!(slow.expect("cut while served").status, 200);
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_keepalive_timeout() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).server("keepalive_timeout = 1");
    let _proxy = config.start();
    let (h2, task) = h2_connect(&ca, config.port).await;
    assert_eq!(h2_get(&h2, "/x", &[]).await.status, 200);
    let closed = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(closed.is_ok(), "the idle connection is still open");
}

#[tokio::test]
async fn a_stream_whose_window_stays_shut_is_reset_after_send_timeout() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).server("send_timeout = 1");
    let _proxy = config.start();
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let (h2, _task) = h2_connect_with(&ca, config.port, builder).await;

    let request = http::Request::builder()
        .uri("https://127.0.0.1/x")
        .header("x-test-body-bytes", "100000")
        .body(())
        .unwrap();
    let mut sender = h2.clone().ready().await.unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    // No window granted: nothing comes, and the proxy gives up.
    let ended = tokio::time::timeout(Duration::from_secs(8), body.data()).await;
    match ended {
        Ok(Some(Err(_))) | Ok(None) => {}
        Ok(Some(Ok(data))) => panic!("{} bytes came without a window", data.len()),
        Err(_) => panic!("the stream is still open after 8 s"),
    }
}

#[tokio::test]
async fn a_request_whose_body_never_comes_ends_with_the_apps_read_timeout() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).upstream("read_timeout = 2");
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let request = http::Request::builder()
        .method("POST")
        .uri("https://127.0.0.1/x")
        .header("content-length", "10")
        .body(())
        .unwrap();
    let mut sender = h2.clone().ready().await.unwrap();
    // The stream stays open, and not a byte of its body comes.
    let (answer, _body) = sender.send_request(request, false).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("no answer 10 s after the app's read_timeout of 2 s");
    assert_eq!(answer.unwrap().status(), 504);
}

// ---- a request body that stops coming ----
//
// Fixed ports of 19300-19399, as the abuse tests below.

/// A POST of `path` whose body (`content-length: 10`) stops after 5 bytes;
/// the stream stays open.
async fn stalled_post(h2: &H2, path: &str) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1{path}"))
        .header("content-length", "10")
        .body(())
        .unwrap();
    let mut sender = h2.clone().ready().await.unwrap();
    let (answer, mut body) = sender.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(b"hello"), false).unwrap();
    (answer, body)
}

/// The reason the proxy resets the stream of `body` with, or `None` if it
/// has not within `within`.
async fn reset_within(body: &mut h2::SendStream<Bytes>, within: Duration) -> Option<h2::Reason> {
    let reset = std::future::poll_fn(|cx| body.poll_reset(cx));
    match tokio::time::timeout(within, reset).await {
        Ok(Ok(reason)) => Some(reason),
        Ok(Err(e)) => e.reason(),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_stalled_request_body_resets_its_stream_after_body_timeout_and_others_go_on() {
    let ca = TestCa::new();
    let (config, recorder) = on_fixed_ports(&ca, 19300);
    // read_timeout far beyond body_timeout: the app's clock must not be
    // what ends the stream. Pooled after a body: the half body must not
    // be followed by another request on its connection.
    let config = config
        .server("body_timeout = 2")
        .upstream("read_timeout = 60")
        .upstream("reuse_after_body = true");
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let started = Instant::now();
    let (answer, mut body) = stalled_post(&h2, "/stalled").await;
    // Another stream on the connection is served meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h2_get(&h2, "/meanwhile", &[]).await.status, 200);
    // (On a machine too loaded to get here well within body_timeout, the
    // reset may rightly have come already.)
    if started.elapsed() < Duration::from_millis(1500) {
        let early = reset_within(&mut body, Duration::ZERO).await;
        assert!(early.is_none(), "reset before body_timeout");
    }

    let reason = reset_within(&mut body, Duration::from_secs(10)).await;
    assert_eq!(
        reason,
        Some(h2::Reason::CANCEL),
        "after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(answer.await.is_err(), "the stalled request got an answer");

    // The connection serves on, and the app saw no complete request for
    // the stalled one, nor anything after its half body.
    assert_eq!(h2_get(&h2, "/after", &[]).await.status, 200);
    let targets: Vec<String> = recorder.requests().into_iter().map(|r| r.target).collect();
    assert!(!targets.contains(&"/stalled".to_string()), "{targets:?}");
    let conns = recorder.connection_texts();
    let stalled = conns
        .iter()
        .find(|c| c.starts_with("POST /stalled "))
        .expect("the stalled request reached the app");
    assert!(stalled.ends_with("\r\n\r\nhello"), "{stalled:?}");
    // And the proxy closed that connection, rather than keep it waiting.
    let closed = eventually(Duration::from_secs(5), || {
        recorder.closed_connection_texts().contains(stalled)
    });
    assert!(
        closed,
        "the app's connection with the half body is still open"
    );
}

#[tokio::test]
async fn a_stalled_body_after_the_apps_answer_resets_its_stream_after_body_timeout() {
    let ca = TestCa::new();
    // An app that answers at once, without reading the body: nothing
    // upstream waits any more, so only the body's own clock ends it.
    let recorder = Recorder::body_ignoring_on_port(19342);
    let mut config = https_proxy(&ca, recorder.port).server("body_timeout = 2");
    (config.port, config.admin_port) = (19340, 19341);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let (answer, mut body) = stalled_post(&h2, "/answered").await;
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await;
    assert_eq!(answer.expect("no answer").expect("answer").status(), 200);
    let reason = reset_within(&mut body, Duration::from_secs(10)).await;
    assert_eq!(reason, Some(h2::Reason::CANCEL), "the stream is still open");
    assert_eq!(h2_get(&h2, "/after", &[]).await.status, 200);
}

#[test]
fn a_client_silent_inside_a_data_frame_has_its_connection_closed_after_body_timeout() {
    let ca = TestCa::new();
    let (config, recorder) = on_fixed_ports(&ca, 19370);
    let config = config
        .server("body_timeout = 2")
        .upstream("read_timeout = 60");
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    let fields: [(&[u8], &[u8]); 5] = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", b"/half-frame"),
        (b"content-length", b"10"),
    ];
    h2.headers(1, &fields, false);
    // A DATA frame of 10 bytes, 4 of them sent: nothing else of the
    // connection's can come until it ends, and no frame can go in.
    let data = frame_bytes(0x0, END_STREAM, 1, b"0123456789");
    // The clock starts before the proxy's can.
    let started = Instant::now();
    h2.write(&data[..9 + 4]);
    assert!(h2.closed_within(Duration::from_secs(12)), "still open");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(recorder.requests().is_empty(), "{}", recorder.text());
}

/// An app on `port` that lets its first connection wait `pause` before it
/// reads a word, then reads the request and its `content-length` body
/// whole and answers `200`; what it read, by the channel.
fn slow_reading_app(port: u16, pause: Duration) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (read, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        std::thread::sleep(pause);
        let mut all = Vec::new();
        let mut buf = [0u8; 65_536];
        loop {
            let n = conn.read(&mut buf).unwrap_or(0);
            all.extend_from_slice(&buf[..n]);
            let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
                if n == 0 {
                    break;
                }
                continue;
            };
            let head = String::from_utf8_lossy(&all[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if n == 0 || all.len() >= end + 4 + length {
                break;
            }
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let _ = read.send(all);
    });
    got
}

#[tokio::test]
async fn a_body_the_app_is_slow_to_take_is_not_cut_off_by_body_timeout() {
    let ca = TestCa::new();
    // The app reads nothing for 6 s: the body fills its socket, then the
    // proxy's flow-control windows, and the client may not send. The
    // proxy's writes to the app wait that long too, so the app's timeouts
    // (its `read_timeout` bounds each write) must be well above it: the
    // default of these tests, 5 s, ran out whenever the client filled
    // the sockets in under a second.
    let read = slow_reading_app(19352, Duration::from_secs(6));
    let mut config = https_proxy(&ca, 19352)
        .server("body_timeout = 2")
        .upstream("read_timeout = 30");
    (config.port, config.admin_port) = (19350, 19351);
    let _proxy = config.start();
    let (h2, _task) = h2_connect(&ca, config.port).await;

    let body = vec![b'b'; 16 << 20];
    let length = body.len().to_string();
    let headers = [("content-length", length.as_str())];
    let answer = h2_request(&h2, "POST", "/upload", &headers, &body);
    let answer = tokio::time::timeout(Duration::from_secs(60), answer).await;
    let answer = answer
        .expect("no answer in 60 s")
        .expect("the stream was reset");
    assert_eq!(answer.status, 200);
    let read = read.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        read.ends_with(&body[..1000]) && read.len() > body.len(),
        "{}",
        read.len()
    );
}

// ---- abuse: what the h2 codec and pingora must bound ----
//
// Each test listens on fixed ports of its own, from 19300-19399.

/// An HTTPS proxy on `first` (its admin listener on `first + 1`) in front
/// of a recording app on `first + 2`.
fn on_fixed_ports(ca: &TestCa, first: u16) -> (ProxyConfig, Recorder) {
    let recorder = Recorder::on_port(first + 2);
    let mut config = https_proxy(ca, recorder.port);
    config.port = first;
    config.admin_port = first + 1;
    (config, recorder)
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// GET `path` on a new connection.
fn served_on_a_new_connection(ca: &TestCa, port: u16, path: &str) -> Outcome {
    RawH2::connect(ca, port).get(path, &[])
}

#[test]
fn a_rapid_reset_flood_ends_its_connection_and_reaches_the_app_a_bounded_number_of_times() {
    let ca = TestCa::new();
    let (config, recorder) = on_fixed_ports(&ca, 19310);
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    let block = header_block(&[
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", b"/flood"),
    ]);
    // Streams opened and reset at once (CVE-2023-44487), 100 to a write,
    // up to 10,000, for as long as the proxy takes them.
    let mut goaway = None;
    let mut closed = false;
    let mut opened = 0u32;
    while opened < 10_000 && goaway.is_none() && !closed {
        let mut batch = Vec::new();
        for _ in 0..100 {
            let id = 2 * opened + 1;
            batch.extend(frame_bytes(HEADERS, END_STREAM | END_HEADERS, id, &block));
            batch.extend(frame_bytes(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
            opened += 1;
        }
        h2.write(&batch);
        let (frames, gone) = h2.drain(Duration::from_millis(1));
        goaway = goaway_code(&frames);
        closed = gone;
    }
    let since = Instant::now();
    while goaway.is_none() && !closed && since.elapsed() < Duration::from_secs(10) {
        let (frames, gone) = h2.drain(Duration::from_millis(200));
        goaway = goaway_code(&frames);
        closed = gone;
    }
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "{opened} streams opened and reset, the connection still open: {closed}"
    );
    assert!(opened < 10_000, "all 10,000 streams were taken");

    // A reset stream may reach the app when pingora took it first: never
    // more than a connection's streams at once.
    std::thread::sleep(Duration::from_millis(500));
    let seen = recorder.requests().len();
    assert!(seen <= 100, "the app saw {seen} of {opened} reset requests");
    assert_eq!(
        served_on_a_new_connection(&ca, config.port, "/after"),
        Outcome::Status(200)
    );
}

#[test]
fn a_continuation_flood_of_header_fields_ends_its_connection_with_bounded_memory() {
    let ca = TestCa::new();
    let (config, _recorder) = on_fixed_ports(&ca, 19320);
    let config = config.server("header_timeout = 3");
    let proxy = config.start();
    assert_eq!(
        served_on_a_new_connection(&ca, config.port, "/warm-up"),
        Outcome::Status(200)
    );
    let before = rss_kib(proxy.child.id());

    let mut h2 = RawH2::connect(&ca, config.port);
    h2.stream
        .sock
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = header_block(&[
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", b"/flood"),
    ]);
    h2.frame(HEADERS, END_STREAM, 1, &head);
    // CONTINUATION frames of 16 KiB of whole header fields, without
    // END_HEADERS, 1 MiB to a write, up to 64 MiB (CVE-2024-27316).
    let field: Vec<(&[u8], &[u8])> = vec![(b"x-flood", &[b'f'; 1000]); 16];
    let continuation = frame_bytes(CONTINUATION, 0, 1, &header_block(&field));
    let megabyte = continuation.repeat(64);
    let (mut sent, mut goaway, mut closed) = (0, None, false);
    let started = Instant::now();
    while sent < 64 && goaway.is_none() && !closed && started.elapsed() < Duration::from_secs(15) {
        h2.write(&megabyte);
        sent += 1;
        let (frames, gone) = h2.drain(Duration::from_millis(1));
        goaway = goaway_code(&frames);
        closed = gone;
    }
    while goaway.is_none() && !closed && started.elapsed() < Duration::from_secs(15) {
        let (frames, gone) = h2.drain(Duration::from_millis(200));
        goaway = goaway_code(&frames);
        closed = gone;
    }
    assert!(
        goaway.is_some() || closed,
        "the connection still open after {sent} MiB of CONTINUATION"
    );
    assert!(sent < 64, "all 64 MiB were taken (GOAWAY {goaway:?})");
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(proxy.child.id()).saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "the proxy grew by {grown} KiB over {sent} MiB of CONTINUATION"
    );
    assert_eq!(
        served_on_a_new_connection(&ca, config.port, "/after"),
        Outcome::Status(200)
    );
}

#[test]
fn a_flood_of_empty_continuation_frames_ends_its_connection() {
    let ca = TestCa::new();
    let (config, _recorder) = on_fixed_ports(&ca, 19330);
    let config = config.server("header_timeout = 3");
    let _proxy = config.start();

    let mut h2 = RawH2::connect(&ca, config.port);
    h2.stream
        .sock
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = header_block(&[(b":method", b"GET")]);
    h2.frame(HEADERS, END_STREAM, 1, &head);
    // Frames that add nothing to the header list, so no size bound sees
    // them: 10,000 to a write, for 15 s at most.
    let empty = frame_bytes(CONTINUATION, 0, 1, &[]).repeat(10_000);
    let (mut writes, mut goaway, mut closed) = (0, None, false);
    let started = Instant::now();
    while goaway.is_none() && !closed && started.elapsed() < Duration::from_secs(15) {
        h2.write(&empty);
        writes += 1;
        let (frames, gone) = h2.drain(Duration::from_millis(1));
        goaway = goaway_code(&frames);
        closed = gone;
    }
    assert!(
        goaway.is_some() || closed,
        "the connection still open after {writes}0,000 empty CONTINUATION frames"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut off only after {:?}",
        started.elapsed()
    );
    assert_eq!(
        served_on_a_new_connection(&ca, config.port, "/after"),
        Outcome::Status(200)
    );
}

#[test]
fn an_h2_connection_whose_streams_h2_resets_for_protocol_errors_is_closed_after_1024() {
    // SECURITY.md, Limits: "| HTTP/2: streams h2 resets for the client's protocol errors |
    // 1024 a connection | h2, `limits::h2_options` | the connection closed
    // (`ENHANCE_YOUR_CALM`) |"
    let ca = TestCa::new();
    let upstream = Recorder::start();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();

    // A request with a connection-specific field: h2 resets its stream
    // (PROTOCOL_ERROR, RFC 9113 8.2.2) without the proxy seeing it.
    let malformed = header_block(&[
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", b"/malformed"),
        (b"connection", b"keep-alive"),
    ]);
    let mut h2 = RawH2::connect(&ca, config.port);
    let mut sent = 0u32;
    let mut goaway_after = None;
    while sent < 1100 && goaway_after.is_none() {
        let mut batch = Vec::new();
        for _ in 0..50 {
            let id = 2 * sent + 1;
            batch.extend(frame_bytes(
                HEADERS,
                END_STREAM | END_HEADERS,
                id,
                &malformed,
            ));
            sent += 1;
        }
        h2.write(&batch);
        let (frames, closed) = h2.drain(Duration::from_millis(50));
        match goaway_code(&frames) {
            Some(code) => {
                assert_eq!(code, ENHANCE_YOUR_CALM, "after {sent} streams");
                goaway_after = Some(sent);
            }
            None => assert!(!closed, "closed without GOAWAY after {sent} streams"),
        }
    }
    let mut rest = Duration::ZERO;
    while goaway_after.is_none() && rest < Duration::from_secs(10) {
        let (frames, _) = h2.drain(Duration::from_millis(200));
        rest += Duration::from_millis(200);
        if goaway_code(&frames).is_some() {
            goaway_after = Some(sent);
        }
    }
    let after = goaway_after.expect("no GOAWAY after 1100 malformed streams");
    assert!(
        (1001..=1100).contains(&after),
        "GOAWAY after {after} malformed streams"
    );
    assert!(upstream.requests().is_empty(), "{}", upstream.text());
}
