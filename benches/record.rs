//! A stored record as JSON: what the disk (and shared) stores encode on
//! every write and decode on every load.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;
use session_proxy::store::Record;

fn record(c: &mut Criterion) {
    let record = Record {
        data: json!({"count": 1, "last": "0123456789abcdef0123456789abcdef"})
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into(),
        created: 1_700_000_000,
        atime: 1_700_000_100,
        ip: "127.0.0.1".into(),
        ver: 42,
    };
    let encoded = serde_json::to_vec(&record).unwrap_or_default();

    c.bench_function("record/encode", |b| {
        b.iter(|| serde_json::to_vec(black_box(&record)))
    });
    c.bench_function("record/decode", |b| {
        b.iter(|| serde_json::from_slice::<Record>(black_box(&encoded)))
    });
    // The memory store hands out a clone on every load (it shares the
    // data and the IP).
    c.bench_function("record/clone", |b| b.iter(|| black_box(&record).clone()));
}

criterion_group!(benches, record);
criterion_main!(benches);
