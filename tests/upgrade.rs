//! Upgrades without downtime: a new process started with `run --upgrade`
//! takes the listening sockets of the running one, which hands them over on
//! SIGQUIT (`[server] upgrade_sock`), finishes its requests and exits.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// A client of the proxy during a hand-over: it counts on a session of its
/// own with web.py's counter as fast as the proxy answers, and keeps the
/// number of requests served, the requests that failed and the last count.
struct Counting {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>, u64)>,
}

impl Counting {
    /// Each request on a new connection, or with `keep_alive` all on one,
    /// opening the next only when the proxy says `Connection: close`.
    fn start(port: u16, keep_alive: bool) -> Counting {
        let first = get(port, "/count", &[]);
        let cookie = format!(
            "session_id={}",
            first.set_cookie("session_id").expect("a session")
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut served, mut failures, mut count) = (1, Vec::new(), 1);
            let mut connection = None;
            while !stopping.load(Ordering::Relaxed) {
                let headers = [("Cookie", cookie.as_str())];
                let answer = match keep_alive {
                    true => kept_alive_get(&mut connection, port, "/count", &headers),
                    false => try_request(port, "GET", "/count", &headers, b""),
                };
                match answer {
                    Ok(response) if response.status == 200 => {
                        served += 1;
                        count = response.text().trim().parse().unwrap_or(0);
                    }
                    Ok(response) => failures.push(format!("status {}", response.status)),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (served, failures, count)
        });
        Counting { stop, thread }
    }

    fn stop(self) -> (usize, Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A GET on the kept-alive `connection` (a new one when there is none),
/// which is dropped after a response that says `Connection: close`.
fn kept_alive_get(
    connection: &mut Option<BufReader<TcpStream>>,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    if connection.is_none() {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        *connection = Some(BufReader::new(stream));
    }
    let reader = connection.as_mut().unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let answer = reader.get_mut().write_all(head.as_bytes()).and_then(|()| {
        let mut raw = Vec::new();
        while !raw.ends_with(b"\r\n\r\n") {
            if reader.read_until(b'\n', &mut raw)? == 0 {
                return Err(std::io::Error::other(
                    "the proxy closed a kept-alive connection without answering",
                ));
            }
        }
        let mut response = parse_response(&raw, true)?;
        let length = response
            .header("content-length")
            .map_or(0, |n| n.parse().unwrap_or(0));
        response.body = vec![0; length];
        reader.read_exact(&mut response.body)?;
        Ok(response)
    });
    let closing = answer.as_ref().map_or(true, |response| {
        response
            .header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"))
    });
    if closing {
        *connection = None;
    }
    answer
}

fn upgrade_sock(config: &ProxyConfig) -> std::path::PathBuf {
    config.dir.path().join("upgrade.sock")
}

fn with_upgrade_sock(config: ProxyConfig) -> ProxyConfig {
    let line = format!(
        "upgrade_sock = {:?}",
        upgrade_sock(&config).display().to_string()
    );
    config.server(&line)
}

/// Asserts that every request for `span` after a SIGQUIT is served (one
/// each 200 ms): the proxy kept its listeners.
fn assert_served_for(port: u16, span: Duration) {
    let started = Instant::now();
    while started.elapsed() < span {
        let answer = try_request(port, "GET", "/", &[], b"");
        assert!(
            answer.as_ref().is_ok_and(|response| response.status == 200),
            "{:?} after SIGQUIT: {answer:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`start_upgrading`], once the new process waits on the upgrade socket.
fn start_waiting(config: &ProxyConfig, log: &Path) -> Process {
    let new = start_upgrading(config, log);
    assert!(
        eventually(Duration::from_secs(20), || upgrade_sock(config).exists()),
        "the new process waits on the upgrade socket"
    );
    new
}

/// `session-proxy run --upgrade` on the config, its log in `log`; killed
/// when dropped, so that a failing test leaves no proxy behind.
fn start_upgrading(config: &ProxyConfig, log: &Path) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args(["run", "--upgrade", "-c"])
        .arg(config.path())
        .env("RUST_LOG", "info")
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Process {
        child,
        port: config.port,
    }
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Asserts that the log at `log` shows `text` within 10 s.
fn assert_logs_soon(log: &Path, text: &str) {
    let shown = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(log).unwrap().contains(text)
    });
    let all = std::fs::read_to_string(log).unwrap();
    assert!(shown, "no {text:?} in {}:\n{all}", log.display());
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn an_upgrade_hands_the_listeners_over_without_losing_a_request_or_a_session() {
    let upstream = start_upstream();
    let config = with_upgrade_sock(ProxyConfig::new(upstream.port));
    let old_log = config.dir.path().join("old.log");
    let mut old = config.start_logging("info", &old_log);
    let first = get(config.port, "/count", &[]);
    let cookie = format!(
        "session_id={}",
        first.set_cookie("session_id").expect("a session")
    );
    // A request the old process is still serving when it hands over.
    let port = config.port;
    let slow = {
        let cookie = cookie.clone();
        std::thread::spawn(move || {
            get(
                port,
                "/",
                &[("Cookie", &cookie), ("X-Test-Sleep-Ms", "2000")],
            )
            .status
        })
    };
    // Clients that open a connection per request, and clients that keep
    // theirs: enough of them that some wait between two requests when
    // the old process stops accepting.
    let clients: Vec<Counting> = (0..18)
        .map(|client| Counting::start(config.port, client >= 2))
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let new_log = config.dir.path().join("new.log");
    let mut new = start_waiting(&config, &new_log);
    signal(&old.child, "QUIT");
    let old_status = wait_exit(&mut old.child, Duration::from_secs(30));
    // Some more requests, served by the new process alone.
    std::thread::sleep(Duration::from_millis(300));
    let counted: Vec<_> = clients.into_iter().map(Counting::stop).collect();

    assert_eq!(
        old_status.and_then(|status| status.code()),
        Some(0),
        "the old process exits 0 once drained"
    );
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "the new process serves on"
    );
    assert_eq!(slow.join().unwrap(), 200, "the request in flight finished");
    for (served, failures, count) in counted {
        // No connection refused, and no kept-alive connection closed
        // while a request was on its way.
        assert!(
            failures.is_empty(),
            "failed during the upgrade: {failures:?}"
        );
        assert!(served > 10, "only {served} requests served");
        // Each client's session went from process to process on the disk
        // store: every request counted once, none lost, none twice.
        assert_eq!(count, served as u64, "the session's count");
    }
    assert_eq!(get(config.admin_port, "/healthz", &[]).text(), "ok");
    let response = get(config.port, "/count", &[("Cookie", &cookie)]);
    assert_eq!(
        response.text(),
        "2",
        "the first session, served by the new process"
    );
    let new_text = std::fs::read_to_string(&new_log).unwrap();
    assert!(!new_text.contains("ERROR"), "new process log:\n{new_text}");
    let old_text = std::fs::read_to_string(&old_log).unwrap();
    assert!(
        old_text.contains("SIGQUIT: handing the listeners"),
        "old process log:\n{old_text}"
    );
    signal(&new.child, "TERM");
    assert_eq!(
        wait_exit(&mut new.child, Duration::from_secs(10)).and_then(|status| status.code()),
        Some(0)
    );
}

#[test]
fn sigquit_without_a_new_process_waiting_leaves_the_proxy_serving() {
    let upstream = start_upstream();
    let config = with_upgrade_sock(ProxyConfig::new(upstream.port));
    let log = config.dir.path().join("proxy.log");
    let mut proxy = config.start_logging("info", &log);
    signal(&proxy.child, "QUIT");
    // It looks for a new process for 5 s, serving all along, until it
    // says it found none (however late a loaded machine has it say so).
    let gave_up = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("SIGQUIT: no new process waits on")
    };
    let started = Instant::now();
    while !gave_up() {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(started.elapsed() < Duration::from_secs(30), "log:\n{text}");
        assert_eq!(get(config.port, "/", &[]).status, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(config.port, "/", &[]).status, 200);
    assert!(proxy.child.try_wait().unwrap().is_none(), "still running");
}

/// A socket file with no process behind it (a new process killed while it
/// waited leaves one) is no new process: SIGQUIT leaves the proxy serving,
/// where pingora would hand the listeners to no one and stop accepting.
#[test]
fn sigquit_with_only_a_stale_upgrade_sock_leaves_the_proxy_serving() {
    let upstream = start_upstream();
    let config = with_upgrade_sock(ProxyConfig::new(upstream.port));
    drop(std::os::unix::net::UnixListener::bind(upgrade_sock(&config)).unwrap());
    let log = config.dir.path().join("proxy.log");
    let mut proxy = config.start_logging("info", &log);
    signal(&proxy.child, "QUIT");
    // pingora tries a socket for 5 s, and stops accepting 5 s after.
    assert_served_for(config.port, Duration::from_secs(12));
    assert!(proxy.child.try_wait().unwrap().is_none(), "still running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGQUIT: no new process waits on"),
        "log:\n{text}"
    );
}

#[test]
fn sigquit_without_upgrade_sock_is_ignored() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let log = config.dir.path().join("proxy.log");
    let mut proxy = config.start_logging("info", &log);
    signal(&proxy.child, "QUIT");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(config.port, "/", &[]).status, 200);
    assert!(proxy.child.try_wait().unwrap().is_none(), "still running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("SIGQUIT ignored"), "log:\n{text}");
}

#[test]
fn run_upgrade_without_upgrade_sock_is_a_usage_error() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let path = config.write();
    let output = run_cli(&["run", "--upgrade", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("[server] upgrade_sock"), "{stderr}");
}

/// SIGTERM (or SIGINT: Ctrl-C) to the new process while it waits stops it
/// at once, and a SIGQUIT then sent to the running proxy leaves that one
/// serving. pingora read the stop only once the listeners had come: the
/// new process took them over, then drained and exited as the old one
/// did, and nothing was left listening.
#[test]
fn sigterm_to_the_new_process_while_it_waits_stops_it_and_the_old_serves_on() {
    let upstream = start_upstream();
    let config = with_upgrade_sock(ProxyConfig::new(upstream.port));
    let old_log = config.dir.path().join("old.log");
    let mut old = config.start_logging("info", &old_log);
    assert_eq!(get(config.port, "/", &[]).status, 200);

    let new_log = config.dir.path().join("new.log");
    let mut new = start_waiting(&config, &new_log);
    signal(&new.child, "TERM");
    assert_eq!(
        wait_exit(&mut new.child, Duration::from_secs(3)).and_then(|status| status.code()),
        Some(0),
        "the new process stops at once"
    );
    assert!(!upgrade_sock(&config).exists(), "its socket is gone");

    signal(&old.child, "QUIT");
    assert_served_for(config.port, Duration::from_secs(7));
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old one serves on"
    );
    assert_logs_soon(&old_log, "SIGQUIT: no new process waits on");
}

/// The recipe's easy mistake: SIGQUIT sent to the new process, which is
/// still waiting for the listeners. It says so and goes on waiting, and
/// the SIGQUIT then sent to the running proxy completes the upgrade.
#[test]
fn sigquit_to_the_new_process_while_it_waits_is_named_and_changes_nothing() {
    let upstream = start_upstream();
    let config = with_upgrade_sock(ProxyConfig::new(upstream.port));
    let old_log = config.dir.path().join("old.log");
    let mut old = config.start_logging("info", &old_log);
    assert_eq!(get(config.port, "/", &[]).status, 200);

    let new_log = config.dir.path().join("new.log");
    let mut new = start_waiting(&config, &new_log);
    signal(&new.child, "QUIT");
    assert_logs_soon(&new_log, "SIGQUIT ignored: this is the new process");
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "the new process waits on"
    );

    signal(&old.child, "QUIT");
    assert_eq!(
        wait_exit(&mut old.child, Duration::from_secs(30)).and_then(|status| status.code()),
        Some(0),
        "the old process hands over and exits 0"
    );
    assert_eq!(
        get(config.port, "/", &[]).status,
        200,
        "served by the new one"
    );
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "the new process serves on"
    );
    // Now that it has them, SIGQUIT is the next upgrade's, as usual.
    signal(&new.child, "QUIT");
    assert_logs_soon(&new_log, "SIGQUIT: no new process waits on");
    let new_text = std::fs::read_to_string(&new_log).unwrap();
    assert!(!new_text.contains("ERROR"), "new process log:\n{new_text}");
    assert!(new.child.try_wait().unwrap().is_none(), "still serving");
}
