//! An upstream that records: it keeps the bytes of each connection and
//! splits them into requests by their declared framing, so that a test
//! asserts which requests the app saw, with which headers and bodies
//! (tests/smuggling.rs, tests/http2.rs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the recording upstream split it off its connection.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Per connection of the recorder: its raw bytes, the requests split off
/// them, and whether the proxy closed it.
pub type Connections = Arc<Mutex<Vec<(Vec<u8>, Vec<Seen>, bool)>>>;

/// What the upstream answers to the `n`th request of a connection.
pub type Script = Arc<dyn Fn(usize, &Seen) -> Vec<u8> + Send + Sync>;

/// An upstream that keeps every byte each connection sent it.
pub struct Recorder {
    pub port: u16,
    conns: Connections,
}

impl Recorder {
    /// Answers every request `200 ok`, kept alive.
    pub fn start() -> Recorder {
        Recorder::scripted(|_, _| ok_response())
    }

    pub fn scripted(script: impl Fn(usize, &Seen) -> Vec<u8> + Send + Sync + 'static) -> Recorder {
        Recorder::start_with(false, script)
    }

    /// An app that never reads request bodies, as a handler that ignores
    /// them on a server that does not drain them: body bytes left on the
    /// connection are parsed as its next request.
    pub fn body_ignoring(
        script: impl Fn(usize, &Seen) -> Vec<u8> + Send + Sync + 'static,
    ) -> Recorder {
        Recorder::start_with(true, script)
    }

    pub fn start_with(
        ignore_bodies: bool,
        script: impl Fn(usize, &Seen) -> Vec<u8> + Send + Sync + 'static,
    ) -> Recorder {
        Recorder::listen(0, ignore_bodies, Arc::new(script))
    }

    /// Answers every request `200 ok`, on `port` (0: any free one).
    pub fn on_port(port: u16) -> Recorder {
        Recorder::listen(port, false, Arc::new(|_, _| ok_response()))
    }

    /// As [`Recorder::body_ignoring`], answering `200 ok`, on `port`.
    pub fn body_ignoring_on_port(port: u16) -> Recorder {
        Recorder::listen(port, true, Arc::new(|_, _| ok_response()))
    }

    fn listen(port: u16, ignore_bodies: bool, script: Script) -> Recorder {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let shared = conns.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let index = {
                    let mut conns = shared.lock().unwrap();
                    conns.push((Vec::new(), Vec::new(), false));
                    conns.len() - 1
                };
                let (shared, script) = (shared.clone(), script.clone());
                std::thread::spawn(move || serve(stream, index, shared, script, ignore_bodies));
            }
        });
        Recorder { port, conns }
    }

    /// Every request the app saw, in order, over all connections.
    pub fn requests(&self) -> Vec<Seen> {
        let conns = self.conns.lock().unwrap();
        conns.iter().flat_map(|(_, seen, _)| seen.clone()).collect()
    }

    /// Everything the app received, all connections joined.
    pub fn raw(&self) -> Vec<u8> {
        let conns = self.conns.lock().unwrap();
        conns.iter().flat_map(|(raw, _, _)| raw.clone()).collect()
    }

    /// Everything the app received, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw()).into_owned()
    }

    /// What each connection brought, as text.
    pub fn connection_texts(&self) -> Vec<String> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .map(|(raw, _, _)| String::from_utf8_lossy(raw).into_owned())
            .collect()
    }

    /// What each connection the proxy has closed brought, as text.
    pub fn closed_connection_texts(&self) -> Vec<String> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|(_, _, closed)| *closed)
            .map(|(raw, _, _)| String::from_utf8_lossy(raw).into_owned())
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

/// An app for the session's turns (`lock = true`): `/login` starts a
/// session (an update), every request sleeps `X-Test-Sleep-Ms` first, and
/// each is recorded as it arrives, before its answer. As the test
/// upstream, it creates the file `X-Test-Arrived` names as a request
/// arrives, and holds the request until the file `X-Test-Wait-For` names
/// exists (30 s at most): a `support::Held` request.
pub fn session_app() -> Recorder {
    Recorder::scripted(|_, seen| {
        if let Some(path) = seen.all("x-test-arrived").first() {
            let _ = std::fs::write(path, b"");
        }
        if let Some(path) = seen.all("x-test-wait-for").first() {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !std::path::Path::new(path).exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(ms) = seen.all("x-test-sleep-ms").first() {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        match seen.target.as_str() {
            "/login" => b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"user\": 1}\r\n\
                          Content-Length: 2\r\n\r\nok"
                .to_vec(),
            _ => ok_response(),
        }
    })
}

impl Recorder {
    /// Whether the app has seen a request for `target`.
    pub fn saw(&self, target: &str) -> bool {
        self.requests().iter().any(|seen| seen.target == target)
    }
}

pub fn ok_response() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
}

/// One connection of the recorder: read, split off complete requests,
/// answer each by the script; stop at a framing it cannot read.
fn serve(
    mut stream: TcpStream,
    index: usize,
    conns: Connections,
    script: Script,
    ignore_bodies: bool,
) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => {
                conns.lock().unwrap()[index].2 = true;
                return;
            }
            Ok(n) => n,
        };
        conns.lock().unwrap()[index].0.extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        loop {
            match split_request(&pending, ignore_bodies) {
                Split::Partial => break,
                Split::Garbage => return,
                Split::Complete(seen, used) => {
                    pending.drain(..used);
                    let number = {
                        let mut conns = conns.lock().unwrap();
                        conns[index].1.push(seen.clone());
                        conns[index].1.len() - 1
                    };
                    // `PAUSE` in an answer: the rest comes in a later write.
                    let answer = script(number, &seen);
                    for (i, part) in split_at_pause(&answer).into_iter().enumerate() {
                        if i > 0 {
                            std::thread::sleep(Duration::from_millis(150));
                        }
                        if stream.write_all(part).is_err() {
                            return;
                        }
                    }
                    // As any HTTP/1.1 server: done after this one.
                    if seen.all("connection").contains(&"close") {
                        return;
                    }
                }
            }
        }
    }
}

pub const PAUSE: &[u8] = b"<PAUSE>";

fn split_at_pause(answer: &[u8]) -> Vec<&[u8]> {
    match answer.windows(PAUSE.len()).position(|w| w == PAUSE) {
        Some(at) => vec![&answer[..at], &answer[at + PAUSE.len()..]],
        None => vec![answer],
    }
}

enum Split {
    Complete(Seen, usize),
    Partial,
    Garbage,
}

/// A strict reading of one request: CRLF lines, a single `chunked` or a
/// single decimal `Content-Length`, else no body.
fn split_request(raw: &[u8], ignore_body: bool) -> Split {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Split::Partial;
    };
    let Ok(head) = std::str::from_utf8(&raw[..end]) else {
        return Split::Garbage;
    };
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let target = first.nth(1).unwrap_or("");
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Split::Garbage;
        };
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut seen = Seen {
        target: target.into(),
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    let used = if ignore_body {
        0
    } else if !seen.all("transfer-encoding").is_empty() {
        if seen.all("transfer-encoding") != ["chunked"] {
            return Split::Garbage;
        }
        match dechunk(rest) {
            Some((body, used)) => {
                seen.body = body;
                used
            }
            None => return Split::Partial,
        }
    } else {
        let length = match seen.all("content-length").as_slice() {
            [] => 0,
            [one] => match one.parse::<usize>() {
                Ok(n) => n,
                Err(_) => return Split::Garbage,
            },
            _ => return Split::Garbage,
        };
        if rest.len() < length {
            return Split::Partial;
        }
        seen.body = rest[..length].to_vec();
        length
    };
    Split::Complete(seen, end + 4 + used)
}

/// A chunked body and how many bytes it took, trailers included.
fn dechunk(raw: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + raw[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let line_end = at + raw[at..].windows(2).position(|w| w == b"\r\n")?;
                let empty = line_end == at;
                at = line_end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        body.extend_from_slice(raw.get(at..at + size)?);
        at += size + 2;
        if raw.len() < at {
            return None;
        }
    }
}
