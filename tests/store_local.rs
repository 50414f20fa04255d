//! The store suite run against the embedded stores, then what is
//! particular to each: the memory store's bound, the disk store's files.

#[path = "support/store_cases.rs"]
#[macro_use]
mod store_cases;
#[path = "support/small_fs.rs"]
mod small_fs;

use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::json;
use session_proxy::config::StoreKind;
use session_proxy::store::disk::DiskStore;
use session_proxy::store::memory::MemoryStore;
use session_proxy::store::{Change, Decide, Expiry, Handle, Record, Store, StoreError};
use small_fs::SmallFileSystem;

store_cases!(memory, async {
    Arc::new(MemoryStore::new(1000)) as Arc<dyn Store>
});
store_cases!(disk, async {
    Arc::new(TempDiskStore::new(false)) as Arc<dyn Store>
});
store_cases!(disk_fsync, async {
    Arc::new(TempDiskStore::new(true)) as Arc<dyn Store>
});

/// A fresh directory in the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "session-proxy-store-test-{:032x}",
            rand::random::<u128>()
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The names in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A disk store in its own temp dir, removed with the store, so the suite
/// can build one per test from a plain expression.
struct TempDiskStore {
    store: DiskStore,
    _dir: TempDir,
}

impl TempDiskStore {
    fn new(fsync: bool) -> TempDiskStore {
        let dir = TempDir::new();
        TempDiskStore {
            store: DiskStore::open(&dir.0, fsync).unwrap(),
            _dir: dir,
        }
    }
}

#[async_trait]
impl Store for TempDiskStore {
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
        self.store.load(handle).await
    }
    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        self.store.modify(handle, decide).await
    }
    async fn modify_seen(
        &self,
        handle: &Handle,
        seen: &Record,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        self.store.modify_seen(handle, seen, decide).await
    }
    async fn touch(&self, handle: &Handle, atime: u64) -> Result<bool, StoreError> {
        self.store.touch(handle, atime).await
    }
    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
        self.store.delete(handle).await
    }
    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
        self.store.list().await
    }
    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
        self.store.delete_expired(now, expiry).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }
}

fn handle(name: &str) -> Handle {
    Handle::of_id(&format!("store-local-{name}"))
}

fn record_at(atime: u64) -> Record {
    let serde_json::Value::Object(data) = json!({"user": "ann", "n": 1}) else {
        unreachable!()
    };
    Record {
        data: data.into(),
        created: atime,
        atime,
        ip: "192.0.2.1".into(),
        ver: 1,
    }
}

async fn put(store: &dyn Store, handle: &Handle, record: Record) {
    let decide = move |_: Option<&Record>| Ok(Change::Put(record.clone()));
    store.modify(handle, &decide).await.unwrap();
}

fn set_age(path: &std::path::Path, age: Duration) {
    let file = fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
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

mod disk_store {
    use super::*;

    #[tokio::test]
    async fn a_record_is_a_handle_json_file_holding_exactly_the_record() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        let handle = handle("file");
        put(&store, &handle, record_at(1_700_000_000)).await;

        assert_eq!(dir.names(), [format!("{handle}.json")]);
        let text = fs::read(dir.0.join(format!("{handle}.json"))).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            stored,
            json!({
                "data": {"user": "ann", "n": 1},
                "created": 1_700_000_000,
                "atime": 1_700_000_000,
                "ip": "192.0.2.1",
                "ver": 1
            })
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn record_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        let handle = handle("mode");
        put(&store, &handle, record_at(1)).await;
        let meta = fs::metadata(dir.0.join(format!("{handle}.json"))).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_corrupt_record_is_an_error_not_a_panic() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        let (corrupt, sound) = (handle("corrupt"), handle("sound"));
        fs::write(dir.0.join(format!("{corrupt}.json")), b"{\"data\": {\"a\"").unwrap();
        put(&store, &sound, record_at(1)).await;

        let loaded = store.load(&corrupt).await;
        assert!(
            matches!(loaded, Err(StoreError::Corrupt { .. })),
            "{loaded:?}"
        );
        let keep = |_: Option<&Record>| Ok(Change::Keep);
        let modified = store.modify(&corrupt, &keep).await;
        assert!(
            matches!(modified, Err(StoreError::Corrupt { .. })),
            "{modified:?}"
        );
        // The others are still listed; the corrupt one can be killed.
        let listed = store.list().await.unwrap();
        assert_eq!(listed, [(sound, record_at(1))]);
        assert!(store.delete(&corrupt).await.unwrap());
    }

    /// Names the store never writes under a record's name: read in bounds
    /// and without blocking, each is a corrupt record, and the sweep goes
    /// past them (a FIFO blocked it for good; a huge file or a link to
    /// `/dev/zero` was read whole).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fifo_a_link_or_a_huge_file_under_a_records_name_is_corrupt() {
        let dir = TempDir::new();
        let store = Arc::new(DiskStore::open(&dir.0, false).unwrap());
        let (fifo, link, huge) = (handle("fifo"), handle("link"), handle("huge"));
        let path = |handle: &Handle| dir.0.join(format!("{handle}.json"));
        let fifo_path = std::ffi::CString::new(path(&fifo).into_os_string().into_vec()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo_path.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", path(&link)).unwrap();
        // Sparse: a gigabyte that takes no room.
        fs::File::create(path(&huge))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();

        for handle in [fifo, link, huge] {
            // Without fsync the load runs on the calling thread: time it
            // from another one.
            let (store, (sender, receiver)) = (store.clone(), std::sync::mpsc::channel());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let _ = sender.send(runtime.block_on(store.load(&handle)));
            });
            let loaded = receiver.recv_timeout(Duration::from_secs(10));
            assert!(
                matches!(loaded, Ok(Err(StoreError::Corrupt { .. }))),
                "{loaded:?}"
            );
        }
        let expiry = Expiry {
            timeout: 60,
            absolute: None,
        };
        let swept = tokio::time::timeout(
            Duration::from_secs(10),
            store.delete_expired(session_proxy::session::now(), expiry),
        )
        .await;
        // The link goes (its target's time is old), the others stay: new.
        assert!(matches!(swept, Ok(Ok(1))), "{swept:?}");
        assert!(Path::new("/dev/zero").exists());
    }

    /// With fsync a write runs on tokio's blocking pool. A request dropped
    /// meanwhile (its client or its upstream gone) released the stripe
    /// while its write went on, and the next write of the session, run at
    /// the same time on the same spare, could end with the version before
    /// both on disk after it returned Ok.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_dropped_on_the_blocking_pool_does_not_undo_the_next_one() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, true).unwrap();
        let handle = handle("dropped");
        put(&store, &handle, record_at(1)).await;
        let next = |n: u64| {
            move |current: Option<&Record>| {
                let mut record = record_at(n);
                record.ver = current.map_or(1, |current| current.ver + 1);
                Ok(Change::Put(record))
            }
        };
        for round in 0..200u64 {
            // Dropped anywhere from before its read to after its write.
            let dropped_after = Duration::from_micros(round * 37 % 4000);
            let _ =
                tokio::time::timeout(dropped_after, store.modify(&handle, &next(2 * round))).await;
            let written = store.modify(&handle, &next(2 * round + 1)).await.unwrap();
            let on_disk = DiskStore::open(&dir.0, false).unwrap().load(&handle).await;
            assert_eq!(on_disk.unwrap(), written, "round {round}");
        }
    }

    /// A full disk still lets a probe make an empty file, but not a new
    /// session: the health check must say so.
    #[tokio::test]
    async fn a_full_disk_fails_the_health_check() {
        let dir = TempDir::new();
        let Some(small) = SmallFileSystem::mount(&dir.0, "64k") else {
            return;
        };
        let store = DiskStore::open(small.path(), false).unwrap();
        store.ping().await.unwrap();
        small.fill("filler");
        let checked = store.ping().await;
        assert!(
            matches!(&checked, Err(StoreError::Unavailable(message)) if message.contains("No space left")),
            "{checked:?}"
        );
    }

    /// One spare per stored session (the version before last, which the
    /// next write overwrites), none for a deleted one, nothing else.
    #[tokio::test]
    async fn writes_leave_only_the_spare_of_a_stored_session() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, true).unwrap();
        let (kept, deleted) = (handle("kept"), handle("deleted"));
        for n in 0..5 {
            put(&store, &kept, record_at(n)).await;
            put(&store, &deleted, record_at(n)).await;
        }
        store.touch(&kept, 10).await.unwrap();
        store.delete(&deleted).await.unwrap();
        store.ping().await.unwrap();
        assert_eq!(
            dir.names(),
            [format!(".{kept}.tmp"), format!("{kept}.json")]
        );
    }

    #[tokio::test]
    async fn records_survive_reopening_the_store() {
        let dir = TempDir::new();
        let handle = handle("reopen");
        {
            let store = DiskStore::open(&dir.0, true).unwrap();
            put(&store, &handle, record_at(7)).await;
        }
        let store = DiskStore::open(&dir.0, false).unwrap();
        assert_eq!(store.load(&handle).await.unwrap(), Some(record_at(7)));
    }

    #[tokio::test]
    async fn the_sweep_removes_stale_temporary_files_and_ignores_other_files() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        let stale = format!(".{}.00000000000000aa.tmp", handle("stale"));
        let fresh = format!(".{}.00000000000000bb.tmp", handle("fresh"));
        for name in [
            &stale,
            &fresh,
            &"notes.txt".to_owned(),
            &"README.json".to_owned(),
        ] {
            fs::write(dir.0.join(name), b"partial").unwrap();
        }
        set_age(&dir.0.join(&stale), Duration::from_secs(120));

        let expiry = Expiry {
            timeout: 60,
            absolute: None,
        };
        assert_eq!(store.delete_expired(u64::MAX, expiry).await.unwrap(), 0);
        assert_eq!(
            dir.names(),
            [fresh, "README.json".to_owned(), "notes.txt".to_owned()]
        );
        assert!(store.list().await.unwrap().is_empty());
    }

    /// An expired session leaves nothing behind: its spare (an older
    /// version of the same data) goes with the record, even when it was
    /// written recently enough to escape the stale-file rule.
    #[tokio::test]
    async fn the_sweep_removes_an_expired_session_with_its_spare() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        let (idle, active) = (handle("idle"), handle("active"));
        for n in 0..3 {
            put(&store, &idle, record_at(100 + n)).await;
            put(&store, &active, record_at(10_000 + n)).await;
        }
        assert_eq!(dir.names().len(), 4, "{:?}", dir.names());
        let expiry = Expiry {
            timeout: 60,
            absolute: None,
        };
        assert_eq!(store.delete_expired(1_000, expiry).await.unwrap(), 1);
        assert_eq!(
            dir.names(),
            [format!(".{active}.tmp"), format!("{active}.json")]
        );
    }

    #[tokio::test]
    async fn the_sweep_removes_corrupt_records_unwritten_for_the_idle_timeout() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        let (old, recent) = (handle("old-corrupt"), handle("recent-corrupt"));
        for handle in [&old, &recent] {
            fs::write(dir.0.join(format!("{handle}.json")), b"not json").unwrap();
        }
        set_age(
            &dir.0.join(format!("{old}.json")),
            Duration::from_secs(7_200),
        );

        let expiry = Expiry {
            timeout: 3_600,
            absolute: None,
        };
        let now = session_proxy::session::now();
        assert_eq!(store.delete_expired(now, expiry).await.unwrap(), 1);
        assert_eq!(dir.names(), [format!("{recent}.json")]);
    }

    #[tokio::test]
    async fn opening_creates_missing_directories() {
        let dir = TempDir::new();
        let nested = dir.0.join("a").join("b");
        let store = DiskStore::open(&nested, false).unwrap();
        assert!(nested.is_dir());
        store.ping().await.unwrap();
        // Their listing names the sessions: for the proxy's user alone.
        use std::os::unix::fs::PermissionsExt;
        for created in [dir.0.join("a"), nested] {
            let mode = fs::metadata(&created).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", created.display());
        }
    }

    #[tokio::test]
    async fn opening_a_file_as_the_directory_fails_clearly() {
        let dir = TempDir::new();
        let file = dir.0.join("sessions");
        fs::write(&file, b"").unwrap();
        let Err(StoreError::Unavailable(message)) = DiskStore::open(&file, false) else {
            panic!("opened a file as the session directory");
        };
        assert!(message.contains(&file.display().to_string()), "{message}");
    }

    #[tokio::test]
    async fn ping_fails_once_the_directory_is_gone() {
        let dir = TempDir::new();
        let store = DiskStore::open(&dir.0, false).unwrap();
        fs::remove_dir_all(&dir.0).unwrap();
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
    }
}

mod open {
    use super::*;

    fn config(kind: StoreKind, path: PathBuf) -> session_proxy::config::Config {
        let kind = format!("{kind:?}").to_ascii_lowercase();
        let text = format!(
            "[upstream]\naddresses = [\"127.0.0.1:9\"]\n[store]\nkind = {kind:?}\npath = {:?}\nmax_entries = 10\n",
            path.display().to_string()
        );
        let key = "k".repeat(32);
        session_proxy::config::parse(&text, std::path::Path::new("test.toml"), Some(&key)).unwrap()
    }

    #[tokio::test]
    async fn opens_the_embedded_stores() {
        let dir = TempDir::new();
        for kind in [StoreKind::Memory, StoreKind::Disk] {
            let store = session_proxy::store::open(&config(kind, dir.0.join("s")))
                .await
                .unwrap();
            store.ping().await.unwrap();
        }
        assert!(dir.0.join("s").is_dir());
    }

    #[tokio::test]
    async fn a_disk_store_that_cannot_be_created_is_unavailable() {
        let dir = TempDir::new();
        fs::write(dir.0.join("file"), b"").unwrap();
        let path = dir.0.join("file").join("sessions");
        let opened = session_proxy::store::open(&config(StoreKind::Disk, path)).await;
        assert!(matches!(opened, Err(StoreError::Unavailable(_))));
    }
}
