//! Request-header stripping: `SessionHeaders::strip_from` on any set of
//! headers a client can send, built into a pingora `RequestHeader`.
//!
//! Input: lines separated by 0xFF, each `name:value` (lines whose name or
//! value HTTP refuses are skipped). The first byte picks which of a few
//! configurations of `[headers]` names is used.
//!
//! Checked: nothing panics; no header left matches one of ours, in any
//! case and with any character but a letter or digit read as `-`, nor is
//! another such spelling of the forwarding or framing headers, nor
//! `Proxy`; every other header is left, with all its values, in order;
//! stripping twice changes nothing.
#![no_main]

use http::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use session_proxy::proxy::headers::{values, SessionHeaders};

const NAMINGS: [[&str; 3]; 3] = [
    ["x-session", "x-session-update", "x-session-action"],
    ["session", "session-update", "session-action"],
    ["x_app_session", "x-app-update", "a"],
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let naming = NAMINGS[usize::from(selector) % NAMINGS.len()];
    let ours = SessionHeaders {
        session: HeaderName::from_static(naming[0]),
        update: HeaderName::from_static(naming[1]),
        action: HeaderName::from_static(naming[2]),
    };

    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    for line in rest.split(|&b| b == 0xff) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(_), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            // Through pingora, keeping the spelling the client used.
            request
                .append_header(String::from_utf8(name.to_vec()).unwrap(), value)
                .unwrap();
        }
    }
    let before: Vec<(HeaderName, Vec<Vec<u8>>)> = names(&request)
        .into_iter()
        .map(|name| {
            let all = values(&request.headers, &name)
                .iter()
                .map(|v| v.to_vec())
                .collect();
            (name, all)
        })
        .collect();

    ours.strip_from(&mut request);

    // A CGI/WSGI server reads `_` and `-` alike, lighttpd every character
    // but a letter or digit, on either side.
    let canonical = |name: &str| {
        name.to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    };
    // Also the other spellings of the forwarding and framing headers,
    // which the proxy alone may send.
    let guarded = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "content-length",
        "transfer-encoding",
    ];
    let reserved = |name: &HeaderName| {
        naming
            .iter()
            .any(|ours| canonical(ours) == canonical(name.as_str()))
            || (!guarded.contains(&name.as_str())
                && guarded
                    .iter()
                    .any(|guarded| *guarded == canonical(name.as_str())))
            // httpoxy: `Proxy` goes whatever else is sent.
            || name.as_str() == "proxy"
    };
    for name in names(&request) {
        assert!(!reserved(&name), "{name} was left");
    }
    for (name, all) in &before {
        let left: Vec<Vec<u8>> = values(&request.headers, name)
            .iter()
            .map(|v| v.to_vec())
            .collect();
        if reserved(name) {
            assert!(left.is_empty(), "{name} was left");
        } else {
            assert_eq!(&left, all, "{name} changed");
        }
    }
    let count = request.headers.len();
    ours.strip_from(&mut request);
    assert_eq!(
        request.headers.len(),
        count,
        "stripping twice changed something"
    );
});

fn names(request: &RequestHeader) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = Vec::new();
    for name in request.headers.keys() {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}
