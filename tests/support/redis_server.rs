//! Whether a test can run a program it needs (a `redis-server` of its own,
//! `systemd-analyze`, ...): shared by the tests that use `support` and by
//! `store_shared`, which does not.

use std::process::{Command, Stdio};

/// Whether `redis-server` can be run here for a test of `what`; when it
/// cannot, a loud skip, or a failure under `SESSION_PROXY_REQUIRE_SERVICES=1`.
pub fn redis_server_installed(what: &str) -> bool {
    installed("redis-server", &format!("no {what} test"))
}

/// Whether `program --version` runs here; when it does not, a loud skip
/// that says what goes `unchecked`, or a failure under
/// `SESSION_PROXY_REQUIRE_SERVICES=1`.
pub fn installed(program: &str, unchecked: &str) -> bool {
    let installed = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        let required = std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() == Ok("1");
        assert!(!required, "{program} not installed");
        eprintln!("\n******** SKIPPED: {program} not installed: {unchecked} ********\n");
    }
    installed
}
