//! The behaviours every [`Store`] must have: one test module per store.
//!
//! A test file includes this file and instantiates the macro once per
//! store, with an expression that builds a fresh store, the only
//! store-specific part (names in it resolve in the including module). It
//! may yield `Arc<dyn Store>` or, for a store behind a service that may be
//! absent, `Option<Arc<dyn Store>>`, `None` skipping the case:
//!
//! ```ignore
//! #[path = "support/store_cases.rs"]
//! #[macro_use]
//! mod store_cases;
//!
//! store_cases!(memory, async { Arc::new(MemoryStore::new(1000)) as Arc<dyn Store> });
//! ```
//!
//! The store may be shared with other tests and earlier runs (postgres,
//! redis): every case works on fresh random handles, never assumes an empty
//! store and checks only the handles it created. A store whose
//! `delete_expired` is not meant to delete anything (Redis expires its own
//! keys) skips that one case with
//! `store_cases!(redis, factory, sweeps = false)`.
//!
//! [`Store`]: session_proxy::store::Store

macro_rules! store_cases {
    ($name:ident, $factory:expr) => {
        store_cases!($name, $factory, sweeps = true);
    };
    ($name:ident, $factory:expr, sweeps = $sweeps:literal) => {
        mod $name {
            // The factory's names come from the including module.
            #[allow(unused_imports)]
            use super::*;

            use ::serde_json::{json, Value};
            use ::session_proxy::store::{Change, Expiry, Handle, Record, Store, StoreError};
            use ::std::sync::{Arc, Mutex};

            /// `None`: the store's service is absent and the case is
            /// skipped (the factory has already said so, loudly).
            async fn store() -> Option<Arc<dyn Store>> {
                $factory.await.into()
            }

            fn fresh_handle() -> Handle {
                Handle::of_id(&format!("store-case-{:032x}", ::rand::random::<u128>()))
            }

            fn now() -> u64 {
                ::session_proxy::session::now()
            }

            /// Adds 1 to the data's `n` and bumps the version.
            fn increment(current: Option<&Record>) -> Result<Change, String> {
                let mut record = current.cloned().ok_or("gone")?;
                let mut data = record.data.to_map().map_err(|e| e.to_string())?;
                let n = data["n"].as_u64().ok_or("not a number")?;
                data.insert("n".to_owned(), json!(n + 1));
                record.data = data.into();
                record.ver += 1;
                Ok(Change::Put(record))
            }

            fn record(data: Value, created: u64, atime: u64) -> Record {
                let Value::Object(data) = data else {
                    panic!("session data is an object");
                };
                Record {
                    data: data.into(),
                    created,
                    atime,
                    ip: "2001:db8::7".into(),
                    ver: 1,
                }
            }

            fn fresh_record() -> Record {
                record(
                    json!({"user": "ann", "cart": [1, 2], "prefs": {"lang": "fr"}}),
                    now() - 30,
                    now() - 10,
                )
            }

            async fn put(store: &Arc<dyn Store>, handle: &Handle, record: &Record) {
                let decide = |_: Option<&Record>| Ok(Change::Put(record.clone()));
                let stored = store.modify(handle, &decide).await.unwrap();
                assert_eq!(stored.as_ref(), Some(record));
            }

            #[tokio::test]
            async fn load_of_a_missing_handle_is_none() {
                let Some(store) = store().await else { return };
                assert_eq!(store.load(&fresh_handle()).await.unwrap(), None);
            }

            #[tokio::test]
            async fn a_stored_record_loads_back_equal() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let record = fresh_record();
                put(&store, &handle, &record).await;
                assert_eq!(store.load(&handle).await.unwrap(), Some(record));
            }

            #[tokio::test]
            async fn modify_is_given_the_latest_record() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let first = fresh_record();
                put(&store, &handle, &first).await;
                let second = Record {
                    ver: 2,
                    ..record(json!({"user": "bob"}), first.created, now())
                };
                put(&store, &handle, &second).await;

                let seen = Mutex::new(None);
                let decide = |current: Option<&Record>| {
                    *seen.lock().unwrap() = Some(current.cloned());
                    Ok(Change::Keep)
                };
                store.modify(&handle, &decide).await.unwrap();
                assert_eq!(seen.into_inner().unwrap(), Some(Some(second)));
            }

            #[tokio::test]
            async fn modify_delete_removes_the_record() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                put(&store, &handle, &fresh_record()).await;
                let delete = |_: Option<&Record>| Ok(Change::Delete);
                assert_eq!(store.modify(&handle, &delete).await.unwrap(), None);
                assert_eq!(store.load(&handle).await.unwrap(), None);
                // And of a missing record: nothing to do, no error.
                assert_eq!(store.modify(&handle, &delete).await.unwrap(), None);
            }

            #[tokio::test]
            async fn modify_keep_writes_nothing() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let record = fresh_record();
                put(&store, &handle, &record).await;
                let keep = |_: Option<&Record>| Ok(Change::Keep);
                assert_eq!(
                    store.modify(&handle, &keep).await.unwrap(),
                    Some(record.clone())
                );
                assert_eq!(store.load(&handle).await.unwrap(), Some(record));

                let missing = fresh_handle();
                assert_eq!(store.modify(&missing, &keep).await.unwrap(), None);
                assert_eq!(store.load(&missing).await.unwrap(), None);
            }

            #[tokio::test]
            async fn a_refused_change_is_rejected_and_writes_nothing() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let record = fresh_record();
                put(&store, &handle, &record).await;
                let refuse = |_: Option<&Record>| Err("too large".to_owned());
                let result = store.modify(&handle, &refuse).await;
                assert!(
                    matches!(&result, Err(StoreError::Rejected(why)) if why == "too large"),
                    "{result:?}"
                );
                assert_eq!(store.load(&handle).await.unwrap(), Some(record));

                let missing = fresh_handle();
                assert!(store.modify(&missing, &refuse).await.is_err());
                assert_eq!(store.load(&missing).await.unwrap(), None);
            }

            #[tokio::test]
            async fn touch_changes_only_the_access_time() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let record = fresh_record();
                put(&store, &handle, &record).await;
                assert!(store.touch(&handle, record.atime + 5).await.unwrap());
                let expected = Record {
                    atime: record.atime + 5,
                    ..record
                };
                assert_eq!(store.load(&handle).await.unwrap(), Some(expected));
            }

            #[tokio::test]
            async fn touch_never_moves_the_access_time_backwards() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let record = fresh_record();
                put(&store, &handle, &record).await;
                assert!(store.touch(&handle, record.atime - 5).await.unwrap());
                assert_eq!(store.load(&handle).await.unwrap(), Some(record));
            }

            #[tokio::test]
            async fn touch_of_a_missing_handle_stores_nothing_and_says_so() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                assert!(!store.touch(&handle, now()).await.unwrap());
                assert_eq!(store.load(&handle).await.unwrap(), None);
            }

            #[tokio::test]
            async fn delete_tells_whether_the_record_was_stored() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                put(&store, &handle, &fresh_record()).await;
                assert!(store.delete(&handle).await.unwrap());
                assert_eq!(store.load(&handle).await.unwrap(), None);
                assert!(!store.delete(&handle).await.unwrap());
            }

            #[tokio::test]
            async fn delete_expired_removes_idle_and_absolute_expired_records() {
                if !$sweeps {
                    return;
                }
                let Some(store) = store().await else { return };
                // Times ten years back: records of other tests (and their
                // `now`) are all later, so this sweep cannot touch them.
                let base = now() - 10 * 365 * 86_400;
                let expiry = Expiry {
                    timeout: 1_000,
                    absolute: Some(3_000),
                };
                let idle = (fresh_handle(), record(json!({}), base - 2_000, base - 2_000));
                let absolute = (fresh_handle(), record(json!({}), base - 5_000, base));
                let live = (fresh_handle(), record(json!({}), base - 100, base - 10));
                // The edges, a second apart: a record lives through the
                // whole second `atime + timeout` (`created + absolute`), as
                // the request path judges it (SPEC [4.3]); the sweep must
                // not delete a session a request would still accept.
                let idle_edge = (fresh_handle(), record(json!({}), base - 1_000, base - 1_000));
                let idle_past = (fresh_handle(), record(json!({}), base - 1_001, base - 1_001));
                let absolute_edge = (fresh_handle(), record(json!({}), base - 3_000, base));
                let absolute_past = (fresh_handle(), record(json!({}), base - 3_001, base));
                let all = [
                    &idle,
                    &absolute,
                    &live,
                    &idle_edge,
                    &idle_past,
                    &absolute_edge,
                    &absolute_past,
                ];
                for (handle, record) in all {
                    put(&store, handle, record).await;
                }

                let removed = store.delete_expired(base, expiry).await.unwrap();
                // At least ours: an interrupted earlier run may have left
                // some of its own behind in a shared store.
                assert!(removed >= 4, "removed {removed}");
                for gone in [&idle, &absolute, &idle_past, &absolute_past] {
                    assert_eq!(store.load(&gone.0).await.unwrap(), None);
                }
                for kept in [&live, &idle_edge, &absolute_edge] {
                    assert_eq!(store.load(&kept.0).await.unwrap(), Some(kept.1.clone()));
                }
                assert_eq!(store.delete_expired(base, expiry).await.unwrap(), 0);
                for kept in [&live, &idle_edge, &absolute_edge] {
                    store.delete(&kept.0).await.unwrap();
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_increments_of_one_record_lose_none() {
                const WRITERS: u64 = 50;
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                put(&store, &handle, &record(json!({"n": 0}), now(), now())).await;

                let writers: Vec<_> = (0..WRITERS)
                    .map(|_| {
                        let (store, handle) = (Arc::clone(&store), handle.clone());
                        tokio::spawn(async move {
                            store.modify(&handle, &increment).await
                        })
                    })
                    .collect();
                for writer in writers {
                    writer.await.unwrap().unwrap();
                }

                let stored = store.load(&handle).await.unwrap().unwrap();
                assert_eq!(stored.data.to_map().unwrap()["n"], json!(WRITERS));
                assert_eq!(stored.ver, 1 + WRITERS);
            }

            /// The proxy's pattern: load at the request, `modify_seen` at
            /// its response, many requests of one session at once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_loads_and_writes_on_what_was_seen_lose_no_increment() {
                const WRITERS: u64 = 50;
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                put(&store, &handle, &record(json!({"n": 0}), now(), now())).await;
                let before = store.load(&handle).await.unwrap().unwrap().ver;

                let writers: Vec<_> = (0..WRITERS)
                    .map(|_| {
                        let (store, handle) = (Arc::clone(&store), handle.clone());
                        tokio::spawn(async move {
                            let seen = store.load(&handle).await?.ok_or(StoreError::Unavailable("gone".into()))?;
                            tokio::task::yield_now().await;
                            store.modify_seen(&handle, &seen, &increment).await
                        })
                    })
                    .collect();
                for writer in writers {
                    writer.await.unwrap().unwrap();
                }

                let stored = store.load(&handle).await.unwrap().unwrap();
                assert_eq!(stored.data.to_map().unwrap()["n"], json!(WRITERS));
                assert_eq!(stored.ver, before + WRITERS);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_changes_of_different_keys_all_survive() {
                const WRITERS: usize = 20;
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let created = now();

                let writers: Vec<_> = (0..WRITERS)
                    .map(|writer| {
                        let (store, handle) = (Arc::clone(&store), handle.clone());
                        tokio::spawn(async move {
                            let set_own_key = |current: Option<&Record>| {
                                let mut stored = current
                                    .cloned()
                                    .unwrap_or_else(|| record(json!({}), created, created));
                                let mut data = stored.data.to_map().map_err(|e| e.to_string())?;
                                data.insert(format!("k{writer}"), json!(writer));
                                stored.data = data.into();
                                Ok(Change::Put(stored))
                            };
                            store.modify(&handle, &set_own_key).await
                        })
                    })
                    .collect();
                for writer in writers {
                    writer.await.unwrap().unwrap();
                }

                let stored = store.load(&handle).await.unwrap().unwrap();
                let data = stored.data.to_map().unwrap();
                for writer in 0..WRITERS {
                    assert_eq!(data[&format!("k{writer}")], json!(writer));
                }
            }

            #[tokio::test]
            async fn list_shows_stored_records_and_not_deleted_ones() {
                let Some(store) = store().await else { return };
                let kept = [fresh_handle(), fresh_handle()];
                let deleted = fresh_handle();
                let record = fresh_record();
                for handle in kept.iter().chain([&deleted]) {
                    put(&store, handle, &record).await;
                }
                store.delete(&deleted).await.unwrap();

                let listed = store.list().await.unwrap();
                for handle in &kept {
                    assert!(
                        listed.contains(&(handle.clone(), record.clone())),
                        "{} not listed",
                        handle.short()
                    );
                }
                assert!(listed.iter().all(|(handle, _)| *handle != deleted));
            }

            #[tokio::test]
            async fn modify_seen_writes_when_the_record_is_unchanged() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let seen = fresh_record();
                put(&store, &handle, &seen).await;
                let next = Record {
                    ver: seen.ver + 1,
                    atime: now(),
                    ..seen.clone()
                };
                let decide = |current: Option<&Record>| {
                    assert_eq!(current, Some(&seen));
                    Ok(Change::Put(next.clone()))
                };
                let stored = store.modify_seen(&handle, &seen, &decide).await.unwrap();
                assert_eq!(stored.as_ref(), Some(&next));
                assert_eq!(store.load(&handle).await.unwrap(), Some(next));
            }

            #[tokio::test]
            async fn modify_seen_decides_again_on_a_record_changed_since() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let seen = fresh_record();
                put(&store, &handle, &seen).await;
                // Another writer got there first: version 2.
                let latest = Record {
                    ver: seen.ver + 1,
                    created: seen.created + 1,
                    ..seen.clone()
                };
                put(&store, &handle, &latest).await;
                let bump = |current: Option<&Record>| match current {
                    Some(current) => Ok(Change::Put(Record {
                        ver: current.ver + 1,
                        ..current.clone()
                    })),
                    None => Ok(Change::Keep),
                };
                let stored = store.modify_seen(&handle, &seen, &bump).await.unwrap();
                let expected = Record {
                    ver: latest.ver + 1,
                    ..latest.clone()
                };
                assert_eq!(stored.as_ref(), Some(&expected));
                assert_eq!(store.load(&handle).await.unwrap(), Some(expected));
            }

            #[tokio::test]
            async fn modify_seen_of_a_record_deleted_since_is_given_none() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let seen = fresh_record();
                put(&store, &handle, &seen).await;
                assert!(store.delete(&handle).await.unwrap());
                let bump = |current: Option<&Record>| match current {
                    Some(current) => Ok(Change::Put(Record {
                        ver: current.ver + 1,
                        ..current.clone()
                    })),
                    None => Ok(Change::Keep),
                };
                assert_eq!(store.modify_seen(&handle, &seen, &bump).await.unwrap(), None);
                assert_eq!(store.load(&handle).await.unwrap(), None);
            }

            /// A change decided with a `now` read a second before the
            /// stored record's (another thread's or proxy's request):
            /// the session's access time stays the later one.
            #[tokio::test]
            async fn a_write_never_moves_the_access_time_backwards() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let stored = fresh_record();
                put(&store, &handle, &stored).await;
                let earlier = |current: Option<&Record>| {
                    let current = current.ok_or("gone")?;
                    Ok(Change::Put(Record {
                        data: json!({"user": "bob"}).as_object().cloned().ok_or("object")?.into(),
                        atime: stored.atime - 1,
                        ver: current.ver + 1,
                        ..current.clone()
                    }))
                };
                let expected = Record {
                    data: json!({"user": "bob"}).as_object().cloned().unwrap().into(),
                    ver: stored.ver + 1,
                    ..stored.clone()
                };
                let written = store.modify(&handle, &earlier).await.unwrap();
                assert_eq!(written.as_ref(), Some(&expected));
                assert_eq!(store.load(&handle).await.unwrap(), Some(expected.clone()));

                // And on the version the caller loaded (the proxy's write).
                let written = store.modify_seen(&handle, &expected, &earlier).await.unwrap();
                let expected = Record {
                    ver: expected.ver + 1,
                    ..expected
                };
                assert_eq!(written.as_ref(), Some(&expected));
                assert_eq!(store.load(&handle).await.unwrap(), Some(expected));
            }

            /// A touch between a request's load and its write leaves the
            /// version as it was: the write on that version keeps the
            /// touch's later access time.
            #[tokio::test]
            async fn a_write_on_what_was_seen_keeps_a_later_touch() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                put(&store, &handle, &fresh_record()).await;
                let seen = store.load(&handle).await.unwrap().unwrap();
                let touched = seen.atime + 5;
                assert!(store.touch(&handle, touched).await.unwrap());
                let bump = |current: Option<&Record>| {
                    let current = current.ok_or("gone")?;
                    Ok(Change::Put(Record {
                        atime: seen.atime + 4,
                        ver: current.ver + 1,
                        ..current.clone()
                    }))
                };
                let written = store.modify_seen(&handle, &seen, &bump).await.unwrap();
                let expected = Record {
                    atime: touched,
                    ver: seen.ver + 1,
                    ..seen.clone()
                };
                assert_eq!(written.as_ref(), Some(&expected));
                assert_eq!(store.load(&handle).await.unwrap(), Some(expected));
            }

            /// A record at the last version (another program's): the
            /// next version, 1, is written over it, and a write on what
            /// was seen at the last version still sees that change.
            #[tokio::test]
            async fn a_change_after_the_last_version_is_seen_by_a_write_on_it() {
                let Some(store) = store().await else { return };
                let handle = fresh_handle();
                let last = Record {
                    data: record(json!({"n": 0}), 0, 0).data,
                    ver: u64::MAX,
                    ..fresh_record()
                };
                put(&store, &handle, &last).await;
                let seen = store.load(&handle).await.unwrap().unwrap();
                let next = |current: Option<&Record>| {
                    let current = current.ok_or("gone")?;
                    let mut data = current.data.to_map().map_err(|e| e.to_string())?;
                    let n = data["n"].as_u64().ok_or("not a number")?;
                    data.insert("n".to_owned(), json!(n + 1));
                    Ok(Change::Put(Record {
                        data: data.into(),
                        ver: current.next_ver(),
                        ..current.clone()
                    }))
                };
                let first = store.modify_seen(&handle, &seen, &next).await.unwrap().unwrap();
                assert_eq!(first.ver, 1);
                let second = store.modify_seen(&handle, &seen, &next).await.unwrap().unwrap();
                assert_eq!(
                    (second.ver, second.data.to_map().unwrap()["n"].clone()),
                    (2, json!(2))
                );
                assert_eq!(store.load(&handle).await.unwrap(), Some(second));
            }

            #[tokio::test]
            async fn ping_succeeds() {
                let Some(store) = store().await else { return };
                store.ping().await.unwrap();
            }
        }
    };
}
