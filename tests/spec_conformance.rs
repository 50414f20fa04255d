//! SPEC.md, clause by clause: the requirements no other test file checks
//! end to end, or checks in a way that could not fail if they were broken.
//! Each test quotes the clause it checks; sections follow SPEC's numbering.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use support::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Writes the config, lets `edit` change its text, and runs the binary
/// with `args` followed by the config's path; waits until it listens on
/// `ports`.
fn spawn_edited(
    config: &ProxyConfig,
    args: &[&str],
    edit: impl FnOnce(String) -> String,
    ports: &[u16],
) -> Process {
    let path = config.write();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_session-proxy"))
        .args(args)
        .arg(&path)
        .env_remove("SESSION_PROXY_SECRET_KEYS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut process = Process {
        child,
        port: ports[0],
    };
    for &port in ports {
        wait_listening(port, &mut process.child);
    }
    process
}

/// Sends a request whose answer has a 500 MB body and reads only its head.
fn read_head_only(port: u16, headers: &[(&str, &str)]) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head =
        "GET /download HTTP/1.1\r\nHost: x\r\nX-Test-Body-Bytes: 500000000\r\n".to_string();
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "closed before the head ended");
        received.extend_from_slice(&buffer[..read]);
    }
    let end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8_lossy(&received[..end]).into_owned(),
        stream,
    )
}

// ---- SPEC [1] Command line ----

#[test]
fn the_bare_dash_c_form_runs_the_proxy() {
    // "`session-proxy run -c FILE` (also `session-proxy -c FILE`) | runs the proxy"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = spawn_edited(&config, &["-c"], |text| text, &[config.port]);
    let response = get(proxy.port, "/", &[("X-Test-Update", r#"{"a":1}"#)]);
    assert_eq!(response.status, 200);
    assert_eq!(response.session()["new"], true);
    assert!(response.set_cookie("session_id").is_some());
}

#[test]
fn sigint_stops_the_proxy_with_exit_0() {
    // "on SIGTERM or SIGINT it stops accepting, lets in-flight requests finish ..., and exits | 0 on clean stop"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let mut proxy = config.start();
    let port = proxy.port;
    let slow = std::thread::spawn(move || get(port, "/", &[("X-Test-Sleep-Ms", "1000")]).status);
    wait_in_flight(config.admin_port, 1);
    signal(proxy.child.id(), "INT");
    assert_eq!(slow.join().unwrap(), 200, "the in-flight request finished");
    let status = wait_exit(&mut proxy.child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn after_sigterm_new_connections_are_not_served() {
    // "on SIGTERM or SIGINT it stops accepting, lets in-flight requests finish"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let mut proxy = config.start();
    let port = proxy.port;
    let slow = std::thread::spawn(move || get(port, "/", &[("X-Test-Sleep-Ms", "2500")]).status);
    wait_in_flight(config.admin_port, 1);
    signal(proxy.child.id(), "TERM");
    let refused = eventually(Duration::from_secs(2), || {
        try_request(port, "GET", "/", &[], b"").is_err()
    });
    assert!(refused, "a new connection was still served after SIGTERM");
    assert_eq!(slow.join().unwrap(), 200, "the in-flight request finished");
    assert_eq!(
        wait_exit(&mut proxy.child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[test]
fn a_config_error_is_exit_2_naming_file_line_column_key_and_expectation_for_every_command() {
    // "A config error names the file, the line and column where it has them, the key, and what was expected; the process exits 2 and starts nothing."
    let config = ProxyConfig::new(free_port()).session("timeout = \"long\"");
    let path = config.write();
    let path = path.to_str().unwrap();
    let line = 1 + std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .position(|line| line.starts_with("timeout = "))
        .unwrap();
    let handle = "0".repeat(64);
    for args in [
        vec!["check", "-c", path],
        vec!["sessions", "list", "-c", path],
        vec!["sessions", "show", &handle, "-c", path],
        vec!["sessions", "kill", &handle, "-c", path],
        vec!["sessions", "purge-expired", "-c", path],
    ] {
        let output = run_cli(&args, &[]);
        let message = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert!(
            message.contains(&format!("{path}:{line}:11: session.timeout: expected ")),
            "{args:?}: {message}"
        );
    }
}

// ---- SPEC [2] Config file ----

#[test]
fn listen_as_an_array_serves_on_every_address() {
    // "listen = \"127.0.0.1:8080\"      # string or array of \"host:port\""
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let second = free_port();
    let single = format!("listen = \"127.0.0.1:{}\"", config.port);
    let both = format!(
        "listen = [\"127.0.0.1:{}\", \"127.0.0.1:{second}\"]",
        config.port
    );
    let _proxy = spawn_edited(
        &config,
        &["run", "-c"],
        |text| text.replace(&single, &both),
        &[config.port, second],
    );
    for port in [config.port, second] {
        assert_eq!(get(port, "/", &[]).session()["new"], true, "port {port}");
    }
}

#[test]
fn configured_header_names_and_token_ttl_are_the_ones_used() {
    // "session = \"X-Session\" ... update = \"X-Session-Update\" ... action = ... token_ttl = 60 # exp - iat of the token"
    let upstream = start_upstream_with(&["--session-header", "X-App-Token"]);
    let mut config = ProxyConfig::new(upstream.port);
    config.headers = vec![
        "session = \"X-App-Token\"".into(),
        "update = \"X-App-Update\"".into(),
        "action = \"X-App-Action\"".into(),
        "token_ttl = 7".into(),
    ];
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    let first = browser.get("/", &[("X-Test-Header", r#"X-App-Update: {"a": 1}"#)]);
    assert_eq!(first.status, 200);
    assert!(
        first.header("x-app-update").is_none(),
        "update reached the client"
    );
    assert!(
        browser.cookie.is_some(),
        "the update under its configured name was applied"
    );
    let claims = first.session();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        7
    );
    // The default names are ordinary headers now: not an instruction.
    let ignored = browser.get("/", &[("X-Test-Update", r#"{"a": 2}"#)]);
    assert_eq!(ignored.status, 200);
    assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);
    let killed = browser.get("/", &[("X-Test-Header", "X-App-Action: kill")]);
    assert!(killed.header("x-app-action").is_none());
    assert!(
        browser.cookie.is_none(),
        "the action under its configured name was applied"
    );
}

#[test]
fn cookie_attributes_follow_cookie_path_httponly_and_samesite() {
    // "cookie_path = \"/\"", "httponly = true", "samesite = \"lax\" # \"strict\" | \"lax\" | \"none\" | \"\" (omitted)"
    let upstream = start_upstream();
    for (settings, attributes) in [
        (
            vec![
                "cookie_path = \"/app\"",
                "httponly = false",
                "samesite = \"\"",
            ],
            "; Path=/app",
        ),
        (
            vec!["samesite = \"none\"", "secure = true"],
            "; Path=/; HttpOnly; Secure; SameSite=None",
        ),
    ] {
        let config = settings
            .iter()
            .fold(ProxyConfig::new(upstream.port), |c, line| c.session(line));
        let proxy = config.start();
        let response = get(proxy.port, "/app", &[("X-Test-Update", r#"{"a":1}"#)]);
        let value = response.set_cookie("session_id").unwrap();
        assert_eq!(
            response.header("set-cookie").unwrap(),
            format!("session_id={value}{attributes}")
        );
    }
}

#[test]
fn the_initializer_is_deep_copied_into_each_new_session() {
    // "no valid cookie: a new session with a deep copy of `initializer`, not yet stored"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("initializer = { prefs = { lang = \"fr\", tags = [1] } }");
    let proxy = config.start();
    let mut first = Browser::new(proxy.port);
    first.get(
        "/",
        &[("X-Test-Update", r#"{"prefs": {"lang": "en", "tags": [2]}}"#)],
    );
    assert_eq!(
        first.get("/", &[]).session()["data"],
        serde_json::json!({"prefs": {"lang": "en", "tags": [2]}})
    );
    assert_eq!(
        get(proxy.port, "/", &[]).session()["data"],
        serde_json::json!({"prefs": {"lang": "fr", "tags": [1]}}),
        "another session's change reached the initializer"
    );
}

#[test]
fn max_data_bytes_bounds_the_merged_data_as_compact_json() {
    // "max_data_bytes = 4096          # size limit of the session data as compact JSON"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("max_data_bytes = 64");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    // {"a":1,"k":"..."} is 14 bytes plus the string: 50 of them make 64.
    let fits = format!("{{ \"k\" :   \"{}\" }}", "x".repeat(50));
    let response = browser.get("/", &[("X-Test-Update", fits.as_str())]);
    assert_eq!(response.status, 200, "64 bytes of compact JSON fit");
    let over = format!("{{\"k\": \"{}\"}}", "x".repeat(51));
    let response = browser.get("/", &[("X-Test-Update", over.as_str())]);
    assert_eq!(response.status, 502, "65 bytes of compact JSON do not");
    let data = browser.get("/", &[]).session()["data"].clone();
    assert_eq!(serde_json::to_string(&data).unwrap().len(), 64);
}

// ---- SPEC [3] The cookie and the session handle ----

#[test]
fn the_cookie_and_token_are_signed_with_the_first_key_as_its_utf8_bytes() {
    // "each entry of `secret_keys` is used as the UTF-8 bytes of the string as written (`keygen` prints such a string)"
    // "Cookie value: `ID.TAG`, where TAG is the first 16 bytes of HMAC-SHA256(key, ID), base64url (22 chars)"
    // "JWT header: {\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"<first 8 hex of SHA-256(signing key)>\"} ... signed with the first key"
    let keygen = run_cli(&["keygen"], &[]);
    let generated = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    // Not decoded as base64, and not cut at a character count either.
    for first in [generated.as_str(), "clé-secrète-ünïcödé-0123456789"] {
        let upstream = start_upstream();
        let mut config = ProxyConfig::new(upstream.port);
        config.session[0] = format!("secret_keys = [{first:?}, {KEY:?}]");
        let proxy = config.start();
        let response = get(proxy.port, "/", &[("X-Test-Update", r#"{"a":1}"#)]);
        let cookie = response.set_cookie("session_id").unwrap();
        let (id, tag) = cookie.split_once('.').unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(id).unwrap().len(),
            32,
            "a 32-byte id"
        );
        let expected_tag =
            URL_SAFE_NO_PAD.encode(&hmac_sha256(first.as_bytes(), id.as_bytes())[..16]);
        assert_eq!(tag, expected_tag, "{first}");

        let token = response.upstream_header("x-session").unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let kid = hex(&Sha256::digest(first.as_bytes())[..4]);
        assert_eq!(
            header,
            serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": kid})
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            hmac_sha256(first.as_bytes(), signed.as_bytes()),
            "{first}"
        );
        // "The raw ID is never stored, logged or sent upstream"
        let next = get(
            proxy.port,
            "/",
            &[("Cookie", &format!("theme=x; session_id={cookie}"))],
        );
        assert_eq!(next.session()["new"], false);
        assert!(!next.text().contains(id), "the raw id reached the upstream");
    }
}

#[test]
fn a_wrongly_signed_or_malformed_cookie_never_reaches_the_store() {
    // "A cookie that is malformed, too long or wrongly signed counts as no cookie, and never reaches the store."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let (id, _) = browser
        .cookie
        .clone()
        .unwrap()
        .split_once('.')
        .map(|(i, t)| (i.to_string(), t.to_string()))
        .unwrap();
    let before = store_ops(config.admin_port);
    for forged in [
        format!("{id}.AAAAAAAAAAAAAAAAAAAAAA"),
        format!("{id}.{}", "A".repeat(2000)),
        id.clone(),
    ] {
        let response = get(
            proxy.port,
            "/",
            &[("Cookie", &format!("session_id={forged}"))],
        );
        assert_eq!(response.session()["new"], true);
    }
    assert_eq!(store_ops(config.admin_port), before, "[load, save, delete]");
}

#[test]
fn with_cookie_max_age_the_cookie_is_not_re_sent_until_the_access_time_is_written() {
    // "and, with `cookie_max_age > 0`, whenever the access time is written, so the browser's expiry slides with the session's"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("cookie_max_age = 600");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let fresh = browser.get("/", &[]);
    assert_eq!(fresh.set_cookie("session_id"), None, "no touch, no cookie");
    // An update that changes nothing writes nothing within touch_interval.
    let noop = browser.get("/", &[("X-Test-Update", "{}")]);
    assert_eq!(noop.set_cookie("session_id"), None, "no write, no cookie");
    // A change writes the access time too.
    let changed = browser.get("/", &[("X-Test-Update", r#"{"a":2}"#)]);
    assert_eq!(changed.set_cookie("session_id"), Some(cookie.clone()));
    age_record(&config, &cookie, 61, &["atime", "created"]);
    let touched = browser.get("/", &[]);
    assert_eq!(touched.set_cookie("session_id"), Some(cookie));
    assert!(touched
        .header("set-cookie")
        .unwrap()
        .contains("; Max-Age=600;"));
}

#[test]
fn every_response_setting_the_cookie_gets_no_cache_set_cookie() {
    // "responses that carry it also get `Cache-Control: no-cache=\"Set-Cookie\"` unless the upstream set `private`/`no-store`"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("cookie_max_age = 600")
        .session("touch_interval = 0");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    for (what, headers) in [
        ("first store", vec![("X-Test-Update", r#"{"a":1}"#)]),
        ("touch", vec![]),
        ("regenerate", vec![("X-Test-Action", "regenerate")]),
        ("kill", vec![("X-Test-Action", "kill")]),
    ] {
        let response = browser.get("/", &headers);
        assert!(response.set_cookie("session_id").is_some(), "{what}");
        assert_eq!(
            response.headers_named("cache-control"),
            vec![r#"no-cache="Set-Cookie""#],
            "{what}"
        );
    }
}

// ---- SPEC [4] One request ----

#[test]
fn a_bypassed_path_never_touches_the_store() {
    // "A path under `bypass` is proxied with no session work: no store access, no token, no `Set-Cookie`"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("bypass = [\"/static/\"]")
        .session("cookie_max_age = 600");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    age_record(&config, &cookie, 61, &["atime", "created"]);
    let aged = stored_record(&config, &cookie);
    let before = store_ops(config.admin_port);
    for headers in [
        vec![],
        vec![("X-Test-Update", r#"{"a":2}"#)],
        vec![("X-Test-Action", "regenerate")],
    ] {
        let response = browser.get("/static/app.css", &headers);
        assert_eq!(response.status, 200);
        assert!(response.session().is_null(), "no token");
        assert!(response.headers_named("set-cookie").is_empty());
    }
    assert_eq!(store_ops(config.admin_port), before, "[load, save, delete]");
    assert_eq!(
        stored_record(&config, &cookie),
        aged,
        "a due touch was written"
    );
}

#[test]
fn a_forged_cookie_is_a_new_session_even_with_ignore_expiry_false() {
    // "a cookie that is malformed or wrongly signed counts as no cookie (a new session, whatever `ignore_expiry` says)"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("ignore_expiry = false");
    let proxy = config.start();
    let forged = format!("session_id={}.{}", "A".repeat(43), "A".repeat(22));
    for cookie in [forged.as_str(), "session_id=not-a-cookie"] {
        let response = get(proxy.port, "/", &[("Cookie", cookie)]);
        assert_eq!(response.status, 200, "{cookie}");
        assert_eq!(response.session()["new"], true, "{cookie}");
        assert!(response.set_cookie("session_id").is_none(), "{cookie}");
    }
}

#[test]
fn a_session_used_from_another_ip_gets_the_whole_expired_answer() {
    // "`ignore_change_ip = false` and the client IP differs from the one stored at creation: the expired answer above"
    // (the expired answer: "answers `expired_status` with `expired_message` (`text/plain`), clears the cookie, and the upstream is not called")
    let upstream = CountingUpstream::start();
    let config = ProxyConfig::new(upstream.port)
        .session("ignore_change_ip = false")
        .session("expired_status = 401")
        .session("expired_message = \"log in again\"")
        .server("trusted_proxies = [\"127.0.0.1/32\"]");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Forwarded-For", "203.0.113.7")]);
    let cookie = browser.cookie.clone().unwrap();
    let response = get(
        proxy.port,
        "/",
        &[
            ("X-Forwarded-For", "198.51.100.9"),
            ("Cookie", &format!("session_id={cookie}")),
        ],
    );
    assert_eq!(
        (response.status, response.text().as_str()),
        (401, "log in again")
    );
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(response.set_cookie("session_id").as_deref(), Some(""));
    assert!(response.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(upstream.count(), 1, "the upstream was called");
}

#[test]
fn past_the_absolute_timeout_a_session_silently_becomes_a_new_one_by_default() {
    // "a correctly signed cookie whose record is ... past `absolute_timeout`: with `ignore_expiry = true` a new session as above"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("absolute_timeout = 50")
        .session("initializer = { fresh = true }");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"fresh": false}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let path = record_path(&config.sessions_dir(), &cookie);
    let mut stored = stored_record(&config, &cookie);
    stored["created"] = (stored["created"].as_u64().unwrap() - 51).into();
    std::fs::write(&path, serde_json::to_vec(&stored).unwrap()).unwrap();
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["new"], true);
    assert_eq!(claims["data"], serde_json::json!({"fresh": true}));
}

#[test]
fn iat_is_the_current_time_in_whole_seconds_and_exp_adds_token_ttl() {
    // "`iat` is the current time in whole seconds, rounded down (JWT libraries reject an `iat` in the future)"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    for _ in 0..5 {
        let before = now();
        let claims = get(proxy.port, "/", &[]).session();
        let after = now();
        let iat = claims["iat"].as_u64().expect("an integer iat");
        assert!(
            before <= iat && iat <= after,
            "{before} <= {iat} <= {after}"
        );
        assert_eq!(claims["exp"].as_u64().unwrap(), iat + 60);
        std::thread::sleep(Duration::from_millis(230));
    }
}

#[test]
fn a_regenerate_alone_grows_ver_by_one_and_keeps_the_data() {
    // "`ver` ... grows by one with every change of its data or id"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let old = browser.cookie.clone().unwrap();
    browser.get("/", &[("X-Test-Action", "regenerate")]);
    assert_ne!(browser.cookie.as_ref(), Some(&old));
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["ver"], 2);
    assert_eq!(claims["data"], serde_json::json!({"a": 1}));
    assert_eq!(stored_files(&config.sessions_dir()).len(), 1);
}

// SPEC [4.5] is silent on the next three; README, "Choices where SPEC is
// silent", says what the proxy does, and these hold it to that.

#[test]
fn a_kill_with_an_update_in_the_same_response_deletes_the_session_and_drops_the_update() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    assert_eq!(stored_files(&config.sessions_dir()).len(), 1);
    let response = browser.get(
        "/",
        &[("X-Test-Action", "kill"), ("X-Test-Update", r#"{"b":2}"#)],
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.set_cookie("session_id").as_deref(), Some(""));
    assert!(stored_files(&config.sessions_dir()).is_empty());
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["new"], true);
    assert_eq!(claims["data"], serde_json::json!({}));
}

#[test]
fn a_regenerate_of_a_session_never_stored_stores_it_under_a_new_id() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    let first = browser.get("/", &[("X-Test-Action", "regenerate")]);
    assert_eq!(first.session()["new"], true);
    let cookie = browser
        .cookie
        .clone()
        .expect("a cookie for the stored session");
    assert_eq!(stored_files(&config.sessions_dir()).len(), 1);
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["new"], false);
    assert_eq!(claims["ver"], 1);
    assert_eq!(claims["sid"], handle_of(&cookie));
}

#[test]
fn instructions_on_an_error_response_are_stored_as_on_a_200() {
    // As web.py, which saves the session in a `finally` around the handler.
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    for (status, update) in [(404, r#"{"a":1}"#), (500, r#"{"b":2}"#)] {
        let code = status.to_string();
        let response = browser.get("/", &[("X-Test-Status", &code), ("X-Test-Update", update)]);
        assert_eq!(response.status, status);
        assert!(browser.cookie.is_some(), "{status}: no cookie");
    }
    assert_eq!(
        browser.get("/", &[]).session()["data"],
        serde_json::json!({"a": 1, "b": 2})
    );
    browser.get("/", &[("X-Test-Status", "503"), ("X-Test-Action", "kill")]);
    assert_eq!(browser.cookie, None);
    assert!(stored_files(&config.sessions_dir()).is_empty());
}

#[test]
fn every_change_is_stored_before_the_response_head_reaches_the_client() {
    // "Every change is stored before the response head goes to the client."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let (head, connection) = read_head_only(proxy.port, &[("X-Test-Update", r#"{"a":1}"#)]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let cookie = parse_response(format!("{head}\r\n\r\n").as_bytes(), true)
        .unwrap()
        .set_cookie("session_id")
        .unwrap();
    assert_eq!(
        stored_record(&config, &cookie)["data"],
        serde_json::json!({"a": 1})
    );
    drop(connection);

    let session = format!("session_id={cookie}");
    let (_, connection) = read_head_only(
        proxy.port,
        &[("Cookie", &session), ("X-Test-Update", r#"{"a":2}"#)],
    );
    assert_eq!(
        stored_record(&config, &cookie)["data"],
        serde_json::json!({"a": 2})
    );
    drop(connection);

    let (_, connection) = read_head_only(
        proxy.port,
        &[("Cookie", &session), ("X-Test-Action", "kill")],
    );
    assert!(
        stored_files(&config.sessions_dir()).is_empty(),
        "not deleted"
    );
    drop(connection);
}

// ---- SPEC [5] Failures and bad input ----

#[test]
fn a_store_write_that_fails_is_a_503_and_leaves_the_session_unchanged() {
    // "store unreachable on load or on write | 503 `session store unavailable` | unchanged"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    age_record(&config, &cookie, 61, &["atime", "created"]);
    let before = std::fs::read(record_path(&config.sessions_dir(), &cookie)).unwrap();
    // The load works; the write's temporary file (README: `.HANDLE.tmp`)
    // cannot be created.
    let temporary = config
        .sessions_dir()
        .join(format!(".{}.tmp", handle_of(&cookie)));
    let _ = std::fs::remove_file(&temporary);
    std::fs::create_dir_all(temporary.join("blocked")).unwrap();
    for (what, headers) in [
        ("an update", vec![("X-Test-Update", r#"{"a":2}"#)]),
        ("a touch", vec![]),
    ] {
        let response = browser.get("/", &headers);
        assert_eq!(
            (response.status, response.text().as_str()),
            (503, "session store unavailable"),
            "{what}"
        );
        assert!(response.headers_named("set-cookie").is_empty(), "{what}");
    }
    assert_eq!(
        std::fs::read(record_path(&config.sessions_dir(), &cookie)).unwrap(),
        before
    );
    std::fs::remove_dir_all(&temporary).unwrap();
    assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);
}

#[test]
fn a_kill_or_regenerate_that_deleted_the_record_is_no_503() {
    // "| store unreachable on load or on write | 503 `session store unavailable` | unchanged |"
    // A 503 tells the client its session is as it was: never after the record went.
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    for action in ["kill", "regenerate"] {
        let mut browser = Browser::new(proxy.port);
        browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
        let cookie = browser.cookie.clone().unwrap();
        // The record can be deleted; its spare (README: `.HANDLE.tmp`) cannot.
        let spare = config
            .sessions_dir()
            .join(format!(".{}.tmp", handle_of(&cookie)));
        let _ = std::fs::remove_file(&spare);
        std::fs::create_dir_all(spare.join("in-the-way")).unwrap();
        let response = browser.get("/", &[("X-Test-Action", action)]);
        let record_left = record_path(&config.sessions_dir(), &cookie).exists();
        assert_eq!(response.status, 200, "{action}: record left: {record_left}");
        assert!(!record_left, "{action}");
        assert_ne!(
            browser.cookie,
            Some(cookie),
            "{action}: the old cookie stays"
        );
        if action == "regenerate" {
            assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);
        }
    }
}

// ---- SPEC [6] Stores ----

#[test]
fn a_disk_record_holds_data_created_atime_ip_and_ver() {
    // "A record is `{\"data\": {…}, \"created\": unix, \"atime\": unix, \"ip\": \"…\", \"ver\": n}`."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let before = now();
    let cookie = get(proxy.port, "/", &[("X-Test-Update", r#"{"a":[1]}"#)])
        .set_cookie("session_id")
        .unwrap();
    let after = now();
    let stored = stored_record(&config, &cookie);
    let mut keys: Vec<&String> = stored.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["atime", "created", "data", "ip", "ver"]);
    assert_eq!(stored["data"], serde_json::json!({"a": [1]}));
    assert_eq!(stored["ip"], "127.0.0.1");
    assert_eq!(stored["ver"], 1);
    for field in ["created", "atime"] {
        let time = stored[field].as_u64().unwrap();
        assert!(before <= time && time <= after, "{field}: {time}");
    }
}

#[test]
fn disk_expiry_reads_atime_from_the_record_not_the_file_time() {
    // "expiry reads `atime` from the record, not from the file system"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("timeout = 100")
        .session("ignore_expiry = false")
        .store("sweep_interval = 1");
    let proxy = config.start();
    let mut fresh = Browser::new(proxy.port);
    fresh.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let mut stale = Browser::new(proxy.port);
    stale.get("/", &[("X-Test-Update", r#"{"b":1}"#)]);
    let fresh_path = record_path(&config.sessions_dir(), fresh.cookie.as_ref().unwrap());
    let stale_path = record_path(&config.sessions_dir(), stale.cookie.as_ref().unwrap());
    // An old file holding a fresh record, and a new file holding an old one.
    std::fs::File::options()
        .write(true)
        .open(&fresh_path)
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    age_record(
        &config,
        stale.cookie.as_ref().unwrap(),
        101,
        &["atime", "created"],
    );
    assert!(
        eventually(Duration::from_secs(5), || !stale_path.exists()),
        "the sweeper never deleted the record past its idle timeout"
    );
    assert!(fresh_path.exists(), "the sweeper went by the file time");
    let response = fresh.get("/", &[]);
    assert_eq!(response.status, 200);
    assert_eq!(response.session()["data"], serde_json::json!({"a": 1}));
}

#[test]
fn the_memory_store_serves_sessions_and_loses_them_on_restart() {
    // "`memory`: in-process, bounded by `max_entries`; lost on restart."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).store("kind = \"memory\"");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
    assert!(stored_files(&config.sessions_dir()).is_empty(), "on disk");
    drop(proxy);
    let proxy = config.start();
    browser.port = proxy.port;
    assert_eq!(browser.get("/count", &[]).text(), "1", "survived a restart");
}

// ---- SPEC [7] Operations ----

#[test]
fn metrics_have_every_family_spec_names() {
    // "`GET /metrics` on `admin_listen`: Prometheus text, with at least `session_proxy_requests_total`, ..."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    browser.get("/", &[("X-Test-Action", "kill")]);
    let text = get(config.admin_port, "/metrics", &[]).text();
    for family in [
        "# TYPE session_proxy_requests_total counter",
        "# TYPE session_proxy_sessions_created_total counter",
        "# TYPE session_proxy_sessions_expired_total counter",
        "# TYPE session_proxy_forged_cookies_total counter",
        "# TYPE session_proxy_store_errors_total counter",
        "# TYPE session_proxy_store_latency_seconds histogram",
    ] {
        assert!(text.contains(family), "missing {family:?} in\n{text}");
    }
    for reason in ["idle", "absolute", "ip", "missing"] {
        metric(
            config.admin_port,
            &format!("session_proxy_sessions_expired_total{{reason=\"{reason}\"}}"),
        );
    }
    let [load, save, delete] = store_ops(config.admin_port);
    assert!(
        load >= 1.0 && save >= 1.0 && delete >= 1.0,
        "{load} {save} {delete}"
    );
    assert!(text.contains("session_proxy_store_latency_seconds_bucket{op=\"delete\",le=\"+Inf\"} "));
}
