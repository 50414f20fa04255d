//! One behaviour per test. Configs are parsed from text, with the secret
//! keys passed as the environment would give them, so no test touches the
//! real (process-global) environment.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::json;

use super::*;

/// 32 bytes: the shortest key accepted.
const KEY: &str = "0123456789abcdef0123456789abcdef";
const UPSTREAM: &str = "[upstream]\naddresses = [\"127.0.0.1:8000\"]\n";

/// `text` followed by a valid `[upstream]`, with `KEY` from the environment.
fn config(text: &str) -> Result<Config, ConfigError> {
    parse(
        &format!("{text}\n{UPSTREAM}"),
        Path::new("test.toml"),
        Some(KEY),
    )
}

fn error(text: &str) -> String {
    config(text).expect_err("config should be refused").message
}

fn error_without_env_keys(text: &str) -> String {
    parse(text, Path::new("test.toml"), None)
        .expect_err("config should be refused")
        .message
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

// Defaults and the shipped file

#[test]
fn absent_sections_take_the_spec_defaults() {
    let config = config("").expect("valid");
    assert_eq!(config.file, Path::new("test.toml"));

    let server = &config.server;
    assert_eq!(server.listen, vec![addr("127.0.0.1:8080")]);
    assert!(server.threads >= 1);
    assert!(server.admin_listen.is_empty());
    assert!(server.trusted_proxies.is_empty());
    assert!(server.tls.is_none());
    assert_eq!(server.grace_period, 10);
    assert_eq!((server.header_timeout, server.keepalive_timeout), (10, 60));
    assert_eq!((server.send_timeout, server.body_timeout), (60, 60));
    assert!(server.upgrade_sock.is_none());
    assert!(server.http2);

    let upstream = &config.upstream;
    assert_eq!(upstream.addresses, vec![addr("127.0.0.1:8000")]);
    assert!(!upstream.tls);
    assert_eq!(upstream.sni, "");
    assert_eq!(upstream.hosts, vec!["127.0.0.1"]);
    assert_eq!(upstream.ca_file, None);
    assert_eq!((upstream.connect_timeout, upstream.read_timeout), (2, 30));
    assert!(!upstream.reuse_after_body);

    let session = &config.session;
    assert_eq!(session.secret_keys, vec![KEY.to_owned()]);
    let cookie = &session.cookie;
    assert_eq!(cookie.name, "session_id");
    assert_eq!(cookie.domain, None);
    assert_eq!(cookie.path, "/");
    assert_eq!(cookie.max_age, 0);
    assert!(!cookie.secure);
    assert!(cookie.httponly);
    assert_eq!(cookie.samesite, SameSite::Lax);
    assert_eq!(session.timeout, 86400);
    assert_eq!(session.absolute_timeout, None);
    assert_eq!(session.touch_interval, 60);
    assert!(session.ignore_expiry);
    assert!(session.ignore_change_ip);
    assert_eq!(session.expired_message, "Session expired");
    assert_eq!(session.expired_status, 200);
    assert!(session.initializer.is_empty());
    assert!(!session.save_uninitialized);
    assert_eq!(session.max_data_bytes, 4096);
    assert!(!session.lock);
    assert!(session.bypass.is_empty());

    let headers = &config.headers;
    assert_eq!(headers.session, "x-session");
    assert_eq!(headers.update, "x-session-update");
    assert_eq!(headers.action, "x-session-action");
    assert_eq!(headers.token_ttl, 60);

    let store = &config.store;
    assert_eq!(store.kind, StoreKind::Disk);
    assert_eq!(store.path, Path::new("sessions"));
    assert_eq!(store.url, "");
    assert_eq!(store.table, "sessions");
    assert_eq!(store.key_prefix, "session:");
    assert_eq!(store.sweep_interval, 60);
    assert_eq!(store.max_entries, 1_000_000);
    assert!(!store.fsync);
}

fn shipped_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_PATH)
}

#[test]
fn shipped_config_loads_with_keys_from_the_environment() {
    let config = load_with_env(&shipped_config(), Some(KEY)).expect("shipped config is valid");
    assert_eq!(config.server.listen, vec![addr("127.0.0.1:8080")]);
    assert_eq!(config.upstream.addresses, vec![addr("127.0.0.1:8000")]);
    assert_eq!(
        config.session.initializer,
        json!({"count": 0}).as_object().cloned().expect("object")
    );
    assert_eq!(config.store.kind, StoreKind::Disk);
    assert_eq!(config.store.path, Path::new("sessions"));
}

#[test]
fn shipped_config_has_no_secret_of_its_own() {
    let message = load_with_env(&shipped_config(), None)
        .expect_err("no key")
        .message;
    assert!(message.contains("session-proxy keygen"), "{message}");
    assert!(message.contains(SECRET_KEYS_ENV), "{message}");
}

#[test]
fn a_file_that_is_not_utf8_is_named_as_such() {
    let path =
        std::env::temp_dir().join(format!("session-proxy-latin1-{}.toml", std::process::id()));
    std::fs::write(&path, b"[session]\ncookie_name = \"caf\xe9\"\n").expect("temp file");
    let message = load_with_env(&path, Some(KEY))
        .expect_err("not UTF-8")
        .message;
    let _ = std::fs::remove_file(&path);
    assert!(
        message.contains("is not UTF-8 text; save it as UTF-8"),
        "{message}"
    );
    assert!(!message.contains("create it"), "{message}");
}

#[test]
fn missing_file_names_the_path_and_the_fix() {
    let message = load_with_env(Path::new("/nonexistent/x.toml"), Some(KEY))
        .expect_err("no file")
        .message;
    assert!(message.starts_with("/nonexistent/x.toml: "), "{message}");
    assert!(message.contains("-c FILE"), "{message}");
}

// Errors from the TOML layer: file, line:column, key

#[test]
fn unknown_key_is_reported_with_file_line_column_and_key() {
    let message = error("[server]\nthreads = 2\nlisten_on = \"x\"\n");
    assert!(
        message
            .starts_with("test.toml:3:1: server.listen_on: unknown key, expected one of `listen`"),
        "{message}"
    );
}

#[test]
fn unknown_section_is_reported() {
    let message = error("[sever]\nlisten = \"127.0.0.1:1\"\n");
    assert!(
        message.starts_with("test.toml:1:2: sever: unknown section, expected one of `server`"),
        "{message}"
    );
}

#[test]
fn wrong_type_is_reported_with_expected_and_found() {
    let message = error("[session]\ntimeout = \"1h\"\n");
    assert_eq!(
        message,
        "test.toml:2:11: session.timeout: expected a non-negative integer, found string \"1h\""
    );
}

#[test]
fn negative_number_is_a_wrong_value() {
    let message = error("[server]\ngrace_period = -1\n");
    assert!(
        message.starts_with("test.toml:2:16: server.grace_period: expected a non-negative integer"),
        "{message}"
    );
}

/// web.py writes the access time on every request; the proxy at most every
/// touch_interval, which at the idle timeout or more expires sessions in
/// use (a timeout of 60 with the default interval did).
#[test]
fn touch_interval_must_be_shorter_than_the_idle_timeout() {
    let message = error("[session]\ntimeout = 60");
    assert!(
        message
            .contains("session.touch_interval: expected less than session.timeout (60), found 60"),
        "{message}"
    );
    let message = error("[session]\ntimeout = 5\ntouch_interval = 9");
    assert!(
        message.starts_with("test.toml:3:18: session.touch_interval"),
        "{message}"
    );
    let session = config("[session]\ntimeout = 61").unwrap().session;
    assert_eq!((session.timeout, session.touch_interval), (61, 60));
    assert!(config("[session]\ntimeout = 1\ntouch_interval = 0").is_ok());
}

/// A 204, 205 or 304 has no content, and the expired answer carries the
/// message: sent as `204` with `Content-Length: 15`, its 15 bytes never came.
#[test]
fn expired_status_must_be_a_status_with_content() {
    for status in [204, 205, 304] {
        let message = error(&format!("[session]\nexpired_status = {status}"));
        assert!(
            message.contains(&format!("session.expired_status: {status} has no content")),
            "{message}"
        );
    }
    for status in [200, 401, 440] {
        assert!(config(&format!("[session]\nexpired_status = {status}")).is_ok());
    }
}

#[test]
fn client_timeouts_are_at_least_one_second() {
    for key in [
        "header_timeout",
        "keepalive_timeout",
        "send_timeout",
        "body_timeout",
    ] {
        let message = error(&format!("[server]\n{key} = 0\n"));
        assert!(
            message.contains(&format!("server.{key}: expected at least 1, found 0")),
            "{message}"
        );
    }
}

#[test]
fn wrong_type_inside_an_array_names_the_element() {
    let message = error("[session]\nbypass = [\"/static/\", 3]\n");
    assert!(
        message
            .starts_with("test.toml:2:23: session.bypass[1]: expected a string, found integer `3`"),
        "{message}"
    );
}

/// TOML integers stop at i64; past that the file does not parse at all,
/// and the key is read off the line.
#[test]
fn a_number_too_large_for_toml_names_its_key() {
    let message = error("[server]\nlisten = \"127.0.0.1:8080\"\nthreads = 99999999999999999999\n");
    assert!(
        message.starts_with("test.toml:3:11: server.threads: a number past TOML's integers"),
        "{message}"
    );
    let message = error("[store]\nmax_entries=99999999999999999999 # huge\n");
    assert!(
        message.starts_with("test.toml:2:13: store.max_entries: "),
        "{message}"
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let message = error("[server]\nthreads = = 2\n");
    assert!(message.starts_with("test.toml:2:"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

// [server]

#[test]
fn listen_accepts_one_string() {
    let config = config("[server]\nlisten = \"127.0.0.1:9000\"").expect("valid");
    assert_eq!(config.server.listen, vec![addr("127.0.0.1:9000")]);
}

#[test]
fn listen_accepts_an_array() {
    let config = config("[server]\nlisten = [\"127.0.0.1:9000\", \"[::1]:9001\"]").expect("valid");
    assert_eq!(
        config.server.listen,
        vec![addr("127.0.0.1:9000"), addr("[::1]:9001")]
    );
}

#[test]
fn listen_resolves_host_names() {
    let config = config("[server]\nlisten = \"localhost:9000\"").expect("valid");
    assert!(!config.server.listen.is_empty());
    assert!(config
        .server
        .listen
        .iter()
        .all(|a| a.ip().is_loopback() && a.port() == 9000));
}

#[test]
fn listen_must_not_be_empty() {
    let message = error("[server]\nlisten = []");
    assert!(
        message.starts_with("test.toml:2:10: server.listen: expected at least one"),
        "{message}"
    );
}

#[test]
fn listen_needs_a_port() {
    let message = error("[server]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1\"]");
    assert!(
        message.starts_with("test.toml:2:26: server.listen[1]: expected \"host:port\""),
        "{message}"
    );
}

#[test]
fn listen_of_another_type_says_what_is_expected() {
    let message = error("[server]\nlisten = 8080");
    assert!(
        message
            .contains("expected a \"host:port\" string or an array of them, found integer `8080`"),
        "{message}"
    );
}

#[test]
fn admin_listen_empty_is_off_and_set_is_resolved() {
    let config = config("[server]\nadmin_listen = \"127.0.0.1:9100\"").expect("valid");
    assert_eq!(config.server.admin_listen, vec![addr("127.0.0.1:9100")]);
    let message = error("[server]\nadmin_listen = \"9100\"");
    assert!(
        message.contains("server.admin_listen: expected \"host:port\""),
        "{message}"
    );
}

/// As `listen`, a name with several addresses listens on all of them,
/// and the proxy names them all; not on the first alone.
#[test]
fn admin_listen_listens_on_every_address_of_its_name() {
    let src = source::Source::new(Path::new("test.toml"), "");
    let (v4, v6) = (addr("127.0.0.1:9100"), addr("[::1]:9100"));
    let resolved = vec![v4, v6, v4];
    let admin = validate::admin_addresses(&src, "localhost:9100", resolved, &[]).unwrap();
    assert_eq!(admin, vec![v4, v6]);
    // Through the resolver: whatever localhost is here, all of it.
    let mut localhost: Vec<SocketAddr> = Vec::new();
    for address in std::net::ToSocketAddrs::to_socket_addrs("localhost:9100").unwrap() {
        if !localhost.contains(&address) {
            localhost.push(address);
        }
    }
    let config = config("[server]\nadmin_listen = \"localhost:9100\"").expect("valid");
    assert_eq!(config.server.admin_listen, localhost);
}

#[test]
fn admin_listen_addresses_that_overlap_each_other_are_refused() {
    let src = source::Source::new(Path::new("test.toml"), "");
    let resolved = vec![addr("0.0.0.0:9100"), addr("127.0.0.1:9100")];
    let message = validate::admin_addresses(&src, "both:9100", resolved, &[])
        .unwrap_err()
        .message;
    assert!(
        message.contains("server.admin_listen: \"both:9100\" resolves to 0.0.0.0:9100 and 127.0.0.1:9100, which overlap"),
        "{message}"
    );
}

/// Port 0 binds a port the kernel picks anew at each start: no client,
/// load balancer or health check could be told it.
#[test]
fn a_listener_on_port_0_is_refused() {
    for (text, start) in [
        (
            "[server]\nlisten = \"0.0.0.0:0\"",
            "test.toml:2:10: server.listen: expected a port clients can be given, found \"0.0.0.0:0\"",
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:0\"]",
            "test.toml:2:29: server.listen[1]: expected a port clients can be given",
        ),
        (
            "[server]\nadmin_listen = \"127.0.0.1:0\"",
            "test.toml:2:16: server.admin_listen: expected a port clients can be given, found \"127.0.0.1:0\"",
        ),
    ] {
        let message = error(text);
        assert!(message.starts_with(start), "{message}");
        assert!(message.contains("e.g. \""), "{message}");
    }
}

#[test]
fn admin_listen_on_a_listen_address_is_refused() {
    for text in [
        "[server]\nlisten = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"",
        "[server]\nlisten = [\"127.0.0.1:9001\", \"127.0.0.1:9000\"]\nadmin_listen = \"localhost:9000\"",
    ] {
        let message = error(text);
        assert!(
            message.contains("server.admin_listen: 127.0.0.1:9000 is also in server.listen"),
            "{message}"
        );
    }
    config("[server]\nlisten = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9001\"")
        .expect("another port");
}

/// Only one of two such sockets can be bound: the other's service would
/// retry for 30 s and then serve nothing, or the admin app would answer
/// on the public port.
#[test]
fn a_wildcard_listen_address_that_overlaps_another_is_refused() {
    for (text, message_start) in [
        (
            "[server]\nlisten = [\"0.0.0.0:9000\", \"127.0.0.1:9000\"]",
            "test.toml:2:27: server.listen[1]: 127.0.0.1:9000 overlaps 0.0.0.0:9000",
        ),
        (
            "[server]\nlisten = [\"127.0.0.1:9000\", \"[::]:9000\"]",
            "test.toml:2:29: server.listen[1]: [::]:9000 overlaps 127.0.0.1:9000",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:9000\"\nadmin_listen = \"0.0.0.0:9000\"",
            "test.toml:3:16: server.admin_listen: 0.0.0.0:9000 overlaps 127.0.0.1:9000 of server.listen",
        ),
        (
            "[server]\nlisten = \"[::]:9000\"\nadmin_listen = \"127.0.0.1:9000\"",
            "test.toml:3:16: server.admin_listen: 127.0.0.1:9000 overlaps [::]:9000 of server.listen",
        ),
    ] {
        let message = error(text);
        assert!(message.starts_with(message_start), "{message}");
    }
    for text in [
        "[server]\nlisten = [\"0.0.0.0:9000\", \"[::1]:9000\", \"127.0.0.1:9001\"]",
        "[server]\nlisten = [\"127.0.0.1:9000\", \"127.0.0.1:9000\"]",
        "[server]\nlisten = \"0.0.0.0:9000\"\nadmin_listen = \"127.0.0.1:9001\"",
    ] {
        config(text).expect("no two of these take one port");
    }
}

#[test]
fn a_wait_longer_than_a_year_is_refused() {
    for key in [
        "[server]\ngrace_period",
        "[server]\nheader_timeout",
        "[server]\nkeepalive_timeout",
        "[server]\nsend_timeout",
        "[server]\nbody_timeout",
        "[store]\ntimeout",
    ] {
        let message = error(&format!("{key} = 9223372036854775807"));
        assert!(
            message.contains("expected at most 31536000 (a year)"),
            "{message}"
        );
        config(&format!("{key} = 31536000")).expect("a year is allowed");
    }
    let upstream = "[upstream]\naddresses = [\"127.0.0.1:8000\"]\nread_timeout = 31536001";
    let message = parse(upstream, Path::new("test.toml"), Some(KEY))
        .unwrap_err()
        .message;
    assert!(
        message.contains("upstream.read_timeout: expected at most"),
        "{message}"
    );
}

#[test]
fn threads_zero_means_one_per_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        config("[server]\nthreads = 0")
            .expect("valid")
            .server
            .threads,
        cpus
    );
    assert_eq!(
        config("[server]\nthreads = 3")
            .expect("valid")
            .server
            .threads,
        3
    );
}

/// Each thread is an event loop for any number of connections: past the
/// CPUs they add nothing but memory and files.
#[test]
fn threads_are_at_most_1024() {
    let message = error("[server]\nthreads = 1025");
    assert!(
        message.starts_with("test.toml:2:11: server.threads: expected at most 1024, found 1025"),
        "{message}"
    );
    assert!(message.contains("use 0 for one per CPU"), "{message}");
    let config = config("[server]\nthreads = 1024").expect("valid");
    assert_eq!(config.server.threads, 1024);
}

#[test]
fn trusted_proxies_take_cidrs_and_bare_ips() {
    let config = config("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.1\", \"::1\"]")
        .expect("valid");
    let proxies: Vec<String> = config
        .server
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(proxies, ["10.0.0.0/8", "192.168.1.1/32", "::1/128"]);
}

#[test]
fn trusted_proxies_reject_anything_else() {
    let message = error("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.local\"]");
    assert!(
        message.starts_with("test.toml:2:34: server.trusted_proxies[1]: expected a CIDR"),
        "{message}"
    );
}

#[test]
fn tls_needs_both_files_or_none() {
    let message = error("[server]\ntls_cert = \"cert.pem\"");
    assert!(
        message
            .starts_with("test.toml:2:12: server.tls_key: is empty while server.tls_cert is set"),
        "{message}"
    );
    let message = error("[server]\ntls_key = \"key.pem\"");
    assert!(
        message.contains("server.tls_cert: is empty while server.tls_key is set"),
        "{message}"
    );
}

#[test]
fn tls_files_must_exist() {
    let message =
        error("[server]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"");
    assert!(
        message.starts_with("test.toml:2:12: server.tls_cert: cannot read"),
        "{message}"
    );
}

#[test]
fn tls_with_both_files_is_on() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("session-proxy-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let with_key = |key: &Path| {
        format!(
            "[server]\ntls_cert = {:?}\ntls_key = {:?}",
            cert_path.display().to_string(),
            key.display().to_string()
        )
    };
    let loaded = config(&with_key(&key_path));
    let wrong = error(&with_key(&cert_path));
    std::fs::remove_dir_all(&dir).unwrap();
    let tls = loaded.expect("valid").server.tls.expect("tls on");
    assert_eq!(tls.cert, cert_path);
    assert_eq!(tls.key, key_path);
    assert!(
        wrong.starts_with("test.toml:3:11: server.tls_key: ") && wrong.contains("no private key"),
        "{wrong}"
    );
}

#[test]
fn upgrade_sock_is_a_socket_path_in_a_directory_that_exists() {
    let dir = std::env::temp_dir().join(format!(
        "session-proxy-config-upgrade-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("upgrade.sock");
    let config = config(&format!(
        "[server]\nupgrade_sock = {:?}",
        sock.display().to_string()
    ))
    .expect("valid");
    assert_eq!(config.server.upgrade_sock.as_deref(), Some(sock.as_path()));

    let missing = dir.join("nowhere/upgrade.sock");
    let message = error(&format!(
        "[server]\nupgrade_sock = {:?}",
        missing.display().to_string()
    ));
    assert!(
        message.contains("server.upgrade_sock: the directory")
            && message.contains("does not exist"),
        "{message}"
    );

    // The new process deletes what is there before it binds.
    let file = dir.join("precious.txt");
    std::fs::write(&file, "keep me").unwrap();
    let message = error(&format!(
        "[server]\nupgrade_sock = {:?}",
        file.display().to_string()
    ));
    assert!(message.contains("exists and is not a socket"), "{message}");

    let long = format!("/tmp/{}.sock", "a".repeat(103));
    let message = error(&format!("[server]\nupgrade_sock = {long:?}"));
    assert!(
        message.contains("at most 107 bytes, found 113"),
        "{message}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn access_log_is_off_by_default_stdout_for_a_dash_else_a_file() {
    let off = config("").expect("valid");
    assert_eq!(off.server.access_log, None);
    let stdout = config("[server]\naccess_log = \"-\"").expect("valid");
    assert_eq!(
        stdout.server.access_log,
        Some(crate::access_log::Destination::Stdout)
    );
    let dir = std::env::temp_dir().join(format!(
        "session-proxy-config-access-log-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("access.log");
    let config = config(&format!(
        "[server]\naccess_log = {:?}",
        file.display().to_string()
    ))
    .expect("valid");
    assert_eq!(
        config.server.access_log,
        Some(crate::access_log::Destination::File(file.clone()))
    );
    assert!(!file.exists(), "checking the config creates no file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_access_log_that_cannot_be_appended_to_is_refused_naming_key_and_path() {
    let dir = std::env::temp_dir().join(format!(
        "session-proxy-config-access-log-bad-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("nowhere/access.log");
    let message = error(&format!(
        "[server]\naccess_log = {:?}",
        missing.display().to_string()
    ));
    assert!(
        message.starts_with("test.toml:2:14: server.access_log: cannot log to ")
            && message.contains(&missing.display().to_string())
            && message.contains("does not exist"),
        "{message}"
    );
    let message = error(&format!(
        "[server]\naccess_log = {:?}",
        dir.display().to_string()
    ));
    assert!(message.contains("it is a directory"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// [upstream]

#[test]
fn upstream_addresses_are_required() {
    let message = error_without_env_keys("[server]\nthreads = 1\n");
    assert!(
        message.starts_with("test.toml: upstream.addresses: required"),
        "{message}"
    );
}

#[test]
fn upstream_addresses_must_not_be_empty() {
    let text = "[upstream]\naddresses = []";
    let message = parse(text, Path::new("test.toml"), Some(KEY))
        .expect_err("empty")
        .message;
    assert!(
        message.starts_with("test.toml:2:13: upstream.addresses: expected at least one"),
        "{message}"
    );
}

#[test]
fn upstream_address_must_resolve() {
    let text = "[upstream]\naddresses = [\"127.0.0.1:8000\", \"no port\"]";
    let message = parse(text, Path::new("test.toml"), Some(KEY))
        .expect_err("bad")
        .message;
    assert!(
        message.starts_with("test.toml:2:32: upstream.addresses[1]: expected \"host:port\""),
        "{message}"
    );
    assert!(message.contains("found \"no port\""), "{message}");
}

/// A port 0 upstream passed `check`, and every request was a 502.
#[test]
fn upstream_address_needs_a_port_to_connect_to() {
    let text = "[upstream]\naddresses = [\"127.0.0.1:8000\", \"127.0.0.1:0\"]";
    let message = parse(text, Path::new("test.toml"), Some(KEY))
        .expect_err("port 0")
        .message;
    assert!(
        message.starts_with(
            "test.toml:2:32: upstream.addresses[1]: expected the app's port, found \"127.0.0.1:0\""
        ),
        "{message}"
    );
}

#[test]
fn upstream_hosts_are_kept_as_written_for_tls() {
    let text = "[upstream]\naddresses = [\"localhost:8000\", \"[::1]:8001\", \"127.0.0.1:8002\"]";
    let config = parse(text, Path::new("test.toml"), Some(KEY)).expect("valid");
    assert_eq!(config.upstream.hosts, vec!["localhost", "::1", "127.0.0.1"]);
}

#[test]
fn upstream_timeouts_are_at_least_one_second() {
    let text = format!("{UPSTREAM}connect_timeout = 0");
    let message = parse(&text, Path::new("test.toml"), Some(KEY))
        .expect_err("zero")
        .message;
    assert_eq!(
        message,
        "test.toml:3:19: upstream.connect_timeout: expected at least 1, found 0"
    );
    let text = format!("{UPSTREAM}read_timeout = 0");
    let message = parse(&text, Path::new("test.toml"), Some(KEY))
        .expect_err("zero")
        .message;
    assert!(
        message.contains("upstream.read_timeout: expected at least 1, found 0"),
        "{message}"
    );
}

// [session]: secret keys

#[test]
fn no_secret_key_tells_how_to_make_one() {
    let message = error_without_env_keys(UPSTREAM);
    assert!(
        message.starts_with(
            "test.toml: session.secret_keys: no secret key; run `session-proxy keygen`"
        ),
        "{message}"
    );
    assert!(message.contains(SECRET_KEYS_ENV), "{message}");
}

#[test]
fn secret_keys_come_from_the_file() {
    let other = "k".repeat(40);
    let text = format!("[session]\nsecret_keys = [{KEY:?}, {other:?}]\n{UPSTREAM}");
    let config = parse(&text, Path::new("test.toml"), None).expect("valid");
    assert_eq!(config.session.secret_keys, vec![KEY.to_owned(), other]);
}

#[test]
fn secret_key_is_an_alias_for_one_key() {
    let text = format!("[session]\nsecret_key = {KEY:?}\n{UPSTREAM}");
    let config = parse(&text, Path::new("test.toml"), None).expect("valid");
    assert_eq!(config.session.secret_keys, vec![KEY.to_owned()]);
}

#[test]
fn secret_key_and_secret_keys_together_are_refused() {
    let text = format!("[session]\nsecret_keys = [{KEY:?}]\nsecret_key = {KEY:?}\n{UPSTREAM}");
    let message = parse(&text, Path::new("test.toml"), None)
        .expect_err("both")
        .message;
    assert!(
        message.starts_with("test.toml:3:14: session.secret_key: set either"),
        "{message}"
    );
    assert!(!message.contains(KEY), "{message}");
}

#[test]
fn short_secret_key_is_named_by_index_never_by_value() {
    let short = "too-short-secret";
    let text = format!("[session]\nsecret_keys = [{KEY:?}, {short:?}]\n{UPSTREAM}");
    let message = parse(&text, Path::new("test.toml"), None)
        .expect_err("short")
        .message;
    assert!(message.starts_with("test.toml:2:52: session.secret_keys[1]: expected a secret of at least 32 bytes, found 16 bytes"), "{message}");
    assert!(!message.contains(short), "{message}");
}

#[test]
fn secret_of_the_wrong_type_is_not_echoed() {
    let text = format!("[session]\nsecret_keys = {KEY:?}\n{UPSTREAM}");
    let message = parse(&text, Path::new("test.toml"), None)
        .expect_err("not an array")
        .message;
    assert!(
        message
            .starts_with("test.toml:2:15: session.secret_keys: expected an array, found a string"),
        "{message}"
    );
    assert!(!message.contains(KEY), "{message}");
}

#[test]
fn environment_keys_override_the_file() {
    let file_key = "f".repeat(32);
    let env = format!(" {KEY} ,, {} ", "e".repeat(32));
    let text = format!("[session]\nsecret_keys = [{file_key:?}]\n{UPSTREAM}");
    let config = parse(&text, Path::new("test.toml"), Some(&env)).expect("valid");
    assert_eq!(
        config.session.secret_keys,
        vec![KEY.to_owned(), "e".repeat(32)]
    );
}

#[test]
fn empty_environment_keys_leave_the_file_keys() {
    let text = format!("[session]\nsecret_key = {KEY:?}\n{UPSTREAM}");
    let config = parse(&text, Path::new("test.toml"), Some(" , ")).expect("valid");
    assert_eq!(config.session.secret_keys, vec![KEY.to_owned()]);
}

#[test]
fn short_environment_key_is_named_by_position_never_by_value() {
    let message = parse(
        UPSTREAM,
        Path::new("test.toml"),
        Some(&format!("{KEY},short")),
    )
    .expect_err("short")
    .message;
    assert_eq!(
        message,
        format!("test.toml: {SECRET_KEYS_ENV}: key 2 of 2 is 5 bytes, expected at least 32; generate one with `session-proxy keygen`")
    );
}

#[test]
fn debug_output_hides_secret_keys() {
    let config = config("").expect("valid");
    let debug = format!("{config:?}");
    assert!(!debug.contains(KEY));
    assert!(debug.contains("<32 bytes>"));
}

// [session]: the cookie

#[test]
fn cookie_name_must_be_a_token() {
    let message = error("[session]\ncookie_name = \"my session\"");
    assert!(
        message.starts_with("test.toml:2:15: session.cookie_name: expected a cookie name"),
        "{message}"
    );
    let message = error("[session]\ncookie_name = \"\"");
    assert!(
        message.contains("session.cookie_name: expected a cookie name"),
        "{message}"
    );
}

#[test]
fn cookie_name_prefixes_need_their_attributes() {
    let message =
        error("[session]\ncookie_name = \"__Host-sid\"\nsecure = true\ncookie_path = \"/app\"");
    assert!(
        message.contains("session.cookie_name: a name starting with \"__Host-\""),
        "{message}"
    );
    let message = error("[session]\ncookie_name = \"__Secure-sid\"");
    assert!(
        message.contains("session.cookie_name: a name starting with \"__Secure-\""),
        "{message}"
    );
    let message = error(
        "[session]\ncookie_name = \"__Host-sid\"\nsecure = true\ncookie_domain = \"example.com\"",
    );
    assert!(
        message.contains("session.cookie_name: a name starting with \"__Host-\""),
        "{message}"
    );
    assert!(config("[session]\ncookie_name = \"__Host-sid\"\nsecure = true").is_ok());
}

#[test]
fn cookie_path_must_start_with_a_slash() {
    let message = error("[session]\ncookie_path = \"app\"");
    assert!(
        message.starts_with(
            "test.toml:2:15: session.cookie_path: expected a path starting with \"/\""
        ),
        "{message}"
    );
    // Written into Set-Cookie as it is: a `;` would add attributes.
    let message = error("[session]\ncookie_path = \"/app;Domain=example.org\"");
    assert!(
        message.starts_with(
            "test.toml:2:15: session.cookie_path: expected a path starting with \"/\", without \";\""
        ),
        "{message}"
    );
}

#[test]
fn cookie_domain_must_not_hold_separators() {
    let message = error("[session]\ncookie_domain = \"example.com; Secure\"");
    assert!(
        message.starts_with("test.toml:2:17: session.cookie_domain: expected a domain"),
        "{message}"
    );
    let config = config("[session]\ncookie_domain = \"example.com\"").expect("valid");
    assert_eq!(config.session.cookie.domain.as_deref(), Some("example.com"));
}

/// Written raw into Set-Cookie, such a path matches no request (browsers
/// send paths percent-encoded) and such a domain makes browsers drop the
/// cookie: sessions would silently never come back.
#[test]
fn cookie_path_and_domain_must_be_written_as_browsers_send_them() {
    for (text, start) in [
        ("cookie_path = \"/ä\"", "test.toml:2:15: session.cookie_path: expected the path as browsers send it, percent-encoded"),
        ("cookie_path = \"/a b\"", "test.toml:2:15: session.cookie_path: expected the path as browsers send it"),
        ("cookie_domain = \"exämple.com\"", "test.toml:2:17: session.cookie_domain: expected an ASCII domain, an internationalized name in its xn-- form"),
    ] {
        let message = error(&format!("[session]\n{text}"));
        assert!(message.starts_with(start), "{message}");
    }
    let config =
        config("[session]\ncookie_path = \"/%C3%A4\"\ncookie_domain = \"xn--exmple-cua.com\"")
            .expect("valid");
    assert_eq!(config.session.cookie.path, "/%C3%A4");
}

#[test]
fn samesite_error_names_file_line_column_and_choices() {
    let message = error("[session]\nsecure = true\nsamesite = \"bogus\"");
    assert_eq!(
        message,
        "test.toml:3:12: session.samesite: expected \"strict\", \"lax\", \"none\" or \"\" (no attribute), found \"bogus\""
    );
}

#[test]
fn samesite_values_ignore_case() {
    let samesite = |value: &str| {
        config(&format!("[session]\nsecure = true\nsamesite = {value:?}"))
            .expect("valid")
            .session
            .cookie
            .samesite
    };
    assert_eq!(samesite("Strict"), SameSite::Strict);
    assert_eq!(samesite("LAX"), SameSite::Lax);
    assert_eq!(samesite("none"), SameSite::None);
    assert_eq!(samesite(""), SameSite::Omitted);
}

#[test]
fn samesite_none_requires_secure() {
    let message = error("[session]\nsamesite = \"none\"");
    assert!(
        message.starts_with("test.toml:2:12: session.samesite: \"none\" requires secure = true"),
        "{message}"
    );
}

// [session]: the rest

#[test]
fn expired_status_is_an_http_status() {
    let message = error("[session]\nexpired_status = 99");
    assert_eq!(
        message,
        "test.toml:2:18: session.expired_status: expected an HTTP status from 200 to 599, found 99"
    );
    assert!(error("[session]\nexpired_status = 600").contains("found 600"));
    assert_eq!(
        config("[session]\nexpired_status = 440")
            .expect("valid")
            .session
            .expired_status,
        440
    );
}

#[test]
fn max_data_bytes_holds_at_least_an_empty_object() {
    let message = error("[session]\nmax_data_bytes = 1");
    assert!(
        message.contains("session.max_data_bytes: expected at least 2"),
        "{message}"
    );
}

#[test]
fn idle_timeout_is_at_least_one_second() {
    let message = error("[session]\ntimeout = 0");
    assert_eq!(
        message,
        "test.toml:2:11: session.timeout: expected at least 1, found 0"
    );
}

#[test]
fn touch_interval_may_be_zero() {
    assert_eq!(
        config("[session]\ntouch_interval = 0")
            .expect("valid")
            .session
            .touch_interval,
        0
    );
}

#[test]
fn absolute_timeout_zero_is_none() {
    assert_eq!(
        config("[session]\nabsolute_timeout = 0")
            .expect("valid")
            .session
            .absolute_timeout,
        None
    );
    assert_eq!(
        config("[session]\nabsolute_timeout = 3600")
            .expect("valid")
            .session
            .absolute_timeout,
        Some(3600)
    );
}

#[test]
fn initializer_becomes_json_with_datetimes_as_text() {
    let text = "[session.initializer]\ncount = 0\nratio = 0.5\nuser = { name = \"anonymous\", roles = [\"guest\"] }\nsince = 1979-05-27T07:32:00Z";
    let config = config(text).expect("valid");
    let expected = json!({
        "count": 0,
        "ratio": 0.5,
        "user": {"name": "anonymous", "roles": ["guest"]},
        "since": "1979-05-27T07:32:00Z",
    });
    assert_eq!(
        serde_json::Value::Object(config.session.initializer),
        expected
    );
}

#[test]
fn initializer_must_fit_in_max_data_bytes() {
    let message = error("[session]\nmax_data_bytes = 8\ninitializer = { count = 12345 }");
    assert!(message.starts_with("test.toml:3:15: session.initializer: is 15 bytes as JSON, more than max_data_bytes (8)"), "{message}");
    // To the byte: {"count":12345} is 15 bytes, over 14, within 15.
    let message = error("[session]\nmax_data_bytes = 14\ninitializer = { count = 12345 }");
    assert!(
        message.contains("is 15 bytes as JSON, more than max_data_bytes (14)"),
        "{message}"
    );
    assert!(config("[session]\nmax_data_bytes = 15\ninitializer = { count = 12345 }").is_ok());
}

#[test]
fn initializer_floats_must_be_finite() {
    let message = error("[session]\ninitializer = { x = nan }");
    assert!(
        message.starts_with("test.toml:2:21: session.initializer.x: expected a finite number"),
        "{message}"
    );
}

/// A prefix is matched against the path as sent, percent-encoded: one
/// written raw would never match, and the paths would get the session
/// work without a word.
#[test]
fn bypass_prefixes_are_written_percent_encoded() {
    for prefix in ["/stätic/", "/my files/"] {
        let message = error(&format!("[session]\nbypass = [\"/static/\", {prefix:?}]"));
        assert!(
            message.starts_with(
                "test.toml:2:23: session.bypass[1]: expected the prefix as clients send paths, percent-encoded"
            ),
            "{message}"
        );
    }
    config("[session]\nbypass = [\"/st%C3%A4tic/\", \"/my%20files/\"]").expect("valid");
}

#[test]
fn bypass_prefixes_start_with_a_slash() {
    let message = error("[session]\nbypass = [\"/static/\", \"assets/\"]");
    assert!(
        message.starts_with(
            "test.toml:2:23: session.bypass[1]: expected a path prefix starting with \"/\""
        ),
        "{message}"
    );
    let config = config("[session]\nbypass = [\"/static/\"]").expect("valid");
    assert_eq!(config.session.bypass, vec!["/static/".to_owned()]);
}

#[test]
fn expired_message_may_be_any_text() {
    let config =
        config("[session]\nexpired_message = \"Gone.\\r\\nLog in again.\"").expect("valid");
    assert_eq!(config.session.expired_message, "Gone.\r\nLog in again.");
}

// [headers]

#[test]
fn header_names_are_lower_cased() {
    let config = config("[headers]\nsession = \"X-App-Session\"").expect("valid");
    assert_eq!(config.headers.session, "x-app-session");
}

#[test]
fn header_names_must_be_tokens() {
    let message = error("[headers]\nupdate = \"X Session\"");
    assert!(
        message.starts_with("test.toml:2:10: headers.update: expected a header name"),
        "{message}"
    );
}

#[test]
fn header_names_must_differ_even_with_underscores() {
    let message = error("[headers]\naction = \"x_session\"");
    assert!(
        message.starts_with(
            "test.toml:2:10: headers.action: \"x_session\" is the same header as headers.session"
        ),
        "{message}"
    );
}

/// The stripping reads every character but a letter or digit as `-`
/// (lighttpd's CGI does): so does the check that the names differ.
#[test]
fn header_names_must_differ_even_with_other_punctuation() {
    let message = error("[headers]\naction = \"X.Session\"");
    assert!(
        message.starts_with(
            "test.toml:2:10: headers.action: \"X.Session\" is the same header as headers.session"
        ),
        "{message}"
    );
    let message = error("[headers]\nsession = \"X.Forwarded.For\"");
    assert!(
        message.contains("is a header HTTP or the proxy already uses"),
        "{message}"
    );
}

#[test]
fn header_names_must_not_be_reserved() {
    let message = error("[headers]\nsession = \"Cookie\"");
    assert!(message.starts_with("test.toml:2:11: headers.session: \"Cookie\" is a header HTTP or the proxy already uses"), "{message}");
    assert!(error("[headers]\nupdate = \"Transfer-Encoding\"").contains("headers.update"));
}

/// `exp = iat + token_ttl` past i64 cannot be read by JWT libraries that
/// hold claims in an i64: the app would refuse every token.
#[test]
fn token_ttl_is_at_most_a_year() {
    let message = error("[headers]\ntoken_ttl = 9223372036854775807");
    assert!(
        message
            .starts_with("test.toml:2:13: headers.token_ttl: expected at most 31536000 (a year)"),
        "{message}"
    );
    config("[headers]\ntoken_ttl = 31536000").expect("a year is allowed");
}

#[test]
fn token_ttl_is_at_least_five_seconds() {
    let message = error("[headers]\ntoken_ttl = 4");
    assert_eq!(
        message,
        "test.toml:2:13: headers.token_ttl: expected at least 5, found 4"
    );
}

// [store]

#[test]
fn store_kinds_are_parsed() {
    let kind = |text: &str| config(text).expect("valid").store.kind;
    assert_eq!(kind("[store]\nkind = \"memory\""), StoreKind::Memory);
    assert_eq!(
        kind("[store]\nkind = \"postgres\"\nurl = \"postgresql://db/app\""),
        StoreKind::Postgres
    );
    assert_eq!(
        kind("[store]\nkind = \"redis\"\nurl = \"redis://a:6379, redis://b:6379\""),
        StoreKind::Redis
    );
}

#[test]
fn unknown_store_kind_is_refused() {
    let message = error("[store]\nkind = \"sqlite\"");
    assert_eq!(message, "test.toml:2:8: store.kind: expected \"disk\", \"memory\", \"postgres\" or \"redis\", found \"sqlite\"");
}

#[test]
fn postgres_and_redis_need_a_url() {
    let message = error("[store]\nkind = \"postgres\"");
    assert!(
        message.starts_with("test.toml:1:1: store.url: required for kind = \"postgres\""),
        "{message}"
    );
    let message = error("[store]\nkind = \"redis\"\nurl = \"\"");
    assert!(
        message.starts_with("test.toml:3:7: store.url: required for kind = \"redis\""),
        "{message}"
    );
}

#[test]
fn store_url_scheme_must_match_the_kind_and_is_not_echoed() {
    let message = error("[store]\nkind = \"postgres\"\nurl = \"mysql://user:hunter2@db/app\"");
    assert!(message.ends_with("expected a URL starting with \"postgres://\" or \"postgresql://\", found one starting with \"mysql://\""), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

/// A URL of the right scheme that the store cannot read: a config error
/// (exit 2, with the line), where `check` exited 1 ("postgres: invalid
/// url"), as for a server that does not answer. Still without the URL.
#[test]
fn a_store_url_the_store_cannot_read_is_a_config_error() {
    for (url, says) in [
        (
            "postgres://app:hunter2@db:99999/app",
            "invalid value for option `port`",
        ),
        (
            "postgres://app:hunter2@db/app?pool_max=10",
            "unknown option `pool_max`",
        ),
    ] {
        let message = error(&format!("[store]\nkind = \"postgres\"\nurl = {url:?}"));
        assert!(
            message.starts_with("test.toml:3:7: store.url: invalid connection string: ")
                && message.contains(says),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
    for url in [
        "redis://:hunter2@127.0.0.1:6379/not-a-number",
        "redis://127.0.0.1:99999",
        "redis://a:6379, redis://:hunter2@b:99999",
    ] {
        let message = error(&format!("[store]\nkind = \"redis\"\nurl = {url:?}"));
        assert!(
            message.starts_with("test.toml:3:7: store.url: the Redis client cannot read it"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
    let valid = "[store]\nkind = \"postgres\"\nurl = \"postgres://app@db:5432/app?application_name=x&sslmode=disable\"";
    config(valid).expect("a URL tokio-postgres reads");
}

#[test]
fn redis_over_tls_is_accepted() {
    let kind = |text: &str| config(text).expect("valid").store.kind;
    assert_eq!(
        kind("[store]\nkind = \"redis\"\nurl = \"rediss://a:6379, rediss://b:6379\""),
        StoreKind::Redis
    );
}

#[test]
fn every_redis_cluster_node_needs_a_scheme() {
    let message = error("[store]\nkind = \"redis\"\nurl = \"redis://a:1,b:2\"");
    assert!(message.contains("store.url: expected a URL starting with \"redis://\" or \"rediss://\" (entry 2 of 2), found one without a scheme"), "{message}");
}

#[test]
fn store_table_is_a_plain_sql_name() {
    assert_eq!(
        config("[store]\ntable = \"app.web_sessions\"")
            .expect("valid")
            .store
            .table,
        "app.web_sessions"
    );
    for bad in ["sessions; drop table users", "1sessions", "a.b.c", ""] {
        let message = error(&format!("[store]\ntable = {bad:?}"));
        assert!(
            message.starts_with("test.toml:2:9: store.table: expected a SQL name"),
            "{message}"
        );
    }
}

/// The store refuses a name part past PostgreSQL's 63 characters (which
/// the server would cut short): refused here, it is a config error (exit
/// 2, with the line), not a store that seems unreachable (exit 1).
#[test]
fn store_table_name_parts_are_at_most_63_characters() {
    let long = "t".repeat(64);
    for bad in [
        long.clone(),
        format!("app.{long}"),
        format!("{long}.sessions"),
    ] {
        let message = error(&format!("[store]\ntable = {bad:?}"));
        assert!(
            message.starts_with("test.toml:2:9: store.table: expected a SQL name"),
            "{message}"
        );
    }
    let longest = format!("{}.{}", "s".repeat(63), "t".repeat(63));
    let table = config(&format!("[store]\ntable = {longest:?}"))
        .expect("63 characters either side")
        .store
        .table;
    assert_eq!(table, longest);
}

#[test]
fn store_sweep_interval_and_max_entries_are_at_least_one() {
    assert!(error("[store]\nsweep_interval = 0")
        .contains("store.sweep_interval: expected at least 1, found 0"));
    assert!(error("[store]\nmax_entries = 0")
        .contains("store.max_entries: expected at least 1, found 0"));
}

/// tokio caps a sleep at about 30 years: a sweep interval past that swept
/// once, at start, and never again, silently.
#[test]
fn store_sweep_interval_is_at_most_a_year() {
    assert!(error("[store]\nsweep_interval = 31536001")
        .contains("store.sweep_interval: expected at most 31536000 (a year), found 31536001"));
    let longest = config("[store]\nsweep_interval = 31536000").expect("a year is accepted");
    assert_eq!(longest.store.sweep_interval, 31536000);
}

/// A pool sets aside a slot per connection when it is made: a pool_size of
/// TOML's order panicked (or aborted) the opening of the store.
#[test]
fn store_pool_size_is_at_most_what_postgresql_allows() {
    for huge in ["262144", "9223372036854775807"] {
        let message = error(&format!("[store]\npool_size = {huge}"));
        assert!(
            message.starts_with("test.toml:2:13: store.pool_size: expected at most 262143"),
            "{message}"
        );
    }
    let store = config("[store]\npool_size = 262143").expect("valid").store;
    assert_eq!(store.pool_size, 262_143);
}

#[test]
fn store_path_must_not_be_empty() {
    let message = error("[store]\npath = \"\"");
    assert!(
        message.starts_with("test.toml:2:8: store.path: expected a directory"),
        "{message}"
    );
}

#[test]
fn store_key_prefix_may_be_any_string() {
    assert_eq!(
        config("[store]\nkey_prefix = \"\"")
            .expect("valid")
            .store
            .key_prefix,
        ""
    );
}
