//! The PostgreSQL store with a client certificate (README, "TLS"): libpq's
//! `sslcert` and `sslkey` in the store URL, through the real binary,
//! against a cluster of the tests' own that lets in by certificate only
//! (`hostssl all all 127.0.0.1/32 cert`: the certificate's CN is the
//! user), its server certificate and the client certificates made by a
//! test CA. The shared PostgreSQL on 5432 cannot check client certificates.
//!
//! Without PostgreSQL's binaries (or `runuser`, as root) the tests that
//! need the cluster are skipped loudly, unless
//! `SESSION_PROXY_REQUIRE_SERVICES=1`, where they fail. The config errors
//! need no server.
//!
//! Ports: the cluster 19400; each test's proxy and upstream a fixed range
//! of 19410-19499 of its own.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::private_postgres::{PrivatePostgres, APP_USER};
use support::test_ca::TestCa;
use support::*;

const CLUSTER_PORT: u16 = 19400;

/// A proxy config on the store `postgres://app:hunter2@localhost:19400/app?{tls}`,
/// listening on `base` (admin `base + 1`) before an upstream on `base + 2`.
/// The password (cert authentication ignores it) must show nowhere.
fn config(base: u16, tls: &str) -> ProxyConfig {
    ProxyConfig {
        dir: TempDir::new("pgcert"),
        port: base,
        admin_port: base + 1,
        upstream_port: base + 2,
        more_upstreams: Vec::new(),
        session: vec![format!("secret_keys = [{KEY:?}]")],
        store: vec![
            "kind = \"postgres\"".into(),
            format!(
                "url = \"postgres://{APP_USER}:hunter2@localhost:{CLUSTER_PORT}/{APP_USER}?{tls}\""
            ),
            "timeout = 2".into(),
        ],
        server: vec!["grace_period = 1".into()],
        upstream: vec!["read_timeout = 5".into(), "connect_timeout = 1".into()],
        headers: vec![],
        env: vec![],
        listen_host: "127.0.0.1".into(),
    }
}

/// The URL's TLS settings: verify-full against `ca`, with the client
/// certificate `(cert, key)` when given.
fn tls(ca: &TestCa, client: Option<&(std::path::PathBuf, std::path::PathBuf)>) -> String {
    let mut tls = format!("sslmode=verify-full&sslrootcert={}", ca.ca_file().display());
    if let Some((cert, key)) = client {
        tls.push_str(&format!(
            "&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ));
    }
    tls
}

/// `session-proxy ARGS -c CONFIG`: the exit code and stderr, which never
/// shows the URL's password.
fn cli(args: &[&str], config: &ProxyConfig) -> (Option<i32>, String) {
    let path = config.write();
    let mut all = args.to_vec();
    all.extend(["-c", path.to_str().unwrap()]);
    let output = run_cli(&all, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("hunter2"),
        "the URL is not shown: {stderr}"
    );
    (output.status.code(), stderr)
}

#[test]
fn with_its_client_certificate_the_proxy_stores_and_reads_sessions() {
    let Some(cluster) = PrivatePostgres::shared(CLUSTER_PORT) else {
        return;
    };
    let client = PrivatePostgres::client_cert(&cluster.ca, "app-client", APP_USER);
    let config = config(19410, &tls(&cluster.ca, Some(&client)));
    assert_eq!(cli(&["check"], &config), (Some(0), String::new()));

    let _upstream = start_upstream_with(&["--port", "19412"]);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
    let cookie = browser.cookie.clone().unwrap();

    let rows = cluster.query(
        APP_USER,
        &format!(
            "SELECT data FROM sessions WHERE session_id = '{}'",
            handle_of(&cookie)
        ),
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].contains(r#""data":{"count":2}"#), "{rows:?}");
    // Logged in by the certificate: the server saw its subject.
    let subjects = cluster.query(
        "postgres",
        &format!(
            "SELECT DISTINCT s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = '{APP_USER}'"
        ),
    );
    assert_eq!(subjects, [format!("/CN={APP_USER}")]);

    let (code, stderr) = cli(&["sessions", "list"], &config);
    assert_eq!(code, Some(0), "{stderr}");
    drop(proxy);
}

/// Keys of other kinds than the ECDSA P-256 above log in too.
#[test]
fn an_ed25519_client_key_logs_in_too() {
    let Some(cluster) = PrivatePostgres::shared(CLUSTER_PORT) else {
        return;
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let client = PrivatePostgres::client_cert_with(&cluster.ca, "app-ed25519", APP_USER, key, None);
    let config = config(19440, &tls(&cluster.ca, Some(&client)));
    assert_eq!(cli(&["check"], &config), (Some(0), String::new()));
}

#[test]
fn without_an_accepted_client_certificate_the_store_is_unreachable() {
    let Some(cluster) = PrivatePostgres::shared(CLUSTER_PORT) else {
        return;
    };
    let stranger_ca = TestCa::new();
    // What the server said, and what to do about it.
    let cases = [
        (
            None,
            "connection requires a valid client certificate (28000); the server takes a client \
             certificate: name it and its key in the store URL's sslcert and sslkey",
        ),
        (
            Some(PrivatePostgres::client_cert(
                &cluster.ca,
                "other-user",
                "intruder",
            )),
            "certificate authentication failed for user \"app\" (28000); the certificate's CN \
             must be the URL's user name",
        ),
        // The server finds no CA of its own that signed it (OpenSSL
        // reports the check against its CA of the same name).
        (
            Some(PrivatePostgres::client_cert(
                &stranger_ca,
                "stranger",
                APP_USER,
            )),
            "received fatal alert",
        ),
    ];
    for (client, problem) in &cases {
        let config = config(19420, &tls(&cluster.ca, client.as_ref()));
        let (code, stderr) = cli(&["check"], &config);
        assert_eq!(code, Some(1), "{problem}: {stderr}");
        assert!(stderr.contains(problem), "{problem}: {stderr}");
        assert!(
            stderr.contains("session-proxy.toml: session store unavailable: postgres: "),
            "{stderr}"
        );
    }
    // `run` will not start on it either, as for any store that does not answer.
    let config = config(19420, &tls(&cluster.ca, None));
    let (code, stderr) = run_to_exit("run", &config.write(), Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("connection requires a valid client certificate"),
        "{stderr}"
    );
}

/// A certificate revoked while the proxy runs: the store is unreachable
/// from then on, as any store that stops answering (503s, /healthz 503).
#[test]
fn a_client_certificate_revoked_later_makes_the_store_unreachable() {
    let Some(cluster) = PrivatePostgres::shared(CLUSTER_PORT) else {
        return;
    };
    // A user of its own: the revocation closes its connections only.
    let user = "revoked_later";
    cluster.add_user(user);
    let key = rcgen::KeyPair::generate().unwrap();
    let client = PrivatePostgres::client_cert_with(&cluster.ca, user, user, key, Some(4242));
    let config = config(19450, &tls(&cluster.ca, Some(&client)));
    let config = config.store(&format!(
        "url = \"postgres://{user}@localhost:{CLUSTER_PORT}/{user}?{}\"",
        tls(&cluster.ca, Some(&client))
    ));
    let _upstream = start_upstream_with(&["--port", "19452"]);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(get(config.admin_port, "/healthz", &[]).status, 200);

    cluster.revoke(&[4242], user);
    let response = browser.get("/count", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (503, "session store unavailable")
    );
    assert_eq!(get(config.admin_port, "/healthz", &[]).status, 503);
    let (code, stderr) = cli(&["check"], &config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("CertificateRevoked"), "{stderr}");
    drop(proxy);
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, PermissionsExt::from_mode(mode)).unwrap();
}

#[test]
fn client_certificate_problems_are_config_errors_naming_the_setting_and_file() {
    let ca = TestCa::new();
    let (cert, key) = PrivatePostgres::client_cert(&ca, "client", APP_USER);
    let (other_cert, other_key) = PrivatePostgres::client_cert(&ca, "other", APP_USER);
    let shared_key = ca.dir.path().join("shared.key");
    std::fs::copy(&key, &shared_key).unwrap();
    chmod(&shared_key, 0o644);
    let group_key = ca.dir.path().join("group.key");
    std::fs::copy(&key, &group_key).unwrap();
    chmod(&group_key, 0o640);
    let cert_as_key = ca.dir.path().join("cert-as.key");
    std::fs::copy(&cert, &cert_as_key).unwrap();
    chmod(&cert_as_key, 0o600);
    let missing = ca.dir.path().join("missing.key");
    let path = |p: &Path| p.display().to_string();
    let pair = |c: &Path, k: &Path| format!("sslcert={}&sslkey={}", c.display(), k.display());
    let group_or_world = "private key file has group or world access";
    // (TLS settings, the setting named, what is said, the file named)
    let cases = [
        (
            format!("sslcert={}", path(&cert)),
            "sslcert",
            "sslkey is not",
            None,
        ),
        (
            format!("sslkey={}", path(&key)),
            "sslkey",
            "sslcert is not",
            None,
        ),
        (
            pair(&cert, &shared_key),
            "sslkey",
            group_or_world,
            Some(&shared_key),
        ),
        (
            pair(&cert, &missing),
            "sslkey",
            "No such file",
            Some(&missing),
        ),
        (
            pair(&missing, &key),
            "sslcert",
            "No such file",
            Some(&missing),
        ),
        (
            pair(&key, &key),
            "sslcert",
            "no certificate found",
            Some(&key),
        ),
        (
            pair(&cert, &cert_as_key),
            "sslkey",
            "no private key read",
            Some(&cert_as_key),
        ),
        (
            pair(&cert, &other_key),
            "sslkey",
            "not a key for this certificate",
            Some(&other_key),
        ),
        (
            pair(&other_cert, &key),
            "sslkey",
            "not a key for this certificate",
            Some(&key),
        ),
    ];
    let mut cases = cases.to_vec();
    // libpq's rule: 0640 is enough only for a file root owns and another
    // user reads; its owner reading it wants 0600.
    cases.push((
        pair(&cert, &group_key),
        "sslkey",
        group_or_world,
        Some(&group_key),
    ));
    for (settings, setting, problem, file) in &cases {
        let config = config(19430, &format!("sslmode=verify-full&{settings}"));
        let (code, stderr) = cli(&["check"], &config);
        assert_eq!(code, Some(2), "{settings}: {stderr}");
        assert!(
            stderr.contains(&format!("store.url: {setting}")),
            "{settings}: {stderr}"
        );
        assert!(stderr.contains(problem), "{settings}: {stderr}");
        if let Some(file) = file {
            assert!(stderr.contains(&path(file)), "{settings}: {stderr}");
        }
        assert!(!stderr.contains("PRIVATE KEY"), "{settings}: {stderr}");
    }

    // A certificate with no TLS to send it in: libpq would send it under
    // `prefer`, which speaks no TLS here.
    let config = config(19430, &pair(&cert, &key));
    let (code, stderr) = cli(&["check"], &config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("store.url: sslcert: a client certificate is sent over TLS only")
            && stderr.contains("set sslmode=verify-full"),
        "{stderr}"
    );

    // A good pair passes the config; nothing listens on the port.
    let good = config.store(&format!(
        "url = \"postgres://{APP_USER}:hunter2@localhost:19439/{APP_USER}?sslmode=require&{}\"",
        pair(&cert, &key)
    ));
    let (code, stderr) = cli(&["check"], &good);
    assert_eq!(code, Some(1), "{stderr}");
}
