//! End to end: the access log (`[server] access_log`), written by the real
//! binary in front of the test upstream. One line per request, in nginx's
//! "combined" format followed by `rt=`, `session=` and `path=`; what the
//! client sent escaped; no secret; reopened on SIGUSR1; flushed at SIGTERM.
//!
//! The proxies listen on 19500-19599.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// Long enough for the writer's one-second flush, on a loaded machine.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// A proxy config on ports of its own (`slot` 0-49), logging to `log`.
fn config_logging_to(upstream_port: u16, slot: u16, log: &str) -> ProxyConfig {
    let mut config = ProxyConfig::new(upstream_port)
        .server(&format!("access_log = {log:?}"))
        .session("bypass = [\"/static/\"]");
    config.port = 19500 + 2 * slot;
    config.admin_port = 19501 + 2 * slot;
    config
}

/// A proxy on ports of its own (`slot`), logging to `access.log` in its
/// directory; the config is kept, for its directory lives as long.
fn start_logging_to_file(upstream_port: u16, slot: u16) -> (ProxyConfig, Process, String) {
    let config = config_logging_to(upstream_port, slot, "");
    start_with_file(config)
}

fn start_with_file(config: ProxyConfig) -> (ProxyConfig, Process, String) {
    let log = config.dir.path().join("access.log").display().to_string();
    let config = config.server(&format!("access_log = {log:?}"));
    let proxy = config.start();
    (config, proxy, log)
}

fn lines_of(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8(bytes).expect("the access log is ASCII");
    text.lines().map(str::to_string).collect()
}

/// Waits until the log holds a line containing `needle`, and returns it.
fn line_with(path: &Path, needle: &str) -> Line {
    let mut found = None;
    let appeared = eventually(FLUSH_WAIT, || {
        found = lines_of(path)
            .into_iter()
            .find(|line| line.contains(needle));
        found.is_some()
    });
    assert!(
        appeared,
        "no line with {needle:?} in {}: {:?}",
        path.display(),
        lines_of(path)
    );
    Line::parse(&found.unwrap_or_default())
}

/// One access log line, split into its fields.
#[derive(Debug)]
struct Line {
    client: String,
    time: String,
    request: String,
    status: u16,
    bytes: usize,
    referer: String,
    user_agent: String,
    rt: String,
    session: String,
    path: String,
}

impl Line {
    /// Parses `ADDR - - [TIME] "REQUEST" STATUS BYTES "REFERER" "UA" rt=S session=H path=P`;
    /// panics on anything else, so a forged or split line fails the test.
    fn parse(line: &str) -> Line {
        fn bad(line: &str) -> ! {
            panic!("not an access log line: {line:?}")
        }
        let fail = || bad(line);
        let (client, rest) = line.split_once(" - - [").unwrap_or_else(fail);
        let (time, rest) = rest.split_once("] \"").unwrap_or_else(fail);
        let (request, rest) = rest.split_once("\" ").unwrap_or_else(fail);
        let (status, rest) = rest.split_once(' ').unwrap_or_else(fail);
        let (bytes, rest) = rest.split_once(" \"").unwrap_or_else(fail);
        let (referer, rest) = rest.split_once("\" \"").unwrap_or_else(fail);
        let (user_agent, rest) = rest.split_once("\" ").unwrap_or_else(fail);
        let ours: Vec<&str> = rest.split(' ').collect();
        let [rt, session, path] = ours[..] else {
            bad(line)
        };
        let field = |text: &str, name: &str| {
            text.strip_prefix(name)
                .unwrap_or_else(|| bad(line))
                .to_string()
        };
        // No field may hold a quote: each is escaped.
        for quoted in [request, referer, user_agent] {
            assert!(!quoted.contains('"'), "{line:?}");
        }
        Line {
            client: client.to_string(),
            time: time.to_string(),
            request: request.to_string(),
            status: status.parse().unwrap_or_else(|_| bad(line)),
            bytes: bytes.parse().unwrap_or_else(|_| bad(line)),
            referer: referer.to_string(),
            user_agent: user_agent.to_string(),
            rt: field(rt, "rt="),
            session: field(session, "session="),
            path: field(path, "path="),
        }
    }
}

#[test]
fn a_session_request_is_logged_with_every_field() {
    let upstream = start_upstream();
    let (config, proxy, log) = start_logging_to_file(upstream.port, 0);
    let mut browser = Browser::new(proxy.port);
    let response = browser.get(
        "/count?from=test",
        &[
            ("User-Agent", "curl/8.0"),
            ("Referer", "http://example.com/"),
        ],
    );
    assert_eq!(response.status, 200);
    let cookie = browser.cookie.clone().expect("a session cookie");

    let line = line_with(Path::new(&log), "/count?from=test");
    assert_eq!(line.client, "127.0.0.1");
    assert!(
        line.time.len() == 26 && line.time.ends_with(" +0000"),
        "{line:?}"
    );
    assert_eq!(line.request, "GET /count?from=test HTTP/1.1");
    assert_eq!(line.status, 200);
    assert_eq!(line.bytes, response.body.len());
    assert_eq!(line.referer, "http://example.com/");
    assert_eq!(line.user_agent, "curl/8.0");
    let (seconds, millis) = line.rt.split_once('.').expect("rt=S.MMM");
    assert!(
        seconds.parse::<u64>().is_ok() && millis.len() == 3 && millis.parse::<u32>().is_ok(),
        "{line:?}"
    );
    assert_eq!(line.session, handle_of(&cookie)[..8]);
    assert_eq!(line.path, "session");

    let metrics = get(config.admin_port, "/metrics", &[]).text();
    assert!(
        metrics.contains("session_proxy_access_log_dropped_total 0"),
        "{metrics}"
    );
}

#[test]
fn a_bypassed_request_is_logged_without_a_session() {
    let upstream = start_upstream();
    let (_config, proxy, log) = start_logging_to_file(upstream.port, 1);
    assert_eq!(get(proxy.port, "/static/app.css", &[]).status, 200);

    let line = line_with(Path::new(&log), "/static/app.css");
    assert_eq!(line.request, "GET /static/app.css HTTP/1.1");
    assert_eq!((line.status, line.referer.as_str()), (200, "-"));
    assert_eq!((line.session.as_str(), line.path.as_str()), ("-", "bypass"));
}

#[test]
fn refused_requests_and_a_down_app_are_logged_with_the_status_sent() {
    // Nothing listens on 19599: the app is down.
    let config = config_logging_to(19599, 2, "").server("header_timeout = 1");
    let (_config, proxy, log) = start_with_file(config);
    let port = proxy.port;

    assert_eq!(get(port, "/down", &[]).status, 502);
    let line = line_with(Path::new(&log), "/down");
    assert_eq!((line.status, line.path.as_str()), (502, "session"));
    assert_eq!(line.bytes, "upstream unreachable".len());

    // Over the 64 KiB bound on a head: 431, before any session work.
    let big = "a".repeat(70 * 1024);
    assert_eq!(get(port, "/too-big", &[("X-Big", &big)]).status, 431);
    let line = line_with(Path::new(&log), "/too-big");
    assert_eq!((line.status, line.path.as_str()), (431, "-"));

    // A head pingora cannot parse: its own 400, before any hook of ours.
    let answer = raw_exchange(
        port,
        b"GET /bad HTTP/1.1\r\nHost : x\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(raw_status(&answer), Some(400));
    let line = line_with(Path::new(&log), "/bad");
    assert_eq!(line.request, "GET /bad HTTP/1.1");
    assert_eq!((line.status, line.session.as_str()), (400, "-"));

    // A head too slow (header_timeout = 1): 408.
    let answer = raw_exchange(
        port,
        b"GET /slow-head HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(raw_status(&answer), Some(408));
    let line = line_with(Path::new(&log), "/slow-head");
    assert_eq!(line.request, "GET /slow-head HTTP/1.1");
    assert_eq!((line.status, line.bytes), (408, 24));
}

#[test]
fn a_client_that_hangs_up_before_its_answer_is_logged_as_499() {
    let upstream = start_upstream();
    let (config, proxy, log) = start_logging_to_file(upstream.port, 3);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    use std::io::Write;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Test-Sleep-Ms: 1500\r\n\r\n")
        .unwrap();
    // Hung up once the proxy has the request, well before its answer.
    wait_in_flight(config.admin_port, 1);
    drop(stream);

    let line = line_with(Path::new(&log), "/slow");
    assert_eq!(line.status, 499, "{line:?}");
}

/// An interim response (`103 Early Hints`) is no answer: a client that
/// hangs up after it, before the final one, is a 499, in the log as in
/// `session_proxy_responses_total`.
#[test]
fn a_client_that_hangs_up_after_an_interim_response_is_logged_as_499() {
    use base64::Engine;
    use std::io::Write;
    let upstream = start_upstream();
    let (config, proxy, log) = start_logging_to_file(upstream.port, 13);
    let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n";
    let head = format!(
        "GET /early-hints HTTP/1.1\r\nHost: x\r\nX-Test-Fault: raw-hang\r\nX-Test-Raw: {}\r\n\r\n",
        base64::engine::general_purpose::STANDARD.encode(hints)
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream.set_read_timeout(Some(FLUSH_WAIT)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed before the 103");
        received.push(byte[0]);
    }
    assert!(received.starts_with(b"HTTP/1.1 103"), "{received:?}");
    drop(stream);

    let line = line_with(Path::new(&log), "/early-hints");
    assert_eq!(line.status, 499, "{line:?}");
    let class = |class: &str| {
        metric(
            config.admin_port,
            &format!("session_proxy_responses_total{{class=\"{class}\"}}"),
        )
    };
    assert_eq!((class("1xx"), class("4xx")), (0.0, 1.0));
}

#[test]
fn client_sent_fields_are_escaped_so_no_line_can_be_forged() {
    let upstream = start_upstream();
    let (_config, proxy, log) = start_logging_to_file(upstream.port, 4);
    // A User-Agent that tries to close its field and forge the rest of a
    // line, with a backslash and bytes past ASCII; a Referer with a tab.
    let forged = b"evil\" 200 0 \"-\" \"x\\y \xc3\xa9\xff rt=0.000 session=deadbeef path=bypass";
    let mut raw = b"GET /escape?q=\\\xc3\xa9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nReferer: a\tb\r\nUser-Agent: ".to_vec();
    raw.extend_from_slice(forged);
    raw.extend_from_slice(b"\r\n\r\n");
    let answer = raw_exchange(proxy.port, &raw, Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(200));

    let line = line_with(Path::new(&log), "/escape");
    assert_eq!(line.request, r"GET /escape?q=\x5C\xC3\xA9 HTTP/1.1");
    assert_eq!(line.referer, r"a\x09b");
    assert_eq!(
        line.user_agent,
        r"evil\x22 200 0 \x22-\x22 \x22x\x5Cy \xC3\xA9\xFF rt=0.000 session=deadbeef path=bypass"
    );
    assert_eq!(line.path, "session");

    // A quote in the target: pingora refuses it (400) before parsing it
    // whole, and the line holds the request line as it came, escaped.
    let raw = b"GET /refused?q=\"x\"\\\xff HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = raw_exchange(proxy.port, raw, Duration::from_secs(10));
    assert_eq!(raw_status(&answer), Some(400));
    let line = line_with(Path::new(&log), "/refused");
    assert_eq!(line.request, r"GET /refused?q=\x22x\x22\x5C\xFF HTTP/1.1");
    assert_eq!(line.status, 400);
    assert_eq!(lines_of(Path::new(&log)).len(), 2);
}

#[test]
fn no_cookie_session_id_token_or_key_reaches_the_access_log() {
    let upstream = start_upstream();
    let (_config, proxy, log) = start_logging_to_file(upstream.port, 5);
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"user":"ann"}"#)]);
    let response = browser.get("/", &[("X-Test-Action", "regenerate")]);
    let token = response.upstream_header("x-session").expect("a token");
    let first_cookie = browser.cookie.clone().expect("a cookie");
    browser.get("/last", &[]);
    let cookie = browser.cookie.clone().expect("a cookie");

    let logged = line_with(Path::new(&log), "/last");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    for secret in [
        cookie.as_str(),
        id_of(&cookie),
        &handle_of(&cookie),
        first_cookie.as_str(),
        id_of(&first_cookie),
        &handle_of(&first_cookie),
        token.as_str(),
        token.split('.').nth(1).expect("payload"),
        token.split('.').nth(2).expect("signature"),
        KEY,
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    // The handle's prefix only, as every other log.
    assert_eq!(logged.session, handle_of(&cookie)[..8]);
}

#[test]
fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let upstream = start_upstream();
    let (_config, proxy, log) = start_logging_to_file(upstream.port, 6);
    let rotated = format!("{log}.1");

    get(proxy.port, "/before", &[]);
    line_with(Path::new(&log), "/before");
    std::fs::rename(&log, &rotated).unwrap();
    get(proxy.port, "/between", &[]);
    signal(proxy.child.id(), "USR1");
    assert!(
        eventually(FLUSH_WAIT, || Path::new(&log).exists()),
        "SIGUSR1 created no new file"
    );
    get(proxy.port, "/after", &[]);

    line_with(Path::new(&log), "/after");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains("/before") && old.contains("/between") && !old.contains("/after"),
        "{old}"
    );
    let new = std::fs::read_to_string(&log).unwrap();
    assert_eq!(new.lines().count(), 1, "{new}");
}

#[test]
fn a_dash_writes_the_log_to_standard_output_and_flushes_it_at_sigterm() {
    let upstream = start_upstream();
    let config = config_logging_to(upstream.port, 7, "-");
    let path = config.write();
    let mut child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(config.port, &mut child);
    assert_eq!(get(config.port, "/to-stdout", &[]).status, 200);
    signal(child.id(), "TERM");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert_eq!(Line::parse(lines[0]).request, "GET /to-stdout HTTP/1.1");
}

#[test]
fn every_line_before_sigterm_is_in_the_file_after_exit() {
    let upstream = start_upstream();
    let (_config, mut proxy, log) = start_logging_to_file(upstream.port, 8);
    for n in 0..40 {
        assert_eq!(get(proxy.port, &format!("/n/{n}"), &[]).status, 200);
    }
    // At once: within the writer's one-second flush.
    signal(proxy.child.id(), "TERM");
    assert!(proxy.child.wait().unwrap().success());
    let lines = lines_of(Path::new(&log));
    assert_eq!(lines.len(), 40, "{lines:?}");
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(Line::parse(line).request, format!("GET /n/{n} HTTP/1.1"));
    }
}

#[test]
fn an_access_log_that_cannot_be_opened_is_exit_2_at_check_and_at_start() {
    let config = config_logging_to(19599, 9, "");
    let missing = config.dir.path().join("no-such-dir/access.log");
    let missing = missing.display().to_string();
    let config = config.server(&format!("access_log = {missing:?}"));
    let path = config.write();
    for command in ["check", "run"] {
        let output = run_cli(&[command, "-c", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("server.access_log") && stderr.contains(&missing),
            "{command}: {stderr}"
        );
    }
}

/// `session_proxy_access_log_dropped_total`, as `/metrics` says it now.
fn dropped_lines(admin_port: u16) -> u64 {
    let metrics = get(admin_port, "/metrics", &[]).text();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("session_proxy_access_log_dropped_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped count in {metrics}"))
}

/// Requests whose lines are 6,1xx bytes each (three fields of 2,000):
/// the writer's 64 KiB buffer holds ten of them.
const BIG_LINES_BUFFERED: u64 = 10;

/// A bypassed request (`session=-`) with a line of 6,1xx bytes.
fn big_line_request(port: u16, n: usize) -> u16 {
    let field = "x".repeat(2000);
    let target = format!("/static/big/{n:02}?{field}");
    get(
        port,
        &target,
        &[("User-Agent", &field), ("Referer", &field)],
    )
    .status
}

/// The proxy's WARNs about failed writes in its log at `stderr`.
fn write_warnings(stderr: &Path) -> usize {
    std::fs::read_to_string(stderr)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("access log: cannot write"))
        .count()
}

/// Twenty requests with big lines while the log cannot be written: all
/// served; ten lines wait in the writer's buffer and each of the ten after
/// them finds no room, dropped and counted.
fn twenty_big_lines_on_a_full_disk(proxy: &Process, config: &ProxyConfig) {
    for n in 0..20 {
        assert_eq!(big_line_request(proxy.port, n), 200, "request {n}");
    }
    let mut dropped = 0;
    eventually(FLUSH_WAIT, || {
        dropped = dropped_lines(config.admin_port);
        dropped >= 20 - BIG_LINES_BUFFERED
    });
    assert_eq!(dropped, 20 - BIG_LINES_BUFFERED);
}

#[test]
fn a_log_that_cannot_be_written_drops_and_counts_lines_and_requests_go_on() {
    let upstream = start_upstream();
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    let config = config_logging_to(upstream.port, 10, "/dev/full");
    let stderr = config.dir.path().join("stderr.log");
    let started = std::time::Instant::now();
    let proxy = config.start_logging("warn", &stderr);
    twenty_big_lines_on_a_full_disk(&proxy, &config);
    assert!(eventually(FLUSH_WAIT, || write_warnings(&stderr) > 0));
    // A WARN at most every 10 s, however many writes fail.
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        write_warnings(&stderr) <= allowed,
        "{}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    assert_eq!(get(proxy.port, "/static/still-served", &[]).status, 200);
}

/// A tmpfs of 128 KiB on a directory, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None`, said on stderr, where mounting is not permitted (not root).
    fn mount(dir: &Path) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs"])
            .arg(dir)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(SmallDisk(dir.to_path_buf())),
            outcome => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs on {}: {outcome:?}",
                    dir.display()
                );
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status();
        if !unmounted.is_ok_and(|status| status.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Writes `path` until the filesystem has no room left.
fn fill(path: &Path) {
    use std::io::Write;
    let mut filler = std::fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    loop {
        match filler.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
}

#[test]
fn after_a_full_disk_has_room_again_the_lines_it_held_and_new_ones_are_written_whole() {
    let upstream = start_upstream();
    let config = config_logging_to(upstream.port, 11, "");
    let disk_dir = config.dir.path().join("disk");
    // Declared before the proxy: dropped (unmounted) after it exits.
    let Some(_disk) = SmallDisk::mount(&disk_dir) else {
        return;
    };
    let log = disk_dir.join("access.log");
    let filler = disk_dir.join("filler");
    fill(&filler);
    let config = config.server(&format!("access_log = {:?}", log.display().to_string()));
    let proxy = config.start();
    twenty_big_lines_on_a_full_disk(&proxy, &config);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(get(proxy.port, "/static/room-again", &[]).status, 200);
    line_with(&log, "/static/room-again");
    let lines = lines_of(&log);
    let requests: Vec<String> = lines
        .iter()
        .map(|line| Line::parse(line).request)
        .map(|request| request.split('?').next().unwrap_or_default().to_string())
        .collect();
    let mut expected: Vec<String> = (0..BIG_LINES_BUFFERED)
        .map(|n| format!("GET /static/big/{n:02}"))
        .collect();
    expected.push("GET /static/room-again HTTP/1.1".to_string());
    assert_eq!(requests, expected);
    assert_eq!(dropped_lines(config.admin_port), 20 - BIG_LINES_BUFFERED);
}

#[test]
fn a_fifo_no_process_reads_is_refused_at_once_and_one_with_a_reader_gets_the_lines() {
    use std::io::BufRead;
    let upstream = start_upstream();
    let config = config_logging_to(upstream.port, 12, "");
    let fifo = config.dir.path().join("access.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let fifo_name = fifo.display().to_string();
    let config = config.server(&format!("access_log = {fifo_name:?}"));
    let path = config.write();

    // Opening a FIFO for writing would wait for a reader: `check` must
    // not, so it runs with a deadline (and is killed past it).
    for command in ["check", "run"] {
        let (code, stderr) = run_to_exit(command, &path, Duration::from_secs(5));
        assert_eq!(code, Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("server.access_log")
                && stderr.contains(&fifo_name)
                && stderr.contains("no process has open for reading"),
            "{command}: {stderr}"
        );
    }

    // A reader (read and write: it never sees an end of file between writers).
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let (found, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if line.contains("/through-the-fifo") {
                let _ = found.send(line);
                return;
            }
        }
    });
    let proxy = config.start();
    assert_eq!(get(proxy.port, "/static/through-the-fifo", &[]).status, 200);
    let line = seen
        .recv_timeout(FLUSH_WAIT)
        .expect("the line through the FIFO");
    assert_eq!(
        Line::parse(&line).request,
        "GET /static/through-the-fifo HTTP/1.1"
    );
}
