//! TLS: HTTPS listeners (`[server] tls_cert`/`tls_key`), HTTPS to the
//! upstream (`[upstream] tls`, `sni`, `ca_file`) and `rediss://`, end to
//! end. A test CA is made for each test; the client is rustls, the
//! upstream is the Python test upstream behind `ssl`, the Redis server one
//! `redis-server` with TLS of the test's own.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use support::test_ca::TestCa;
use support::*;

fn path_text(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A TLS connection to the proxy on 127.0.0.1, the handshake done.
fn connect(client: Arc<ClientConfig>, port: u16) -> StreamOwned<ClientConnection, TcpStream> {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let connection = ClientConnection::new(client, name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut stream = StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake with the proxy");
    }
    stream
}

/// One HTTPS request on a connection of its own (`Connection: close`).
fn https_get(
    client: &Arc<ClientConfig>,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Response {
    let mut stream = connect(client.clone(), port);
    let mut head =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify: what came is whole here,
        // the response's framing says so.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {}
        Err(e) => panic!("reading the HTTPS answer: {e}"),
    }
    parse_response(&raw, false).expect("an HTTP answer over TLS")
}

/// An HTTPS proxy with a certificate for 127.0.0.1, in front of `upstream`.
fn https_proxy(ca: &TestCa, upstream_port: u16) -> ProxyConfig {
    let (cert, key) = ca.issue("proxy", &["localhost", "127.0.0.1"]);
    ProxyConfig::new(upstream_port)
        .server(&format!("tls_cert = {}", path_text(&cert)))
        .server(&format!("tls_key = {}", path_text(&key)))
        .session("secure = true")
}

#[test]
fn an_https_listener_serves_sessions() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let _proxy = config.start();
    let client = ca.client(&[]);

    let first = https_get(&client, config.port, "/count", &[]);
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "1");
    let cookie = first.set_cookie("session_id").expect("a session cookie");
    let set_cookie = first.header("set-cookie").unwrap();
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");

    let jar = format!("session_id={cookie}");
    let second = https_get(&client, config.port, "/count", &[("Cookie", &jar)]);
    assert_eq!(second.text(), "2");
    let third = https_get(&client, config.port, "/x", &[("Cookie", &jar)]);
    assert_eq!(third.session()["data"]["count"], 2);
    assert_eq!(
        third.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
}

#[test]
fn with_http2_off_the_https_listener_offers_http_1_1_only() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).server("http2 = false");
    let _proxy = config.start();

    let stream = connect(ca.client(&[b"h2", b"http/1.1"]), config.port);
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[test]
fn plain_http_to_the_https_port_gets_no_answer_and_no_error_line() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port);
    let log = config.dir.path().join("proxy.log");
    let _proxy = config.start_logging("info", &log);

    let answer = raw_exchange(
        config.port,
        b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(raw_status(&answer), None, "{answer:?}");
    // A client that distrusts the certificate fails its handshake.
    assert!(!trusts(&TestCa::new(), config.port));

    // The listener still serves.
    let served = https_get(&ca.client(&[]), config.port, "/x", &[]);
    assert_eq!(served.status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ERROR"), "{text}");
}

#[test]
fn bad_tls_files_are_config_errors() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("proxy", &["127.0.0.1"]);
    let (_other_cert, other_key) = ca.issue("other", &["127.0.0.1"]);
    let not_pem = ca.dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    // Copied in part, as a file cut short in transit is.
    let cut = |path: &std::path::Path, name: &str| {
        let whole = std::fs::read(path).unwrap();
        let cut = ca.dir.path().join(name);
        std::fs::write(&cut, &whole[..100]).unwrap();
        cut
    };
    let (cut_cert, cut_key) = (cut(&cert, "cut.crt"), cut(&key, "cut.key"));
    let cut_short = "ends before the line \"-----END";

    let cases = [
        (&not_pem, &key, "no certificate found", "server.tls_cert"),
        (&cut_cert, &key, cut_short, "server.tls_cert"),
        (&cert, &not_pem, "no private key", "server.tls_key"),
        (&cert, &cut_key, cut_short, "server.tls_key"),
        (
            &cert,
            &other_key,
            "not a key for this certificate",
            "server.tls_key",
        ),
    ];
    for (cert, key, expected, named) in cases {
        let config = ProxyConfig::new(free_port())
            .server(&format!("tls_cert = {}", path_text(cert)))
            .server(&format!("tls_key = {}", path_text(key)));
        let path = config.write();
        for command in ["run", "check"] {
            let output = run_cli(&[command, "-c", path.to_str().unwrap()], &[]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
            assert!(stderr.contains(named), "{stderr}");
            assert!(stderr.contains(expected), "{expected}: {stderr}");
        }
    }

    let config = ProxyConfig::new(free_port())
        .server(&format!("tls_cert = {}", path_text(&cert)))
        .server(&format!("tls_key = {}", path_text(&key)));
    let path = config.write();
    let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

/// The test upstream over HTTPS with a certificate for `names`.
fn https_upstream(ca: &TestCa, names: &[&str]) -> Process {
    let (cert, key) = ca.issue("upstream", names);
    start_upstream_with(&["--tls", cert.to_str().unwrap(), key.to_str().unwrap()])
}

#[test]
fn an_https_upstream_is_verified_against_ca_file() {
    let ca = TestCa::new();
    let upstream = https_upstream(&ca, &["127.0.0.1"]);
    let config = ProxyConfig::new(upstream.port)
        .upstream("tls = true")
        .upstream(&format!("ca_file = {}", path_text(&ca.ca_file())));
    let _proxy = config.start();

    let mut browser = Browser::new(config.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
    let echoed = browser.get("/x", &[]);
    assert_eq!(echoed.session()["data"]["count"], 2);
    // An IP address is checked against the certificate, and is no SNI.
    assert_eq!(echoed.json()["sni"], serde_json::Value::Null);
}

#[test]
fn an_https_upstream_must_carry_the_name_asked_for() {
    let ca = TestCa::new();
    let upstream = https_upstream(&ca, &["app.internal"]);
    let ca_file = format!("ca_file = {}", path_text(&ca.ca_file()));

    // sni = "": the certificate must name the address, 127.0.0.1.
    let config = ProxyConfig::new(upstream.port)
        .upstream("tls = true")
        .upstream(&ca_file);
    let proxy = config.start();
    assert_eq!(get(config.port, "/x", &[]).status, 502);
    drop(proxy);

    let config = ProxyConfig::new(upstream.port)
        .upstream("tls = true")
        .upstream(&ca_file)
        .upstream("sni = \"app.internal\"");
    let _proxy = config.start();
    let served = get(config.port, "/x", &[]);
    assert_eq!(served.status, 200);
    assert_eq!(served.json()["sni"], "app.internal");
}

#[test]
fn an_https_upstream_signed_by_an_unknown_ca_is_refused() {
    let ca = TestCa::new();
    let upstream = https_upstream(&ca, &["127.0.0.1"]);
    // No ca_file: the system's CAs, which do not know the test CA.
    let config = ProxyConfig::new(upstream.port).upstream("tls = true");
    let _proxy = config.start();
    let mut browser = Browser::new(config.port);
    let refused = browser.get("/count", &[]);
    assert_eq!(refused.status, 502);
    assert_eq!(refused.set_cookie("session_id"), None);

    // Nor does TLS to a plain HTTP upstream go through.
    let plain = start_upstream();
    let other_ca = TestCa::new();
    let config = ProxyConfig::new(plain.port)
        .upstream("tls = true")
        .upstream(&format!("ca_file = {}", path_text(&other_ca.ca_file())));
    let _proxy = config.start();
    assert_eq!(get(config.port, "/x", &[]).status, 502);
}

#[test]
fn ca_file_without_tls_or_unreadable_is_a_config_error() {
    let ca = TestCa::new();
    let not_pem = ca.dir.path().join("not.pem");
    std::fs::write(&not_pem, "nothing here\n").unwrap();
    let cases = [
        ("tls = false", ca.ca_file(), "upstream.tls = false"),
        ("tls = true", not_pem, "no certificate found"),
    ];
    for (tls, ca_file, expected) in cases {
        let config = ProxyConfig::new(free_port())
            .upstream(tls)
            .upstream(&format!("ca_file = {}", path_text(&ca_file)));
        let path = config.write();
        let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("upstream.ca_file"), "{stderr}");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

/// A `redis-server` speaking only TLS with a certificate of `ca`, on a
/// port of its own; `None` (with a loud skip) when it is not installed,
/// except under `SESSION_PROXY_REQUIRE_SERVICES=1`.
fn redis_over_tls(ca: &TestCa) -> Option<Process> {
    if !redis_server_installed("rediss://") {
        return None;
    }
    let (cert, key) = ca.issue("redis", &["127.0.0.1"]);
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .args(["--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(ca.ca_file())
        .args(["--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .current_dir(ca.dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    wait_listening(port, &mut child);
    Some(Process { child, port })
}

#[test]
fn a_redis_store_over_tls_checks_the_servers_certificate() {
    let ca = TestCa::new();
    let Some(redis) = redis_over_tls(&ca) else {
        return;
    };
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port)
        .store("kind = \"redis\"")
        .store(&format!("url = \"rediss://127.0.0.1:{}\"", redis.port));
    let path = config.write();
    let path = path.to_str().unwrap();

    // The system's CAs do not know the test CA: the store is unreachable.
    let output = run_cli(&["check", "-c", path], &[("SSL_CERT_FILE", "/nonexistent")]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let ca_file = ca.ca_file().display().to_string();
    let output = run_cli(&["check", "-c", path], &[("SSL_CERT_FILE", &ca_file)]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");

    config.env.push(("SSL_CERT_FILE".into(), ca_file));
    let _proxy = config.start();
    let mut browser = Browser::new(config.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
    let handle = handle_of(browser.cookie.as_deref().unwrap());
    let sessions = run_cli(
        &["sessions", "show", &handle, "-c", path],
        &[("SSL_CERT_FILE", &ca.ca_file().display().to_string())],
    );
    let record: serde_json::Value = serde_json::from_slice(&sessions.stdout).unwrap();
    assert_eq!(record["data"]["count"], 2, "{sessions:?}");
}

/// Whether a client trusting `ca` alone completes a handshake with the
/// proxy on `port`.
fn trusts(ca: &TestCa, port: u16) -> bool {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut connection = ClientConnection::new(ca.client(&[]), name).unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        match connection.complete_io(&mut tcp) {
            Ok(_) if connection.is_handshaking() => continue,
            outcome => return outcome.is_ok(),
        }
    }
}

#[test]
fn sighup_renews_the_listeners_certificate_and_keeps_it_on_a_bad_file() {
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let upstream = start_upstream();
    let config = https_proxy(&old_ca, upstream.port);
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("info", &log);
    assert!(trusts(&old_ca, config.port));
    assert!(!trusts(&new_ca, config.port));

    // The files the config names, rewritten with a certificate of the new CA.
    let (cert, key) = new_ca.issue("renewed", &["127.0.0.1"]);
    let served = old_ca.dir.path();
    std::fs::copy(&cert, served.join("proxy.pem")).unwrap();
    std::fs::copy(&key, served.join("proxy.key")).unwrap();
    assert!(!trusts(&new_ca, config.port), "renewed before SIGHUP");
    signal(proxy.child.id(), "HUP");
    assert!(eventually(Duration::from_secs(5), || trusts(
        &new_ca,
        config.port
    )));
    assert!(!trusts(&old_ca, config.port));
    let response = https_get(&new_ca.client(&[]), config.port, "/count", &[]);
    assert_eq!(response.text(), "1");

    // A broken file: the renewed certificate stays, and the log says why.
    std::fs::write(served.join("proxy.pem"), "half a certificate").unwrap();
    signal(proxy.child.id(), "HUP");
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("certificate kept"))
    }));
    assert!(trusts(&new_ca, config.port));
}

#[test]
fn sighup_without_tls_leaves_the_proxy_serving() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    signal(proxy.child.id(), "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(config.port, "/x", &[]).status, 200);
}

#[test]
fn the_certificates_expiry_is_exported_and_an_expired_one_is_warned_of() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let (cert, key) = ca.issue_until("proxy", &["127.0.0.1"], (2020, 1, 1));
    let config = ProxyConfig::new(upstream.port)
        .server(&format!("tls_cert = {}", path_text(&cert)))
        .server(&format!("tls_key = {}", path_text(&key)))
        .session("secure = true");
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("info", &log);
    let metric = |port: u16| {
        get(port, "/metrics", &[]).text().lines().find_map(|line| {
            line.strip_prefix("session_proxy_tls_certificate_not_after_seconds ")
                .map(str::to_string)
        })
    };
    assert_eq!(metric(config.admin_port).as_deref(), Some("1577836800"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("WARN") && text.contains("EXPIRED"), "{text}");

    // Renewed: the metric follows.
    let (renewed_cert, renewed_key) = ca.issue_until("renewed", &["127.0.0.1"], (2099, 1, 1));
    std::fs::copy(&renewed_cert, &cert).unwrap();
    std::fs::copy(&renewed_key, &key).unwrap();
    signal(proxy.child.id(), "HUP");
    assert!(eventually(Duration::from_secs(5), || {
        metric(config.admin_port).as_deref() == Some("4070908800")
    }));

    // Without TLS, no such metric.
    let plain = ProxyConfig::new(upstream.port);
    let _plain = plain.start();
    assert_eq!(metric(plain.admin_port), None);
}

#[test]
fn https_listeners_with_cookies_not_secure_are_warned_of() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).session("secure = false");
    let log = config.dir.path().join("proxy.log");
    let _proxy = config.start_logging("warn", &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN") && text.contains("session.secure = false"),
        "{text}"
    );
}

/// As on plain HTTP (tests/hostile_clients.rs): a client that asks for
/// responses without a body one after the other and reads none is cut off
/// after `send_timeout`. On TLS, besides the head, the `close_notify` of a
/// `Connection: close` waits for the client untimed by pingora.
#[test]
fn an_https_client_that_stops_reading_responses_without_body_is_cut_off() {
    let ca = TestCa::new();
    let upstream = start_upstream();
    let config = https_proxy(&ca, upstream.port).server("send_timeout = 1");
    let _proxy = config.start();

    let pad = "p".repeat(60_000);
    let head = format!("HEAD /x HTTP/1.1\r\nHost: x\r\nX-Test-Header: X-Pad: {pad}\r\n\r\n");
    let mut stream = connect(ca.client(&[]), config.port);
    let raw = stream.sock.try_clone().unwrap();
    assert!(send_until_a_response_stalls(
        &mut stream,
        &raw,
        config.port,
        head.as_bytes()
    ));
    let closed = eventually(Duration::from_secs(8), || {
        held_connections(config.port) == 0
    });
    assert!(
        closed,
        "the HTTPS connection of a client that reads nothing is still held"
    );
    assert_eq!(
        https_get(&ca.client(&[]), config.port, "/x", &[]).status,
        200
    );
}

/// `SSL_CERT_FILE`/`SSL_CERT_DIR` (README: how to trust a private CA for
/// `rediss://`) name the CAs pingora loads for the upstream when the proxy
/// starts, whether or not the upstream speaks TLS; one that cannot be read
/// made `run` panic (exit 101) after `check` had said ok.
#[test]
fn an_unusable_ssl_cert_file_is_no_panic() {
    let upstream = start_upstream();
    // Both set (neither rescues the other), to nothing readable.
    let missing = [
        ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
        ("SSL_CERT_DIR", "/nonexistent/certs"),
    ];

    // No TLS to the upstream: the CAs are not needed, the proxy serves.
    let mut config = ProxyConfig::new(upstream.port);
    for (name, value) in missing {
        config.env.push((name.into(), value.into()));
    }
    let _proxy = config.start();
    assert_eq!(get(config.port, "/x", &[]).status, 200);

    // TLS with the system's CAs: a config error, from `check` and `run` alike.
    let config = ProxyConfig::new(upstream.port).upstream("tls = true");
    let path = config.write();
    for command in ["check", "run"] {
        let output = run_cli(&[command, "-c", path.to_str().unwrap()], &missing);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("upstream."), "{command}: {stderr}");
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
    }
}

/// A `ca_file` holding more than certificates (a key, as in a combined
/// PEM) passed `check`, and `run` panicked in pingora, which refuses it.
#[test]
fn check_and_run_agree_on_a_ca_file() {
    let ca = TestCa::new();
    let combined = ca.dir.path().join("combined.pem");
    std::fs::write(
        &combined,
        format!("{}{}", ca.cert.pem(), ca.key.serialize_pem()),
    )
    .unwrap();
    let config = ProxyConfig::new(free_port())
        .upstream("tls = true")
        .upstream(&format!("ca_file = {}", path_text(&combined)));
    let path = config.write();
    let mut codes = Vec::new();
    for command in ["check", "run"] {
        let output = run_cli(&[command, "-c", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
        codes.push((command, output.status.code(), stderr));
    }
    for (command, code, stderr) in &codes {
        assert_eq!(*code, Some(2), "{command}: {stderr}");
        assert!(stderr.contains("upstream.ca_file"), "{command}: {stderr}");
    }
}
/// An `sni` that is no server name (a port, a scheme) failed every request
/// at run time with a 502, after `check` had said ok.
#[test]
fn an_sni_that_is_no_server_name_is_a_config_error() {
    let ca = TestCa::new();
    for sni in ["app.internal:8443", "https://app.internal", "app internal"] {
        let config = ProxyConfig::new(free_port())
            .upstream("tls = true")
            .upstream(&format!("ca_file = {}", path_text(&ca.ca_file())))
            .upstream(&format!("sni = {sni:?}"));
        let path = config.write();
        let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{sni}: {stderr}");
        assert!(stderr.contains("upstream.sni"), "{sni}: {stderr}");
    }
}

/// A bad key file is named as `server.tls_key`, at its line (SPEC [1]),
/// not as `server.tls_cert`.
#[test]
fn a_bad_key_file_is_named_as_tls_key() {
    let ca = TestCa::new();
    let (cert, _key) = ca.issue("proxy", &["127.0.0.1"]);
    let (_other_cert, other_key) = ca.issue("other", &["127.0.0.1"]);
    let not_pem = ca.dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a key\n").unwrap();
    for key in [&not_pem, &other_key] {
        let config = ProxyConfig::new(free_port())
            .server(&format!("tls_cert = {}", path_text(&cert)))
            .server(&format!("tls_key = {}", path_text(key)));
        let path = config.write();
        let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("server.tls_key"), "{stderr}");
    }
}
