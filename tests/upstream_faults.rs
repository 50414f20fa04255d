//! End to end: upstreams that answer badly. Whatever an upstream sends,
//! the stored session changes only as the client is told: a failed
//! response (502, 504) leaves the disk store's files byte for byte as
//! they were; a change is stored only with a response head the client
//! receives. Responses no HTTP library would send come from the test
//! upstream's `raw` fault.
//!
//! `tests/failures.rs` has the plain cases (unreachable, reset, garbage,
//! hang before the head, a huge update, invalid updates); these extend them.

mod support;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;
use support::*;

/// A proxy with one stored session `{"a": 1}`, and its cookie.
struct Setup {
    _upstream: Process,
    proxy: Process,
    config: ProxyConfig,
    cookie: String,
}

fn with_session() -> Setup {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port);
    config.upstream = vec!["read_timeout = 1".into(), "connect_timeout = 1".into()];
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    browser.get("/", &[("X-Test-Update", r#"{"a": 1}"#)]);
    let cookie = browser.cookie.expect("a stored session");
    Setup {
        _upstream: upstream,
        proxy,
        config,
        cookie,
    }
}

impl Setup {
    /// Every record file, name and bytes.
    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = stored_files(&self.config.sessions_dir())
            .into_iter()
            .map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    fn data(&self) -> serde_json::Value {
        let path = record_path(&self.config.sessions_dir(), &self.cookie);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        record["data"].clone()
    }

    /// The upstream answers the session's request with exactly `raw`.
    fn raw(&self, raw: &[u8], then_hang: bool) -> Answer {
        self.send(&[
            ("Cookie", &format!("session_id={}", self.cookie)),
            ("X-Test-Fault", if then_hang { "raw-hang" } else { "raw" }),
            ("X-Test-Raw", &STANDARD.encode(raw)),
        ])
    }

    fn send(&self, headers: &[(&str, &str)]) -> Answer {
        let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        Answer(raw_exchange(
            self.proxy.port,
            head.as_bytes(),
            Duration::from_secs(15),
        ))
    }
}

/// Everything the client received, as bytes.
struct Answer(Vec<u8>);

impl Answer {
    fn status(&self) -> Option<u16> {
        raw_status(&self.0)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
    fn body(&self) -> &[u8] {
        let end = self.0.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        &self.0[end + 4..]
    }
    /// No copy of the upstream's instructions reached the client.
    fn assert_no_instructions(&self) {
        let lower = self.text().to_ascii_lowercase();
        assert!(
            !lower.contains("x-session-update") && !lower.contains("x-session-action"),
            "the client saw the upstream's instructions: {}",
            self.text()
        );
    }
}

/// The upstream's raw response is a failure: 502 with `message`, the
/// files untouched, no cookie set.
fn assert_refused(setup: &Setup, raw: &[u8], message: &str) {
    let before = setup.files();
    let answer = setup.raw(raw, false);
    let shown = String::from_utf8_lossy(raw);
    assert_eq!(answer.status(), Some(502), "{shown:?} -> {}", answer.text());
    assert!(
        answer.text().ends_with(message),
        "{shown:?} -> {}",
        answer.text()
    );
    assert!(!answer.text().to_ascii_lowercase().contains("set-cookie"));
    answer.assert_no_instructions();
    assert_eq!(setup.files(), before, "{shown:?} changed the store");
}

#[test]
fn malformed_responses_are_502_and_change_nothing() {
    let setup = with_session();
    let update = "X-Session-Update: {\"a\":9}\r\n";
    let cases: Vec<Vec<u8>> = vec![
        // Cut off inside the head, the update already sent.
        format!("HTTP/1.1 200 OK\r\n{update}Content-Len").into_bytes(),
        format!("HTTP/1.1 2OO OK\r\n{update}Content-Length: 0\r\n\r\n").into_bytes(),
        format!("HTTP/1.1 200 OK\r\n{update}broken header line\r\nContent-Length: 0\r\n\r\n")
            .into_bytes(),
        format!("HTTP/1.1 200 OK\r\n{update}Content-Length: 2\r\nContent-Length: 3\r\n\r\nok")
            .into_bytes(),
        format!("HTTP/1.1 200 OK\r\n{update}Content-Length: abc\r\n\r\nok").into_bytes(),
        b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"a\":\"\x00\"}\r\nContent-Length: 2\r\n\r\nok"
            .to_vec(),
        // More header lines than pingora reads (256).
        format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 2\r\n\r\nok",
            update.repeat(300)
        )
        .into_bytes(),
        // HTTP/0.9, and a close with no answer at all.
        b"ok".to_vec(),
        Vec::new(),
    ];
    for raw in cases {
        assert_refused(&setup, &raw, "upstream unreachable");
    }
    assert_eq!(setup.data(), json!({"a": 1}));
}

#[test]
fn duplicated_or_undecodable_instructions_in_any_spelling_are_502_and_change_nothing() {
    let setup = with_session();
    let many: String = (0..100)
        .map(|i| format!("X-Session-Update: {{\"a\":{i}}}\r\n"))
        .collect();
    let cases: Vec<Vec<u8>> = vec![
        b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"a\":9}\r\nx-session-update: {\"b\":9}\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        b"HTTP/1.1 200 OK\r\nX-Session-Action: kill\r\nX-SESSION-ACTION: regenerate\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 2\r\n\r\nok").into_bytes(),
        // Not UTF-8, so not JSON.
        b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"a\":\"\xff\"}\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"a\":9}\r\nX-Session-Action: kill\r\nX-Session-Action: \r\nContent-Length: 2\r\n\r\nok".to_vec(),
        // An empty action is none of the two: refused, not taken for either.
        b"HTTP/1.1 200 OK\r\nX-Session-Action: \r\nContent-Length: 2\r\n\r\nok".to_vec(),
    ];
    for raw in cases {
        assert_refused(&setup, &raw, "invalid session update from upstream");
    }
    assert_eq!(setup.data(), json!({"a": 1}));
}

#[test]
fn a_kill_or_regenerate_in_a_head_cut_short_is_not_carried_out() {
    let setup = with_session();
    for action in ["kill", "regenerate"] {
        let raw = format!("HTTP/1.1 200 OK\r\nX-Session-Action: {action}\r\nContent-Le");
        assert_refused(&setup, raw.as_bytes(), "upstream unreachable");
    }
    assert_eq!(setup.data(), json!({"a": 1}));
}

#[test]
fn a_huge_update_with_an_action_is_refused_whole() {
    let setup = with_session();
    let before = setup.files();
    let answer = setup.send(&[
        ("Cookie", &format!("session_id={}", setup.cookie)),
        ("X-Test-Fault", "huge-header"),
        ("X-Test-Action", "kill"),
    ]);
    assert_eq!(answer.status(), Some(502), "{}", answer.text());
    answer.assert_no_instructions();
    assert_eq!(
        setup.files(),
        before,
        "killed or changed by a refused response"
    );
}

#[test]
fn a_response_head_over_one_mib_is_502_and_changes_nothing() {
    let setup = with_session();
    let before = setup.files();
    let answer = setup.send(&[
        ("Cookie", &format!("session_id={}", setup.cookie)),
        ("X-Test-Fault", "huge-head"),
    ]);
    assert_eq!(answer.status(), Some(502), "{}", answer.text());
    assert_eq!(setup.files(), before);
}

/// The token is for the app: an app that echoes its request's headers into
/// its response does not hand it to the client, on a session path or a
/// bypassed one, in any case of the name.
#[test]
fn a_token_the_app_echoes_never_reaches_the_client() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("bypass = [\"/static/\"]");
    let proxy = config.start();
    let mut browser = Browser::new(proxy.port);
    for path in ["/", "/static/x"] {
        for spelling in ["X-Session", "x-session", "X-SESSION"] {
            let echoed = format!("{spelling}: eyJhbGciOiJIUzI1NiJ9.echoed.sig");
            let response = browser.get(path, &[("X-Test-Header", echoed.as_str())]);
            assert_eq!(response.status, 200, "{path}");
            assert_eq!(response.header("x-session"), None, "{path} {spelling}");
        }
    }
    // Other headers the app adds still reach the client.
    let response = browser.get("/", &[("X-Test-Header", "X-Session-Id-Like: kept")]);
    assert_eq!(response.header("x-session-id-like"), Some("kept"));
}

#[test]
fn informational_responses_carry_no_instructions_to_the_client_or_the_store() {
    let setup = with_session();
    let before = setup.files();
    for interim in [
        "HTTP/1.1 103 Early Hints\r\nX-Session-Update: {\"a\":9}\r\nX-Session-Action: kill\r\nLink: </app.css>; rel=preload\r\n\r\n",
        "HTTP/1.1 100 Continue\r\nX-Session-Update: {\"a\":9}\r\n\r\n",
    ] {
        let raw = format!("{interim}HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let answer = setup.raw(raw.as_bytes(), false);
        assert!(answer.text().contains("HTTP/1.1 200 OK"), "{}", answer.text());
        answer.assert_no_instructions();
        assert_eq!(setup.files(), before, "{interim:?} changed the store");
    }
}

/// SPEC 4.5 reads the instructions of "the upstream's response", whatever
/// it is: one without a body (`HEAD`, `204`, `304`) and the `101` that
/// ends an upgrade's exchange are applied as a `200`'s are, and hidden.
#[test]
fn instructions_on_a_response_without_a_body_are_applied_and_hidden() {
    let setup = with_session();
    let cookie = format!("session_id={}", setup.cookie);
    for (method, status, update) in [
        ("HEAD", "200", r#"{"head":1}"#),
        ("GET", "204", r#"{"s204":1}"#),
        ("GET", "304", r#"{"s304":1}"#),
    ] {
        let response = request(
            setup.proxy.port,
            method,
            "/",
            &[
                ("Cookie", &cookie),
                ("X-Test-Status", status),
                ("X-Test-Update", update),
            ],
        );
        assert_eq!(response.status.to_string(), status, "{method} {status}");
        assert!(response.header("x-session-update").is_none(), "{status}");
    }
    let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nX-Session-Update: {\"ws\":1}\r\n\r\n";
    let answer = setup.send(&[
        ("Cookie", &cookie),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("X-Test-Fault", "raw"),
        ("X-Test-Raw", &STANDARD.encode(switching)),
    ]);
    assert_eq!(answer.status(), Some(101), "{}", answer.text());
    answer.assert_no_instructions();
    assert_eq!(
        setup.data(),
        json!({"a": 1, "head": 1, "s204": 1, "s304": 1, "ws": 1})
    );
    // An action too: a regenerate's new cookie goes out on a 304.
    let response = get(
        setup.proxy.port,
        "/",
        &[
            ("Cookie", &cookie),
            ("X-Test-Status", "304"),
            ("X-Test-Action", "regenerate"),
        ],
    );
    assert_eq!(response.status, 304);
    let new = response
        .set_cookie("session_id")
        .expect("the new id's cookie");
    assert_ne!(new, setup.cookie);
    assert!(!record_path(&setup.config.sessions_dir(), &setup.cookie).exists());
}

/// SPEC 4.5: any JSON object is a merge patch, whatever its keys: a NUL
/// is kept (escaped) and `__proto__` is a key like any other. README
/// (deviations): JSON text whose value the proxy cannot keep exactly, a
/// lone surrogate (which no Unicode string holds: Python's `json.dumps` of
/// a `surrogateescape` string) or a number past a double's range, is
/// refused as JSON that is not an object is: 502, the session unchanged.
#[test]
fn an_update_is_kept_exactly_or_refused_whole() {
    let setup = with_session();
    let cookie = format!("session_id={}", setup.cookie);
    let update = |patch: &str| {
        get(
            setup.proxy.port,
            "/",
            &[("Cookie", &cookie), ("X-Test-Update", patch)],
        )
    };
    let patch = r#"{"k\u0000":"v\u0000","__proto__":{"admin":true}}"#;
    assert_eq!(update(patch).status, 200);
    let stored = json!({"a": 1, "k\u{0}": "v\u{0}", "__proto__": {"admin": true}});
    assert_eq!(setup.data(), stored);
    let token = get(setup.proxy.port, "/", &[("Cookie", &cookie)]).session();
    assert_eq!(token["data"], stored);
    let before = setup.files();
    for patch in [
        r#"{"s":"\ud800"}"#,
        r#"{"s":"\udcff.txt"}"#,
        r#"{"n":1e400}"#,
        r#"{"n":[-1e309]}"#,
    ] {
        let refused = update(patch);
        assert_eq!(refused.status, 502, "{patch}: {}", refused.text());
        assert_eq!(refused.text(), "invalid session update from upstream");
        assert_eq!(setup.files(), before, "{patch} changed the store");
    }
}

#[test]
fn a_body_cut_short_after_the_head_ends_the_connection_and_nothing_is_added() {
    let setup = with_session();
    let raw =
        b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"a\":9}\r\nContent-Length: 100\r\n\r\nonly ten b";
    let answer = setup.raw(raw, false);
    // The head left, so the change was stored first (SPEC 4.5) and the
    // client was told; then the body stops short of its Content-Length.
    assert_eq!(answer.status(), Some(200), "{}", answer.text());
    answer.assert_no_instructions();
    assert_eq!(setup.data(), json!({"a": 9}));
    assert_eq!(
        answer.body(),
        b"only ten b",
        "nothing may be written into a body under way"
    );
}

/// A chunked body the upstream cuts off (mid-chunk, or at a chunk size
/// that is no number) must not reach the client as a complete one: the
/// last chunk (`0`) is the only sign an HTTP/1.1 client has that the body
/// is whole, and a cache or a download would keep the truncated one.
#[test]
fn a_chunked_body_cut_short_never_gets_its_last_chunk() {
    let setup = with_session();
    let head =
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Session-Update: {\"a\":9}\r\n\r\n";
    for cut in [
        "5\r\nhello\r\n6\r\n wo",
        "5\r\nhello\r\n",
        "5\r\nhello\r\nzz\r\nbad\r\n",
    ] {
        let answer = setup.raw(format!("{head}{cut}").as_bytes(), false);
        assert_eq!(answer.status(), Some(200), "{cut:?}: {}", answer.text());
        answer.assert_no_instructions();
        let body = String::from_utf8_lossy(answer.body()).into_owned();
        // pingora chunks the body anew: what came of it passes on.
        assert!(body.contains("hello"), "{cut:?}: {body:?}");
        assert!(
            !body.ends_with("0\r\n\r\n"),
            "{cut:?}: a truncated body was ended as complete: {body:?}"
        );
    }
    // The head left, so its change was stored first (SPEC 4.5).
    assert_eq!(setup.data(), json!({"a": 9}));
}

#[test]
fn a_body_that_hangs_after_the_head_is_cut_by_read_timeout_and_nothing_is_added() {
    let setup = with_session();
    let raw =
        b"HTTP/1.1 200 OK\r\nX-Session-Update: {\"a\":9}\r\nContent-Length: 100\r\n\r\nonly ten b";
    let answer = setup.raw(raw, true);
    assert_eq!(answer.status(), Some(200), "{}", answer.text());
    assert_eq!(setup.data(), json!({"a": 9}));
    assert_eq!(answer.body(), b"only ten b");
}

#[test]
fn a_failed_response_stores_no_new_session() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port);
    let proxy = config.start();
    for headers in [
        vec![
            ("X-Test-Fault", "raw".to_string()),
            (
                "X-Test-Raw",
                STANDARD.encode("HTTP/1.1 200 OK\r\nX-Session-Update: {\"n\":1}\r\nContent-Le"),
            ),
        ],
        vec![("X-Test-Fault", "huge-header".to_string())],
        vec![("X-Test-Fault", "huge-head".to_string())],
        vec![
            ("X-Test-Fault", "reset".to_string()),
            ("X-Test-Update", r#"{"n":1}"#.to_string()),
        ],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let response = try_request(proxy.port, "GET", "/", &headers, b"").unwrap();
        assert_eq!(response.status, 502, "{headers:?}");
        assert!(response.set_cookie("session_id").is_none());
        assert!(
            stored_files(&config.sessions_dir()).is_empty(),
            "{headers:?}"
        );
    }
}

/// RFC 9112 6.1: no `Transfer-Encoding` to a client that did not speak
/// HTTP/1.1. pingora asks the upstream in HTTP/1.1 whatever the client
/// spoke, and turns a response without a length into a chunked one: an
/// HTTP/1.0 client (ab, simple scripts, health checkers) read the chunk
/// framing as part of the body.
#[test]
fn an_http_1_0_client_never_gets_a_chunked_body() {
    let upstream = start_upstream();
    let proxy = ProxyConfig::new(upstream.port).start();
    for raw in [
        // The upstream chunks its body (any streaming app server does).
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..],
        // The upstream ends its body by closing the connection.
        &b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world"[..],
    ] {
        let head = format!(
            "GET / HTTP/1.0\r\nHost: x\r\nX-Test-Fault: raw\r\nX-Test-Raw: {}\r\n\r\n",
            STANDARD.encode(raw)
        );
        let answer = raw_exchange(proxy.port, head.as_bytes(), Duration::from_secs(10));
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(raw_status(&answer), Some(200), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "an HTTP/1.0 client got Transfer-Encoding:\n{head}"
        );
        assert_eq!(body, "hello world");
    }
}

/// RFC 9110 15.2: no 1xx to an HTTP/1.0 client, which takes the upstream's
/// `103 Early Hints` for the answer.
#[test]
fn an_http_1_0_client_gets_no_interim_response() {
    let upstream = start_upstream();
    let proxy = ProxyConfig::new(upstream.port).start();
    let raw = b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n\
                HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let head = format!(
        "GET / HTTP/1.0\r\nHost: x\r\nX-Test-Fault: raw\r\nX-Test-Raw: {}\r\n\r\n",
        STANDARD.encode(raw)
    );
    let answer = raw_exchange(proxy.port, head.as_bytes(), Duration::from_secs(10));
    assert_eq!(
        raw_status(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
