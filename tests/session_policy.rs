//! End to end: expiry, the client-IP check, touches, cookie attributes and
//! concurrency (SPEC [3], [4.3], [4.5], [4.6]).

mod support;

use std::time::{Duration, Instant};

use support::*;

fn record_files(config: &ProxyConfig) -> Vec<serde_json::Value> {
    stored_files(&config.sessions_dir())
        .iter()
        .map(|path| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
        .collect()
}

/// Rewrites every stored record's times, as if `seconds` had passed
/// (negative: as if a clock that fast had written them).
fn age_records(config: &ProxyConfig, seconds: i64) {
    for path in stored_files(&config.sessions_dir()) {
        let mut record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for field in ["atime", "created"] {
            let time = record[field].as_u64().unwrap();
            record[field] = time.checked_add_signed(-seconds).unwrap().into();
        }
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    }
}

/// `/metrics` counted one expired session, for `reason` and no other.
fn assert_counted_expired_once(config: &ProxyConfig, reason: &str) {
    let metrics = get(config.admin_port, "/metrics", &[]).text();
    for other in ["idle", "absolute", "ip", "missing"] {
        let count = if other == reason { 1 } else { 0 };
        let line = format!("session_proxy_sessions_expired_total{{reason=\"{other}\"}} {count}");
        assert!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
    }
}

#[test]
fn an_expired_session_gets_the_configured_answer_and_the_upstream_is_not_called() {
    let upstream = CountingUpstream::start();
    let config = ProxyConfig::new(upstream.port)
        .session("ignore_expiry = false")
        .session("timeout = 100")
        .session("expired_status = 440")
        .session("expired_message = \"Votre session a expiré\"");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[]);
    assert!(browser.cookie.is_some());
    assert_eq!(upstream.count(), 1);
    age_records(&config, 101);
    let response = browser.get("/", &[]);
    assert_eq!(response.status, 440);
    assert_eq!(response.text(), "Votre session a expiré");
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(
        response.header("set-cookie").unwrap().contains("Max-Age=0"),
        "the cookie is cleared"
    );
    // About this client's session: no shared cache may serve it to others.
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert_eq!(upstream.count(), 1, "the upstream was not called");
    assert_counted_expired_once(&config, "idle");
}

#[test]
fn a_missing_record_with_ignore_expiry_false_gets_the_expired_answer() {
    let upstream = CountingUpstream::start();
    let config = ProxyConfig::new(upstream.port).session("ignore_expiry = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[]);
    for path in stored_files(&config.sessions_dir()) {
        std::fs::remove_file(path).unwrap();
    }
    let response = browser.get("/", &[]);
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "Session expired")
    );
    assert_eq!(upstream.count(), 1);
    assert_counted_expired_once(&config, "missing");
}

#[test]
fn an_idle_expired_session_silently_becomes_a_new_one_by_default() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("timeout = 100");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    age_records(&config, 101);
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["new"], true);
    assert_eq!(claims["data"], serde_json::json!({}));
}

#[test]
fn a_session_whose_access_time_is_further_ahead_than_timeout_is_expired() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("timeout = 100")
        .session("ignore_expiry = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    // Written by a clock 90 s fast: within the timeout, still the session.
    age_records(&config, -90);
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["data"], serde_json::json!({"a": 1}));
    // 290 s fast: as far from now as a session idle that long. (A write
    // never moves `atime` back: it would otherwise live until the clock
    // got there, however idle.)
    age_records(&config, -200);
    assert_eq!(browser.get("/", &[]).text(), "Session expired");
    assert_counted_expired_once(&config, "idle");
}

#[test]
fn the_absolute_timeout_ends_a_busy_session() {
    let upstream = CountingUpstream::start();
    let config = ProxyConfig::new(upstream.port)
        .session("timeout = 100000")
        .session("absolute_timeout = 50")
        .session("ignore_expiry = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[]);
    // Created 51 s ago but used just now.
    for path in stored_files(&config.sessions_dir()) {
        let mut record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        record["created"] = (record["created"].as_u64().unwrap() - 51).into();
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    }
    assert_eq!(browser.get("/", &[]).text(), "Session expired");
    assert_counted_expired_once(&config, "absolute");
}

#[test]
fn an_update_keeps_the_creation_time_the_absolute_timeout_counts_from() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("timeout = 100000")
        .session("absolute_timeout = 50")
        .session("ignore_expiry = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    // 30 s on, the session is used and changed...
    age_records(&config, 30);
    assert_eq!(browser.get("/count", &[]).text(), "2");
    // ...which does not make it younger: 60 s after its creation it ends.
    age_records(&config, 30);
    assert_eq!(browser.get("/count", &[]).text(), "Session expired");
}

#[test]
fn a_session_keeps_the_ip_it_was_created_from_when_used_from_another() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("ignore_change_ip = true")
        .server("trusted_proxies = [\"127.0.0.1/32\"]");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/count", &[("X-Forwarded-For", "203.0.113.7")]);
    let moved = [("X-Forwarded-For", "198.51.100.9")];
    assert_eq!(browser.get("/count", &moved).text(), "2");
    // A regenerate copies the record, and must not take the new IP either.
    browser.get("/count", &[moved[0], ("X-Test-Action", "regenerate")]);
    let records = record_files(&config);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["data"]["count"], 3);
    assert_eq!(
        records[0]["ip"], "203.0.113.7",
        "SPEC [4.3]: the IP at creation"
    );
}

#[test]
fn a_regenerate_writes_the_access_time_under_the_new_id() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("timeout = 100")
        .session("ignore_expiry = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/count", &[]);
    let old = browser.cookie.clone();
    age_records(&config, 90);
    browser.get("/count", &[("X-Test-Action", "regenerate")]);
    assert_ne!(browser.cookie, old, "regenerated");
    // 20 s after the regenerate, 110 s after the use before it.
    age_records(&config, 20);
    assert_eq!(browser.get("/count", &[]).text(), "3");
}

#[test]
fn a_session_used_from_another_ip_is_refused_and_left_alone() {
    let upstream = CountingUpstream::start();
    let config = ProxyConfig::new(upstream.port)
        .session("ignore_change_ip = false")
        .server("trusted_proxies = [\"127.0.0.1/32\"]");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Forwarded-For", "203.0.113.7")]);
    let cookie = browser.cookie.clone().unwrap();
    assert_eq!(
        browser
            .get("/", &[("X-Forwarded-For", "203.0.113.7")])
            .status,
        200
    );
    let before = record_files(&config);
    assert_eq!(before[0]["ip"], "203.0.113.7");
    let other = get(
        proxy.port,
        "/",
        &[
            ("X-Forwarded-For", "198.51.100.9"),
            ("Cookie", &format!("session_id={cookie}")),
        ],
    );
    assert_eq!(other.text(), "Session expired");
    assert_eq!(upstream.count(), 2);
    assert_counted_expired_once(&config, "ip");
    assert_eq!(
        record_files(&config),
        before,
        "the stored record is left alone"
    );
}

/// A record whose IP was stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`,
/// as an IPv4 client of a dual-stack listener was named before its address
/// was made canonical) is the same client when it comes back over IPv4.
#[test]
fn a_stored_ipv4_mapped_address_is_the_ipv4_client_it_names() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("ignore_change_ip = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"user":"ann"}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let path = record_path(&config.sessions_dir(), &cookie);
    let mut record = stored_record(&config, &cookie);
    assert_eq!(record["ip"], "127.0.0.1");
    record["ip"] = "::ffff:127.0.0.1".into();
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

    let response = browser.get("/", &[]);
    assert_eq!(response.status, 200);
    assert_ne!(response.text(), "Session expired");
    assert_eq!(response.set_cookie("session_id"), None);
    assert_eq!(response.session()["data"]["user"], "ann");
    assert_eq!(browser.cookie.as_deref(), Some(cookie.as_str()));
}

#[test]
fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let upstream = CountingUpstream::start();
    let config = ProxyConfig::new(upstream.port).session("ignore_change_ip = false");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Forwarded-For", "203.0.113.7")]);
    assert_eq!(record_files(&config)[0]["ip"], "127.0.0.1");
    assert_eq!(
        browser
            .get("/", &[("X-Forwarded-For", "198.51.100.9")])
            .status,
        200
    );
}

#[test]
fn the_access_time_is_written_only_after_touch_interval_and_keeps_ver() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    age_records(&config, 30);
    let aged = record_files(&config)[0].clone();
    assert!(browser.get("/", &[]).headers_named("set-cookie").is_empty());
    assert_eq!(
        record_files(&config)[0],
        aged,
        "younger than touch_interval (60 s): untouched"
    );
    age_records(&config, 31);
    let response = browser.get("/", &[]);
    assert!(
        response.headers_named("set-cookie").is_empty(),
        "a browser-session cookie is not re-sent"
    );
    let touched = record_files(&config)[0].clone();
    assert!(touched["atime"].as_u64().unwrap() >= aged["atime"].as_u64().unwrap() + 30);
    assert_eq!(touched["ver"], 1, "a touch leaves ver alone");
}

/// An update that changes nothing (`{}`, which a middleware that sends
/// the keys it changed sends on most requests; a `null` for an absent key;
/// a value already stored) is no change (SPEC [4.4], [4.5]): it stored every
/// new visitor's session with a cookie, and bumped `ver` of existing ones.
#[test]
fn an_update_that_changes_nothing_is_no_change() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    for noop in ["{}", r#"{"absent": null}"#] {
        let response = get(proxy.port, "/", &[("X-Test-Update", noop)]);
        assert_eq!(response.status, 200);
        assert_eq!(response.set_cookie("session_id"), None, "{noop}");
        assert!(record_files(&config).is_empty(), "stored for {noop}");
    }

    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    assert_eq!(record_files(&config)[0]["ver"], 1);
    for noop in ["{}", r#"{"absent": null}"#, r#"{"a": 1}"#] {
        let response = browser.get("/", &[("X-Test-Update", noop)]);
        assert_eq!(response.status, 200);
        assert_eq!(response.set_cookie("session_id"), None, "{noop}");
        let record = record_files(&config)[0].clone();
        assert_eq!(record["data"], serde_json::json!({"a": 1}));
        assert_eq!(record["ver"], 1, "{noop} changed nothing, yet ver grew");
    }
    // Younger than touch_interval (60 s), a no-op update writes nothing,
    // not even the access time, as a request without one would not.
    age_records(&config, 30);
    let young = record_files(&config)[0].clone();
    browser.get("/", &[("X-Test-Update", "{}")]);
    assert_eq!(
        record_files(&config)[0],
        young,
        "a no-op update within touch_interval wrote the record"
    );
    // An old session's no-op update touches it, as a request without one would.
    age_records(&config, 31);
    let aged = record_files(&config)[0]["atime"].as_u64().unwrap();
    browser.get("/", &[("X-Test-Update", "{}")]);
    let record = record_files(&config)[0].clone();
    assert!(
        record["atime"].as_u64().unwrap() >= aged + 60,
        "not touched"
    );
    assert_eq!(record["ver"], 1);
    // A real change still counts.
    browser.get("/", &[("X-Test-Update", r#"{"a":2}"#)]);
    assert_eq!(record_files(&config)[0]["ver"], 2);
}

/// A WebSocket handshake is a request of the session, and its `101` the
/// final response: read as an interim one, it did no session work, so a
/// session used only through WebSocket (re)connections was never touched
/// and idled out while in use.
#[test]
fn a_websocket_handshake_touches_the_session() {
    use base64::Engine;
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    age_records(&config, 61);
    let aged = record_files(&config)[0]["atime"].as_u64().unwrap();

    let switching =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Cookie: session_id={cookie}\r\nX-Test-Fault: raw\r\nX-Test-Raw: {}\r\n\r\n",
        base64::engine::general_purpose::STANDARD.encode(switching)
    );
    let answer = raw_exchange(proxy.port, handshake.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        raw_status(&answer),
        Some(101),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let record = record_files(&config)[0].clone();
    assert!(
        record["atime"].as_u64().unwrap() >= aged + 60,
        "the handshake did not touch the session: atime {}, aged to {aged}",
        record["atime"]
    );
    assert_eq!(record["ver"], 1, "a touch leaves ver alone");
}

#[test]
fn with_cookie_max_age_the_cookie_is_re_sent_when_the_session_is_touched() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("cookie_max_age = 3600")
        .session("touch_interval = 0")
        .session("secure = true")
        .session("samesite = \"strict\"")
        .session("cookie_domain = \"example.test\"")
        .session("cookie_name = \"sid\"");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.cookie_name = "sid".into();
    let first = browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let expected = format!("sid={cookie}; Path=/; Domain=example.test; Max-Age=3600; HttpOnly; Secure; SameSite=Strict");
    assert_eq!(first.header("set-cookie"), Some(expected.as_str()));
    let touched = browser.get("/", &[]);
    assert_eq!(touched.header("set-cookie"), Some(expected.as_str()));
}

#[test]
fn the_upstream_cache_control_private_or_no_store_is_kept_as_is() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    for directive in ["private", "no-store, max-age=0"] {
        let response = get(
            proxy.port,
            "/",
            &[
                ("X-Test-Update", r#"{"a":1}"#),
                ("X-Test-Cache-Control", directive),
            ],
        );
        assert_eq!(response.headers_named("cache-control"), vec![directive]);
    }
    let public = get(
        proxy.port,
        "/",
        &[
            ("X-Test-Update", r#"{"a":1}"#),
            ("X-Test-Cache-Control", "max-age=60"),
        ],
    );
    assert_eq!(
        public.headers_named("cache-control"),
        vec!["max-age=60", r#"no-cache="Set-Cookie""#]
    );
}

#[test]
fn upstream_cookies_are_passed_to_the_client_next_to_ours() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let response = get(
        proxy.port,
        "/",
        &[
            ("X-Test-Update", r#"{"a":1}"#),
            ("X-Test-Set-Cookie", "theme=dark"),
        ],
    );
    let cookies = response.headers_named("set-cookie");
    assert_eq!(cookies.len(), 2);
    assert!(cookies.contains(&"theme=dark"));
}

fn increments(port: u16, cookie: &str, count: usize) -> Vec<u16> {
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let cookie = format!("session_id={cookie}");
            std::thread::spawn(move || {
                // read-modify-write in the app: /count reads count and writes count + 1
                get(
                    port,
                    "/count",
                    &[("Cookie", &cookie), ("X-Test-Sleep-Ms", "5")],
                )
                .status
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn with_lock_concurrent_read_modify_writes_lose_no_increment() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("lock = true");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let statuses = increments(proxy.port, browser.cookie.as_ref().unwrap(), 20);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(browser.get("/count", &[]).text(), "22");
}

/// The turn of `lock = true` ends when the change is stored, before the
/// response head leaves (SPEC [4.5]): a download its client reads slowly,
/// or a stream that stays open, held it to the body's end, and every
/// other request of the session waited for it, then got `503 session busy`.
#[test]
fn with_lock_a_response_body_read_slowly_does_not_hold_up_the_session() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("lock = true");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    assert_eq!(browser.get("/count", &[]).text(), "1");
    let cookie = browser.cookie.clone().unwrap();
    let download = stalled_download(proxy.port, &cookie);

    let started = Instant::now();
    let response = browser.get("/count", &[]);
    let waited = started.elapsed();
    assert_eq!((response.status, response.text().as_str()), (200, "2"));
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    drop(download);
}

#[test]
fn without_lock_concurrent_writes_of_different_keys_all_survive() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"start": true}"#)]);
    let statuses = concurrent_key_writes(&[proxy.port], browser.cookie.as_ref().unwrap(), 20);
    assert!(statuses.iter().all(|&status| status == 200), "{statuses:?}");
    let claims = browser.get("/", &[]).session();
    let data = claims["data"].as_object().unwrap();
    for i in 0..20 {
        assert_eq!(data[&format!("key{i}")], i, "key{i} lost: {data:?}");
    }
    assert_eq!(claims["ver"], 21);
}

#[test]
fn the_sweeper_deletes_expired_records() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("timeout = 100")
        .store("sweep_interval = 1");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let mut other = Browser::new(proxy.port);
    other.get("/", &[("X-Test-Update", r#"{"b":1}"#)]);
    assert_eq!(stored_files(&config.sessions_dir()).len(), 2);
    age_records(&config, 101);
    other.get("/", &[("X-Test-Update", r#"{"b":2}"#)]);
    assert!(eventually(Duration::from_secs(5), || stored_files(
        &config.sessions_dir()
    )
    .len()
        == 1));
    // Both aged records: `other`'s last request found its own expired and
    // started a new session, the one file left.
    let swept = "session_proxy_sessions_swept_total 2\n";
    assert!(
        eventually(Duration::from_secs(5), || get(
            config.admin_port,
            "/metrics",
            &[]
        )
        .text()
        .contains(swept)),
        "missing {swept:?} in\n{}",
        get(config.admin_port, "/metrics", &[]).text()
    );
}
