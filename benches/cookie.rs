//! The cookie on the request path: verifying `ID.TAG` and deriving the
//! store handle from the id (SPEC [3]), and the memo of the values verified
//! last, which the request path asks instead.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use session_proxy::proxy::cookie_memo::CookieMemo;
use session_proxy::session::cookie::{CookieSigner, Handle, SessionId};

const KEY: &str = "bench-key-bench-key-bench-key-bench-key-0001";
const OLD_KEY: &str = "bench-key-bench-key-bench-key-bench-key-0000";

fn cookie(c: &mut Criterion) {
    let signer = CookieSigner::new(&[KEY.to_owned()]);
    let rotated = CookieSigner::new(&[OLD_KEY.to_owned(), KEY.to_owned()]);
    let id = SessionId::generate();
    let value = signer.sign(&id);
    let mut forged = value.clone().into_bytes();
    forged[50] ^= 1;

    c.bench_function("cookie/verify", |b| {
        b.iter(|| signer.verify(black_box(value.as_bytes())))
    });
    // The second key of two: what every cookie costs during a key rotation.
    c.bench_function("cookie/verify_second_key", |b| {
        b.iter(|| rotated.verify(black_box(value.as_bytes())))
    });
    c.bench_function("cookie/verify_forged", |b| {
        b.iter(|| signer.verify(black_box(&forged)))
    });
    c.bench_function("cookie/sign", |b| b.iter(|| signer.sign(black_box(&id))));
    c.bench_function("handle/of_id", |b| {
        b.iter(|| Handle::of_id(black_box(id.as_str())))
    });
    c.bench_function("session_id/generate", |b| b.iter(SessionId::generate));

    // What a request with its session's cookie costs: verified, and its
    // handle derived, once; then found again.
    let memo = CookieMemo::new(signer.clone());
    c.bench_function("cookie_memo/verify_and_handle_first", |b| {
        b.iter(|| {
            signer.verify(black_box(value.as_bytes())).map(|id| {
                let handle = id.handle();
                (id, handle)
            })
        })
    });
    memo.verify(value.as_bytes());
    c.bench_function("cookie_memo/verify_kept", |b| {
        b.iter(|| memo.verify(black_box(value.as_bytes())))
    });
    c.bench_function("cookie_memo/verify_forged_of_a_kept_id", |b| {
        b.iter(|| memo.verify(black_box(&forged)))
    });
}

criterion_group!(benches, cookie);
criterion_main!(benches);
