//! The command line (SPEC [1]): exit codes, messages, `sessions`.

mod support;

use support::*;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn keygen_prints_a_fresh_43_character_base64url_secret() {
    let (a, b) = (run_cli(&["keygen"], &[]), run_cli(&["keygen"], &[]));
    assert!(a.status.success());
    let key = stdout(&a).trim().to_string();
    assert_eq!(key.len(), 43);
    assert!(
        key.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "{key}"
    );
    assert_ne!(key, stdout(&b).trim());
}

#[test]
fn check_prints_ok_for_a_valid_config_and_a_reachable_store() {
    let config = ProxyConfig::new(free_port());
    let path = config.write();
    let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), "ok");
}

#[test]
fn check_exits_2_and_names_the_file_line_and_key_for_an_invalid_config() {
    let config = ProxyConfig::new(free_port()).session("samesite = \"sometimes\"");
    let path = config.write();
    let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains(path.to_str().unwrap()), "{message}");
    assert!(message.contains("session.samesite"), "{message}");
    assert!(message.contains("sometimes"), "{message}");
}

#[test]
fn an_unknown_key_is_a_config_error() {
    let config = ProxyConfig::new(free_port()).session("cookie_nmae = \"x\"");
    let output = run_cli(&["check", "-c", config.write().to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("cookie_nmae"));
}

#[test]
fn run_with_an_invalid_config_exits_2_and_listens_nowhere() {
    let mut config = ProxyConfig::new(free_port());
    config.session = vec!["secret_keys = [\"too short\"]".into()];
    let output = run_cli(&["run", "-c", config.write().to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("keygen"), "{message}");
    assert!(
        !message.contains("too short"),
        "a secret is never printed: {message}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", config.port)).is_err());
}

/// pingora binds in a task of its own, where a failure would leave a
/// process that serves nothing, its /healthz saying ok: `run` checks every
/// address first, and exits 1 naming the one it cannot have.
#[test]
fn run_exits_1_when_its_port_or_admin_port_is_taken() {
    for admin in [false, true] {
        let config = ProxyConfig::new(free_port());
        let port = if admin {
            config.admin_port
        } else {
            config.port
        };
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_session-proxy"))
            .args(["run", "-c", config.write().to_str().unwrap()])
            .env_remove("SESSION_PROXY_SECRET_KEYS")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                child.kill().unwrap();
                panic!("still running with port {port} taken (admin: {admin})");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut message = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut message).unwrap();
        assert_eq!(status.code(), Some(1), "{message}");
        assert!(
            message.contains(&format!("cannot listen on 127.0.0.1:{port}")),
            "{message}"
        );
    }
}

/// `run -c PATH` with `threads` and the shell's `ulimit` (e.g. `-Sn 200`)
/// on open files, its stderr piped.
fn spawn_with_open_files_limit(
    config: &ProxyConfig,
    threads: u32,
    ulimit: &str,
) -> std::process::Child {
    let path = config.write();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("threads = 2", &format!("threads = {threads}")),
    )
    .unwrap();
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\" run -c \"$1\""))
        .arg(env!("CARGO_BIN_EXE_session-proxy"))
        .arg(&path)
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn hard_open_files_limit() -> u64 {
    let output = std::process::Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .unwrap();
    stdout(&output).trim().parse().unwrap_or(u64::MAX)
}

/// pingora opens about 8 files per thread at start and panicked (exit
/// 101) below that; systemd's soft limit of 1024 is passed by one thread
/// per CPU on a large machine. The soft limit is raised to the hard one.
#[test]
fn run_raises_a_soft_open_files_limit_its_threads_pass() {
    if hard_open_files_limit() < 2048 {
        eprintln!("SKIPPED: the hard limit on open files is too low to raise to");
        return;
    }
    let config = ProxyConfig::new(free_port());
    let child = spawn_with_open_files_limit(&config, 40, "-Sn 200");
    let mut proxy = Process {
        child,
        port: config.port,
    };
    wait_listening(config.port, &mut proxy.child);
    wait_listening(config.admin_port, &mut proxy.child);
}

/// A hard limit it cannot raise is a message naming `server.threads` and
/// exit 1, not a panic.
#[test]
fn run_exits_1_naming_threads_when_the_open_files_limit_is_too_low() {
    let config = ProxyConfig::new(free_port());
    let child = spawn_with_open_files_limit(&config, 40, "-n 200");
    let output = child.wait_with_output().unwrap();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(
        message.contains("server.threads = 40 needs about") && message.contains("ulimit -n"),
        "{message}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", config.port)).is_err());
}

#[test]
fn the_secret_can_come_from_the_environment() {
    let mut config = ProxyConfig::new(free_port());
    config.session = vec![];
    let path = config.write();
    let output = run_cli(
        &["check", "-c", path.to_str().unwrap()],
        &[("SESSION_PROXY_SECRET_KEYS", KEY)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let without = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(without.status.code(), Some(2));
}

#[test]
fn check_and_run_exit_1_naming_the_config_when_the_store_is_unreachable() {
    let mut config = ProxyConfig::new(free_port());
    config.store = vec!["path = \"/dev/null/sessions\"".into()];
    let path = config.write();
    let path = path.to_str().unwrap();
    for command in ["check", "run"] {
        let output = run_cli(&[command, "-c", path], &[]);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{command}: {message}");
        assert!(
            message.starts_with(&format!("session-proxy: {path}: session store unavailable")),
            "{command}: {message}"
        );
    }
}

#[test]
fn the_config_path_defaults_to_config_session_proxy_toml() {
    let dir = TempDir::new("cwd");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("config/session-proxy.toml"),
        "{}",
        stderr(&output)
    );
}

/// `keygen > key.txt` on a full disk, or `check` with its standard output
/// gone: the output that could not be written is an error the command
/// names, exit 1, as for `sessions`; `println!` panicked (exit 101, a
/// panic message and a backtrace on stderr).
#[test]
fn keygen_and_check_report_output_they_cannot_write() {
    let config = ProxyConfig::new(free_port());
    let path = config.write();
    for args in [vec!["keygen"], vec!["check", "-c", path.to_str().unwrap()]] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-proxy"))
            .args(&args)
            .env_remove("SESSION_PROXY_SECRET_KEYS")
            .stdout(full)
            .output()
            .unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
        assert!(
            message.contains("cannot write the output"),
            "{args:?}: {message}"
        );
    }
}

/// The exit codes hold when standard error cannot be written either: a
/// config error is 2, which a service manager reads as "do not restart"
/// (`RestartPreventExitStatus=2` in examples/systemd); `eprintln!`
/// panicked on the write and the process exited 101.
#[test]
fn a_config_error_exits_2_when_its_message_cannot_be_written() {
    let dir = TempDir::new("stderr-full");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args(["check", "-c"])
        .arg(dir.path().join("missing.toml"))
        .stderr(full)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// A config path that exists but cannot be read (a directory, a file
/// the proxy's user may not read) is not fixed by creating it: the
/// message says what is wrong with it, and only a missing file is told
/// to be created.
#[test]
fn a_config_path_that_is_a_directory_is_not_told_to_be_created() {
    let dir = TempDir::new("config-dir");
    let output = run_cli(&["check", "-c", dir.path().to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains(dir.path().to_str().unwrap()), "{message}");
    assert!(message.contains("is a directory"), "{message}");
    assert!(!message.contains("create it"), "{message}");

    let missing = dir.path().join("missing.toml");
    let output = run_cli(&["check", "-c", missing.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("create it"), "{}", stderr(&output));
}

/// A path that is not a config (`/dev/zero`, a log file) is refused once
/// it passes 16 MiB, not read into memory to its end.
#[test]
fn a_config_file_past_16_mib_is_refused_without_reading_it_whole() {
    let dir = TempDir::new("config-huge");
    let huge = dir.path().join("huge.toml");
    // Sparse: NUL bytes, valid UTF-8, read back without taking disk space.
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let output = run_cli(&["check", "-c", huge.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains(huge.to_str().unwrap()), "{message}");
    assert!(message.contains("larger than 16 MiB"), "{message}");
}

/// The handle of a new session the proxy on `port` stores with `update`
/// (the test app reports it as `sid`).
fn new_session_handle(port: u16, update: &str) -> String {
    Browser::new(port)
        .get("/", &[("X-Test-Update", update)])
        .session()["sid"]
        .as_str()
        .expect("the app reports the session's handle")
        .to_string()
}

#[test]
fn sessions_lists_shows_kills_and_purges_stored_sessions() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("timeout = 100");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    let handle = browser
        .get("/", &[("X-Test-Update", r#"{"secret": "do-not-list"}"#)])
        .session()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    drop(proxy);
    let path = config.path();
    let path = path.to_str().unwrap();

    let list = run_cli(&["sessions", "list", "-c", path], &[]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(stdout(&list).contains(&handle));
    assert!(
        !stdout(&list).contains("do-not-list"),
        "list never shows data"
    );

    let show = run_cli(&["sessions", "show", &handle, "-c", path], &[]);
    assert!(show.status.success());
    let record: serde_json::Value = serde_json::from_str(&stdout(&show)).unwrap();
    assert_eq!(record["data"]["secret"], "do-not-list");

    let unknown = "0".repeat(64);
    assert_eq!(
        run_cli(&["sessions", "show", &unknown, "-c", path], &[])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        run_cli(&["sessions", "kill", &unknown, "-c", path], &[])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(
        run_cli(&["sessions", "show", "nonsense", "-c", path], &[])
            .status
            .code(),
        Some(1)
    );
    // A digit more is no handle, though its first 64 are a session's: not
    // as an argument, nor as the name of a file in the store.
    let longer = format!("{handle}0");
    let refused = run_cli(&["sessions", "show", &longer, "-c", path], &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("is not a session handle"),
        "{}",
        stderr(&refused)
    );
    let dir = config.sessions_dir();
    std::fs::copy(
        dir.join(format!("{handle}.json")),
        dir.join(format!("{longer}.json")),
    )
    .unwrap();
    let list = run_cli(&["sessions", "list", "-c", path], &[]);
    assert!(!stdout(&list).contains(&longer), "{}", stdout(&list));
    std::fs::remove_file(dir.join(format!("{longer}.json"))).unwrap();

    assert!(run_cli(&["sessions", "kill", &handle, "-c", path], &[])
        .status
        .success());
    assert_eq!(
        run_cli(&["sessions", "show", &handle, "-c", path], &[])
            .status
            .code(),
        Some(1)
    );

    let proxy = config.start();
    let mut other = Browser::new(proxy.port);
    other.get("/", &[("X-Test-Update", r#"{"b": 1}"#)]);
    for file in stored_files(&config.sessions_dir()) {
        let mut record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        record["atime"] = (record["atime"].as_u64().unwrap() - 101).into();
        std::fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();
    }
    drop(proxy);
    let purge = run_cli(&["sessions", "purge-expired", "-c", path], &[]);
    assert!(stdout(&purge).contains("deleted 1"), "{}", stdout(&purge));
    assert!(stored_files(&config.sessions_dir()).is_empty());
}

/// `purge-expired` deletes what the proxy would refuse (SPEC [4.3], [6]):
/// sessions past `absolute_timeout` too, however recently used.
#[test]
fn purge_expired_deletes_sessions_past_the_absolute_timeout() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("absolute_timeout = 100");
    let proxy = config.start();
    let old = new_session_handle(proxy.port, r#"{"a": 1}"#);
    let file = stored_files(&config.sessions_dir()).pop().unwrap();
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    // Created 101 s ago, used just now.
    record["created"] = (record["created"].as_u64().unwrap() - 101).into();
    std::fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();
    let young = new_session_handle(proxy.port, r#"{"b": 1}"#);
    drop(proxy);
    let path = config.path();
    let path = path.to_str().unwrap();

    let purge = run_cli(&["sessions", "purge-expired", "-c", path], &[]);
    assert!(purge.status.success(), "{}", stderr(&purge));
    assert!(stdout(&purge).contains("deleted 1 "), "{}", stdout(&purge));
    let show = |handle: &str| {
        run_cli(&["sessions", "show", handle, "-c", path], &[])
            .status
            .code()
    };
    assert_eq!(show(&old), Some(1), "past absolute_timeout, still stored");
    assert_eq!(show(&young), Some(0));
}

/// A record whose data holds a number past f64's range (edited by hand, or
/// written by another tool) is still shown, as it is stored: the proxy
/// passes such data through as text, and `show` used to refuse it.
#[test]
fn sessions_show_prints_data_a_json_value_cannot_hold_as_stored() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let handle = new_session_handle(proxy.port, r#"{"big": 1}"#);
    drop(proxy);
    let files = stored_files(&config.sessions_dir());
    let [file] = &files[..] else {
        panic!("one record expected");
    };
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(r#""big":1"#), "{text}");
    std::fs::write(file, text.replace(r#""big":1"#, r#""big":1e400"#)).unwrap();

    let path = config.path();
    let show = run_cli(
        &["sessions", "show", &handle, "-c", path.to_str().unwrap()],
        &[],
    );
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(
        stdout(&show).contains(r#""big":1e400"#),
        "{}",
        stdout(&show)
    );
}

/// The line that says the proxy started names every address it listens
/// on, the admin listener's too.
#[test]
fn the_start_line_names_the_listen_and_admin_addresses() {
    let config = ProxyConfig::new(free_port());
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("info", &log);
    let text = std::fs::read_to_string(&log).unwrap();
    let expected = format!(
        "listening on [127.0.0.1:{}], admin on [127.0.0.1:{}]",
        config.port, config.admin_port
    );
    assert!(text.contains(&expected), "{text}");
    drop(proxy);
}

/// An error of `sessions` names the config whose store it is, and the
/// disk store's name the directory, so that the fix is clear.
#[test]
fn sessions_errors_name_the_config_file_and_the_directory_at_fault() {
    let mut config = ProxyConfig::new(free_port());
    let dir = config.sessions_dir();
    let handle = "b".repeat(64);
    // A record that is a directory: it can be neither read nor deleted.
    std::fs::create_dir_all(dir.join(format!("{handle}.json"))).unwrap();
    let path = config.write();
    let path = path.to_str().unwrap();
    for (args, problem) in [
        (
            ["sessions", "show", &handle],
            "cannot read session bbbbbbbb in",
        ),
        (
            ["sessions", "kill", &handle],
            "cannot delete session bbbbbbbb in",
        ),
    ] {
        let mut args = args.to_vec();
        args.extend(["-c", path]);
        let output = run_cli(&args, &[]);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let message = stderr(&output);
        assert!(
            message.starts_with(&format!("session-proxy: {path}: ")),
            "{args:?}: {message}"
        );
        assert!(
            message.contains(&format!("{problem} {}", dir.display())),
            "{args:?}: {message}"
        );
    }

    let not_a_directory = config.dir.path().join("not-a-directory");
    std::fs::write(&not_a_directory, "").unwrap();
    config.store = vec![format!("path = {:?}", not_a_directory.to_str().unwrap())];
    let path = config.write();
    let path = path.to_str().unwrap();
    for command in ["list", "purge-expired"] {
        let output = run_cli(&["sessions", command, "-c", path], &[]);
        assert_eq!(output.status.code(), Some(1), "{command}");
        let message = stderr(&output);
        assert!(
            message.starts_with(&format!("session-proxy: {path}: ")),
            "{command}: {message}"
        );
        assert!(
            message.contains(&format!(
                "the session store path {} is not a directory",
                not_a_directory.display()
            )),
            "{command}: {message}"
        );
    }
}

/// `sessions list | head`: the reader goes away with most of the listing
/// unread. The rest is no error to report, as for other command-line
/// tools; `println!` panicked on the broken pipe (exit 101, a panic
/// message on stderr).
#[test]
fn sessions_list_into_a_pipe_closed_early_ends_quietly() {
    use std::io::Read;
    use std::process::{Command, Stdio};

    let config = ProxyConfig::new(free_port());
    let path = config.write();
    let sessions = config.sessions_dir();
    std::fs::create_dir_all(&sessions).unwrap();
    // Some 600 KB of listing: far more than a pipe holds (64 KiB).
    let now = session_proxy::session::now();
    for n in 0..4000u32 {
        let record =
            format!(r#"{{"data":{{}},"created":{now},"atime":{now},"ip":"127.0.0.1","ver":1}}"#);
        std::fs::write(sessions.join(format!("{n:064x}.json")), record).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args(["sessions", "list", "-c", path.to_str().unwrap()])
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first line, then the pipe closes (`head -1`).
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"handle "), "{first:?}");
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success() && stderr(&output).is_empty(),
        "{:?}: {}",
        output.status,
        stderr(&output)
    );
}

/// The memory store lives in the proxy process: a `sessions` command
/// would open an empty one of its own, list nothing and answer "no
/// session" for a session the running proxy still serves.
#[test]
fn sessions_on_the_memory_store_say_they_cannot_reach_it() {
    let config = ProxyConfig::new(free_port()).store("kind = \"memory\"");
    let path = config.write();
    let path = path.to_str().unwrap();
    let handle = "0".repeat(64);
    for args in [
        vec!["sessions", "list", "-c", path],
        vec!["sessions", "show", &handle, "-c", path],
        vec!["sessions", "kill", &handle, "-c", path],
        vec!["sessions", "purge-expired", "-c", path],
    ] {
        let output = run_cli(&args, &[]);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(stdout(&output).is_empty(), "{args:?}: {}", stdout(&output));
        let message = stderr(&output);
        assert!(
            message.contains("store.kind = \"memory\"") && !message.contains("no session"),
            "{args:?}: {message}"
        );
    }
}

#[test]
fn check_exits_1_when_a_shared_store_does_not_answer() {
    let closed = free_port();
    for store in [
        vec![
            "kind = \"redis\"".to_string(),
            format!("url = \"redis://127.0.0.1:{closed}\""),
        ],
        vec![
            "kind = \"postgres\"".to_string(),
            format!("url = \"postgres://postgres@127.0.0.1:{closed}/test\""),
        ],
    ] {
        let mut config = ProxyConfig::new(free_port());
        config.store = store;
        config = config.store("timeout = 1");
        let output = run_cli(&["check", "-c", config.write().to_str().unwrap()], &[]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(
            !stderr(&output).contains("postgres@"),
            "the URL is not echoed: {}",
            stderr(&output)
        );
    }
}
