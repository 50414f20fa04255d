//! End to end: the built proxy in front of a real upstream process, a
//! session's life as a client and the upstream see it (SPEC [3], [4]).

mod support;

use std::process::Command;

use support::*;

struct Setup {
    _upstream: Process,
    proxy: Process,
    config: ProxyConfig,
}

fn setup(configure: impl FnOnce(ProxyConfig) -> ProxyConfig) -> Setup {
    let upstream = start_upstream();
    let config = configure(ProxyConfig::new(upstream.port));
    let proxy = config.start();
    Setup {
        _upstream: upstream,
        proxy,
        config,
    }
}

impl Setup {
    fn port(&self) -> u16 {
        self.proxy.port
    }
    fn browser(&self) -> Browser {
        Browser::new(self.port())
    }
    fn records(&self) -> Vec<serde_json::Value> {
        stored_files(&self.config.sessions_dir())
            .iter()
            .map(|path| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
            .collect()
    }
}

/// `examples/counter.py`, which verifies every token with `KEY`.
fn start_counter_example() -> Process {
    let port = free_port();
    let mut child = Command::new("python3")
        .arg(repo_root().join("examples/counter.py"))
        .args(["--port", &port.to_string()])
        .env("SESSION_PROXY_SECRET_KEYS", KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child);
    Process { child, port }
}

#[test]
fn the_seed_counter_counts_and_starts_over_after_reset() {
    let counter = start_counter_example();
    let port = counter.port;
    let config = ProxyConfig::new(port).session("initializer = { count = 0 }");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    let counts: Vec<String> = (0..3).map(|_| browser.get("/count", &[]).text()).collect();
    assert_eq!(counts, ["1", "2", "3"]);
    assert_eq!(browser.get("/reset", &[]).status, 200);
    assert!(browser.cookie.is_none(), "reset clears the cookie");
    assert_eq!(browser.get("/count", &[]).text(), "1");
    assert_eq!(browser.get("/count", &[]).text(), "2");
}

#[test]
fn the_counter_app_refuses_requests_that_bypass_the_proxy() {
    let counter = start_counter_example();
    let port = counter.port;
    assert_eq!(
        get(port, "/count", &[("X-Session", "e30.e30.forged")]).status,
        401
    );
}

#[test]
fn a_new_session_carries_the_initializer_and_is_flagged_new() {
    let s = setup(|c| c.session("initializer = { count = 0, prefs = { lang = \"fr\" } }"));
    let claims = get(s.port(), "/", &[]).session();
    assert_eq!(
        claims["data"],
        serde_json::json!({"count": 0, "prefs": {"lang": "fr"}})
    );
    assert_eq!(claims["new"], true);
    assert_eq!(claims["ver"], 0);
    assert_eq!(claims["sid"].as_str().unwrap().len(), 64);
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 60, "token_ttl defaults to 60");
}

#[test]
fn a_new_session_without_changes_is_not_stored_and_gets_no_cookie() {
    let s = setup(|c| c);
    let response = get(s.port(), "/", &[]);
    assert_eq!(response.status, 200);
    assert!(response.headers_named("set-cookie").is_empty());
    assert!(s.records().is_empty());
}

#[test]
fn save_uninitialized_stores_a_new_session_and_sets_its_cookie() {
    let s = setup(|c| {
        c.session("save_uninitialized = true")
            .session("initializer = { a = 1 }")
    });
    let mut browser = s.browser();
    browser.get("/", &[]);
    assert!(browser.cookie.is_some());
    let records = s.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["data"], serde_json::json!({"a": 1}));
    assert_eq!(records[0]["ver"], 1);
    assert_eq!(browser.get("/", &[]).session()["new"], false);
    // SPEC [7]: a session stored for nothing but save_uninitialized is created too.
    assert_eq!(
        metric(s.config.admin_port, "session_proxy_sessions_created_total"),
        1.0
    );
}

#[test]
fn an_update_creates_the_session_with_cookie_and_record() {
    let s = setup(|c| c.session("initializer = { count = 0 }"));
    let mut browser = s.browser();
    let response = browser.get("/", &[("X-Test-Update", r#"{"count": 5}"#)]);
    let cookie = browser.cookie.clone().expect("a Set-Cookie");
    let (id, tag) = cookie.split_once('.').unwrap();
    assert_eq!((id.len(), tag.len()), (43, 22));
    assert_eq!(
        response.header("set-cookie").unwrap(),
        format!("session_id={cookie}; Path=/; HttpOnly; SameSite=Lax")
    );
    assert_eq!(
        response.header("cache-control"),
        Some(r#"no-cache="Set-Cookie""#)
    );
    let records = s.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["data"], serde_json::json!({"count": 5}));
    assert_eq!(records[0]["ver"], 1);
    assert_eq!(records[0]["ip"], "127.0.0.1");
    let claims = browser.get("/", &[]).session();
    assert_eq!(claims["data"], serde_json::json!({"count": 5}));
    assert_eq!(
        (claims["new"].clone(), claims["ver"].clone()),
        (false.into(), 1.into())
    );
}

#[test]
fn the_record_file_is_named_by_the_handle_and_never_holds_the_id() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    let response = browser.get("/", &[("X-Test-Update", r#"{"k": 1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let id = cookie.split('.').next().unwrap();
    let handle = {
        use sha2::Digest;
        sha2::Sha256::digest(id.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(
        response.session()["sid"],
        handle,
        "the token's sid is the handle"
    );
    let files = stored_files(&s.config.sessions_dir());
    assert_eq!(
        files,
        vec![s.config.sessions_dir().join(format!("{handle}.json"))]
    );
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(!text.contains(id), "the raw id is never stored");
}

#[test]
fn merge_patches_apply_in_turn_and_null_deletes() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    browser.get(
        "/",
        &[("X-Test-Update", r#"{"a": 1, "b": {"c": 2, "d": 3}}"#)],
    );
    browser.get(
        "/",
        &[(
            "X-Test-Update",
            r#"{"a": null, "b": {"c": null, "e": 4}, "f": [1]}"#,
        )],
    );
    let claims = browser.get("/", &[]).session();
    assert_eq!(
        claims["data"],
        serde_json::json!({"b": {"d": 3, "e": 4}, "f": [1]})
    );
    assert_eq!(claims["ver"], 2);
}

/// A record at the last version (`u64::MAX`, written by another
/// program): its next change counts afresh from 1, where saturating kept
/// the version still, so a write checked against the version it loaded
/// could no longer see a change made in between.
#[test]
fn a_change_of_a_record_at_the_last_version_starts_the_count_again() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    let cookie = browser.cookie.clone().unwrap();
    let path = record_path(&s.config.sessions_dir(), &cookie);
    let mut record = stored_record(&s.config, &cookie);
    record["ver"] = u64::MAX.into();
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

    let response = browser.get("/", &[("X-Test-Update", r#"{"a": 2}"#)]);
    assert_eq!(response.session()["ver"], u64::MAX);
    let stored = stored_record(&s.config, &cookie);
    assert_eq!(
        (stored["ver"].clone(), stored["data"].clone()),
        (1.into(), serde_json::json!({"a": 2}))
    );
    let claims = browser.get("/", &[]).session();
    assert_eq!(
        (claims["ver"].clone(), claims["data"]["a"].clone()),
        (1.into(), 2.into())
    );
}

#[test]
fn kill_deletes_the_record_and_clears_the_cookie() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    let old = browser.cookie.clone().unwrap();
    let response = browser.get("/", &[("X-Test-Action", "kill")]);
    assert_eq!(
        response.header("set-cookie").unwrap(),
        "session_id=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
    );
    assert!(s.records().is_empty());
    let again = get(s.port(), "/", &[("Cookie", &format!("session_id={old}"))]);
    assert_eq!(
        again.session()["new"],
        true,
        "a killed session's cookie starts a new session"
    );
}

#[test]
fn regenerate_moves_the_session_to_a_new_id_and_applies_the_update() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"cart": 3}"#)]);
    let old = browser.cookie.clone().unwrap();
    let old_sid = browser.get("/", &[]).session()["sid"].clone();
    browser.get(
        "/",
        &[
            ("X-Test-Action", "regenerate"),
            ("X-Test-Update", r#"{"user": "ann"}"#),
        ],
    );
    let new = browser.cookie.clone().unwrap();
    assert_ne!(old, new);
    let claims = browser.get("/", &[]).session();
    assert_ne!(claims["sid"], old_sid);
    assert_eq!(
        claims["data"],
        serde_json::json!({"cart": 3, "user": "ann"})
    );
    assert_eq!(claims["ver"], 2);
    assert_eq!(s.records().len(), 1, "the old record is deleted");
    let replay = get(s.port(), "/", &[("Cookie", &format!("session_id={old}"))]);
    assert_eq!(replay.session()["new"], true, "the old id is dead");
}

/// With the lock off, a request of the session may be answered after a
/// regenerate has moved it. Its touch then finds no record, and it must
/// not send the old id back over the new cookie: that would log the user
/// out again (and undo the defence against session fixation).
#[test]
fn an_answer_after_a_regenerate_does_not_send_the_old_cookie_back() {
    let s = setup(|c| {
        c.session("cookie_max_age = 600")
            .session("touch_interval = 0")
            .upstream("read_timeout = 30")
    });
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"cart": 3}"#)]);
    let old = browser.cookie.clone().unwrap();
    // Loaded, and held at the app until the regenerate is done.
    let slow = Held::get(s.port(), "/", &[("Cookie", &format!("session_id={old}"))]);
    slow.at_the_app();
    browser.get(
        "/",
        &[
            ("X-Test-Action", "regenerate"),
            ("X-Test-Update", r#"{"user": "ann"}"#),
        ],
    );
    assert_ne!(browser.cookie.as_ref(), Some(&old));
    let late = slow.answer();
    assert_eq!(late.status, 200);
    assert_eq!(late.set_cookie("session_id"), None, "the old id came back");
    assert_eq!(
        browser.get("/", &[]).session()["data"],
        serde_json::json!({"cart": 3, "user": "ann"})
    );
}

/// SPEC [3]: the id is 32 bytes from a CSPRNG. Each of them varies from
/// session to session: a constant part (a buffer filled in part, a
/// generator cut short) would leave that much less to guess. With 40 ids
/// a random byte is the same in all of them with odds of 256^-39.
#[test]
fn every_byte_of_the_session_id_varies() {
    use base64::Engine;
    let s = setup(|c| c);
    let ids: Vec<Vec<u8>> = (0..40)
        .map(|_| {
            let response = get(s.port(), "/", &[("X-Test-Update", r#"{"a":1}"#)]);
            let cookie = response.set_cookie("session_id").unwrap();
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(id_of(&cookie))
                .unwrap()
        })
        .collect();
    assert!(ids.iter().all(|id| id.len() == 32));
    for position in 0..32 {
        let first = ids[0][position];
        assert!(
            ids.iter().any(|id| id[position] != first),
            "byte {position} of the id is {first} in all {} sessions",
            ids.len()
        );
    }
}

#[test]
fn a_forged_cookie_is_a_new_session_and_creates_no_file() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    // Sent once, so that the proxy keeps the value it verified: a forgery
    // that shares its id must still be refused.
    assert_eq!(browser.get("/", &[]).session()["new"], false);
    let real = browser.cookie.clone().unwrap();
    let (id, tag) = real.split_once('.').unwrap();
    let other_tag_start = if tag.starts_with('A') { 'B' } else { 'A' };
    let forgeries = [
        format!("{id}.AAAAAAAAAAAAAAAAAAAAAA"),
        format!("{id}.{other_tag_start}{}", &tag[1..]),
        format!("{}.{}", "A".repeat(43), "A".repeat(22)),
        "x".repeat(5000),
        "../../etc/passwd".into(),
        String::new(),
    ];
    for forged in forgeries {
        let response = get(
            s.port(),
            "/",
            &[("Cookie", &format!("session_id={forged}"))],
        );
        assert_eq!(response.status, 200);
        assert_eq!(response.session()["new"], true, "{forged:.40}");
        assert!(response.headers_named("set-cookie").is_empty());
    }
    assert_eq!(s.records().len(), 1);
}

/// A browser sends every cookie of the name it holds: after a change of
/// `cookie_domain` or `cookie_path`, a stale one (of a session killed or
/// expired since) beside the current one, often first. The first correctly
/// signed value decided alone, so every request met the stale session and
/// started a new one, and no session outlived its response.
#[test]
fn of_several_signed_cookies_the_one_whose_session_lives_is_used() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("ignore_expiry = false");
    let proxy = config.start();
    let mut stale = Browser::new(proxy.port);
    stale.get("/", &[("X-Test-Update", r#"{"who":"stale"}"#)]);
    let stale_cookie = stale.cookie.clone().unwrap();
    stale.get("/", &[("X-Test-Action", "kill")]);
    let mut current = Browser::new(proxy.port);
    current.get("/", &[("X-Test-Update", r#"{"who":"current"}"#)]);
    let current_cookie = current.cookie.clone().unwrap();

    let both = format!("session_id={stale_cookie}; session_id={current_cookie}");
    let response = get(proxy.port, "/", &[("Cookie", &both)]);
    assert_ne!(response.text(), "Session expired");
    let claims = response.session();
    assert_eq!(claims["data"]["who"], "current", "{claims}");
    assert_eq!(claims["sid"], handle_of(&current_cookie));
    assert_eq!(response.set_cookie("session_id"), None);

    // With no live session among them, the first decides, as before.
    let dead = format!("session_id={stale_cookie}; session_id={stale_cookie}");
    let response = get(proxy.port, "/", &[("Cookie", &dead)]);
    assert_eq!(response.text(), "Session expired");
}

#[test]
fn client_sent_session_headers_never_reach_the_upstream() {
    let s = setup(|c| c.session("bypass = [\"/static/\"]"));
    let spoofed = [
        ("X-Session", "forged"),
        ("X_Session", "forged"),
        ("x-session-update", "{}"),
        ("X-Session-Action", "kill"),
        ("X_SESSION_ACTION", "kill"),
    ];
    for path in ["/app", "/static/x"] {
        let seen = get(s.port(), path, &spoofed).upstream_headers();
        let names: Vec<String> = seen
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase().replace('_', "-"))
            .collect();
        assert!(
            !names.contains(&"x-session-update".to_string()),
            "{path}: {names:?}"
        );
        assert!(
            !names.contains(&"x-session-action".to_string()),
            "{path}: {names:?}"
        );
        let tokens: Vec<&(String, String)> = seen
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-session"))
            .collect();
        match path {
            "/app" => assert!(tokens.len() == 1 && tokens[0].1 != "forged", "{tokens:?}"),
            _ => assert!(tokens.is_empty(), "bypassed paths get no token: {tokens:?}"),
        }
        assert!(
            !seen.iter().any(|(n, _)| n.contains('_')),
            "{path}: {seen:?}"
        );
    }
}

/// Headers a client names in `Connection` are hop-by-hop, and pingora
/// removes them from the upstream request: the token must not be one.
#[test]
fn a_client_cannot_take_the_token_away_by_naming_it_in_connection() {
    let s = setup(|c| c);
    for connection in ["X-Session", "x-session, keep-alive", "close, X-SESSION"] {
        let response = get(s.port(), "/app", &[("Connection", connection)]);
        assert_eq!(response.status, 200);
        assert_eq!(response.session()["new"], true, "{connection}: a token");
    }
}

/// The proxy owns the session cookie. An upstream `Set-Cookie` of that
/// name (an app whose framework uses the same one) replaced the browser's
/// session whenever the proxy set no cookie itself; it never reaches the
/// client now, and the app's other cookies still do.
#[test]
fn the_upstreams_set_cookie_of_the_session_cookie_never_reaches_the_client() {
    let s = setup(|c| c.session("bypass = [\"/static/\"]"));
    let mut browser = s.browser();
    browser.get("/app", &[("X-Test-Update", r#"{"a":1}"#)]);
    let clash = [
        ("X-Test-Set-Cookie", "session_id=EVIL; Path=/"),
        // RFC 6265 5.2: the name is trimmed, and a browser reads this one
        // as session_id too.
        ("X-Test-Set-Cookie", "session_id =EVIL; Path=/"),
        ("X-Test-Set-Cookie", "theme=dark; Path=/"),
    ];
    for (path, update) in [
        ("/app", None),
        ("/app", Some(r#"{"a":2}"#)),
        ("/static/x", None),
    ] {
        let mut headers = clash.to_vec();
        headers.extend(update.map(|update| ("X-Test-Update", update)));
        let response = browser.get(path, &headers);
        let cookies = response.headers_named("set-cookie");
        assert!(
            cookies.iter().any(|c| c.starts_with("theme=dark")),
            "{path}: {cookies:?}"
        );
        assert!(
            !cookies.iter().any(|c| c.contains("EVIL")),
            "{path}: {cookies:?}"
        );
    }
    assert_eq!(browser.get("/app", &[]).session()["data"]["a"], 2);
}

#[test]
fn upstream_session_headers_never_reach_the_client() {
    let s = setup(|c| c.session("bypass = [\"/static/\"]"));
    for path in ["/app", "/static/x"] {
        let response = get(
            s.port(),
            path,
            &[
                ("X-Test-Update", r#"{"a":1}"#),
                ("X-Test-Action", "regenerate"),
            ],
        );
        assert_eq!(response.status, 200);
        assert!(response.header("x-session-update").is_none(), "{path}");
        assert!(response.header("x-session-action").is_none(), "{path}");
    }
}

#[test]
fn a_bypassed_path_gets_no_session_work_but_loses_the_session_cookie() {
    let s = setup(|c| {
        c.session("bypass = [\"/static/\"]")
            .session("save_uninitialized = true")
    });
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = format!(
        "theme=dark; session_id={}; lang=en",
        browser.cookie.clone().unwrap()
    );
    let response = get(
        s.port(),
        "/static/app.css",
        &[("Cookie", &cookie), ("X-Test-Action", "kill")],
    );
    assert!(response.session().is_null());
    assert!(response.headers_named("set-cookie").is_empty());
    assert_eq!(
        response.upstream_header("cookie").as_deref(),
        Some("theme=dark; lang=en")
    );
    assert_eq!(
        s.records().len(),
        1,
        "the ignored kill did not delete the session"
    );
}

/// An app that resolves dot-segments would serve `/static/../count` as
/// `/count`: such a path is no bypassed path, whatever its spelling.
#[test]
fn a_path_that_leaves_the_bypass_prefix_gets_the_session() {
    let s = setup(|c| c.session("bypass = [\"/static/\"]"));
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let cookie = format!("session_id={}", browser.cookie.clone().unwrap());
    assert!(get(s.port(), "/static/app.css", &[("Cookie", &cookie)])
        .session()
        .is_null());
    for path in [
        "/static/../count",
        "/static/%2e%2e/count",
        "/static/..;/count",
    ] {
        let response = get(s.port(), path, &[("Cookie", &cookie)]);
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.session()["data"]["a"], 1, "{path}");
    }
}

#[test]
fn the_session_cookie_is_removed_from_the_upstream_cookie_header() {
    let s = setup(|c| c);
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let value = browser.cookie.clone().unwrap();
    let response = request(
        s.port(),
        "GET",
        "/",
        &[
            ("Cookie", &format!("a=1; session_id={value}")),
            ("Cookie", "b=2"),
        ],
    );
    assert_eq!(
        response.session()["new"],
        false,
        "several Cookie headers are one list"
    );
    assert_eq!(
        response.upstream_header("cookie").as_deref(),
        Some("a=1; b=2")
    );
    let only = get(s.port(), "/", &[("Cookie", &format!("session_id={value}"))]);
    assert_eq!(
        only.upstream_header("cookie"),
        None,
        "an emptied Cookie header is dropped"
    );
}

/// An intermediary that merges repeated `Cookie` lines with `, ` (Apache
/// httpd merges every repeated request header so) puts the session cookie
/// after a comma. The proxy read it as part of the cookie before, so the
/// session was lost, and passed it on, where parsers that split cookies at
/// commas too (Python's `SimpleCookie`, Rack before 2.1.4) gave the app
/// the session cookie the proxy promises to remove.
#[test]
fn a_session_cookie_after_a_comma_is_used_and_removed() {
    let s = setup(|c| c.session("bypass = [\"/static/\"]"));
    let mut browser = s.browser();
    browser.get("/", &[("X-Test-Update", r#"{"a":1}"#)]);
    let value = browser.cookie.clone().unwrap();
    let cases = [
        (format!("a=1, session_id={value}; b=2"), "a=1; b=2"),
        (format!("session_id={value},a=1, c=3; b=2"), "a=1; c=3; b=2"),
        // A comma in another cookie's value is left as it is.
        (format!("x=p, q; session_id={value}"), "x=p, q"),
    ];
    for (cookie, rest) in &cases {
        let response = get(s.port(), "/", &[("Cookie", cookie)]);
        assert_eq!(response.session()["data"]["a"], 1, "{cookie}");
        assert_eq!(response.upstream_header("cookie").as_deref(), Some(*rest));
        let bypassed = get(s.port(), "/static/x", &[("Cookie", cookie)]);
        assert_eq!(bypassed.upstream_header("cookie").as_deref(), Some(*rest));
    }
    let forged = get(s.port(), "/", &[("Cookie", "a=1, session_id=forged")]);
    assert_eq!(forged.session()["new"], true);
    assert_eq!(forged.upstream_header("cookie").as_deref(), Some("a=1"));
}

#[test]
fn the_token_verifies_with_pyjwt() {
    let s = setup(|c| c.session("initializer = { count = 0 }"));
    let token = get(s.port(), "/", &[])
        .upstream_header("x-session")
        .unwrap();
    let python = std::env::var("SESSION_PROXY_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = repo_root().join(".venv/bin/python");
        if venv.exists() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let output = Command::new(&python)
        .arg(repo_root().join("tests/support/jwt_check.py"))
        .args([token.as_str(), KEY])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.code() == Some(3) {
        assert!(
            std::env::var("SESSION_PROXY_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "PyJWT missing in {python}"
        );
        eprintln!("\n!!! SKIPPED the_token_verifies_with_pyjwt: PyJWT is not installed for {python} (make a .venv with PyJWT) !!!\n");
        return;
    }
    assert!(
        output.status.success(),
        "PyJWT refused the token: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let kid = {
        use sha2::Digest;
        sha2::Sha256::digest(KEY.as_bytes())[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(stdout.contains(&format!("kid {kid}")), "{stdout}");
    assert!(
        stdout.contains("\"count\": 0") || stdout.contains("\"count\":0"),
        "{stdout}"
    );
}

#[test]
fn old_cookies_stay_valid_while_their_key_is_listed() {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    config.session[0] = format!("secret_keys = [{OLD_KEY:?}]");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"who": "old"}"#)]);
    drop(proxy);

    config.session[0] = format!("secret_keys = [{KEY:?}, {OLD_KEY:?}]");
    let proxy = config.start();
    browser.port = proxy.port;
    let claims = browser.get("/", &[]).session();
    assert_eq!(
        claims["data"],
        serde_json::json!({"who": "old"}),
        "the old key still verifies"
    );
    drop(proxy);

    config.session[0] = format!("secret_keys = [{KEY:?}]");
    let proxy = config.start();
    browser.port = proxy.port;
    assert_eq!(
        browser.get("/", &[]).session()["new"],
        true,
        "an unlisted key no longer verifies"
    );
}

#[test]
fn a_disk_session_continues_after_a_restart() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/count", &[]);
    browser.get("/count", &[]);
    drop(proxy);
    let proxy = config.start();
    browser.port = proxy.port;
    assert_eq!(browser.get("/count", &[]).text(), "3");
}

#[test]
fn head_requests_and_request_bodies_pass_through() {
    let s = setup(|c| c);
    let head = request(s.port(), "HEAD", "/", &[]);
    assert_eq!(head.status, 200);
    let posted = try_request(
        s.port(),
        "POST",
        "/form",
        &[("Content-Type", "text/plain")],
        b"hello body",
    )
    .unwrap();
    assert_eq!(posted.json()["body"], "hello body");
    assert_eq!(posted.json()["method"], "POST");
}

#[test]
fn large_bodies_stream_through_untouched() {
    let s = setup(|c| c);
    // A client that takes compressed bodies still gets the upstream's bytes.
    let accepts = ("Accept-Encoding", "gzip, br, zstd");
    let response = get(s.port(), "/", &[("X-Test-Body-Bytes", "3000000"), accepts]);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Content-Encoding"), None);
    assert_eq!(response.header("Content-Length"), Some("3000000"));
    assert_eq!(response.body.len(), 3_000_000);
    assert!(response.body.iter().all(|&b| b == b'a'));
}
