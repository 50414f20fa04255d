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

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
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
    let mut queued = connect(proxy.port);
    queued
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    queued
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();

    drop(idle);
    let mut raw = Vec::new();
    queued
        .read_to_end(&mut raw)
        .expect("the queued client served");
    assert_eq!(parse_response(&raw, false).unwrap().status, 200);
    assert_eq!(get(proxy.port, "/", &[]).status, 200);
    assert_eq!(get(config.admin_port, "/healthz", &[]).status, 200);
}
