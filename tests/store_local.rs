//! The store suite run against the embedded stores, then what is
//! particular to each.

#[path = "support/store_cases.rs"]
#[macro_use]
mod store_cases;

use std::sync::Arc;

use serde_json::json;
use session_proxy::store::memory::MemoryStore;
use session_proxy::store::{Change, Handle, Record, Store};

store_cases!(memory, async {
    Arc::new(MemoryStore::new(1000)) as Arc<dyn Store>
});
fn handle(name: &str) -> Handle {
    Handle::of_id(&format!("store-local-{name}"))
}

fn record_at(atime: u64) -> Record {
    let serde_json::Value::Object(data) = json!({"user": "ann", "n": 1}) else {
        unreachable!()
    };
    Record {
        data,
        created: atime,
        atime,
        ip: "192.0.2.1".to_owned(),
        ver: 1,
    }
}

async fn put(store: &dyn Store, handle: &Handle, record: Record) {
    let decide = move |_: Option<&Record>| Ok(Change::Put(record.clone()));
    store.modify(handle, &decide).await.unwrap();
}

mod memory_store {
    use super::*;

    #[tokio::test]
    async fn never_holds_more_than_max_entries() {
        let store = MemoryStore::new(10);
        for n in 0..100 {
            put(&store, &handle(&n.to_string()), record_at(1_000 + n)).await;
            assert!(store.len() <= 10);
        }
        assert_eq!(store.evictions(), 90);
        // Each insert evicted the least recently accessed: the last ten.
        for n in 90..100 {
            assert!(store.load(&handle(&n.to_string())).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn evicts_untouched_sessions_before_touched_ones() {
        let store = MemoryStore::new(10);
        let old: Vec<Handle> = (0..10).map(|n| handle(&format!("old{n}"))).collect();
        for handle in &old {
            put(&store, handle, record_at(1_000)).await;
        }
        for handle in &old[..5] {
            store.touch(handle, 1_050).await.unwrap();
        }
        for n in 0..5 {
            put(&store, &handle(&format!("new{n}")), record_at(1_100)).await;
        }
        for handle in &old[..5] {
            assert!(
                store.load(handle).await.unwrap().is_some(),
                "touched evicted"
            );
        }
        for handle in &old[5..] {
            assert!(
                store.load(handle).await.unwrap().is_none(),
                "untouched kept"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_inserts_stay_within_the_bound() {
        let store = Arc::new(MemoryStore::new(10));
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for n in 0..200 {
                        let handle = handle(&format!("w{writer}-{n}"));
                        put(store.as_ref(), &handle, record_at(n)).await;
                        assert!(store.len() <= 10);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        assert_eq!(store.list().await.unwrap().len(), 10);
        assert_eq!(store.len(), 10);
        assert_eq!(store.evictions(), 800 - 10);
    }
}
