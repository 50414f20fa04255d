//! README.md ("Where this proxy deviates from or adds to SPEC") and
//! SECURITY.md, claim by claim: the promises of the project's own that no
//! other test file checks end to end, or checks in a way that could not
//! fail if they were broken. Each test quotes the sentence it checks.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use support::*;

/// `ID.TAG` for `id`, the tag being the first 16 bytes of HMAC-SHA256(key, ID).
fn signed(key: &str, id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(id.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("{id}.{}", URL_SAFE_NO_PAD.encode(&tag[..16]))
}

/// A request with `headers` and `cookie` that the test upstream answers
/// after `sleep_ms`, on a thread of its own.
fn slow_request(
    port: u16,
    headers: &[(&str, &str)],
    cookie: &str,
    sleep_ms: u64,
) -> std::thread::JoinHandle<Response> {
    let mut owned: Vec<(String, String)> = headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    owned.push(("Cookie".into(), cookie.into()));
    owned.push(("X-Test-Sleep-Ms".into(), sleep_ms.to_string()));
    std::thread::spawn(move || {
        let all: Vec<(&str, &str)> = owned
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        get(port, "/", &all)
    })
}

/// The base64url character `offset` places after `c` in the alphabet: an
/// alias of `c` when only padding bits change.
fn shifted(c: char, offset: usize) -> char {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let at = ALPHABET.find(c).unwrap();
    ALPHABET.as_bytes()[at + offset] as char
}

// ---- SECURITY.md, "Clients" ----

#[test]
fn a_cookie_that_is_not_canonical_base64url_is_no_cookie_and_never_reaches_the_store() {
    // SECURITY.md: "A value that is not exactly 66 bytes, not canonical base64url, or whose
    // tag does not verify under one of the keys counts as no cookie and never reaches the store."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let genuine = browser.cookie.clone().unwrap();
    let (id, tag) = genuine.split_once('.').unwrap();

    // The tag's last character carries 4 bits of padding, the id's 2: the
    // aliases decode to the same bytes as the canonical text.
    let last = tag.chars().last().unwrap();
    let tag_alias = format!("{id}.{}{}", &tag[..21], shifted(last, 1));
    // An id whose last character has a padding bit set, signed by the
    // proxy's own key: only its spelling is wrong.
    let id_last = id.chars().last().unwrap();
    let odd_id = format!("{}{}", &id[..42], shifted(id_last, 1));
    let id_alias = signed(KEY, &odd_id);
    assert_eq!(URL_SAFE_NO_PAD.decode(tag).unwrap().len(), 16);
    assert!(URL_SAFE_NO_PAD.decode(&tag_alias[44..]).is_err());

    let before = store_ops(config.admin_port);
    for (what, cookie) in [("tag alias", &tag_alias), ("id alias", &id_alias)] {
        assert_eq!(cookie.len(), 66, "{what}");
        let response = get(
            proxy.port,
            "/",
            &[("Cookie", &format!("session_id={cookie}"))],
        );
        assert_eq!(response.status, 200, "{what}");
        assert_eq!(response.session()["new"], true, "{what}: {cookie}");
        assert_eq!(response.session()["data"], serde_json::json!({}), "{what}");
    }
    assert_eq!(store_ops(config.admin_port), before, "[load, save, delete]");
    // The genuine cookie still works.
    assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);
}

// ---- README, "Additions" ----

#[test]
fn the_keys_of_the_environment_replace_those_of_the_config_file() {
    // README: "The environment variable `SESSION_PROXY_SECRET_KEYS` (comma-separated)
    // replaces the keys of the config file."
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    config.session[0] = format!("secret_keys = [{OLD_KEY:?}]");
    let other = "env-second-key-0123456789abcdefghijklmnopqrs";
    config
        .env
        .push(("SESSION_PROXY_SECRET_KEYS".into(), format!("{KEY},{other}")));
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    assert_eq!(
        cookie,
        signed(KEY, id_of(&cookie)),
        "signed with the environment's first key"
    );
    let with = |value: String| {
        get(
            proxy.port,
            "/",
            &[("Cookie", &format!("session_id={value}"))],
        )
        .session()
    };
    assert_eq!(
        with(signed(other, id_of(&cookie)))["data"]["a"],
        1,
        "the environment's second key verifies"
    );
    let by_file_key = with(signed(OLD_KEY, id_of(&cookie)));
    assert_eq!(
        by_file_key["new"], true,
        "the config file's key no longer verifies"
    );
    drop(proxy);

    // README, "The secret": "set but holding no key (empty, or only commas and spaces), it is
    // ignored and the file's keys count."
    config.env = vec![("SESSION_PROXY_SECRET_KEYS".into(), " , ".into())];
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    assert_eq!(
        cookie,
        signed(OLD_KEY, id_of(&cookie)),
        "the file's key signs"
    );
}

// ---- README, "Choices where SPEC is silent" ----

#[test]
fn an_empty_update_header_is_no_update() {
    // README: "An empty `X-Session-Update` header is no update."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let before = stored_record(&config, &cookie);
    let response = browser.get("/", &[("X-Test-Update", "")]);
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(response.header("x-session-update").is_none());
    assert_eq!(
        stored_record(&config, &cookie),
        before,
        "the record unchanged"
    );
    // A new session with an empty update is not stored.
    let fresh = get(proxy.port, "/", &[("X-Test-Update", "")]);
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.set_cookie("session_id"), None);
    assert_eq!(stored_files(&config.sessions_dir()).len(), 1);
}

#[test]
fn a_key_repeated_in_an_update_counts_with_its_last_value() {
    // README: "A key repeated in one object of an update counts once, with its last value
    // (`{"a":1,"a":null}` deletes `a`)".
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1,"n":{"x":1}}"#)]);
    let response = browser.get(
        "/",
        &[(
            "X-Test-Update",
            r#"{"a":1,"a":null,"b":1,"b":2,"n":{"y":1},"n":{"x":null,"z":1,"z":2}}"#,
        )],
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let cookie = browser.cookie.clone().unwrap();
    assert_eq!(
        stored_record(&config, &cookie)["data"],
        serde_json::json!({"b": 2, "n": {"z": 2}})
    );
}

#[test]
fn an_update_for_a_session_killed_meanwhile_starts_a_new_one_and_a_touch_sets_no_cookie() {
    // README: "An update for a session that was deleted meanwhile (e.g. killed by a concurrent
    // request) starts a new session, with a new id, instead of bringing the killed one back. A
    // response with nothing to store for such a session sets no cookie, so it cannot send the
    // old id back over the one a concurrent `regenerate` or `kill` set. With
    // `save_uninitialized = true`, an empty update (`{}`) is an update too: it starts a new
    // session, as it would for a request that came without a cookie."
    let upstream = start_upstream();
    // The access time written on every request, and the cookie re-sent
    // whenever it is: a touch of the killed session would send the old id.
    let configured = || {
        ProxyConfig::new(upstream.port)
            .upstream("read_timeout = 30")
            .session("touch_interval = 0")
            .session("cookie_max_age = 3600")
            .session(r#"initializer = {init = true}"#)
    };
    let config = configured();
    let saving = configured().session("save_uninitialized = true");
    let (proxy, saving_proxy) = (config.start(), saving.start());
    let initialized = serde_json::json!({"init": true});
    let cases = [
        (
            &proxy,
            &config,
            vec![("X-Test-Update", r#"{"b":2}"#)],
            Some(serde_json::json!({"init": true, "b": 2})),
        ),
        (&proxy, &config, vec![], None),
        (&proxy, &config, vec![("X-Test-Update", "{}")], None),
        (&saving_proxy, &saving, vec![], None),
        (
            &saving_proxy,
            &saving,
            vec![("X-Test-Update", "{}")],
            Some(initialized),
        ),
    ];
    // The cases side by side, each with a session of its own.
    std::thread::scope(|scope| {
        for (proxy, config, slow_headers, new_data) in cases {
            scope.spawn(move || {
                let mut browser = Browser::new(proxy.port);
                browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
                let old = browser.cookie.clone().unwrap();
                let port = proxy.port;
                let cookie_header = format!("session_id={old}");
                // Held at the upstream, so it has loaded the session.
                let slow = Held::get(
                    port,
                    "/",
                    &[&slow_headers[..], &[("Cookie", &cookie_header)]].concat(),
                );
                slow.at_the_app();
                let killed = get(
                    proxy.port,
                    "/",
                    &[("Cookie", &cookie_header), ("X-Test-Action", "kill")],
                );
                assert_eq!(killed.set_cookie("session_id").as_deref(), Some(""));
                let slow = slow.answer();
                assert_eq!(slow.status, 200, "{slow_headers:?}");
                assert_eq!(slow.session()["data"]["a"], 1, "it loaded the session");
                let set = slow.set_cookie("session_id");
                match new_data {
                    Some(data) => {
                        let new = set.expect("the update sets a cookie");
                        assert_ne!(new, old, "a new id");
                        let claims =
                            get(proxy.port, "/", &[("Cookie", &format!("session_id={new}"))])
                                .session();
                        assert_eq!(claims["new"], false, "{slow_headers:?}: stored");
                        assert_eq!(
                            claims["data"], data,
                            "a new session: the initializer and the update, not the killed data"
                        );
                    }
                    None => assert_eq!(set, None, "{slow_headers:?}: nothing to store, no cookie"),
                }
                assert!(!record_path(&config.sessions_dir(), &old).exists());
                let again = get(proxy.port, "/", &[("Cookie", &cookie_header)]).session();
                assert_eq!(again["new"], true, "the killed session stays dead");
            });
        }
    });
}

#[test]
fn a_kill_of_a_session_never_stored_still_clears_the_cookie() {
    // README: "`X-Session-Action: kill` on a session that was never stored still clears the cookie."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("cookie_max_age = 3600");
    let proxy = config.start();
    let response = get(proxy.port, "/", &[("X-Test-Action", "kill")]);
    assert_eq!(response.status, 200);
    assert_eq!(response.set_cookie("session_id").as_deref(), Some(""));
    let header = response.header("set-cookie").unwrap();
    assert!(header.contains("Max-Age=0"), "{header}");
    assert!(stored_files(&config.sessions_dir()).is_empty());
}

#[test]
fn the_action_is_read_without_regard_to_case() {
    // README: "`X-Session-Action` is read without regard to case (`Kill` is `kill`)."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let first = browser.cookie.clone().unwrap();
    let regenerated = browser.get("/", &[("X-Test-Action", "REGENERATE")]);
    assert_eq!(regenerated.status, 200, "{}", regenerated.text());
    let second = browser.cookie.clone().unwrap();
    assert_ne!(first, second, "a new id");
    assert!(!record_path(&config.sessions_dir(), &first).exists());
    assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);

    let killed = browser.get("/", &[("X-Test-Action", "Kill")]);
    assert_eq!(killed.status, 200, "{}", killed.text());
    assert_eq!(killed.set_cookie("session_id").as_deref(), Some(""));
    assert!(stored_files(&config.sessions_dir()).is_empty());
}

#[test]
fn the_proxys_own_answers_carry_cache_control_no_store() {
    // README: "The proxy's own answers, the expired answer included, carry
    // `Cache-Control: no-store`: they are about one client's session, and a shared cache must
    // not serve a `200` "session expired" for the URL to everyone."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).upstream("read_timeout = 1");
    let proxy = config.start();
    let mut answers = vec![
        (
            "invalid update",
            get(proxy.port, "/", &[("X-Test-Update", "[1]")]),
        ),
        (
            "upstream reset",
            get(proxy.port, "/", &[("X-Test-Fault", "reset")]),
        ),
        (
            "upstream hung",
            get(proxy.port, "/", &[("X-Test-Fault", "hang")]),
        ),
        (
            "head too large",
            get(proxy.port, "/", &[("X-Big", &"b".repeat(100_000))]),
        ),
    ];
    // A store that fails its write: the session's spare is in the way.
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let spare = config
        .sessions_dir()
        .join(format!(".{}.tmp", handle_of(&cookie)));
    let _ = std::fs::remove_file(&spare);
    std::fs::create_dir_all(spare.join("in-the-way")).unwrap();
    answers.push((
        "store failed",
        browser.get("/", &[("X-Test-Update", r#"{"a":2}"#)]),
    ));
    let expected = [502, 502, 504, 431, 503];
    for ((what, response), status) in answers.iter().zip(expected) {
        assert_eq!(response.status, status, "{what}: {}", response.text());
        assert_eq!(
            response.header("cache-control"),
            Some("no-store"),
            "{what}: {:?}",
            response.headers
        );
    }
}

#[test]
fn an_update_nested_deeper_than_128_levels_is_a_502_and_changes_nothing() {
    // SECURITY.md, Limits: "| Nesting of an update | 128 levels (serde_json) | `session::patch` | `502` |"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let before = stored_record(&config, &cookie);
    let nested = |depth: usize| format!("{{\"x\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
    let deep = browser.get("/", &[("X-Test-Update", &nested(200))]);
    assert_eq!(deep.status, 502, "{}", deep.text());
    assert_eq!(stored_record(&config, &cookie), before);
    // Within the bound, the same shape is stored.
    let shallow = browser.get("/", &[("X-Test-Update", &nested(100))]);
    assert_eq!(shallow.status, 200, "{}", shallow.text());
    assert_eq!(stored_record(&config, &cookie)["ver"], 2);
}

#[test]
fn an_update_with_an_integer_past_64_bits_is_a_502_and_changes_nothing() {
    // SECURITY.md, Limits: "| Integers in an update | -2^63 to 2^64 - 1 (past them serde_json
    // keeps only the nearest float) | `session::patch` | `502` |"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let before = stored_record(&config, &cookie);
    // Python's int(uuid4()) and the like: kept as a float, the app would
    // read back another number, of another type.
    for past in [
        "18446744073709551616",
        "-9223372036854775809",
        "340282366920938463463374607431768211455",
    ] {
        let update = format!(r#"{{"n":{past}}}"#);
        let refused = browser.get("/", &[("X-Test-Update", &update)]);
        assert_eq!(refused.status, 502, "{past}: {}", refused.text());
        assert_eq!(refused.text(), "invalid session update from upstream");
        assert_eq!(stored_record(&config, &cookie), before, "{past}");
    }
    // The extremes of 64 bits, floats, and digits in strings are kept, exactly.
    let kept = r#"{"big":"18446744073709551616","f":1.5e+300,"max":18446744073709551615,"min":-9223372036854775808}"#;
    let stored = browser.get("/", &[("X-Test-Update", kept)]);
    assert_eq!(stored.status, 200, "{}", stored.text());
    let record = std::fs::read_to_string(record_path(&config.sessions_dir(), &cookie)).unwrap();
    let data = &record[record.find(r#""big""#).unwrap()..];
    assert!(
        data.starts_with(&kept[1..kept.len() - 1]),
        "stored as {record}"
    );
}

// ---- SECURITY.md, "Log readers": the access log ----

#[test]
fn the_access_log_is_not_world_readable_cuts_fields_at_2_kib_and_holds_no_secret() {
    // SECURITY.md: "It names a session by the first 8 hex digits of its handle and never holds
    // the session id, a cookie or any other request header, the token, the upstream's
    // instructions or the session data. Client-sent fields are escaped as nginx does (...)
    // and cut at 2 KiB (...) The file is created mode 0640."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let log = config.dir.path().join("access.log");
    let config = config.server(&format!("access_log = {:?}", log.display().to_string()));
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    let data_marker = "datamarker7f3a9c";
    let first = browser.get(
        "/first",
        &[("X-Test-Update", &format!(r#"{{"secret":"{data_marker}"}}"#))],
    );
    let token = first.upstream_header("x-session").unwrap();
    let first_cookie = browser.cookie.clone().unwrap();
    let long_agent = "u".repeat(5000);
    let header_marker = "headermarker51be0d";
    browser.get(
        "/last",
        &[
            ("User-Agent", &long_agent),
            ("Authorization", &format!("Bearer {header_marker}")),
            ("X-Test-Action", "regenerate"),
        ],
    );
    let cookie = browser.cookie.clone().unwrap();
    let mut text = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("/last")
        }),
        "no line for /last: {text:?}"
    );
    let mode = std::fs::metadata(&log).unwrap().permissions();
    let mode = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777;
    assert_eq!(mode & 0o007, 0, "others may not read it: {mode:o}");
    assert_eq!(mode & 0o600, 0o600, "{mode:o}");
    assert_eq!(mode & 0o133, 0, "at most 0640: {mode:o}");

    let last = text.lines().find(|l| l.contains("/last")).unwrap();
    let agent = last
        .split("\" \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    assert!(agent.starts_with("uuuu"), "{last}");
    assert!(agent.len() <= 2048 + 3, "{} bytes", agent.len());
    assert!(agent.len() >= 2048, "{} bytes", agent.len());
    for secret in [
        data_marker,
        header_marker,
        "secret",
        "regenerate",
        token.as_str(),
        token.split('.').nth(1).unwrap(),
        cookie.as_str(),
        id_of(&cookie),
        &handle_of(&cookie),
        first_cookie.as_str(),
        id_of(&first_cookie),
        &handle_of(&first_cookie),
    ] {
        assert!(!text.contains(secret), "{secret:?} in {text}");
    }
}

// ---- SECURITY.md, "Rotating keys" ----

#[test]
fn after_a_rotation_every_cookie_the_proxy_sets_is_signed_with_the_new_key() {
    // SECURITY.md: "Put the new key first in the proxy, the old one after it [...] New sessions,
    // and every cookie the proxy sets from now on, are signed with NEW; cookies signed with OLD
    // still verify." and "a cookie is re-signed only when the proxy sets it again: when its
    // session is regenerated, and with `cookie_max_age > 0` whenever the access time is written"
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port).session("cookie_max_age = 3600");
    config.session[0] = format!("secret_keys = [{OLD_KEY:?}]");
    let proxy = config.start();
    let mut touched = Browser::new(proxy.port);
    touched.get("/", &[("X-Test-Update", r#"{"who":"touched"}"#)]);
    let mut regenerated = Browser::new(proxy.port);
    regenerated.get("/", &[("X-Test-Update", r#"{"who":"regenerated"}"#)]);
    let old_touched = touched.cookie.clone().unwrap();
    assert_eq!(old_touched, signed(OLD_KEY, id_of(&old_touched)));
    drop(proxy);

    config.session[0] = format!("secret_keys = [{KEY:?}, {OLD_KEY:?}]");
    let proxy = config.start();
    touched.port = proxy.port;
    regenerated.port = proxy.port;
    // Not yet touched: the cookie is not set again, the old one verifies.
    let response = touched.get("/", &[]);
    assert_eq!(response.session()["data"]["who"], "touched");
    assert_eq!(response.set_cookie("session_id"), None);
    // The access time is written: the same id, signed with the new key.
    age_record(&config, &old_touched, 120, &["atime"]);
    let response = touched.get("/", &[]);
    let resent = response.set_cookie("session_id").expect("re-sent");
    assert_eq!(resent, signed(KEY, id_of(&old_touched)));

    let response = regenerated.get("/", &[("X-Test-Action", "regenerate")]);
    let new = response.set_cookie("session_id").expect("a new cookie");
    assert_eq!(new, signed(KEY, id_of(&new)));
    assert_eq!(
        regenerated.get("/", &[]).session()["data"]["who"],
        "regenerated"
    );
}

// ---- README, "Additions": shutdown ----

/// Reads one response with a `Content-Length` body off a kept-alive connection.
fn read_one(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                return parse_response(&raw[..end + 4 + length], false).unwrap();
            }
        }
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "closed after {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buffer[..read]);
    }
}

#[test]
fn after_sigterm_the_next_request_on_a_kept_alive_connection_is_served_with_connection_close() {
    // README: "On SIGTERM/SIGINT (and after an upgrade's hand-over), for 0.5 s after the proxy
    // stops accepting, the next request on an open kept-alive connection is still served, with
    // `Connection: close`: pingora alone reset the requests already on their way."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let mut proxy = config.start();
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = b"GET /kept HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(request).unwrap();
    let first = read_one(&mut stream);
    assert_eq!(first.status, 200);
    assert_ne!(first.header("connection"), Some("close"));

    signal(proxy.child.id(), "TERM");
    // Until the proxy stops accepting, the request would be served as
    // before; the window begins then.
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            proxy.port
        ))
        .is_err()),
        "the proxy still accepts"
    );
    // Well inside the 0.5 s, and well after pingora alone would have
    // closed the connection.
    std::thread::sleep(Duration::from_millis(200));
    stream.write_all(request).unwrap();
    let second = read_one(&mut stream);
    assert_eq!(second.status, 200);
    assert_eq!(second.header("connection"), Some("close"));
    let status = wait_exit(&mut proxy.child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

// ---- README, "Additions": metrics ----

#[test]
fn metrics_count_bypassed_requests_refused_updates_and_swept_sessions_apart() {
    // README: "Metrics beyond SPEC [7]: `session_proxy_requests_total` has a `path` label
    // (`session` or `bypass`), `session_proxy_invalid_updates_total` counts refused upstream
    // instructions, `session_proxy_sessions_swept_total` counts the expired sessions the
    // background sweep deleted (`sessions_expired_total` counts only signed cookies that met an
    // expired or missing session)"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port)
        .session("bypass = [\"/static/\"]")
        .session("timeout = 100")
        .store("sweep_interval = 1");
    let proxy = config.start();
    let admin = config.admin_port;
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    for _ in 0..3 {
        assert_eq!(browser.get("/static/x.css", &[]).status, 200);
    }
    assert_eq!(
        metric(admin, "session_proxy_requests_total{path=\"bypass\"}"),
        3.0
    );
    assert_eq!(
        metric(admin, "session_proxy_requests_total{path=\"session\"}"),
        1.0
    );

    assert_eq!(metric(admin, "session_proxy_invalid_updates_total"), 0.0);
    for bad in [
        vec![("X-Test-Update", "[1]")],
        vec![("X-Test-Action", "explode")],
        vec![
            ("X-Test-Update", r#"{"a":2}"#),
            ("X-Test-Update", r#"{"a":3}"#),
        ],
    ] {
        assert_eq!(browser.get("/", &bad).status, 502, "{bad:?}");
    }
    browser.get("/", &[("X-Test-Update", r#"{"a":4}"#)]);
    assert_eq!(metric(admin, "session_proxy_invalid_updates_total"), 3.0);

    // The sweep deletes the session gone idle; no request met it.
    let cookie = browser.cookie.clone().unwrap();
    age_record(&config, &cookie, 101, &["atime"]);
    assert!(
        eventually(Duration::from_secs(10), || metric(
            admin,
            "session_proxy_sessions_swept_total"
        ) == 1.0),
        "not swept"
    );
    assert!(!record_path(&config.sessions_dir(), &cookie).exists());
    for reason in ["idle", "absolute", "ip", "missing"] {
        let series = format!("session_proxy_sessions_expired_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(admin, &series), 0.0, "{series}");
    }
}

#[test]
fn the_admin_answers_get_and_head_and_names_them_to_other_methods() {
    // README: "`HEAD /healthz` and `HEAD /metrics` answer as `GET` without the body; other
    // methods on them are `405` with `Allow: GET, HEAD`"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let _proxy = config.start();
    let admin = config.admin_port;
    let ok = get(admin, "/healthz", &[]);
    assert_eq!((ok.status, ok.text().as_str()), (200, "ok"));

    let head = raw_exchange(
        admin,
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    let answer = parse_response(&head, true).unwrap();
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&head));
    assert!(head.ends_with(b"\r\n\r\n"), "HEAD sent a body: {head:?}");
    assert_eq!(request(admin, "HEAD", "/metrics", &[]).status, 200);

    for (method, path) in [
        ("POST", "/healthz"),
        ("DELETE", "/metrics"),
        ("PUT", "/healthz"),
    ] {
        let refused = request(admin, method, path, &[]);
        assert_eq!(refused.status, 405, "{method} {path}: {}", refused.text());
        assert_eq!(
            refused.header("allow"),
            Some("GET, HEAD"),
            "{method} {path}"
        );
        assert!(
            refused.text().contains("GET and HEAD"),
            "{}",
            refused.text()
        );
    }
    assert_eq!(request(admin, "POST", "/nowhere", &[]).status, 404);
}

#[test]
fn metrics_count_answers_by_status_class_and_requests_in_flight() {
    // README: "`session_proxy_responses_total` counts the answers by `class` (`1xx` to `5xx`
    // ...), the proxy's own 502, 503 and 504 among them"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let admin = config.admin_port;
    let counts = || {
        ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            metric(
                admin,
                &format!("session_proxy_responses_total{{class=\"{class}\"}}"),
            )
        })
    };
    assert_eq!(counts(), [0.0; 5], "every class exported from the start");
    for (status, headers) in [
        (200, vec![]),
        (200, vec![("X-Test-Update", r#"{"a":1}"#)]),
        (302, vec![("X-Test-Status", "302")]),
        (404, vec![("X-Test-Status", "404")]),
        (500, vec![("X-Test-Status", "500")]),
        (502, vec![("X-Test-Update", "[1]")]),
    ] {
        assert_eq!(get(proxy.port, "/", &headers).status, status, "{headers:?}");
    }
    assert_eq!(counts(), [0.0, 2.0, 1.0, 1.0, 2.0]);

    // README: "`session_proxy_requests_in_flight` is the requests being served now"
    let in_flight = || metric(admin, "session_proxy_requests_in_flight");
    assert_eq!(in_flight(), 0.0);
    let slow = [2500, 2500].map(|ms| slow_request(proxy.port, &[], "", ms));
    assert!(
        eventually(Duration::from_secs(2), || in_flight() == 2.0),
        "two requests at the app: {}",
        in_flight()
    );
    for request in slow {
        assert_eq!(request.join().unwrap().status, 200);
    }
    assert!(
        eventually(Duration::from_secs(2), || in_flight() == 0.0),
        "{}",
        in_flight()
    );
}

#[test]
fn metrics_count_the_answers_to_heads_refused_before_the_app() {
    // README: "`session_proxy_responses_total` counts the answers by `class` [...]
    // pingora's `400` for a head it cannot parse, its `405` for `CONNECT` and the `408`
    // of a head too slow among them"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).server("header_timeout = 1");
    let proxy = config.start();
    let four_xx = || {
        metric(
            config.admin_port,
            "session_proxy_responses_total{class=\"4xx\"}",
        )
    };
    assert_eq!(four_xx(), 0.0);
    let within = Duration::from_secs(10);
    let unparsable = raw_exchange(proxy.port, b"GET /bad HTTP/1.1\r\nHost : x\r\n\r\n", within);
    assert_eq!(raw_status(&unparsable), Some(400));
    let connect = raw_exchange(
        proxy.port,
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        within,
    );
    assert_eq!(raw_status(&connect), Some(405));
    let too_slow = raw_exchange(proxy.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n", within);
    assert_eq!(raw_status(&too_slow), Some(408));
    assert_eq!(
        get(proxy.port, "/", &[("X-Test-Status", "404")]).status,
        404
    );
    assert!(
        eventually(Duration::from_secs(2), || four_xx() == 4.0),
        "400, 405, 408 and the app's 404: {}",
        four_xx()
    );
    assert_eq!(
        metric(
            config.admin_port,
            "session_proxy_responses_total{class=\"2xx\"}"
        ),
        0.0
    );
}

// ---- README: configurations refused ----

#[test]
fn forwarding_header_names_and_statuses_without_content_are_refused_exit_2() {
    // README: "`X-Forwarded-For` and `X-Forwarded-Proto` to the app ("The upstream
    // contract"); they may not be chosen as names of the session headers." and
    // "`expired_status` may not be 204, 205 or 304: [...] (the config is refused, exit 2)."
    let cases = [
        (
            "headers",
            "session = \"X-Forwarded-For\"",
            "headers.session",
        ),
        (
            "headers",
            "update = \"x_forwarded_proto\"",
            "headers.update",
        ),
        ("headers", "action = \"X-FORWARDED-FOR\"", "headers.action"),
        ("session", "expired_status = 204", "session.expired_status"),
        ("session", "expired_status = 205", "session.expired_status"),
        ("session", "expired_status = 304", "session.expired_status"),
    ];
    for (section, line, key) in cases {
        let mut config = ProxyConfig::new(free_port());
        match section {
            "headers" => config.headers.push(line.into()),
            _ => config = config.session(line),
        }
        let path = config.write();
        let output = run_cli(&["check", "-c", path.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{line}: {stderr}");
        assert!(stderr.contains(key), "{line}: {stderr}");
    }
}

// ---- README, "Additions": body_timeout ----

#[test]
fn a_request_body_that_stops_coming_closes_the_apps_connection_too() {
    // README: "`[server] body_timeout` (60 s for a request body to bring its next byte, as
    // nginx's `client_body_timeout`: then `408` and the connection closed on HTTP/1.1 [...];
    // the app's connection, which got part of the body, is closed"
    let recorder = support::recorder::Recorder::start();
    let config = ProxyConfig::new(recorder.port)
        .server("body_timeout = 1")
        .upstream("read_timeout = 60");
    let proxy = config.start();
    let answer = raw_exchange(
        proxy.port,
        b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello",
        Duration::from_secs(15),
    );
    assert_eq!(raw_status(&answer), Some(408), "{answer:?}");
    // The app's connection with half a body is closed, never pooled for
    // another client's request to complete it.
    let closed = eventually(Duration::from_secs(10), || {
        recorder
            .closed_connection_texts()
            .iter()
            .any(|text| text.ends_with("\r\n\r\nhello"))
    });
    assert!(
        closed,
        "the app's connection stays open: {:?}",
        recorder.connection_texts()
    );
    let after = get(proxy.port, "/after", &[]);
    assert_eq!(after.status, 200);
    assert!(recorder
        .closed_connection_texts()
        .iter()
        .all(|text| !text.contains("GET /after")));
}

// ---- README, "Choices where SPEC is silent": the disk store ----

#[test]
fn an_update_racing_a_delete_by_another_process_leaves_no_file_of_the_session() {
    // README: "The `disk` directory belongs to one proxy process. Other processes may delete
    // records (`session-proxy sessions kill` and `sweep` do), and the proxy notices: a write
    // racing such a delete neither brings the session back nor leaves a file of it behind"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).upstream("read_timeout = 30");
    let proxy = config.start();
    let path = config.path();
    let cases = [vec![("X-Test-Update", r#"{"b":2}"#)], vec![]];
    // The cases side by side, each with a session of its own.
    std::thread::scope(|scope| {
        for slow_headers in cases {
            let (proxy, config, path) = (&proxy, &config, &path);
            scope.spawn(move || {
                let mut browser = Browser::new(proxy.port);
                // Written by this process: its next write does not read it again.
                browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
                browser.get("/", &[("X-Test-Update", r#"{"a":2}"#)]);
                let old = browser.cookie.clone().unwrap();
                let handle = handle_of(&old);
                if slow_headers.is_empty() {
                    // A touch is due: the slow request writes the access time.
                    age_record(config, &old, 120, &["atime"]);
                }
                let port = proxy.port;
                let cookie_header = format!("session_id={old}");
                let slow = Held::get(
                    port,
                    "/",
                    &[&slow_headers[..], &[("Cookie", &cookie_header)]].concat(),
                );
                slow.at_the_app();
                let killed = run_cli(
                    &["sessions", "kill", &handle, "-c", path.to_str().unwrap()],
                    &[],
                );
                assert!(
                    killed.status.success(),
                    "{}",
                    String::from_utf8_lossy(&killed.stderr)
                );
                let slow = slow.answer();
                assert_eq!(slow.status, 200, "{slow_headers:?}: {}", slow.text());
                assert_eq!(slow.session()["data"]["a"], 2, "it loaded the session");
                let left: Vec<String> = std::fs::read_dir(config.sessions_dir())
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.contains(&handle))
                    .collect();
                assert!(left.is_empty(), "{slow_headers:?}: left behind: {left:?}");
                assert_eq!(
                    get(port, "/", &[("Cookie", &format!("session_id={old}"))]).session()["new"],
                    true,
                    "{slow_headers:?}: the session came back"
                );
                if let Some(new) = slow.set_cookie("session_id") {
                    assert_ne!(new, old, "{slow_headers:?}");
                }
            });
        }
    });
}

// ---- SECURITY.md, "Limits": the session cookie candidates ----

#[test]
fn session_cookie_copies_past_the_fourth_are_ignored_and_removed() {
    // SECURITY.md, Limits: "| Session cookie candidates verified per request | 4 |
    // `proxy::headers` | later copies ignored (and removed) |"
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("bypass = [\"/static/\"]");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let genuine = browser.cookie.clone().unwrap();
    let mut pairs = vec!["theme=dark".to_string()];
    pairs.extend((0..4).map(|i| format!("session_id={:0>43}.{:0>22}", i, i)));
    pairs.push(format!("session_id={genuine}"));
    pairs.push("lang=en".into());
    pairs.push(format!("session_id={genuine}"));
    let header = pairs.join("; ");
    for path in ["/", "/static/x"] {
        let response = get(proxy.port, path, &[("Cookie", &header)]);
        assert_eq!(response.status, 200, "{path}");
        if path == "/" {
            assert_eq!(
                response.session()["new"],
                true,
                "a fifth copy is not verified"
            );
        }
        assert_eq!(
            response.upstream_header("cookie").as_deref(),
            Some("theme=dark; lang=en"),
            "{path}: every copy of the session cookie is removed"
        );
        assert!(!response.text().contains(id_of(&genuine)), "{path}");
    }
}

// ---- SECURITY.md, "The store": the disk store's files ----

#[test]
fn a_disk_sessions_record_and_spare_are_owner_only_and_go_with_it() {
    // SECURITY.md: "The spare (`.HANDLE.tmp`, owner-only like the record) holds the session's
    // version before last until the next write overwrites it; it is deleted with the session"
    use std::os::unix::fs::PermissionsExt;
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    for n in 1..=3 {
        browser.get("/", &[("X-Test-Update", &format!(r#"{{"n":{n}}}"#))]);
    }
    let cookie = browser.cookie.clone().unwrap();
    let handle = handle_of(&cookie);
    let record = record_path(&config.sessions_dir(), &cookie);
    let spare = config.sessions_dir().join(format!(".{handle}.tmp"));
    for file in [&record, &spare] {
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let before_last: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spare).unwrap()).unwrap();
    assert_eq!(before_last["data"]["n"], 2, "the version before last");
    assert!(!String::from_utf8_lossy(&std::fs::read(&spare).unwrap()).contains(id_of(&cookie)));

    let killed = browser.get("/", &[("X-Test-Action", "kill")]);
    assert_eq!(killed.status, 200);
    let left: Vec<String> = std::fs::read_dir(config.sessions_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---- README, "Choices where SPEC is silent": what a failed regenerate leaves ----

/// `chattr +i` on a file while it lives, `-i` when dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    /// `None` where the file system or the user cannot (not root, tmpfs).
    fn set(path: &std::path::Path) -> Option<Immutable> {
        let done = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false);
        done.then(|| Immutable(path.to_owned()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_regenerate_whose_delete_of_the_old_id_fails_leaves_no_copy_behind() {
    // README: "A failing delete of the old id during `regenerate` (503) also removes the copy
    // under the new one, so nothing is left that no cookie names."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let record = record_path(&config.sessions_dir(), &cookie);
    let names = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(config.sessions_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = names();
    // The old record can be read and not deleted; files around it can be
    // made. Without a way to do that here, say so and stop.
    let Some(guard) = Immutable::set(&record) else {
        eprintln!("SKIPPED: chattr +i does not work here (root on ext4/xfs/btrfs needed)");
        return;
    };
    let response = browser.get("/", &[("X-Test-Action", "regenerate")]);
    let after = names();
    drop(guard);
    assert_eq!(
        (response.status, response.text().as_str()),
        (503, "session store unavailable")
    );
    assert!(response.headers_named("set-cookie").is_empty());
    assert_eq!(after, before, "the copy under the new id is gone");
    assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);
}

// ---- README, "Choices where SPEC is silent": the disk store's note ----

#[test]
fn a_record_deleted_or_rewritten_by_another_process_is_seen_by_the_next_load() {
    // README: "A load of a record this process wrote last does not read it either, when its
    // data is at most 1 KiB: the note keeps it, and the load compares the file's inode, length
    // and modification time with what the write left, so a deleted or rewritten file is seen."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let path = config.path();

    // Deleted by `sessions kill`: the note does not bring it back.
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    assert_eq!(browser.get("/", &[]).session()["data"]["a"], 1);
    let killed = run_cli(
        &[
            "sessions",
            "kill",
            &handle_of(&cookie),
            "-c",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let response = browser.get("/", &[]);
    assert_eq!(
        response.session()["new"],
        true,
        "the killed session is served"
    );
    assert!(!record_path(&config.sessions_dir(), &cookie).exists());

    // Rewritten in place, to the same length: the new content is served.
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let record = record_path(&config.sessions_dir(), &cookie);
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains(r#""a":1"#), "{text}");
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&record, text.replace(r#""a":1"#, r#""a":7"#)).unwrap();
    assert_eq!(
        browser.get("/", &[]).session()["data"]["a"],
        7,
        "the rewritten record is read"
    );
}

// ---- README, "Choices where SPEC is silent": an undecodable record on disk ----

#[test]
fn a_disk_record_that_cannot_be_decoded_is_logged_by_handle_prefix_and_treated_as_missing() {
    // README: "A stored record that cannot be decoded is logged and treated as missing."
    // SECURITY.md: "A record that does not parse is treated as a missing session (logged, the
    // client starts over)."
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("warn", &log);
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let old = browser.cookie.clone().unwrap();
    let handle = handle_of(&old);
    std::fs::write(
        record_path(&config.sessions_dir(), &old),
        b"{\"data\": {\"secret-content\": tru",
    )
    .unwrap();
    let response = browser.get("/", &[("X-Test-Update", r#"{"b":2}"#)]);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.session()["new"], true, "a missing session");
    let new = browser.cookie.clone().unwrap();
    assert_ne!(new, old, "a new session, with a new id");
    assert_eq!(
        browser.get("/", &[]).session()["data"],
        serde_json::json!({"b": 2})
    );
    let mut text = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(&handle[..8])
        }),
        "no line names the session: {text}"
    );
    for secret in [handle.as_str(), id_of(&old), "secret-content"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// "`ver` grows by one per response that changes the session's data or id":
/// a `regenerate` with an update in the same response is one change.
#[test]
fn a_regenerate_with_an_update_in_one_response_raises_ver_by_one() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    let first = browser.cookie.clone().unwrap();
    assert_eq!(browser.get("/", &[]).session()["ver"], 1);

    browser.get("/", &[("X-Test-Action", "regenerate")]);
    assert_ne!(browser.cookie.as_deref(), Some(first.as_str()));
    assert_eq!(
        browser.get("/", &[]).session()["ver"],
        2,
        "regenerate alone"
    );

    let second = browser.cookie.clone().unwrap();
    browser.get(
        "/",
        &[
            ("X-Test-Action", "regenerate"),
            ("X-Test-Update", r#"{"b": 2}"#),
        ],
    );
    assert_ne!(browser.cookie.as_deref(), Some(second.as_str()));
    let session = browser.get("/", &[]).session();
    assert_eq!(session["ver"], 3, "regenerate and update: one change");
    assert_eq!(session["data"], serde_json::json!({"a": 1, "b": 2}));
}

// ---- README, "Reading the session": when the token is signed ----

#[test]
fn the_token_is_signed_when_the_head_arrives_not_when_the_body_ends() {
    // README: "The token is signed when the request's head reaches the proxy, before
    // its body, and `exp` counts from then: an app that checks it only once the whole
    // body is in (...) answers 401 to an upload that took longer than `token_ttl`".
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head_sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbo",
        )
        .unwrap();
    // The test upstream reads the whole body before it answers, as PHP does.
    std::thread::sleep(Duration::from_millis(2200));
    stream.write_all(b"dy").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let response = parse_response(&raw, false).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["body"], "body");
    let claims = response.session();
    let iat = claims["iat"].as_u64().unwrap();
    assert!(
        iat <= head_sent + 1,
        "iat {iat} is from the body's end, not the head's arrival ({head_sent})"
    );
    assert_eq!(claims["exp"].as_u64().unwrap() - iat, 60);
}

// ---- README, "Snippets" ----

#[test]
fn the_python_snippet_counts_with_the_keys_the_proxy_reads() {
    // README, "The secret": "Spaces around an entry are ignored (`NEW, OLD` is `NEW,OLD`:
    // trim them in the app too) and empty entries skipped". The README's Python snippet,
    // run as written (under wsgiref), must read the key the proxy signs with.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("```python\n").expect("a Python snippet") + "```python\n".len();
    let snippet = &readme[start..start + readme[start..].find("```").unwrap()];
    let dir = TempDir::new("python-snippet");
    let port = free_port();
    let app = dir.path().join("app.py");
    std::fs::write(
        &app,
        format!(
            "{snippet}\nfrom wsgiref.simple_server import make_server\n\
             make_server('127.0.0.1', {port}, app).serve_forever()\n"
        ),
    )
    .unwrap();
    // As a .env file or a unit's Environment= may leave them.
    let keys = format!(", {KEY} , {OLD_KEY} ");
    let mut child = std::process::Command::new("python3")
        .arg(&app)
        .env("SESSION_PROXY_SECRET_KEYS", &keys)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 must be installed");
    wait_listening(port, &mut child);
    let app = Process { child, port };
    let mut config = ProxyConfig::new(app.port);
    config.env.push(("SESSION_PROXY_SECRET_KEYS".into(), keys));
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    for count in ["1", "2"] {
        let response = browser.get("/", &[]);
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.text(), count);
    }
}
