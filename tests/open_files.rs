//! End to end: the proxy out of file descriptors (EMFILE), as idle
//! clients holding connections, or a low `LimitNOFILE=`, leave it. Its
//! limit is lowered while it runs (`prlimit`) to just above what it holds,
//! and idle clients take the rest.
//!
//! pingora's accept loop logs the failure and waits a second before the
//! next accept: a line a second a listener, no spin (measured: 0.02 s of
//! CPU in 2 s). Meanwhile new clients wait in the listener's queue, and
//! those connected are served while no descriptor is needed (a new
//! upstream connection is a 502).
//!
//! Out of the system's files (ENFILE), which only a process not run as
//! root meets, pingora retries accept() at once: a core busy, and as many
//! failures as it can log. A shim (`LD_PRELOAD`) makes accept4 fail so.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

/// Descriptors left to the proxy above those it holds when its limit drops.
const HEADROOM: usize = 16;

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).unwrap()
}

/// A request sent on a new connection, its answer not read yet: out of
/// descriptors, the connection waits in the listener's queue.
fn send_request(port: u16) -> TcpStream {
    let mut stream = connect(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    stream
}

/// The status of the answer on `stream`, read to its end.
fn answer_of(mut stream: TcpStream) -> u16 {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("an answer");
    parse_response(&raw, false).unwrap().status
}

/// Once the idle clients leave, the proxy serves the client that waited in
/// its queue, and new ones, and /healthz says ok: no restart needed.
#[test]
fn out_of_open_files_the_proxy_serves_again_once_idle_clients_leave() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let log = config.path().with_file_name("proxy.log");
    let proxy = config.spawn("warn", std::fs::File::create(&log).unwrap());
    let pid = proxy.child.id();
    let limit = open_files(pid) + HEADROOM;
    let limited = Command::new("prlimit")
        .arg(format!("--nofile={limit}:{limit}"))
        .arg(format!("--pid={pid}"))
        .status()
        .expect("prlimit (util-linux) must be installed");
    assert!(limited.success());

    let idle: Vec<TcpStream> = (0..HEADROOM * 2).map(|_| connect(proxy.port)).collect();
    let accept_failed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("Too many open files")
    };
    assert!(
        eventually(Duration::from_secs(5), accept_failed),
        "the idle clients took every descriptor"
    );
    let queued = send_request(proxy.port);

    drop(idle);
    assert_eq!(answer_of(queued), 200, "the queued client served");
    assert_eq!(get(proxy.port, "/", &[]).status, 200);
    assert_eq!(get(config.admin_port, "/healthz", &[]).status, 200);
}

/// An `accept4` that fails with ENFILE while the file named by
/// `ACCEPT_FAILS_WHILE` exists.
const ENFILE_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/socket.h>
int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    const char *toggle = getenv("ACCEPT_FAILS_WHILE");
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    if (toggle && access(toggle, F_OK) == 0) { errno = ENFILE; return -1; }
    return real(fd, addr, len, flags);
}
"#;

/// The shim built into `dir`; `None` without a C compiler.
fn enfile_shim(dir: &Path) -> Option<std::path::PathBuf> {
    let source = dir.join("enfile.c");
    let shim = dir.join("enfile.so");
    std::fs::write(&source, ENFILE_SHIM).unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .status();
    built.is_ok_and(|status| status.success()).then_some(shim)
}

/// While accept() fails at once, again and again, the log gets a line a
/// second, not one a failure; the proxy serves as soon as it succeeds.
#[test]
fn accept_failing_at_once_is_logged_once_a_second() {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    let dir = config.path().parent().unwrap().to_path_buf();
    let Some(shim) = enfile_shim(&dir) else {
        eprintln!("SKIPPED: no C compiler (cc) to build the accept4 shim");
        return;
    };
    let failing = dir.join("accept-fails");
    config
        .env
        .push(("LD_PRELOAD".into(), shim.display().to_string()));
    config
        .env
        .push(("ACCEPT_FAILS_WHILE".into(), failing.display().to_string()));
    let log = dir.join("proxy.log");
    let proxy = config.spawn("warn", std::fs::File::create(&log).unwrap());
    let failures = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("Too many open files in system")
            .count()
    };

    std::fs::write(&failing, "").unwrap();
    let queued = send_request(proxy.port);
    assert!(
        eventually(Duration::from_secs(5), || failures() > 0),
        "accept() never failed: the shim needs a dynamically linked binary"
    );
    std::thread::sleep(Duration::from_secs(2));
    let logged = failures();
    std::fs::remove_file(&failing).unwrap();
    assert!(logged <= 4, "{logged} accept failures logged in about 2 s");

    assert_eq!(answer_of(queued), 200, "the queued client served");
}
