//! End to end: everything the proxy writes to its log during a full run,
//! at trace level, names sessions by handle prefix only. No session id,
//! cookie value, token, full handle or secret key appears, whatever
//! happens: new sessions, updates, regenerate, kill, forged and expired
//! cookies, invalid updates, store and upstream failures, malformed,
//! oversized and unfinished requests (pingora logs some with their raw bytes).
//! And no client can break one of its lines in two.

mod support;

use std::time::Duration;

use support::*;

/// Everything a log reader must not learn, with what it is.
#[derive(Default)]
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn add(&mut self, what: &str, value: &str) {
        assert!(!value.is_empty(), "{what} is empty");
        self.0.push((what.to_string(), value.to_string()));
    }

    fn cookie(&mut self, cookie: &str) {
        self.add("cookie value", cookie);
        self.add("session id", id_of(cookie));
        self.add("full handle", &handle_of(cookie));
    }

    /// The token and its payload and signature (its header is public).
    fn token(&mut self, response: &Response) {
        let token = response
            .upstream_header("x-session")
            .expect("the upstream got a token");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        self.add("token payload", parts[1]);
        self.add("token signature", parts[2]);
        self.add("token", &token);
    }
}

#[test]
fn a_trace_log_of_a_full_run_holds_no_id_cookie_token_or_key() {
    let upstream = start_upstream();
    let mut config = ProxyConfig::new(upstream.port)
        .session(&format!("secret_keys = [{KEY:?}, {OLD_KEY:?}]"))
        .session("ignore_expiry = false")
        .session("timeout = 1")
        .session("touch_interval = 0")
        .session("bypass = [\"/static/\"]")
        .server("header_timeout = 1");
    config.upstream = vec!["read_timeout = 1".into(), "connect_timeout = 1".into()];
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("trace", &log);
    let port = proxy.port;
    let mut secrets = Secrets::default();
    secrets.add("secret key", KEY);
    secrets.add("old secret key", OLD_KEY);
    let mut browser = Browser::new(port);

    // A new session, an update, a regenerate, a bypassed path.
    let created = browser.get("/login", &[("X-Test-Update", r#"{"user":"ann"}"#)]);
    assert_eq!(created.status, 200);
    let first = browser.cookie.clone().unwrap();
    secrets.cookie(&first);
    secrets.token(&created);
    let updated = browser.get("/cart", &[("X-Test-Update", r#"{"cart":[1,2]}"#)]);
    secrets.token(&updated);
    let regenerated = browser.get("/", &[("X-Test-Action", "regenerate")]);
    assert_eq!(regenerated.status, 200);
    let second = browser.cookie.clone().unwrap();
    assert_ne!(first, second);
    secrets.cookie(&second);
    secrets.token(&browser.get("/", &[]));
    let cookie_header = format!("session_id={second}; theme=dark");
    assert_eq!(
        get(port, "/static/app.css", &[("Cookie", &cookie_header)]).status,
        200
    );

    // The old cookie, now unknown: the expired answer.
    let stale = get(port, "/", &[("Cookie", &format!("session_id={first}"))]);
    assert_eq!(stale.text(), "Session expired");
    // Forged: a real id with another's tag, and garbage.
    let forged = format!("{}.AAAAAAAAAAAAAAAAAAAAAA", id_of(&second));
    for value in [forged.as_str(), "not-a-cookie"] {
        let response = get(port, "/", &[("Cookie", &format!("session_id={value}"))]);
        assert_eq!(response.status, 200);
        assert_eq!(response.session()["new"], true);
    }

    // An invalid update, then an upstream that hangs (pingora logs the failure).
    assert_eq!(
        browser.get("/", &[("X-Test-Update", "not json")]).status,
        502
    );
    assert_eq!(browser.get("/", &[("X-Test-Fault", "hang")]).status, 504);

    // Malformed requests carrying the cookie: pingora logs their raw bytes.
    let malformed = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nCookie: session_id={second}\r\nno colon here\r\n\r\n"
    );
    let answer = raw_exchange(port, malformed.as_bytes(), Duration::from_secs(5));
    assert_eq!(raw_status(&answer), Some(400));
    let mut flood = format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: session_id={second}\r\n");
    for i in 0..300 {
        flood.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    flood.push_str("\r\n");
    let answer = raw_exchange(port, flood.as_bytes(), Duration::from_secs(5));
    assert_eq!(raw_status(&answer), Some(400));
    // Over our head limit (431), and a head that never ends (408).
    let oversized = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nCookie: session_id={second}\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    let answer = raw_exchange(port, oversized.as_bytes(), Duration::from_secs(5));
    assert_eq!(raw_status(&answer), Some(431));
    let unfinished = format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: session_id={second}\r\n");
    let answer = raw_exchange(port, unfinished.as_bytes(), Duration::from_secs(5));
    assert_eq!(raw_status(&answer), Some(408));

    // Kill, then a new session that meets a failing store.
    assert_eq!(browser.get("/", &[("X-Test-Action", "kill")]).status, 200);
    assert!(browser.cookie.is_none());
    browser.get("/", &[("X-Test-Update", r#"{"n":1}"#)]);
    let third = browser.cookie.clone().unwrap();
    secrets.cookie(&third);
    let dir = config.sessions_dir();
    let aside = config.dir.path().join("aside");
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    assert_eq!(browser.get("/", &[]).status, 503);
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();

    // Idle past the timeout: expired.
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(browser.get("/", &[]).text(), "Session expired");

    drop(proxy);
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(
        text.contains("TRACE") && text.contains("regenerated as"),
        "the log was not written at trace level:\n{text}"
    );
    // Sessions are still named, by handle prefix.
    assert!(text.contains(&handle_of(&first)[..8]), "{text}");
    let leaks: Vec<String> = secrets
        .0
        .iter()
        .filter(|(_, value)| text.contains(value.as_str()))
        .map(|(what, value)| {
            let line = text.lines().find(|line| line.contains(value.as_str()));
            format!("{what} {value:?} in: {}", line.unwrap_or_default())
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "{} leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// pingora's lines about a request it could not proxy quote the client's
/// path and `Host`, which may hold any UTF-8 past ASCII: a line break
/// there (U+0085, U+2028) or a terminal's CSI (U+009B) must not reach the
/// log as sent, or a client could forge log lines, or steer the terminal
/// of whoever reads them. They are escaped, and the line stays one line.
#[test]
fn a_client_cannot_break_a_log_line_with_what_its_path_or_host_holds() {
    // Nothing listens there: pingora logs the failure, quoting the request.
    let config = ProxyConfig::new(free_port());
    let log = config.dir.path().join("proxy.log");
    let proxy = config.start_logging("info", &log);
    let raw = "GET /x\u{85}FORGED-BY-PATH\u{2028}LINE\u{9b}2J HTTP/1.1\r\n\
               Host: h\u{85}FORGED-BY-HOST\u{202e}\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(proxy.port, raw.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        raw_status(&answer),
        Some(502),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let read = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(
        eventually(Duration::from_secs(5), || read().contains("FORGED-BY-HOST")),
        "pingora logged no line quoting the request:\n{}",
        read()
    );
    drop(proxy);
    let text = read();
    for raw in ['\u{85}', '\u{2028}', '\u{9b}', '\u{202e}'] {
        assert!(!text.contains(raw), "{raw:?} reached the log:\n{text}");
    }
    for line in text.lines().filter(|line| line.contains("FORGED")) {
        assert!(
            line.starts_with('['),
            "a line begun by the client: {line:?}"
        );
        assert!(
            line.contains(r"/x\u{85}FORGED-BY-PATH\u{2028}LINE\u{9b}2J")
                && line.contains(r"h\u{85}FORGED-BY-HOST\u{202e}"),
            "{line:?}"
        );
    }
}
