//! The embedded stores' load and modify, as the request path calls them.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;
use session_proxy::store::disk::DiskStore;
use session_proxy::store::memory::MemoryStore;
use session_proxy::store::{Change, Handle, Record, Store};

fn record() -> Record {
    Record {
        data: json!({"count": 1, "last": "0123456789abcdef0123456789abcdef"})
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into(),
        created: 1_700_000_000,
        atime: 1_700_000_000,
        ip: "127.0.0.1".into(),
        ver: 1,
    }
}

/// Loads and modifies one of `sessions` stored records.
fn bench_store(c: &mut Criterion, name: &str, store: &dyn Store, sessions: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let handles: Vec<Handle> = (0..sessions)
        .map(|n| Handle::of_id(&format!("bench-{n}")))
        .collect();
    let put = |_: Option<&Record>| Ok::<_, String>(Change::Put(record()));
    runtime.block_on(async {
        for handle in &handles {
            store.modify(handle, &put).await.unwrap_or_default();
        }
    });
    // The write path's decision: clone, bump, store.
    let bump = |current: Option<&Record>| {
        Ok::<_, String>(match current {
            Some(current) => {
                let mut next = current.clone();
                next.ver += 1;
                Change::Put(next)
            }
            None => Change::Keep,
        })
    };
    let mut next = 0;
    let mut pick = || {
        next = (next + 7919) % handles.len();
        &handles[next]
    };
    c.bench_function(&format!("{name}/load"), |b| {
        b.to_async(&runtime).iter(|| store.load(black_box(pick())))
    });
    let mut next = 0;
    let mut pick = || {
        next = (next + 7919) % handles.len();
        &handles[next]
    };
    c.bench_function(&format!("{name}/modify"), |b| {
        b.to_async(&runtime)
            .iter(|| store.modify(black_box(pick()), &bump))
    });
}

fn stores(c: &mut Criterion) {
    bench_store(c, "memory_1e3", &MemoryStore::new(1_000_000), 1_000);
    bench_store(c, "memory_1e5", &MemoryStore::new(1_000_000), 100_000);
    let dir = std::env::temp_dir().join(format!("session-proxy-bench-{}", std::process::id()));
    match DiskStore::open(&dir, false) {
        Ok(disk) => bench_store(c, "disk", &disk, 1_000),
        Err(e) => eprintln!("disk store benches skipped: {e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, stores);
criterion_main!(benches);
