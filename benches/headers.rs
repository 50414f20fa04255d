//! Request header surgery done on every request, bypassed or not.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use http::HeaderName;
use pingora::http::RequestHeader;
use session_proxy::proxy::headers::{remove_cookie, take_cookie, SessionHeaders};

const VALUE: &str = "S0JdVx2qf0m3yH7nV9k0bJk3Xq8rT1a2Zc4Vb6Nm8Lp.Zk8uQ3n5Rx7Tv9Wb1Yc3Ad";

/// A browser-like request, as wrk sends it in the harness.
fn request(cookie: &str) -> RequestHeader {
    let mut request =
        RequestHeader::build("GET", b"/read/x", None).unwrap_or_else(|_| unreachable!());
    for (name, value) in [
        ("Host", "127.0.0.1:18282"),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "Accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("Accept-Language", "en-US,en;q=0.5"),
        ("Accept-Encoding", "gzip, deflate"),
        ("Cookie", cookie),
    ] {
        let _ = request.append_header(name, value);
    }
    request
}

fn headers(c: &mut Criterion) {
    let names = SessionHeaders {
        session: HeaderName::from_static("x-session"),
        update: HeaderName::from_static("x-session-update"),
        action: HeaderName::from_static("x-session-action"),
    };
    let with_session = format!("theme=dark; session_id={VALUE}; lang=en");

    // The value is offered to a check that accepts it, as a verified cookie is.
    let accept = |value: &[u8]| Some(black_box(value).len());
    c.bench_function("headers/take_cookie", |b| {
        b.iter_batched_ref(
            || request(&with_session),
            |request| take_cookie(request, black_box("session_id"), accept),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/take_cookie_absent", |b| {
        b.iter_batched_ref(
            || request("theme=dark; lang=en"),
            |request| take_cookie(request, black_box("session_id"), accept),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/remove_cookie", |b| {
        b.iter_batched_ref(
            || request(&with_session),
            |request| remove_cookie(request, black_box("session_id")),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/strip_from_clean", |b| {
        b.iter_batched_ref(
            || request(&with_session),
            |request| names.strip_from(black_box(request)),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/strip_from_spoofed", |b| {
        b.iter_batched_ref(
            || {
                let mut request = request(&with_session);
                let _ = request.append_header("X-Session", "forged");
                let _ = request.append_header("X_Session_Update", "{}");
                request
            },
            |request| names.strip_from(black_box(request)),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, headers);
criterion_main!(benches);
