//! The process logger: `env_logger` (filtered by `RUST_LOG`, `info` by
//! default) behind a filter that takes credentials out of every line.
//!
//! Our own log lines name sessions by handle prefix only, but pingora's
//! debug and trace lines print whole requests: the client's `Cookie`
//! header, the token sent upstream, a malformed request's raw bytes. So
//! every line that is written is redacted first:
//!
//! - the secret keys, as configured, become `[secret]`;
//! - a run of 32 or more base64url characters (`A-Z a-z 0-9 - _`) becomes
//!   `[redacted]`: a session id is 43 of them, every part of a token but
//!   the shortest header is longer, and a hex handle is 64 (of which the
//!   first 8, the log name of a session, are kept).
//!
//! And every line stays one line: pingora quotes the client's path and
//! `Host` in its lines, and what would end a line or steer a terminal
//! there (control characters, U+2028) is escaped, `\u{85}`.
//!
//! Only lines that pass the `RUST_LOG` filter are formatted, so at the
//! default level the request path pays nothing.
//!
//! It also moves pingora's ERROR line for a client that broke off before
//! its request head was complete, or whose TLS handshake failed, down to
//! DEBUG, on the proxy's listener and the admin one: any client can cause
//! as many as it likes, and ERROR is what operators are paged on. So is
//! its ERROR line for a race in its upstream connection pool that it
//! recovers from by itself.
//!
//! And it writes pingora's line for a failed accept() at most once a
//! second: out of the system's files (ENFILE) or memory, pingora retries
//! at once, and logged tens of thousands of ERROR lines a second.
//!
//! ```no_run
//! session_proxy::logging::init();
//! session_proxy::logging::protect(&["a secret key of 32 bytes or more..".to_string()]);
//! ```

use std::borrow::Cow;
use std::sync::{LazyLock, RwLock};
use std::time::Duration;

use log::{Level, Log, Metadata, Record};

use crate::throttle::Throttle;

/// A run of base64url characters this long is a credential as far as logs go.
const MIN_OPAQUE_RUN: usize = 32;
/// Characters of a handle kept in a log line.
const HANDLE_PREFIX: usize = 8;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Installs the redacting logger; a second call does nothing.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max_level = inner.filter();
    if log::set_boxed_logger(Box::new(Redacting { inner })).is_ok() {
        log::set_max_level(max_level);
    }
}

/// Adds strings (the secret keys) that no log line may contain.
pub fn protect(secrets: &[String]) {
    if let Ok(mut known) = SECRETS.write() {
        for secret in secrets {
            if !secret.is_empty() && !known.contains(secret) {
                known.push(secret.clone());
            }
        }
    }
}

struct Redacting {
    inner: env_logger::Logger,
}

impl Log for Redacting {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.matches(record) {
            return;
        }
        let line = record.args().to_string();
        if is_accept_failure(record, &line) && !ACCEPT_FAILURES.due() {
            return;
        }
        let level = match belongs_at_debug(record, &line) {
            true => Level::Debug,
            false => record.level(),
        };
        let metadata = Metadata::builder()
            .level(level)
            .target(record.target())
            .build();
        if level != record.level() && !self.inner.enabled(&metadata) {
            return;
        }
        match one_line(redact(&line)) {
            Cow::Borrowed(_) if level == record.level() => self.inner.log(record),
            clean => self.inner.log(
                &Record::builder()
                    .args(format_args!("{clean}"))
                    .metadata(metadata)
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// pingora's ERROR line for a request that failed on the client's side
/// (the error's source is `Downstream`). Above all a head that never came
/// whole (the client closed, broke the connection or outlasted
/// `header_timeout`): pingora logs it before any hook of ours runs, where
/// `suppress_error_log` keeps quiet about a client gone later or a head
/// refused. The client's
/// doing, so DEBUG (nginx logs such at info). The proxy's own answers
/// (502, 503, 504) carry another source and keep their ERROR lines, but
/// for a refused session update: the app's bug, a WARN with the handle. The
/// admin listener's are pingora's HTTP app's, which names no source: all
/// its failures to read a head or write an answer are the client's. So
/// is a TLS handshake that failed or outlasted pingora's 60 s: plain HTTP
/// sent to an HTTPS port, a scanner, a client that distrusts the
/// certificate (nginx logs those at info too). pingora's WARN line for a
/// TLS client that went without reading the `close_notify` goes to DEBUG
/// too. And one that is no failure at all: pingora's pool found an idle
/// upstream connection still held by the task that watches it, gave it
/// up and connects anew (seen once in a while on a quiet proxy); the
/// request is served. Nor is a process started with `run --upgrade`
/// waiting for the listeners, which it logs each second until the old
/// process sends them; we log the wait once, at INFO.
fn belongs_at_debug(record: &Record, line: &str) -> bool {
    let target = record.target();
    if record.level() == Level::Warn {
        // A TLS client that left without taking the close_notify; one whose
        // ClientHello named the server by IP address (wrk, some health
        // checkers and Java clients do it on every connection) or carried
        // a malformed name: rustls parses SNI only on the server side; an
        // h2 client whose malformed requests used up its connection.
        return (target.starts_with("pingora_core::protocols::tls")
            && line.starts_with("TLS shutdown failed"))
            || (target.starts_with("rustls::msgs::handshake") && line.starts_with("Illegal SNI "))
            || (target.starts_with("pingora_core::protocols::http::v2::server")
                && line.starts_with("tearing down downstream h2 connection"));
    }
    if record.level() != Level::Error {
        return false;
    }
    if target.starts_with("pingora_proxy") {
        return line.starts_with("Fail to proxy: Downstream ");
    }
    if target.starts_with("pingora_core::services::listening") {
        return line.starts_with("Downstream handshake ");
    }
    if target.starts_with("pingora_core::connectors") {
        return line == "failed to acquire reusable stream";
    }
    if target.starts_with("pingora_core::server::transfer_fd") {
        return line.starts_with("No incoming socket transfer");
    }
    // A client that chose h2 in ALPN and then sent no valid preface.
    if target == "pingora_core::apps" {
        return line.starts_with("H2 handshake error");
    }
    target.starts_with("pingora_core::apps::http_app")
        && (line.starts_with("HTTP server fails to read from downstream")
            || line.starts_with("HTTP server fails to write to downstream"))
}

/// pingora's line for an accept() that failed. It waits a second before
/// the next one only after EMFILE (the process's limit): after ENFILE,
/// ENOBUFS or ENOMEM it tries again at once, failing as fast as it can.
/// That spin is pingora's to end; the log can at least stay readable.
fn is_accept_failure(record: &Record, line: &str) -> bool {
    record.level() == Level::Error
        && record.target() == "pingora_core::services::listening"
        && line.starts_with("Accept() failed")
}

static ACCEPT_FAILURES: LazyLock<Throttle> =
    LazyLock::new(|| Throttle::new(Duration::from_secs(1)));

/// `line` with secrets and long opaque runs taken out (see the module docs).
pub fn redact(line: &str) -> Cow<'_, str> {
    let mut line = Cow::Borrowed(line);
    if let Ok(secrets) = SECRETS.read() {
        for secret in secrets.iter() {
            if line.contains(secret.as_str()) {
                line = Cow::Owned(line.replace(secret.as_str(), "[secret]"));
            }
        }
    }
    match redact_runs(&line) {
        Some(clean) => Cow::Owned(clean),
        None => line,
    }
}

/// `line` with every character that could end it, steer a terminal or
/// reorder its text escaped as `\u{85}`: control characters (C0, DEL and
/// C1: U+0085 is a line break to Unicode-aware readers, U+009B a CSI to
/// terminals), the line and paragraph separators, and the bidirectional
/// overrides. pingora's lines quote the client's path and `Host` as
/// UTF-8, in which all of these can be sent; a line of ours must stay one
/// line, read as written.
pub fn one_line(line: Cow<'_, str>) -> Cow<'_, str> {
    if !line.chars().any(breaks_a_line) {
        return line;
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        match breaks_a_line(c) {
            true => out.extend(c.escape_unicode()),
            false => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn breaks_a_line(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `None` when no run is long enough to redact.
fn redact_runs(line: &str) -> Option<String> {
    let bytes = line.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut start = 0;
    while start < bytes.len() {
        if !is_base64url(bytes[start]) {
            start += 1;
            continue;
        }
        let end = bytes[start..]
            .iter()
            .position(|&b| !is_base64url(b))
            .map_or(bytes.len(), |len| start + len);
        if end - start >= MIN_OPAQUE_RUN {
            // Runs are ASCII, so both ends are char boundaries.
            let out = out.get_or_insert_with(|| String::with_capacity(line.len()));
            out.push_str(&line[copied..start]);
            let run = &line[start..end];
            if is_handle(run) {
                out.push_str(&run[..HANDLE_PREFIX]);
                out.push('…');
            } else {
                out.push_str("[redacted]");
            }
            copied = end;
        }
        start = end;
    }
    let mut out = out?;
    out.push_str(&line[copied..]);
    Some(out)
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_handle(run: &str) -> bool {
    run.len() == 64 && run.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_keeps_nothing_of_its_id() {
        let id = "j98nwedOTkXfRQZYB4zFs5FijmzbWAN7YJjVgUR-lhE";
        let line =
            format!(r#"headers: {{"cookie": "session_id={id}.Sza_-9Dhg7npr8Me14twjA; a=1"}}"#);
        let clean = redact(&line);
        assert!(!clean.contains(id));
        assert_eq!(
            clean,
            r#"headers: {"cookie": "session_id=[redacted].Sza_-9Dhg7npr8Me14twjA; a=1"}"#
        );
    }

    #[test]
    fn a_token_loses_its_payload_and_signature() {
        let line = "x-session: eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzaWQiOiI2YWFlMDZlMDdhZjljMzI2NTVkYjFj.c2lnbmF0dXJlLW9mLXRoZS10b2tlbi0xMjM0NTY3ODk";
        assert_eq!(redact(line), "x-session: [redacted].[redacted].[redacted]");
    }

    #[test]
    fn a_handle_is_cut_to_its_prefix() {
        let handle = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(redact(&format!("session {handle}")), "session ba7816bf…");
    }

    #[test]
    fn registered_secrets_are_hidden_whatever_they_contain() {
        protect(&["a secret with spaces & symbols!".to_string()]);
        assert_eq!(
            redact("key=a secret with spaces & symbols!;"),
            "key=[secret];"
        );
    }

    #[test]
    fn a_line_stays_one_line_whatever_it_quotes() {
        let quoted = "GET /a\r\nb\u{85}c\u{9b}31md\u{1b}[2Je\u{2028}f\u{202e}g\u{7f}, Host: h\tx";
        assert_eq!(
            one_line(Cow::Borrowed(quoted)),
            "GET /a\\u{d}\\u{a}b\\u{85}c\\u{9b}31md\\u{1b}[2Je\\u{2028}f\\u{202e}g\\u{7f}, Host: h\\u{9}x"
        );
        let line = "Fail to proxy: Upstream ConnectRefused, GET /caf\u{e9}/\u{1F600}, Host: x";
        assert!(matches!(one_line(Cow::Borrowed(line)), Cow::Borrowed(_)));
    }

    #[test]
    fn ordinary_lines_are_left_alone() {
        let line = "session 6aae06e0: regenerated as 029cf0a2 (GET /x, Host: 127.0.0.1:18080) ü";
        assert!(matches!(redact(line), Cow::Borrowed(_)));
    }

    #[test]
    fn client_failures_and_the_pools_race_are_told_apart_from_the_proxys_failures() {
        let record = |level: Level, target: &str, line: &str| {
            belongs_at_debug(
                &Record::builder()
                    .level(level)
                    .target(target)
                    .args(format_args!("{line}"))
                    .build(),
                line,
            )
        };
        let tls = "pingora_core::protocols::tls::rustls::server";
        assert!(record(Level::Warn, tls, "TLS shutdown failed, Broken pipe"));
        let hello = "rustls::msgs::handshake";
        assert!(record(
            Level::Warn,
            hello,
            "Illegal SNI extension: ignoring IP address presented as hostname (3132372e302e302e31)"
        ));
        assert!(record(
            Level::Warn,
            hello,
            "Illegal SNI hostname received \"a b\""
        ));
        assert!(!record(
            Level::Warn,
            hello,
            "meaningless CertificateRequest message"
        ));
        assert!(!record(
            Level::Warn,
            "session_proxy::proxy",
            "TLS shutdown failed"
        ));
        let listening = "pingora_core::services::listening";
        assert!(record(
            Level::Error,
            listening,
            "Downstream handshake error from 127.0.0.1:1: x"
        ));
        assert!(!record(
            Level::Error,
            "pingora_proxy::proxy_h1",
            "Fail to proxy: Upstream ConnectRefused"
        ));
        assert!(record(
            Level::Error,
            "pingora_proxy::proxy_h1",
            "Fail to proxy: Downstream ReadError"
        ));
        assert!(record(
            Level::Error,
            "pingora_core::connectors",
            "failed to acquire reusable stream"
        ));
        assert!(!record(
            Level::Error,
            "pingora_core::connectors::l4",
            "connect to 127.0.0.1:1 failed"
        ));
        let transfer = "pingora_core::server::transfer_fd";
        assert!(record(
            Level::Error,
            transfer,
            "No incoming socket transfer, sleep 1s and try again"
        ));
        assert!(!record(
            Level::Error,
            transfer,
            "Giving up reading socket from: /run/x.sock, error: EAGAIN"
        ));
        assert!(record(
            Level::Error,
            "pingora_core::apps",
            "H2 handshake error HandshakeError context: while h2 handshaking with client"
        ));
        assert!(record(
            Level::Warn,
            "pingora_core::protocols::http::v2::server",
            "tearing down downstream h2 connection after 32 malformed requests"
        ));
    }
}
