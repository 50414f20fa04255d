//! The signed session token sent upstream on every session request.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use session_proxy::proxy::token_memo::TokenMemo;
use session_proxy::session::cookie::Handle;
use session_proxy::session::data::SessionData;
use session_proxy::session::token::TokenSigner;

const KEY: &str = "bench-key-bench-key-bench-key-bench-key-0001";

fn data(value: Value) -> SessionData {
    SessionData::from_map(&value.as_object().cloned().unwrap_or_default())
}

fn token(c: &mut Criterion) {
    let signer = TokenSigner::new(KEY, 60);
    let handle = Handle::of_id("bench");
    // What the wrk harness's upstream writes: {"count":1,"last":"<32 hex>"}.
    let small = data(json!({"count": 1, "last": "0123456789abcdef0123456789abcdef"}));
    let larger = data(json!({
        "user": {"id": 4711, "name": "Zoé Martin", "roles": ["admin", "editor"]},
        "cart": [{"sku": "A-1", "qty": 2}, {"sku": "B-22", "qty": 1}],
        "csrf": "k3Jd93nD0slA8fJ2mQx7Zt5Rv1Wc6Ye4",
        "flash": null,
        "count": 1234
    }));

    let empty = SessionData::default();
    c.bench_function("token/sign_empty", |b| {
        b.iter(|| signer.sign(black_box(&handle), true, 0, 1_700_000_000, &empty))
    });
    c.bench_function("token/sign_bench_data", |b| {
        b.iter(|| signer.sign(black_box(&handle), false, 7, 1_700_000_000, &small))
    });
    c.bench_function("token/sign_larger_data", |b| {
        b.iter(|| signer.sign(black_box(&handle), false, 7, 1_700_000_000, &larger))
    });

    // The request path: a header value, made or given back by the memo.
    let memo = TokenMemo::new(signer.clone());
    c.bench_function("token/memo_hit_bench_data", |b| {
        b.iter(|| memo.token(black_box(&handle), false, 7, 1_700_000_000, &small))
    });
    let mut now = 1_700_000_000;
    c.bench_function("token/memo_miss_bench_data", |b| {
        b.iter(|| {
            now += 1;
            memo.token(black_box(&handle), false, 7, now, &small)
        })
    });
}

criterion_group!(benches, token);
criterion_main!(benches);
