//! What the end-to-end tests share: real processes on loopback (the built
//! proxy binary, the Python test upstream) and a raw HTTP/1.1 client that
//! sends exactly the bytes a test asks for.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod private_postgres;
pub mod recorder;
pub mod redis_cluster;
mod redis_server;
pub mod shared;
pub mod small_fs;
pub mod test_ca;
#[allow(unused_imports)] // used by some of the test crates that include this module
pub use redis_server::{installed, redis_server_installed};

pub const KEY: &str = "test-key-0123456789abcdefghijklmnopqrstuvwxyz";
pub const OLD_KEY: &str = "old-test-key-0123456789abcdefghijklmnopqrstuv";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "session-proxy-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.finish()
}

/// A free port for a test server, handed out once per test process.
///
/// Not one found by binding port 0: that port is released before the
/// server binds it, and meanwhile any socket bound to port 0 (another
/// test's upstream) or any outgoing connection may draw it again. The
/// server then fails to start while the test, finding the port open,
/// talks to that other socket. So the ports come from just below the
/// kernel's ephemeral range, from which neither draws.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 8192;
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let Some(low) = ephemeral_low.checked_sub(SPAN).filter(|&low| low >= 1024) else {
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    };
    // Test processes running side by side start at scattered offsets.
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    loop {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (low + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process killed when dropped.
pub struct Process {
    pub child: Child,
    pub port: u16,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python test upstream (`tests/support/upstream.py`).
pub fn start_upstream() -> Process {
    start_upstream_with(&[])
}

/// The Python test upstream with more arguments (e.g. `--tls CERT KEY`).
pub fn start_upstream_with(args: &[&str]) -> Process {
    let mut child = Command::new("python3")
        .arg(repo_root().join("tests/support/upstream.py"))
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 must be installed");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("upstream said {line:?}"));
    Process { child, port }
}

/// A proxy configuration written to a file; `extra` is TOML appended to the
/// sections by name ("session", "store", ...).
pub struct ProxyConfig {
    pub dir: TempDir,
    pub port: u16,
    pub admin_port: u16,
    pub upstream_port: u16,
    /// Ports of further upstream addresses, after `upstream_port`.
    pub more_upstreams: Vec<u16>,
    pub session: Vec<String>,
    pub store: Vec<String>,
    pub server: Vec<String>,
    pub upstream: Vec<String>,
    pub headers: Vec<String>,
    /// Environment variables of the proxy process.
    pub env: Vec<(String, String)>,
    /// The host of `listen` ("127.0.0.1"; "[::]" for a dual-stack listener).
    pub listen_host: String,
}

impl ProxyConfig {
    pub fn new(upstream_port: u16) -> ProxyConfig {
        let dir = TempDir::new("proxy");
        let sessions = dir.path().join("sessions");
        ProxyConfig {
            port: free_port(),
            admin_port: free_port(),
            upstream_port,
            more_upstreams: Vec::new(),
            session: vec![
                format!("secret_keys = [{KEY:?}]"),
                "touch_interval = 60".into(),
            ],
            store: vec![format!("path = {:?}", sessions.display().to_string())],
            server: vec!["grace_period = 5".into()],
            upstream: vec!["read_timeout = 5".into(), "connect_timeout = 1".into()],
            headers: vec![],
            env: vec![],
            listen_host: "127.0.0.1".into(),
            dir,
        }
    }

    /// Sets `key = value` in `[session]`, replacing an earlier setting.
    pub fn session(mut self, line: &str) -> Self {
        set_line(&mut self.session, line);
        self
    }
    pub fn store(mut self, line: &str) -> Self {
        set_line(&mut self.store, line);
        self
    }
    pub fn server(mut self, line: &str) -> Self {
        set_line(&mut self.server, line);
        self
    }
    pub fn upstream(mut self, line: &str) -> Self {
        set_line(&mut self.upstream, line);
        self
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.dir.path().join("sessions")
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("session-proxy.toml")
    }

    pub fn write(&self) -> PathBuf {
        let text = format!(
            "[server]\nlisten = \"{}:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nthreads = 2\n{}\n\n\
             [upstream]\naddresses = [{}]\n{}\n\n[session]\n{}\n\n[headers]\n{}\n\n[store]\n{}\n",
            self.listen_host,
            self.port,
            self.admin_port,
            self.server.join("\n"),
            std::iter::once(self.upstream_port)
                .chain(self.more_upstreams.iter().copied())
                .map(|port| format!("\"127.0.0.1:{port}\""))
                .collect::<Vec<_>>()
                .join(", "),
            self.upstream.join("\n"),
            self.session.join("\n"),
            self.headers.join("\n"),
            self.store.join("\n"),
        );
        std::fs::write(self.path(), text).unwrap();
        self.path()
    }

    /// Writes the config and starts the proxy on it, waiting until it listens
    /// on both ports.
    pub fn start(&self) -> Process {
        match std::env::var("TEST_PROXY_LOG") {
            Ok(level) => self.spawn(&level, Stdio::inherit()),
            Err(_) => self.spawn("warn", Stdio::null()),
        }
    }

    /// Writes the config, starts the proxy with `RUST_LOG=level` and its
    /// stderr to `stderr`, and waits until it listens.
    pub fn spawn(&self, level: &str, stderr: impl Into<Stdio>) -> Process {
        let mut process = self.launch(level, stderr);
        // Two services of their own, started in no set order.
        wait_listening(self.port, &mut process.child);
        wait_listening(self.admin_port, &mut process.child);
        process
    }

    /// Writes the config and starts the proxy on it, without waiting.
    pub fn launch(&self, level: &str, stderr: impl Into<Stdio>) -> Process {
        let path = self.write();
        let child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", level)
            .env_remove("SESSION_PROXY_SECRET_KEYS")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Process {
            child,
            port: self.port,
        }
    }
}

fn set_line(lines: &mut Vec<String>, line: &str) {
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    lines.retain(|existing| key(existing) != key(line));
    lines.push(line.into());
}

pub fn wait_listening(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited before listening on {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {port} after 20 s");
}

/// The proxy binary with arguments, run to completion.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_session-proxy"));
    command
        .args(args)
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// [`run_cli`], and the most memory the process held (its peak resident
/// set, in bytes). Measured by a Python parent of its own: a child's
/// `ru_maxrss` counts what its parent held when it was forked, which for
/// this test process (a store's worth of test data) says nothing.
pub fn run_cli_peak(args: &[&str]) -> (std::process::Output, u64) {
    const MEASURE: &str = "import resource, subprocess, sys\n\
        code = subprocess.call(sys.argv[2:])\n\
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n\
        open(sys.argv[1], 'w').write(str(peak))\n\
        sys.exit(code)\n";
    let dir = TempDir::new("peak");
    let report = dir.path().join("peak");
    let output = Command::new("python3")
        .arg("-c")
        .arg(MEASURE)
        .arg(&report)
        .arg(env!("CARGO_BIN_EXE_session-proxy"))
        .args(args)
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let peak = std::fs::read_to_string(&report).unwrap_or_else(|error| {
        panic!(
            "no peak measured ({error}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    // Linux counts `ru_maxrss` in KiB.
    (output, peak.trim().parse::<u64>().unwrap() * 1024)
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The value the response sets for cookie `name`: `Some("")` when it clears it.
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers_named("set-cookie")
            .into_iter()
            .find_map(|header| {
                let pair = header.split(';').next()?.trim();
                let value = pair.strip_prefix(name)?.strip_prefix('=')?;
                Some(value.to_string())
            })
    }
    /// What the upstream saw (the test upstream echoes it as JSON).
    pub fn upstream_headers(&self) -> Vec<(String, String)> {
        self.json()["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().unwrap().to_string(),
                    pair[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.upstream_headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
    /// The token claims the upstream received (decoded, not verified).
    pub fn session(&self) -> serde_json::Value {
        self.json()["session"].clone()
    }
}

/// Sends one request on a new connection and reads the whole response.
pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    try_request(port, method, path, headers, b"").unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    request(port, "GET", path, headers)
}

pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

pub fn parse_response(raw: &[u8], head_only: bool) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if head_only {
        Vec::new()
    } else if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// A browser: one cookie jar for the session cookie.
pub struct Browser {
    pub port: u16,
    pub cookie_name: String,
    pub cookie: Option<String>,
}

impl Browser {
    pub fn new(port: u16) -> Browser {
        Browser {
            port,
            cookie_name: "session_id".into(),
            cookie: None,
        }
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        let cookie_header = self
            .cookie
            .as_ref()
            .map(|value| format!("{}={value}", self.cookie_name));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(cookie) = &cookie_header {
            all.push(("Cookie", cookie));
        }
        let response = get(self.port, path, &all);
        match response.set_cookie(&self.cookie_name) {
            Some(value) if value.is_empty() => self.cookie = None,
            Some(value) => self.cookie = Some(value),
            None => {}
        }
        response
    }
}

/// Files in the disk store's directory that hold records.
pub fn stored_files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p.file_name().unwrap().to_string_lossy().starts_with('.')
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Polls `condition` for up to `within`.
pub fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal upstream in the test process that counts the requests it
/// answers, for checks that the proxy did not call the upstream. Every
/// answer is 200 `ok` with an update that sets `n` to 1.
pub struct CountingUpstream {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingUpstream {
    pub fn start() -> CountingUpstream {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut stream = stream;
                    loop {
                        let mut line = String::new();
                        // Read one request head (the proxy sends GETs without bodies).
                        loop {
                            line.clear();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => {}
                            }
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Session-Update: {\"n\":1}\r\n\r\nok";
                        if stream.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        CountingUpstream { port, requests }
    }

    pub fn count(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A TCP relay on loopback between the proxy and a service, which a test
/// stops (every connection cut, nothing listening) and starts again on the
/// same port: a store that goes away and comes back. It can also stall
/// (connections stay open, nothing more is carried) and cut a connection in
/// the middle of a reply from the service.
pub struct Relay {
    pub port: u16,
    target: String,
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    faults: std::sync::Arc<RelayFaults>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

/// The faults a [`Relay`] applies to the bytes it carries.
#[derive(Default)]
struct RelayFaults {
    /// While set, a connection that carries anything is wedged for good.
    stalled: std::sync::atomic::AtomicBool,
    /// The service's reads still to pass before one is cut (0: none).
    cut_countdown: std::sync::atomic::AtomicUsize,
    /// Connections wedged so far, and those of them the client still
    /// holds open.
    wedged: std::sync::atomic::AtomicUsize,
    wedged_open: std::sync::atomic::AtomicUsize,
    /// Connections cut in the middle of a reply.
    cut: std::sync::atomic::AtomicUsize,
    /// Connections opened before the last [`Relay::forget_idle`] are
    /// closed when their client next sends (an era: a count of calls).
    era: std::sync::atomic::AtomicUsize,
    /// Connections closed so, and the bytes their client sent that the
    /// service never got.
    forgotten: std::sync::atomic::AtomicUsize,
}

impl Relay {
    pub fn start(target: &str) -> Relay {
        // Another test process may take a port free_port handed out here
        // before this one binds it: then another port.
        let listener = (0..20)
            .find_map(|_| TcpListener::bind(("127.0.0.1", free_port())).ok())
            .expect("no port for the relay");
        let mut relay = Relay {
            port: listener.local_addr().unwrap().port(),
            target: target.to_string(),
            running: Default::default(),
            faults: Default::default(),
            connections: Default::default(),
            acceptor: None,
        };
        relay.serve(listener);
        relay
    }

    /// Listens again on the same port.
    pub fn resume(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("relay port {}: {e}", self.port));
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        use std::sync::atomic::Ordering;
        listener.set_nonblocking(true).unwrap();
        self.running.store(true, Ordering::SeqCst);
        let (running, connections, target, faults) = (
            self.running.clone(),
            self.connections.clone(),
            self.target.clone(),
            self.faults.clone(),
        );
        self.acceptor = Some(std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let wedged = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let born = faults.era.load(Ordering::SeqCst);
                let mut tracked = connections.lock().unwrap();
                for (from_service, from, to) in [
                    (
                        false,
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                    ),
                    (
                        true,
                        server.try_clone().unwrap(),
                        client.try_clone().unwrap(),
                    ),
                ] {
                    let (faults, wedged) = (faults.clone(), wedged.clone());
                    std::thread::spawn(move || {
                        relay_one_way(from, to, from_service, born, &faults, &wedged)
                    });
                }
                tracked.extend([client, server]);
            }
        }));
    }

    /// Cuts every connection and stops listening.
    pub fn stop(&mut self) {
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }

    /// From now on, a connection that carries anything (new ones too) goes
    /// silent for good, both ends left open: a server that hangs, or one
    /// behind a black hole.
    pub fn stall(&self) {
        self.faults
            .stalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections carry again, the ones wedged meanwhile excepted.
    pub fn unstall(&self) {
        self.faults
            .stalled
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The `n`th read from the service from now on (1: the next) is passed
    /// on only in part, and its connection then closed both ways: a reply
    /// cut in the middle.
    pub fn cut_reply(&self, n: usize) {
        self.faults
            .cut_countdown
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether an armed [`Relay::cut_reply`] is still to happen.
    pub fn cut_pending(&self) -> bool {
        self.faults
            .cut_countdown
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    }

    /// Forgets every open connection without a word, as a firewall, a NAT
    /// or a pooler that drops idle connections does: the next bytes the
    /// client sends on one never reach the service, and the connection is
    /// closed both ways then, not before. New connections carry as ever.
    pub fn forget_idle(&self) {
        self.faults
            .era
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections closed on their client's next bytes after
    /// [`Relay::forget_idle`] so far.
    pub fn forgotten(&self) -> usize {
        self.faults
            .forgotten
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections cut in the middle of a reply so far.
    pub fn cuts(&self) -> usize {
        self.faults.cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections wedged so far (see [`Relay::stall`]).
    pub fn wedged(&self) -> usize {
        self.faults.wedged.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wedged connections their client has not closed.
    pub fn wedged_open(&self) -> usize {
        self.faults
            .wedged_open
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Carries `from` to `to` until either closes, applying the relay's faults.
fn relay_one_way(
    mut from: TcpStream,
    mut to: TcpStream,
    from_service: bool,
    born: usize,
    faults: &RelayFaults,
    wedged: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if faults.stalled.load(Ordering::SeqCst) && !wedged.swap(true, Ordering::SeqCst) {
            faults.wedged.fetch_add(1, Ordering::SeqCst);
            faults.wedged_open.fetch_add(1, Ordering::SeqCst);
        }
        if wedged.load(Ordering::SeqCst) {
            continue;
        }
        if !from_service && born < faults.era.load(Ordering::SeqCst) {
            faults.forgotten.fetch_add(1, Ordering::SeqCst);
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = to.shutdown(std::net::Shutdown::Both);
            return;
        }
        let cut_here = from_service
            && faults
                .cut_countdown
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                == Ok(1);
        if cut_here {
            let _ = to.write_all(&buffer[..read / 2]);
            faults.cut.fetch_add(1, Ordering::SeqCst);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
            return;
        }
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    // The client closed (or was closed): a wedged connection is let go.
    if !from_service && wedged.load(Ordering::SeqCst) {
        faults.wedged_open.fetch_sub(1, Ordering::SeqCst);
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

// Helpers for the hostile-input tests (hostile_clients, upstream_faults,
// crash_safety, soak, log_secrets).

impl ProxyConfig {
    /// Starts the proxy with `RUST_LOG=level`, its stderr appended to `log`.
    pub fn start_logging(&self, level: &str, log: &Path) -> Process {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        self.spawn(level, stderr)
    }
}

/// Sends `raw` bytes as they are on a new connection and reads until the
/// proxy closes it (or `within` passes); returns what came back.
pub fn raw_exchange(port: u16, raw: &[u8], within: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(within)).unwrap();
    // The proxy may answer and close before it has read everything.
    let _ = stream.write_all(raw);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

/// The status of a raw HTTP response, if it has a status line.
pub fn raw_status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// The session id inside a cookie value `ID.TAG`.
pub fn id_of(cookie: &str) -> &str {
    cookie.split('.').next().unwrap_or(cookie)
}

/// The store handle (hex SHA-256) of a cookie value's id.
pub fn handle_of(cookie: &str) -> String {
    session_proxy::session::cookie::Handle::of_id(id_of(cookie)).to_string()
}

/// The record file of a cookie's session in a disk store.
pub fn record_path(dir: &Path, cookie: &str) -> PathBuf {
    dir.join(format!("{}.json", handle_of(cookie)))
}

/// Every record file in a disk store, parsed; panics on one that does not parse.
pub fn parsed_records(dir: &Path) -> Vec<(PathBuf, session_proxy::store::Record)> {
    stored_files(dir)
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            let record = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{} does not parse as a record ({e}): {:?}",
                    path.display(),
                    String::from_utf8_lossy(&bytes)
                )
            });
            (path, record)
        })
        .collect()
}

/// Sends a signal to a process by pid.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Runs `session-proxy COMMAND -c CONFIG` (no secret from the
/// environment, RUST_LOG=warn) until it exits, which it must within
/// `within` (else it is killed and the test fails): its exit code and
/// stderr. For the commands that must refuse to start.
pub fn run_to_exit(command: &str, config: &Path, within: Duration) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args([command, "-c"])
        .arg(config)
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut process = Process { child, port: 0 };
    let status = wait_exit(&mut process.child, within);
    let mut stderr = String::new();
    let _ = process
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr);
    (status.code(), stderr)
}

/// Waits up to `within` for `child` to exit; panics if it does not.
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small xorshift generator: random moments and choices that a printed
/// seed reproduces.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// `count` writes of one key each (`key0`, `key1`, ...) to one session at
/// the same time, spread over `ports`; their statuses.
pub fn concurrent_key_writes(ports: &[u16], cookie: &str, count: usize) -> Vec<u16> {
    let threads: Vec<_> = (0..count)
        .map(|i| {
            let cookie = format!("session_id={cookie}");
            let port = ports[i % ports.len()];
            std::thread::spawn(move || {
                let update = format!(r#"{{"key{i}": {i}}}"#);
                get(
                    port,
                    "/",
                    &[("Cookie", &cookie), ("X-Test-Update", &update)],
                )
                .status
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect()
}

/// A download of the session `cookie` whose client reads the response head
/// and then stops reading: the response's body (500 MB) is still being
/// sent while the connection lives.
pub fn stalled_download(port: u16, cookie: &str) -> TcpStream {
    let mut download = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        download,
        "GET /download HTTP/1.1\r\nHost: x\r\nCookie: session_id={cookie}\r\n\
         X-Test-Body-Bytes: 500000000\r\n\r\n"
    )
    .unwrap();
    download
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 256];
    let read = download.read(&mut head).unwrap();
    assert!(
        head[..read].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..read])
    );
    std::thread::sleep(Duration::from_millis(500));
    download
}

/// Connections on `port` that a process still holds open: not listening,
/// and not left to the kernel (FIN_WAIT, TIME_WAIT: inode 0); from
/// /proc/net/tcp and tcp6.
pub fn held_connections(port: u16) -> usize {
    let local_port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 9
                && fields[1].ends_with(&local_port)
                && fields[3] != "0A"
                && fields[9] != "0"
        })
        .count()
}

/// A client that reads nothing: sends `request` on a kept-alive
/// connection (through `writer`, over the socket `raw`) to the proxy on
/// `proxy_port` again and again, one at a time, until a response no
/// longer goes out whole: what the proxy has sent on the connection (its
/// send queue in /proc/net/tcp, plus the client's receive queue) grows by
/// less than the first response. The buffers are full and the proxy waits
/// to write; the client stops there (pingora drops a connection whose
/// client sends while a response is under way). Whether it got there.
pub fn send_until_a_response_stalls(
    writer: &mut dyn Write,
    raw: &TcpStream,
    proxy_port: u16,
    request: &[u8],
) -> bool {
    let client_port = raw.local_addr().unwrap().port();
    let (local, remote) = (format!(":{proxy_port:04X}"), format!(":{client_port:04X}"));
    let mut peeked = vec![0u8; 64 << 20];
    let mut sent_so_far = || {
        let queued_there = std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.len() > 4 && fields[1].ends_with(&local) && fields[2].ends_with(&remote))
                    .then(|| usize::from_str_radix(fields[4].split(':').next()?, 16).ok())
                    .flatten()
            })
            .unwrap_or(0);
        raw.set_nonblocking(true).unwrap();
        let queued_here = raw.peek(&mut peeked).unwrap_or(0);
        raw.set_nonblocking(false).unwrap();
        queued_there + queued_here
    };
    // What has been sent once it stops growing for a moment.
    let mut settled = || {
        let mut last = sent_so_far();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = sent_so_far();
            if now == last {
                break;
            }
            last = now;
        }
        last
    };
    let mut size = None;
    for _ in 0..2000 {
        let before = settled();
        if writer
            .write_all(request)
            .and_then(|()| writer.flush())
            .is_err()
        {
            return false;
        }
        let grown = settled().saturating_sub(before);
        match size {
            None if grown > 0 => size = Some(grown),
            None => return false,
            // Short of a whole response (by more than TLS's framing varies).
            Some(size) if grown + 1024 < size => return true,
            Some(_) => {}
        }
    }
    false
}

/// The value of the metric line that starts with `series` (name and labels).
pub fn metric(admin_port: u16, series: &str) -> f64 {
    let text = get(admin_port, "/metrics", &[]).text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits until the proxy with the admin listener `admin_port` serves at
/// least `count` requests (`session_proxy_requests_in_flight`): the moment
/// a test may signal it, or act on their sessions, with those requests in
/// flight, however long their threads took to send them.
pub fn wait_in_flight(admin_port: u16, count: usize) {
    let series = "session_proxy_requests_in_flight";
    let reached = eventually(Duration::from_secs(20), || {
        metric(admin_port, series) >= count as f64
    });
    assert!(reached, "fewer than {count} requests in flight");
}

/// A GET the test upstream holds until the test lets it go, sent on a
/// thread of its own (`X-Test-Arrived`, `X-Test-Wait-For`): what happens
/// to its session meanwhile does not depend on how fast either side is.
/// The proxy's `read_timeout` must outlast the hold.
pub struct Held {
    signals: TempDir,
    answer: std::thread::JoinHandle<(Response, Instant)>,
}

impl Held {
    pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Held {
        let signals = TempDir::new("held");
        let arrived = signals.path().join("arrived").display().to_string();
        let release = signals.path().join("release").display().to_string();
        let mut owned: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        owned.push(("X-Test-Arrived".into(), arrived));
        owned.push(("X-Test-Wait-For".into(), release));
        let path = path.to_string();
        let answer = std::thread::spawn(move || {
            let all: Vec<(&str, &str)> = owned
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            let response = get(port, &path, &all);
            (response, Instant::now())
        });
        Held { signals, answer }
    }

    /// Waits until the upstream has the request: the proxy has loaded its
    /// session.
    pub fn at_the_app(&self) {
        let arrived = self.signals.path().join("arrived");
        assert!(
            eventually(Duration::from_secs(20), || arrived.exists()),
            "the held request never reached the upstream"
        );
    }

    /// Lets the upstream answer.
    pub fn release(&self) {
        std::fs::write(self.signals.path().join("release"), b"").unwrap();
    }

    /// Lets the upstream answer (if not yet); the response.
    pub fn answer(self) -> Response {
        self.answered_at().0
    }

    /// Lets the upstream answer (if not yet); the response, and when it
    /// came.
    pub fn answered_at(self) -> (Response, Instant) {
        self.release();
        self.answer.join().unwrap()
    }
}

/// How many loads, saves and deletes the store has timed so far.
pub fn store_ops(admin_port: u16) -> [f64; 3] {
    ["load", "save", "delete"].map(|op| {
        metric(
            admin_port,
            &format!("session_proxy_store_latency_seconds_count{{op=\"{op}\"}}"),
        )
    })
}

/// The disk record of the session of `cookie`, as JSON.
pub fn stored_record(config: &ProxyConfig, cookie: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(record_path(&config.sessions_dir(), cookie)).unwrap())
        .unwrap()
}

/// Sets the disk record's times named in `fields` (`atime`, `created`)
/// back by `seconds`.
pub fn age_record(config: &ProxyConfig, cookie: &str, seconds: u64, fields: &[&str]) {
    let path = record_path(&config.sessions_dir(), cookie);
    let mut record = stored_record(config, cookie);
    for &field in fields {
        record[field] = (record[field].as_u64().unwrap() - seconds).into();
    }
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
}

/// The proxy's own 503 for a store that failed: the text SPEC [5] gives,
/// no cookie set or cleared for the session it could not store, and none
/// of the app's session headers.
pub fn assert_store_unavailable(response: &Response, what: &str) {
    assert_eq!(
        (response.status, response.text().as_str()),
        (503, "session store unavailable"),
        "{what}"
    );
    assert_eq!(
        response.headers_named("set-cookie"),
        Vec::<&str>::new(),
        "{what}"
    );
    assert_eq!(response.header("x-session-update"), None, "{what}");
    assert_eq!(response.header("x-session-action"), None, "{what}");
}

/// What [`count_through_cut_replies`] saw.
pub struct CutReplies {
    /// The count of the last change acknowledged with a 200.
    pub acknowledged: u64,
    /// Requests answered with the 503.
    pub failed: usize,
    /// 503s whose change was stored all the same: the store's reply was
    /// lost after the write.
    pub stored_but_failed: usize,
}

/// `browser`'s `/count` (the test upstream's counter) once for each entry
/// of `reads`, with that reply of the store's cut by `relay`: each answer
/// comes within `bound` and is a 200 or the proxy's own 503, the session is
/// never replaced, and after a 503 the next 200 still counts on from every
/// acknowledged change. `acknowledged`: the count the browser saw last.
pub fn count_through_cut_replies(
    browser: &mut Browser,
    relay: &Relay,
    reads: &[usize],
    bound: Duration,
    acknowledged: u64,
) -> CutReplies {
    let cookie = browser.cookie.clone();
    let mut seen = CutReplies {
        acknowledged,
        failed: 0,
        stored_but_failed: 0,
    };
    for &read in reads {
        relay.cut_reply(read);
        let started = Instant::now();
        let response = browser.get("/count", &[]);
        let took = started.elapsed();
        relay.cut_reply(0);
        let what = format!("reply {read} cut");
        assert!(took < bound, "{what}: answered after {took:?}");
        assert_eq!(
            browser.cookie,
            cookie,
            "{what}: the session was replaced ({} {})",
            response.status,
            response.text()
        );
        let count: u64 = match response.status {
            200 => response.text().parse().unwrap(),
            _ => {
                assert_store_unavailable(&response, &what);
                seen.failed += 1;
                let mut next = None;
                let recovered = eventually(Duration::from_secs(5), || {
                    let response = browser.get("/count", &[]);
                    next = Some((response.status, response.text()));
                    response.status == 200
                });
                let (status, text) = next.unwrap();
                assert!(recovered, "{what}: no recovery: {status} {text}");
                let count = text.parse().unwrap();
                if count > seen.acknowledged + 1 {
                    seen.stored_but_failed += 1;
                }
                count
            }
        };
        assert!(
            count > seen.acknowledged,
            "{what}: count {count} after {} was acknowledged",
            seen.acknowledged
        );
        seen.acknowledged = count;
    }
    seen
}
