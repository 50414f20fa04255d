//! End to end: many sessions, many threads, a fixed number of mixed
//! requests with `lock = true`. Increments (`/count`, a read-modify-write
//! in the app), key writes, reads, regenerates and kills run concurrently
//! on shared sessions (regenerate and kill alone on theirs, as a browser's
//! cookie jar would have it). Afterwards every live session's record equals
//! a sequential replay of the updates acknowledged to its clients, killed
//! and regenerated-away handles are gone, and every record file parses.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{json, Map, Value};
use session_proxy::session::patch::merge;
use support::*;

const SESSIONS: usize = 50;
const THREADS: usize = 8;
const REQUESTS: usize = 5000;

/// What the clients of one session were told.
#[derive(Default)]
struct Slot {
    /// The cookie; written only under the write lock (create, regenerate, kill).
    cookie: RwLock<Option<String>>,
    /// The counts `/count` answered in this session's life.
    counts: Mutex<Vec<u64>>,
    /// The keys acknowledged written.
    keys: Mutex<BTreeMap<String, u64>>,
    /// Handles this slot's sessions had before a regenerate or kill.
    gone: Mutex<Vec<String>>,
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    increments: AtomicU64,
    writes: AtomicU64,
    reads: AtomicU64,
    regenerates: AtomicU64,
    kills: AtomicU64,
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
}

fn cookie_header(cookie: &str) -> String {
    format!("session_id={cookie}")
}

/// One request on `slot`, of a kind chosen by `roll` (0..100).
fn one_request(port: u16, slot: &Slot, roll: u64, key: &str, seq: u64, tally: &Tally) {
    tally.requests.fetch_add(1, Ordering::SeqCst);
    let shared = slot.cookie.read().unwrap();
    let Some(cookie) = shared.clone() else {
        drop(shared);
        return create(port, slot, tally);
    };
    if roll >= 90 {
        drop(shared);
        return exclusive(port, slot, roll, tally);
    }
    let header = cookie_header(&cookie);
    if roll < 35 {
        let response = get(port, "/count", &[("Cookie", &header)]);
        check_answer(&response, "count", tally);
        if let Ok(n) = response.text().trim().parse::<u64>() {
            slot.counts.lock().unwrap().push(n);
        }
        tally.increments.fetch_add(1, Ordering::SeqCst);
    } else if roll < 65 {
        let update = json!({ key: seq }).to_string();
        let response = get(
            port,
            "/",
            &[("Cookie", &header), ("X-Test-Update", &update)],
        );
        check_answer(&response, "write", tally);
        if response.status == 200 {
            slot.keys.lock().unwrap().insert(key.to_string(), seq);
        }
        tally.writes.fetch_add(1, Ordering::SeqCst);
    } else {
        // What was acknowledged before the read was sent must be seen.
        let counted = slot.counts.lock().unwrap().len() as u64;
        let written: Vec<String> = slot.keys.lock().unwrap().keys().cloned().collect();
        let response = get(port, "/", &[("Cookie", &header)]);
        check_answer(&response, "read", tally);
        let data = &response.session()["data"];
        let seen = data["count"].as_u64().unwrap_or(0);
        if seen < counted {
            tally.violation(format!("read count {seen} after {counted} increments"));
        }
        for key in written {
            if data.get(&key).is_none() {
                tally.violation(format!("read misses acknowledged key {key}"));
            }
        }
        tally.reads.fetch_add(1, Ordering::SeqCst);
    }
}

/// A 200 for an existing session, which keeps its cookie.
fn check_answer(response: &Response, what: &str, tally: &Tally) {
    if response.status != 200 {
        tally.violation(format!("{what}: {} {}", response.status, response.text()));
    }
    if response.set_cookie("session_id").is_some() {
        tally.violation(format!("{what}: the session was replaced by a new one"));
    }
}

fn create(port: u16, slot: &Slot, tally: &Tally) {
    let mut cookie = slot.cookie.write().unwrap();
    if cookie.is_some() {
        return; // another thread created it meanwhile
    }
    let response = get(port, "/count", &[]);
    match (response.status, response.set_cookie("session_id")) {
        (200, Some(new)) if !new.is_empty() => {
            *cookie = Some(new);
            *slot.counts.lock().unwrap() = vec![1];
            slot.keys.lock().unwrap().clear();
        }
        (status, _) => tally.violation(format!("create: {status} {}", response.text())),
    }
    tally.increments.fetch_add(1, Ordering::SeqCst);
}

/// Regenerate or kill, with no other request of the session in flight.
fn exclusive(port: u16, slot: &Slot, roll: u64, tally: &Tally) {
    let mut guard = slot.cookie.write().unwrap();
    let Some(old) = guard.clone() else {
        return;
    };
    let action = if roll < 95 { "regenerate" } else { "kill" };
    let response = get(
        port,
        "/",
        &[("Cookie", &cookie_header(&old)), ("X-Test-Action", action)],
    );
    if response.status != 200 {
        tally.violation(format!("{action}: {} {}", response.status, response.text()));
        return;
    }
    slot.gone.lock().unwrap().push(handle_of(&old));
    match (action, response.set_cookie("session_id")) {
        ("regenerate", Some(new)) if !new.is_empty() && new != old => {
            *guard = Some(new);
            tally.regenerates.fetch_add(1, Ordering::SeqCst);
        }
        ("kill", Some(cleared)) if cleared.is_empty() => {
            *guard = None;
            slot.counts.lock().unwrap().clear();
            slot.keys.lock().unwrap().clear();
            tally.kills.fetch_add(1, Ordering::SeqCst);
        }
        (_, set) => tally.violation(format!("{action}: Set-Cookie {set:?}")),
    }
}

/// The data a sequential replay of a slot's acknowledged updates gives:
/// the counter's patches in the order the app counted, then the keys
/// (each written once, so their order does not matter).
fn replay(slot: &Slot) -> Map<String, Value> {
    let mut counts = slot.counts.lock().unwrap().clone();
    counts.sort_unstable();
    let mut data = Map::new();
    for n in counts {
        merge(&mut data, json!({"count": n}).as_object().unwrap());
    }
    for (key, seq) in slot.keys.lock().unwrap().iter() {
        merge(&mut data, json!({ key: seq }).as_object().unwrap());
    }
    data
}

#[test]
fn fifty_sessions_under_mixed_concurrent_load_lose_no_update() {
    let upstream = start_upstream();
    let config = ProxyConfig::new(upstream.port).session("lock = true");
    let proxy = config.start();
    let port = proxy.port;
    let slots: Arc<Vec<Slot>> = Arc::new((0..SESSIONS).map(|_| Slot::default()).collect());
    let tally = Arc::new(Tally::default());

    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (slots, tally) = (slots.clone(), tally.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((thread as u64 + 1) * 0x1234_5678));
                for seq in 0..(REQUESTS / THREADS) as u64 {
                    // A few hot sessions, so that requests meet on them.
                    let slot = if rng.next(2) == 0 {
                        rng.next(5)
                    } else {
                        rng.next(SESSIONS as u64)
                    };
                    let key = format!("k{thread}_{seq}");
                    one_request(
                        port,
                        &slots[slot as usize],
                        rng.next(100),
                        &key,
                        seq,
                        &tally,
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }

    let dir = config.sessions_dir();
    let records: BTreeMap<String, session_proxy::store::Record> = parsed_records(&dir)
        .into_iter()
        .map(|(path, record)| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, record)
        })
        .collect();
    let mut lost_writes = 0;
    let mut mismatches = Vec::new();
    let mut live = Vec::new();
    for (index, slot) in slots.iter().enumerate() {
        for handle in slot.gone.lock().unwrap().iter() {
            assert!(
                !records.contains_key(handle),
                "slot {index}: {handle} outlived its session"
            );
        }
        let Some(cookie) = slot.cookie.read().unwrap().clone() else {
            continue;
        };
        let handle = handle_of(&cookie);
        live.push(handle.clone());
        let expected = replay(slot);
        let Some(record) = records.get(&handle) else {
            panic!("slot {index}: live session {} missing", &handle[..8]);
        };
        let mut counts = slot.counts.lock().unwrap().clone();
        counts.sort_unstable();
        let distinct = {
            let mut d = counts.clone();
            d.dedup();
            d
        };
        assert_eq!(
            counts.len(),
            distinct.len(),
            "slot {index}: two increments read the same count (lock = true lost one)"
        );
        let data = record.data.to_map().unwrap();
        if data != expected {
            let stored_keys = data.len();
            lost_writes +=
                expected.len().saturating_sub(stored_keys)
                    + (expected.get("count").and_then(Value::as_u64).unwrap_or(0) as usize)
                        .saturating_sub(
                            data.get("count").and_then(Value::as_u64).unwrap_or(0) as usize
                        );
            mismatches.push(format!(
                "slot {index}: stored {data:?}\n   replay {expected:?}"
            ));
        }
    }
    let mut orphans: Vec<&String> = records.keys().filter(|h| !live.contains(h)).collect();
    orphans.sort();
    let violations = tally.violations.lock().unwrap().clone();
    eprintln!(
        "soak: {} requests ({} increments, {} writes, {} reads, {} regenerates, {} kills) \
         over {SESSIONS} session slots and {THREADS} threads; {} live sessions, \
         {} records, {lost_writes} lost writes, {} violations",
        tally.requests.load(Ordering::SeqCst),
        tally.increments.load(Ordering::SeqCst),
        tally.writes.load(Ordering::SeqCst),
        tally.reads.load(Ordering::SeqCst),
        tally.regenerates.load(Ordering::SeqCst),
        tally.kills.load(Ordering::SeqCst),
        live.len(),
        records.len(),
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert_eq!(lost_writes, 0);
    assert!(
        orphans.is_empty(),
        "records of no live session: {orphans:?}"
    );
    assert_eq!(tally.requests.load(Ordering::SeqCst), REQUESTS as u64);
    assert!(tally.kills.load(Ordering::SeqCst) > 0 && tally.regenerates.load(Ordering::SeqCst) > 0);
}
