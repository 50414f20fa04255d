//! The deployment examples as shipped, held to the binary they deploy:
//! `examples/systemd/session-proxy.service` is checked by systemd, and the
//! commands and signals it names are run against the built proxy;
//! `examples/logrotate/session-proxy` rotates a running proxy's access log
//! with its own directives. Without `systemd-analyze` or `logrotate` a test
//! is skipped loudly, or fails under `SESSION_PROXY_REQUIRE_SERVICES=1`.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const UNIT: &str = "examples/systemd/session-proxy.service";
const LOGROTATE: &str = "examples/logrotate/session-proxy";
const INSTALLED_BINARY: &str = "/usr/local/bin/session-proxy";
const INSTALLED_CONFIG: &str = "/etc/session-proxy/config.toml";

fn tool_installed(tool: &str) -> bool {
    installed(tool, &format!("{UNIT} and {LOGROTATE} unchecked"))
}

fn example(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap()
}

/// `text` with `from` replaced by `to`; `from` must be there, so that an
/// example that drifts from what the test expects fails it.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the example no longer has {from:?}");
    text.replace(from, to)
}

/// The value of the unit's setting `key` (one line `key=value`).
fn setting(unit: &str, key: &str) -> String {
    let values: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect();
    assert_eq!(values.len(), 1, "{key} in {UNIT}: {values:?}");
    values[0].trim().to_owned()
}

/// The command line of the unit's `key`, for this test's binary and config.
fn command_of(unit: &str, key: &str, config: &Path, pid: Option<u32>) -> Command {
    let line = setting(unit, key)
        .replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_session-proxy"))
        .replace(INSTALLED_CONFIG, &config.display().to_string())
        .replace(
            "$MAINPID",
            &pid.map(|pid| pid.to_string()).unwrap_or_default(),
        );
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut command = Command::new(words[0]);
    command
        .args(&words[1..])
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn");
    command
}

#[test]
fn systemd_accepts_the_unit_without_a_warning() {
    if !tool_installed("systemd-analyze") {
        return;
    }
    let dir = TempDir::new("unit");
    let path = dir.path().join("session-proxy.service");
    let unit = replaced(
        &example(UNIT),
        INSTALLED_BINARY,
        env!("CARGO_BIN_EXE_session-proxy"),
    );
    std::fs::write(&path, unit).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // systemd ignores an unknown key or a bad value with a warning only.
    assert!(output.status.success() && stderr.is_empty(), "{stderr}");
}

/// What the unit tells systemd about the proxy holds: `ExecStartPre`
/// checks the config (and fails with `RestartPreventExitStatus` for a bad
/// one), `ExecStart` serves, `ExecReload` leaves it serving the same
/// sessions, and `KillSignal` stops it with exit 0 within `TimeoutStopSec`.
#[test]
fn the_units_commands_and_signals_do_what_it_says() {
    let unit = example(UNIT);
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let path = config.write();

    let checked = command_of(&unit, "ExecStartPre", &path, None)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    assert_eq!(String::from_utf8_lossy(&checked.stdout).trim(), "ok");

    let mut proxy = Process {
        child: command_of(&unit, "ExecStart", &path, None)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        port: config.port,
    };
    wait_listening(config.port, &mut proxy.child);
    let mut browser = Browser::new(config.port);
    browser.get("/", &[("X-Test-Update", r#"{"n":1}"#)]);
    assert!(browser.cookie.is_some());

    let pid = proxy.child.id();
    let reloaded = command_of(&unit, "ExecReload", &path, Some(pid))
        .status()
        .unwrap();
    assert!(reloaded.success());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(proxy.child.try_wait().unwrap(), None, "reload stopped it");
    assert_eq!(browser.get("/", &[]).session()["data"]["n"], 1);

    let stop_signal = setting(&unit, "KillSignal");
    let signal_name = stop_signal.strip_prefix("SIG").unwrap();
    let stop_within: u64 = setting(&unit, "TimeoutStopSec").parse().unwrap();
    signal(pid, signal_name);
    let status = wait_exit(&mut proxy.child, Duration::from_secs(stop_within));
    assert_eq!(status.code(), Some(0), "{stop_signal}");

    std::fs::write(&path, "[server]\nlisten = 8080\n").unwrap();
    let refused = command_of(&unit, "ExecStartPre", &path, None)
        .output()
        .unwrap();
    let no_restart: i32 = setting(&unit, "RestartPreventExitStatus").parse().unwrap();
    assert_eq!(refused.status.code(), Some(no_restart), "{refused:?}");
}

/// logrotate with the example's directives (its path, `su` and
/// `postrotate` command made this test's): the proxy writes on into a file
/// of its own making, and the rotated ones are kept and compressed one
/// rotation late.
#[test]
fn logrotate_rotates_a_running_proxys_access_log() {
    if !tool_installed("logrotate") {
        return;
    }
    let upstream = start_upstream();
    let logs = TempDir::new("logrotate");
    let log = logs.path().join("access.log");
    let config = ProxyConfig::new(upstream.port).server(&format!("access_log = {log:?}"));
    let proxy = config.start();
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    };
    let conf = example(LOGROTATE);
    let conf = replaced(
        &conf,
        "/var/log/session-proxy/access.log",
        &log.display().to_string(),
    );
    let conf = replaced(&conf, "su session-proxy session-proxy", "");
    let conf = replaced(
        &conf,
        "systemctl kill --kill-whom=main --signal=USR1 session-proxy.service",
        &format!("kill -USR1 {}", proxy.child.id()),
    );
    let conf_path = logs.path().join("logrotate.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let rotate = || {
        let output = Command::new("logrotate")
            .arg("-f")
            .arg("-s")
            .arg(logs.path().join("state"))
            .arg(&conf_path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        // The proxy reopens its log after `postrotate` has returned: the
        // file it makes (`nocreate`: logrotate makes none) says it has.
        assert!(
            eventually(Duration::from_secs(5), || log.exists()),
            "no new file"
        );
    };

    for _ in 0..3 {
        get(config.port, "/before", &[]);
    }
    assert!(eventually(Duration::from_secs(5), || lines(&log) == 3));
    rotate();
    let rotated = logs.path().join("access.log.1");
    assert_eq!(lines(&rotated), 3);
    get(config.port, "/after", &[]);
    assert!(
        eventually(Duration::from_secs(5), || lines(&log) == 1),
        "no new line in a new file"
    );
    assert!(std::fs::read_to_string(&log).unwrap().contains("/after"));
    assert_eq!(lines(&rotated), 3, "written to the rotated file");

    rotate();
    assert!(
        logs.path().join("access.log.2.gz").exists(),
        "not compressed"
    );
    assert_eq!(lines(&logs.path().join("access.log.1")), 1);
}
