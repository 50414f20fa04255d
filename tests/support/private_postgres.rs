//! A PostgreSQL cluster of a test's own, in a temporary directory, for
//! what the shared one on 5432 cannot be set up to do: TLS with a test
//! CA's certificate, and `cert` authentication of its clients.
//!
//! The server runs as the `postgres` OS user when the tests run as root
//! (PostgreSQL refuses root; `runuser`), else as the tests' user. It is
//! stopped (`pg_ctl stop -m immediate`) and its directory removed when the
//! guard drops, a failed test's too. Without PostgreSQL's binaries (or,
//! as root, `runuser` or a `postgres` user) [`PrivatePostgres::start`]
//! skips loudly, or fails under `SESSION_PROXY_REQUIRE_SERVICES=1`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::test_ca::TestCa;
use super::TempDir;

/// The role the proxy logs in as, by its certificate's CN, and its database.
pub const APP_USER: &str = "app";

pub struct PrivatePostgres {
    pub port: u16,
    /// Signed the server's certificate (for `localhost` and 127.0.0.1),
    /// and the client certificates the server accepts.
    pub ca: TestCa,
    bin: PathBuf,
    /// The `postgres` user's uid and gid when the tests run as root.
    run_as: Option<(u32, u32)>,
    dir: TempDir,
}

impl PrivatePostgres {
    /// The cluster on `port`, shared with the tests of this process that
    /// hold it at the same time (one start, about a second, for them all);
    /// `None` when it cannot run here (skipped loudly).
    pub fn shared(port: u16) -> Option<Arc<PrivatePostgres>> {
        static CLUSTER: Mutex<Weak<PrivatePostgres>> = Mutex::new(Weak::new());
        let mut slot = CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cluster) = slot.upgrade() {
            return Some(cluster);
        }
        let cluster = Arc::new(PrivatePostgres::start(port)?);
        *slot = Arc::downgrade(&cluster);
        Some(cluster)
    }

    /// initdb, TLS, `hostssl … cert`, started; a role and a database
    /// [`APP_USER`] made.
    pub fn start(port: u16) -> Option<PrivatePostgres> {
        let (bin, run_as) = runnable()?;
        let cluster = PrivatePostgres {
            port,
            ca: TestCa::new(),
            bin,
            run_as,
            dir: TempDir::new("pgcluster"),
        };
        cluster.own(cluster.dir.path());
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "--no-sync",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let dir = cluster.dir.path().to_path_buf();
        let (cert, key) = cluster.ca.issue("pg-server", &["localhost", "127.0.0.1"]);
        for (from, to) in [
            (cert, "server.crt"),
            (key, "server.key"),
            (cluster.ca.ca_file(), "ca.crt"),
        ] {
            std::fs::copy(from, dir.join(to)).unwrap();
            cluster.own(&dir.join(to));
        }
        std::fs::set_permissions(dir.join("server.key"), PermissionsExt::from_mode(0o600)).unwrap();
        let settings = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             ssl_ca_file = '{dir}/ca.crt'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 16MB\nmax_connections = 60\n",
            dir = dir.display()
        );
        append(&data.join("postgresql.conf"), &settings);
        // The test's own statements come over the socket; TCP takes a
        // certificate whose CN is the user's name.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all postgres trust\nhostssl all all 127.0.0.1/32 cert\n",
        )
        .unwrap();
        let log = dir.join("server.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        cluster.query("postgres", &format!("CREATE ROLE {APP_USER} LOGIN"));
        cluster.query(
            "postgres",
            &format!("CREATE DATABASE {APP_USER} OWNER {APP_USER}"),
        );
        Some(cluster)
    }

    /// A client certificate for `user`, signed by `ca`, as PEM files
    /// `(cert, key)`; the key file (ECDSA P-256, PKCS#8) is the user's
    /// alone (0600).
    pub fn client_cert(ca: &TestCa, tag: &str, user: &str) -> (PathBuf, PathBuf) {
        Self::client_cert_with(ca, tag, user, rcgen::KeyPair::generate().unwrap(), None)
    }

    /// The same, with the key `key`, and the serial number `serial` if
    /// given (else a random one).
    pub fn client_cert_with(
        ca: &TestCa,
        tag: &str,
        user: &str,
        key: rcgen::KeyPair,
        serial: Option<u64>,
    ) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, user);
        let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        let cert_path = ca.dir.path().join(format!("{tag}.crt"));
        let key_path = ca.dir.path().join(format!("{tag}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, PermissionsExt::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }

    /// Makes a login role `user` with a database of the same name.
    pub fn add_user(&self, user: &str) {
        self.query("postgres", &format!("CREATE ROLE {user} LOGIN"));
        self.query("postgres", &format!("CREATE DATABASE {user} OWNER {user}"));
    }

    /// Revokes the certificates of `serials` (signed by the cluster's CA):
    /// a CRL for new connections, and `user`'s open connections closed.
    pub fn revoke(&self, serials: &[u64], user: &str) {
        let mut params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(4000, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        for &serial in serials {
            params.revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(serial),
                revocation_time: rcgen::date_time_ymd(2020, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let crl = params.signed_by(&self.ca.cert, &self.ca.key).unwrap();
        let path = self.dir.path().join("crl.pem");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        self.own(&path);
        self.query(
            "postgres",
            &format!("ALTER SYSTEM SET ssl_crl_file = '{}'", path.display()),
        );
        self.query("postgres", "SELECT pg_reload_conf()");
        // The reload is the postmaster's, after this returns: until new
        // connections see the CRL, close the user's as they come.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let applied = self.query("postgres", "SHOW ssl_crl_file");
            self.query(
                "postgres",
                &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{user}'"),
            );
            if applied == [path.display().to_string()] || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Runs `sql` in `database` as the superuser, over the Unix socket;
    /// the rows' first columns as text.
    pub fn query(&self, database: &str, sql: &str) -> Vec<String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut config = tokio_postgres::Config::new();
            config
                .host_path(self.dir.path())
                .port(self.port)
                .user("postgres")
                .dbname(database);
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let messages = client.simple_query(sql).await.unwrap();
            messages
                .iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                })
                .collect()
        })
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of PostgreSQL's programs as the server's user; panics,
    /// with its output, when it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let output = self.command(program, args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?}: {}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.bin.join(program);
        let mut command = match self.run_as {
            Some(_) => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(path);
                command
            }
            None => Command::new(path),
        };
        // A working directory the server's user can enter.
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        command
    }

    /// Gives `path` to the server's user.
    fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        if data.join("postmaster.pid").exists() {
            let _ = self
                .command(
                    "pg_ctl",
                    &[
                        "-D",
                        data.to_str().unwrap(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// PostgreSQL's programs, and whom to run them as; `None` (after a loud
/// message) when something is missing, or a panic when services are
/// required.
fn runnable() -> Option<(PathBuf, Option<(u32, u32)>)> {
    let missing = |what: String| {
        assert!(
            std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "a private PostgreSQL cluster is required (SESSION_PROXY_REQUIRE_SERVICES=1), but {what}"
        );
        eprintln!(
            "\n!!! SKIPPED: no private PostgreSQL cluster: {what}; this test did not run !!!\n"
        );
        None
    };
    let Some(bin) = binaries() else {
        return missing(
            "initdb and pg_ctl are not in /usr/lib/postgresql/*/bin nor in `pg_config --bindir` (apt-get install postgresql)"
                .into(),
        );
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some((bin, None));
    }
    let runuser = Command::new("runuser")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    if !runuser.is_ok_and(|status| status.success()) {
        return missing("the tests run as root and `runuser` (util-linux) is missing".into());
    }
    let id = |flag: &str| -> Option<u32> {
        let output = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(output.stdout).ok()?.trim().parse().ok()
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Some((bin, Some((uid, gid)))),
        _ => missing(
            "the tests run as root and there is no `postgres` user to run the server".into(),
        ),
    }
}

/// The newest `/usr/lib/postgresql/N/bin` (Debian's layout), else
/// `pg_config --bindir`, that holds initdb and pg_ctl.
fn binaries() -> Option<PathBuf> {
    let complete = |bin: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|p| bin.join(p).is_file())
    };
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| complete(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    complete(&bin).then_some(bin)
}
