//! Whether a test can start a `redis-server` of its own (shared by the
//! tests that use `support` and by `store_shared`, which does not).

use std::process::{Command, Stdio};

/// Whether `redis-server` can be run here for a test of `what`; when it
/// cannot, a loud skip, or a failure under `SESSION_PROXY_REQUIRE_SERVICES=1`.
pub fn redis_server_installed(what: &str) -> bool {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        let required = std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() == Ok("1");
        assert!(!required, "redis-server not installed");
        eprintln!("\n******** SKIPPED: redis-server not installed: no {what} test ********\n");
    }
    installed
}
