//! How much memory the `memory` store takes per session, measured as the
//! process's RSS growth (BENCHMARKS.md, scale: < 512 MB at 10^6 sessions).
//! A test binary of its own, with the proxy's allocator, so nothing else
//! runs in the process while it measures:
//!
//! ```sh
//! cargo test --test memory_footprint -- --ignored --nocapture
//! ```

use serde_json::{Map, Value};
use session_proxy::store::memory::MemoryStore;
use session_proxy::store::{Change, Handle, Record, Store};

// As in src/main.rs: the binary's allocator decides the per-session cost.
#[global_allocator]
static GLOBAL: session_proxy::allocator::MiMalloc = session_proxy::allocator::MiMalloc;

const SESSIONS: usize = 1_000_000;

/// The resident set of this process, in bytes.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// A record like the ones the benchmark's write path stores.
fn bench_record(n: usize) -> Record {
    let data: Map<String, Value> =
        serde_json::from_str(&format!(r#"{{"count":1,"last":"{n:032x}"}}"#)).expect("JSON");
    Record {
        data: data.into(),
        created: 1_700_000_000,
        atime: 1_700_000_000,
        ip: "127.0.0.1".into(),
        ver: 1,
    }
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement, not a check"]
async fn rss_per_session_at_a_million_sessions() {
    let store = MemoryStore::new(SESSIONS);
    let before = rss_bytes();
    for n in 0..SESSIONS {
        let handle = Handle::of_id(&format!("footprint-{n}"));
        let record = bench_record(n);
        let put = move |_: Option<&Record>| Ok(Change::Put(record.clone()));
        store.modify(&handle, &put).await.expect("stored");
    }
    let after = rss_bytes();
    assert_eq!(store.len(), SESSIONS);
    let growth = after.saturating_sub(before);
    println!(
        "{SESSIONS} sessions: RSS {} MB -> {} MB, {} bytes per session",
        before >> 20,
        after >> 20,
        growth / SESSIONS
    );
}
