//! Applying the upstream's merge patch: parse, merge, size check.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Map, Value};
use session_proxy::session::data::SessionData;
use session_proxy::session::patch::{self, Instructions};

fn object(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn merge_patch(c: &mut Criterion) {
    let stored = object(json!({
        "count": 41,
        "last": "0123456789abcdef0123456789abcdef",
        "user": {"id": 4711, "roles": ["admin", "editor"]}
    }));
    let update = br#"{"count":1,"last":"fedcba9876543210fedcba9876543210"}"#;
    let nested = object(json!({"user": {"roles": null, "theme": "dark"}, "flash": null}));

    c.bench_function("patch/parse_update_header", |b| {
        b.iter(|| Instructions::parse(&[black_box(&update[..])], &[], 4096))
    });
    let flat = object(serde_json::from_slice(update).unwrap_or(Value::Null));
    // The stored data is JSON text: a patch parses it, merges, encodes the
    // result and checks its size.
    let stored = SessionData::from_map(&stored);
    c.bench_function("patch/apply", |b| {
        b.iter(|| patch::apply(&stored, black_box(&flat), 4096))
    });
    c.bench_function("patch/apply_nested", |b| {
        b.iter(|| patch::apply(&stored, black_box(&nested), 4096))
    });
    // A session holding more (a user, a cart, a CSRF token: ~250 bytes),
    // of which a request changes one key: the merge copies the rest as text.
    let larger = SessionData::from_map(&object(json!({
        "cart": [{"sku": "A-1001", "n": 2}, {"sku": "B-2002", "n": 1}, {"sku": "C-3003", "n": 5}],
        "csrf": "0123456789abcdef0123456789abcdef0123456789abcdef",
        "flash": null,
        "user": {"id": 4711, "name": "Zoé Martin", "roles": ["admin", "editor"]},
        "visits": 41
    })));
    let one_key = object(json!({"visits": 42}));
    c.bench_function("patch/apply_one_key_of_larger_data", |b| {
        b.iter(|| patch::apply(&larger, black_box(&one_key), 4096))
    });
    // The clone `Store::modify`'s decision makes of the current record's data.
    c.bench_function("patch/clone_data", |b| {
        b.iter(|| black_box(&stored).clone())
    });
}

criterion_group!(benches, merge_patch);
criterion_main!(benches);
