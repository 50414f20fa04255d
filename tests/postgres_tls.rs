//! The PostgreSQL store over TLS (README, "TLS"): libpq's `sslmode` and
//! `sslrootcert` in the store URL, through the real binary.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (database `test`, trust auth) with
//! `ssl = on` and Debian's snakeoil certificate, self-signed for the name
//! `localhost`, which serves as its own CA here. Without it each test that
//! needs it is skipped loudly, unless `SESSION_PROXY_REQUIRE_SERVICES=1`,
//! where they fail. The config errors need no server.
//!
//! Every port a test listens on is a fixed one of 19200-19299, each test
//! its own; but the cut test's, which come from `support::free_port`.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use support::*;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn postgres_available() -> bool {
    if TcpStream::connect(("127.0.0.1", 5432)).is_ok() && std::path::Path::new(SNAKEOIL).exists() {
        return true;
    }
    assert!(
        std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "PostgreSQL with TLS is required (SESSION_PROXY_REQUIRE_SERVICES=1) but 127.0.0.1:5432 or {SNAKEOIL} is missing"
    );
    eprintln!(
        "\n!!! SKIPPED: PostgreSQL is not reachable on 127.0.0.1:5432 (or {SNAKEOIL} is missing); this test did not run !!!\n"
    );
    false
}

/// A table of this test's own, dropped with the guard.
struct Table(String);

impl Table {
    fn new(tag: &str) -> Table {
        Table(format!("sessions_pgtls_{tag}_{}", std::process::id()))
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = query(&format!("DROP TABLE IF EXISTS {}", self.0));
    }
}

/// Runs `sql` on the test database over a plain connection of the test's
/// own; the rows' first columns as text.
fn query(sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable";
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let rows = client.simple_query(sql).await?;
        Ok(rows
            .iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .collect())
    })
}

/// A proxy config on the store `postgres://postgres:hunter2@{url_tail}`
/// and `table`, listening on `base` (admin `base + 1`) before an upstream
/// on `base + 2`. The password (trust auth ignores it) must show nowhere.
fn config(base: u16, table: &str, url_tail: &str) -> ProxyConfig {
    let mut config = ProxyConfig {
        dir: TempDir::new("pgtls"),
        port: base,
        admin_port: base + 1,
        upstream_port: base + 2,
        more_upstreams: Vec::new(),
        session: vec![format!("secret_keys = [{KEY:?}]")],
        store: vec![],
        server: vec!["grace_period = 1".into()],
        upstream: vec!["read_timeout = 5".into(), "connect_timeout = 1".into()],
        headers: vec![],
        env: vec![],
        listen_host: "127.0.0.1".into(),
    };
    config.store = vec![
        "kind = \"postgres\"".into(),
        format!("url = \"postgres://postgres:hunter2@{url_tail}\""),
        format!("table = \"{table}\""),
        "timeout = 2".into(),
    ];
    config
}

fn check(config: &ProxyConfig) -> (Option<i32>, String) {
    let output = run_cli(&["check", "-c", config.write().to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("hunter2"),
        "the URL is not shown: {stderr}"
    );
    (output.status.code(), stderr)
}

/// A CA that signed nothing the server holds.
fn unrelated_ca(dir: &TempDir) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let path = dir.path().join("unrelated-ca.pem");
    std::fs::write(&path, cert.pem()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn verify_full_checks_the_chain_and_the_name_in_host() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("full");
    let tls = format!("sslmode=verify-full&sslrootcert={SNAKEOIL}");
    let by_name = config(19200, &table.0, &format!("localhost:5432/test?{tls}"));
    assert_eq!(check(&by_name), (Some(0), String::new()));
    // hostaddr picks the address; the name checked is still host's.
    let by_address = config(
        19200,
        &table.0,
        &format!("localhost:5432/test?hostaddr=127.0.0.1&{tls}"),
    );
    assert_eq!(check(&by_address), (Some(0), String::new()));
    let wrong_name = config(19200, &table.0, &format!("127.0.0.1:5432/test?{tls}"));
    let (code, stderr) = check(&wrong_name);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("not valid for name \"127.0.0.1\""),
        "{stderr}"
    );
}

/// Without `sslrootcert`, the system's CAs: Debian links the snakeoil
/// certificate into /etc/ssl/certs, so it verifies until that directory
/// is left out.
#[test]
fn verify_full_without_a_root_cert_takes_the_systems_cas() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("system");
    let config = config(19280, &table.0, "localhost:5432/test?sslmode=verify-full");
    let path = config.write();
    let empty = TempDir::new("pgtls-no-cas");
    for (cert_dir, code) in [("/etc/ssl/certs", 0), (empty.path().to_str().unwrap(), 1)] {
        let env = [
            ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            ("SSL_CERT_DIR", cert_dir),
        ];
        let output = run_cli(&["check", "-c", path.to_str().unwrap()], &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{cert_dir}: {stderr}");
    }
}

#[test]
fn verify_ca_checks_the_chain_and_not_the_name() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("ca");
    for tls in ["sslmode=verify-ca", "sslmode=require"] {
        let url = format!("127.0.0.1:5432/test?{tls}&sslrootcert={SNAKEOIL}");
        assert_eq!(
            check(&config(19210, &table.0, &url)),
            (Some(0), String::new())
        );
    }
}

#[test]
fn a_certificate_of_another_ca_is_refused() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("other");
    let dir = TempDir::new("pgtls-ca");
    let ca = unrelated_ca(&dir);
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = format!("localhost:5432/test?sslmode={mode}&sslrootcert={ca}");
        let (code, stderr) = check(&config(19220, &table.0, &url));
        assert_eq!(code, Some(1), "{mode}: {stderr}");
        assert!(stderr.contains("UnknownIssuer"), "{mode}: {stderr}");
    }
}

#[test]
fn require_without_a_root_cert_takes_any_certificate_and_warns() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("require");
    let (code, stderr) = check(&config(
        19230,
        &table.0,
        "127.0.0.1:5432/test?sslmode=require",
    ));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.matches("WARN").count(), 1, "{stderr}");
    assert!(
        stderr.contains("not verified") && stderr.contains("verify-full"),
        "{stderr}"
    );
}

/// Every connection the running proxy opens, its pools' and the one that
/// holds `lock = true`'s leases, speaks TLS when the URL asks for it and
/// only then.
#[test]
fn run_uses_tls_on_every_store_connection_when_asked() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("run");
    let _upstream = start_upstream_with(&["--port", "19242"]);
    let cases = [
        (format!("sslmode=verify-full&sslrootcert={SNAKEOIL}"), "t"),
        ("sslmode=require".to_string(), "t"),
        ("sslmode=prefer".to_string(), "f"),
        ("sslmode=disable".to_string(), "f"),
        ("connect_timeout=5".to_string(), "f"),
    ];
    for (index, (tls, ssl)) in cases.iter().enumerate() {
        let application = format!("pgtls_run_{index}_{}", std::process::id());
        let url = format!("localhost:5432/test?application_name={application}&{tls}");
        let proxy = config(19240, &table.0, &url).session("lock = true").start();
        let mut browser = Browser::new(proxy.port);
        assert_eq!(browser.get("/count", &[]).text(), "1", "{tls}");
        assert_eq!(browser.get("/count", &[]).text(), "2", "{tls}");
        let connections = query(&format!(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = '{application}'"
        ))
        .unwrap();
        // A pool's connection and the leases' connection, at least.
        assert!(connections.len() >= 2, "{tls}: {connections:?}");
        assert!(
            connections.iter().all(|used| used == ssl),
            "{tls}: {connections:?}"
        );
        drop(proxy);
    }
}

#[test]
fn sessions_lists_over_tls_and_not_past_a_bad_certificate() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("sessions");
    let tls = format!("sslmode=verify-full&sslrootcert={SNAKEOIL}");
    for (host, code) in [("localhost", Some(0)), ("127.0.0.1", Some(1))] {
        let config = config(19250, &table.0, &format!("{host}:5432/test?{tls}"));
        let output = run_cli(
            &["sessions", "list", "-c", config.write().to_str().unwrap()],
            &[],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), code, "{host}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
}

/// A server that answers PostgreSQL's TLS request with "no" (as one with
/// `ssl = off` does), on 127.0.0.1:`port`.
fn refuses_tls(port: u16) -> std::thread::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0; 8];
        stream.read_exact(&mut request).unwrap();
        stream.write_all(b"N").unwrap();
    })
}

#[test]
fn a_server_without_tls_is_unreachable_under_require() {
    // Not joined: a check that never connects must fail here, not hang.
    let _server = refuses_tls(19262);
    let (code, stderr) = check(&config(
        19260,
        "unused",
        "127.0.0.1:19262/test?sslmode=require",
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("server does not support TLS"), "{stderr}");
}

#[test]
fn bad_tls_settings_are_config_errors_naming_them() {
    let dir = TempDir::new("pgtls-bad");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    for (tls, problem) in [
        ("sslmode=verify_full", "sslmode: expected"),
        ("sslrootcert=system&sslmode=require", "sslrootcert=system"),
        (
            &format!("sslmode=verify-ca&sslrootcert={not_pem}"),
            "no certificate found",
        ),
        (
            &format!("sslmode=require&sslrootcert={missing}"),
            "No such file",
        ),
    ] {
        let (code, stderr) = check(&config(19270, "unused", &format!("127.0.0.1:1/test?{tls}")));
        assert_eq!(code, Some(2), "{tls}: {stderr}");
        assert!(stderr.contains("store.url: "), "{tls}: {stderr}");
        assert!(stderr.contains(problem), "{tls}: {stderr}");
    }
}

/// Over TLS (`verify-full`), the store's connections are cut in the middle
/// of a reply, so in the middle of a TLS record (half of what the server
/// sent, then the connection closed without `close_notify`), at a
/// different point each time: the TLS handshake of a new connection, a
/// load's reply, a write's, a lease's (`lock = true`). The client gets a
/// 200 or the 503 within twice the store timeout, never a 500, a hang, or a
/// new session in place of its own; a change whose 200 went out is never
/// lost; the proxy does not panic, and it reconnects by itself.
#[test]
fn a_reply_cut_in_the_middle_of_a_tls_record_is_a_503_and_the_proxy_reconnects() {
    if !postgres_available() {
        return;
    }
    let table = Table::new("cut");
    let relay = Relay::start("127.0.0.1:5432");
    let upstream = start_upstream();
    let application = format!("pgtls_cut_{}", std::process::id());
    let config = ProxyConfig::new(upstream.port)
        .store("kind = \"postgres\"")
        .store(&format!(
            "url = \"postgres://postgres@localhost:{}/test?sslmode=verify-full&\
             sslrootcert={SNAKEOIL}&application_name={application}\"",
            relay.port
        ))
        .store(&format!("table = \"{}\"", table.0))
        .store("timeout = 1")
        .session("timeout = 600")
        .session("lock = true");
    let log_path = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("warn", &log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let bound = std::time::Duration::from_millis(2 * 1000 + 1500);
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let encrypted = query(&format!(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = '{application}'"
    ))
    .unwrap();
    assert!(
        !encrypted.is_empty() && encrypted.iter().all(|ssl| ssl == "t"),
        "the store's connections are not all TLS: {encrypted:?}"
    );
    let reads = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3];
    let CutReplies {
        acknowledged,
        failed,
        ..
    } = count_through_cut_replies(&mut browser, &relay, &reads, bound, 1);
    eprintln!("{} cuts, {failed} 503s", relay.cuts());
    assert!(relay.cuts() >= 8, "only {} replies were cut", relay.cuts());
    assert!(failed > 0, "no request failed: no test");
    let log = log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(get(config.admin_port, "/healthz", &[]).status, 200);
    assert_eq!(
        browser.get("/count", &[]).text(),
        (acknowledged + 1).to_string()
    );
}
