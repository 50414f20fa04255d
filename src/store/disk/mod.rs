//! The default store: one JSON file per session in a directory.
//!
//! A record lives in `DIR/HANDLE.json`, exactly the [`Record`] as JSON. A
//! write goes to the record's spare file in the same directory
//! (`.HANDLE.tmp`), which then takes the record's place atomically (swapped
//! with the old file, which becomes the next spare, or renamed when there
//! is none: see `files::write_record` and `files::put_in_place`), so a
//! crash never leaves a torn record; with `fsync` the file and then the
//! directory are synced before the write is reported done. The `files`
//! module does the file system's part; this one decides on which thread,
//! under which lock, and what a load may skip. Expiry reads `atime` and `created` from the record, never the
//! file's times. Other files in the directory are left alone.
//!
//! `modify` is atomic within one process (a lock per stripe of handles,
//! which loads take too: a write reuses the spare file in place, so a load
//! must not overlap the write after next). The directory belongs to one
//! proxy: other processes may delete records (`session-proxy sessions`),
//! never write them. Proxies that share sessions use postgres or redis.
//! `modify_seen` skips reading the record again when this process wrote
//! the version the caller loaded, and a load of a small record this
//! process wrote last only looks its file up: gone is no record, and only
//! a file rewritten since is read (see the `stripes` module).
//!
//! Without `fsync`, a request's file operations run on its own thread; with
//! `fsync`, and for the sweep and listings, on tokio's blocking pool (see
//! `DiskStore::on_request_path` for why). Measured by the `timing` test
//! (ext4 on a virtio disk, page cache warm, round 4's machine): a load
//! takes about 3 µs, a write 7 µs, and 0.16 ms with `fsync`.
//!
//! Without `fsync` the records survive a crash of the proxy, not
//! necessarily one of the machine: after a power loss a record written in
//! the last seconds may be lost, or come back empty, which reads as a
//! corrupt record: that session starts over. Set `fsync = true` where a
//! session must outlive that.
//!
//! ```no_run
//! use session_proxy::store::{disk::DiskStore, Store};
//! # async fn example() -> Result<(), session_proxy::store::StoreError> {
//! let store = DiskStore::open("sessions", false)?;
//! store.ping().await?;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{
    decide_on, max_record_bytes, Change, Decide, Expiry, Handle, Record, Store, StoreError,
};
use files::{
    create_dir, expired_candidates, probe_writable, read_record, record_files, record_path,
    remove_record, sweep_record, write_record, Place, Stamp,
};
use stripes::{Held, Stripes};

mod files;
mod stripes;

pub struct DiskStore {
    dir: PathBuf,
    fsync: bool,
    /// Locks held across a load and a read-decide-write, with a note of
    /// the version this process wrote last. With `fsync`, request-path
    /// file operations run on the blocking pool, in their stripe's file
    /// turn; without, on the calling thread (see
    /// [`DiskStore::on_request_path`]).
    stripes: Stripes,
    /// A record file larger than this is read as corrupt, never whole.
    max_record_bytes: usize,
}

impl DiskStore {
    /// Opens the store in `dir`, creating the directory (owner-only on
    /// Unix: records are session data) if it is missing.
    pub fn open(dir: impl AsRef<Path>, fsync: bool) -> Result<DiskStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        let not_a_directory = || {
            StoreError::Unavailable(format!(
                "the session store path {} is not a directory; \
                 set [store] path to a directory",
                dir.display()
            ))
        };
        create_dir(&dir).map_err(|error| match error.kind() {
            // A file of that name: "File exists" would not say the problem.
            io::ErrorKind::AlreadyExists => not_a_directory(),
            _ => StoreError::Unavailable(format!(
                "cannot create the session directory {}: {error}; \
                 create it or set [store] path to a writable directory",
                dir.display()
            )),
        })?;
        if !dir.is_dir() {
            return Err(not_a_directory());
        }
        Ok(DiskStore {
            dir,
            fsync,
            stripes: Stripes::new(fsync),
            // The floor, until `with_max_data_bytes` says more.
            max_record_bytes: max_record_bytes(0),
        })
    }

    /// Sizes the largest record file it reads for session data of at most
    /// `max_data_bytes`, with room to spare for records an earlier config
    /// allowed larger.
    pub fn with_max_data_bytes(mut self, max_data_bytes: usize) -> DiskStore {
        self.max_record_bytes = max_record_bytes(max_data_bytes);
        self
    }

    /// The directory the records are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file_of(&self, handle: &Handle) -> PathBuf {
        record_path(&self.dir, handle)
    }

    /// The handle's record, with its stripe `held`.
    async fn read(&self, held: &Held<'_>, handle: &Handle) -> Result<Option<Record>, StoreError> {
        let path = self.file_of(handle);
        if let Some((record, stamp)) = held.last_record() {
            // This process wrote it last: it is on disk as kept, unless
            // its file was deleted or rewritten since.
            let looked_up = path.clone();
            match self
                .on_request_path(held, move || Stamp::of_file(&looked_up))
                .await?
            {
                Ok(Some(now)) if now == stamp => return Ok(Some(record.clone())),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(None),
                Err(error) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot read session {} in {}: {error}",
                        handle.short(),
                        self.dir.display()
                    )))
                }
            }
        }
        let (short, limit) = (handle.short().to_owned(), self.max_record_bytes);
        self.on_request_path(held, move || read_record(&path, &short, limit))
            .await?
    }

    /// Writes `record` as `handle`'s. With [`Place::OverRecord`], only over
    /// a record still on disk: `Ok(false)` when it is gone.
    async fn write(
        &self,
        held: &mut Held<'_>,
        handle: &Handle,
        record: &Record,
        place: Place,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_vec(record).map_err(|error| {
            StoreError::Unavailable(format!("cannot encode session {}: {error}", handle.short()))
        })?;
        // Until this write is known to be in place, nothing is known.
        held.forget();
        let (dir, handle_owned, fsync) = (self.dir.clone(), handle.clone(), self.fsync);
        let stamp = self
            .on_request_path(held, move || {
                write_record(&dir, &handle_owned, &json, fsync, place).map_err(|error| {
                    StoreError::Unavailable(format!(
                        "cannot write session {} in {}: {error}",
                        handle_owned.short(),
                        dir.display()
                    ))
                })
            })
            .await??;
        if let Some(stamp) = stamp {
            held.wrote(record, stamp);
        }
        Ok(stamp.is_some())
    }

    /// Runs a file operation of a request: on the calling thread without
    /// `fsync`, on the blocking pool with it.
    ///
    /// Without `fsync`, reading or writing one small record in the page
    /// cache takes 5–15 µs of the calling thread; handing it to the pool
    /// costs more than that in thread wake-ups alone, and under load the
    /// wake-ups dominated the disk store's cost per request (BENCHMARKS.md).
    /// The price: while the disk stalls (the page cache misses on a slow
    /// device), so do the other connections of that thread, as with nginx's
    /// `aio off` default. With `fsync`, every write waits for the device,
    /// so it goes to the pool, in the stripe's file turn (`held`'s): should
    /// the caller be dropped while it runs there, the stripe's next file
    /// work waits for it to end.
    async fn on_request_path<T, F>(&self, held: &Held<'_>, work: F) -> Result<T, StoreError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match held.file_turn() {
            None => Ok(work()),
            Some(turn) => blocking(move || turn.run(work)).await,
        }
    }

    async fn remove(&self, held: &mut Held<'_>, handle: &Handle) -> Result<bool, StoreError> {
        held.forget();
        let (dir, path, fsync) = (self.dir.clone(), self.file_of(handle), self.fsync);
        let short = handle.short().to_owned();
        self.on_request_path(held, move || {
            remove_record(&dir, &path, fsync).map_err(|error| {
                StoreError::Unavailable(format!(
                    "cannot delete session {short} in {}: {error}",
                    dir.display()
                ))
            })
        })
        .await?
    }

    /// `modify` with the handle's stripe held.
    async fn modify_locked(
        &self,
        held: &mut Held<'_>,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        loop {
            let current = self.read(held, handle).await?;
            match decide_on(decide, current.as_ref())? {
                Change::Put(record) => {
                    // A change decided on a record goes only over that
                    // record: if another process deleted it since the
                    // read (`sessions kill`), decide again on nothing,
                    // which cannot fail this way a second time.
                    let place = match current {
                        Some(_) => Place::OverRecord,
                        None => Place::Anyway,
                    };
                    if self.write(held, handle, &record, place).await? {
                        return Ok(Some(record));
                    }
                }
                Change::Delete => {
                    if current.is_some() {
                        self.remove(held, handle).await?;
                    }
                    return Ok(None);
                }
                Change::Keep => return Ok(current),
            }
        }
    }
}

#[async_trait]
impl Store for DiskStore {
    async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
        // A rename replaces the record whole, but the file it replaced
        // becomes the spare that the next write overwrites: a load that
        // opened it before the swap could read half of that next version.
        let held = self.stripes.lock(handle).await;
        self.read(&held, handle).await
    }

    async fn modify(
        &self,
        handle: &Handle,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let mut held = self.stripes.lock(handle).await;
        self.modify_locked(&mut held, handle, decide).await
    }

    async fn modify_seen(
        &self,
        handle: &Handle,
        seen: &Record,
        decide: Decide<'_>,
    ) -> Result<Option<Record>, StoreError> {
        let mut held = self.stripes.lock(handle).await;
        // A touch since the load wrote `seen.ver` again with a later
        // atime, which the decision must see (as every write keeps it).
        if !held.wrote_last(seen.ver, seen.atime) {
            return self.modify_locked(&mut held, handle, decide).await;
        }
        // `seen` is on disk, unless another process deleted it since.
        match decide_on(decide, Some(seen))? {
            Change::Put(record) => {
                if self
                    .write(&mut held, handle, &record, Place::OverRecord)
                    .await?
                {
                    Ok(Some(record))
                } else {
                    // Deleted: decide again on what is there now.
                    self.modify_locked(&mut held, handle, decide).await
                }
            }
            Change::Delete => {
                self.remove(&mut held, handle).await?;
                Ok(None)
            }
            // Read it, to return what is stored.
            Change::Keep => self.modify_locked(&mut held, handle, decide).await,
        }
    }

    async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
        // Under the lock, so a change in flight cannot write back a
        // session that was just killed.
        let mut held = self.stripes.lock(handle).await;
        self.remove(&mut held, handle).await
    }

    async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
        let (dir, limit) = (self.dir.clone(), self.max_record_bytes);
        blocking(move || {
            let mut records = Vec::new();
            for (handle, path) in record_files(&dir)? {
                match read_record(&path, handle.short(), limit) {
                    Ok(Some(record)) => records.push((handle, record)),
                    // Deleted since the directory was read.
                    Ok(None) => {}
                    Err(error) => log::warn!("listing sessions: skipped {error}"),
                }
            }
            Ok(records)
        })
        .await?
    }

    async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
        let (dir, limit) = (self.dir.clone(), self.max_record_bytes);
        let candidates = blocking(move || expired_candidates(&dir, now, expiry, limit)).await??;
        let mut deleted = 0;
        for (handle, path) in candidates {
            // Re-read under the lock: a request may have refreshed the
            // session since the scan.
            let mut held = self.stripes.lock(&handle).await;
            held.forget();
            let (dir, fsync) = (self.dir.clone(), self.fsync);
            let short = handle.short().to_owned();
            let sweep = move || sweep_record(&dir, &path, &short, now, expiry, limit, fsync);
            let outcome = match held.file_turn() {
                None => blocking(sweep).await?,
                Some(turn) => blocking(move || turn.run(sweep)).await?,
            };
            match outcome {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                // One unreadable file does not stop the sweep.
                Err(error) => log::warn!("sweep: {error}"),
            }
        }
        Ok(deleted)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        blocking(move || {
            probe_writable(&dir).map_err(|error| {
                StoreError::Unavailable(format!(
                    "the session directory {} is not writable: {error}",
                    dir.display()
                ))
            })
        })
        .await?
    }
}

/// Runs blocking file I/O on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::Unavailable(format!("disk store task failed: {error}")))
}

#[cfg(test)]
mod tests {
    use super::files::{
        handle_of_file, is_temp_file, put_in_place, read_small_file, removal_order,
        remove_if_there, spare_of, Placed,
    };
    use super::stripes::KEPT_RECORD_MAX;
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::io::Read;
    use std::time::{Duration, Instant};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "session-proxy-disk-unit-{:016x}",
                rand::random::<u64>()
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn record(n: u64) -> Record {
        let mut data = serde_json::Map::new();
        data.insert("user".to_owned(), serde_json::json!("someone@example.org"));
        data.insert("n".to_owned(), serde_json::json!(n));
        Record {
            data: data.into(),
            created: crate::session::now(),
            atime: crate::session::now(),
            ip: "192.0.2.7".into(),
            ver: n,
        }
    }

    #[test]
    fn paths_are_the_directory_joined_with_the_name() {
        let handle = Handle::of_id("x");
        for dir in ["/var/lib/sessions", "/var/lib/sessions/", "sessions", ""] {
            let dir = Path::new(dir);
            assert_eq!(
                record_path(dir, &handle),
                dir.join(format!("{handle}.json"))
            );
            assert_eq!(spare_of(dir, &handle), dir.join(format!(".{handle}.tmp")));
        }
    }

    #[test]
    fn only_record_and_temp_names_are_ours() {
        let handle = Handle::of_id("x");
        assert_eq!(
            handle_of_file(&format!("{handle}.json")),
            Some(handle.clone())
        );
        assert_eq!(handle_of_file(&format!("{handle}.json.bak")), None);
        assert_eq!(handle_of_file("README.json"), None);
        assert!(is_temp_file(&format!(".{handle}.0123456789abcdef.tmp")));
        assert!(is_temp_file(
            &spare_of(Path::new(""), &handle).to_string_lossy()
        ));
        assert!(!is_temp_file("notes.tmp"));
    }

    /// `record` with `len` more bytes of data.
    fn padded(mut record: Record, len: usize) -> Record {
        let mut data = record.data.to_map().unwrap();
        data.insert("padding".to_owned(), "x".repeat(len).into());
        record.data = data.into();
        record
    }

    /// A write of `record`, as `modify` makes one.
    async fn put_record(store: &DiskStore, handle: &Handle, record: &Record) {
        let mut held = store.stripes.lock(handle).await;
        let placed = store.write(&mut held, handle, record, Place::Anyway).await;
        assert!(placed.unwrap());
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn rewrites_keep_one_spare_and_a_delete_removes_it_with_the_record() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-rewrite");
        for n in 1..=3 {
            put_record(&store, &handle, &record(n)).await;
            let stored = store.load(&handle).await.unwrap().unwrap();
            assert_eq!(stored.ver, n);
        }
        let spare = spare_of(&temp.0, &handle);
        assert_eq!(
            names_in(&temp.0),
            vec![format!(".{handle}.tmp"), format!("{handle}.json")]
        );
        // The version before last, never read as the record.
        let previous: Record = serde_json::from_slice(&fs::read(&spare).unwrap()).unwrap();
        assert_eq!(previous.ver, 2);

        // A longer record, then a shorter one: the spare is cut to size.
        let long = padded(record(4), 500);
        put_record(&store, &handle, &long).await;
        put_record(&store, &handle, &record(5)).await;
        assert_eq!(store.load(&handle).await.unwrap().unwrap().ver, 5);
        // Into the long version's file: nothing of it is left.
        put_record(&store, &handle, &record(6)).await;
        let on_disk = fs::read(temp.0.join(format!("{handle}.json"))).unwrap();
        assert_eq!(on_disk, serde_json::to_vec(&record(6)).unwrap());

        // Swept away between writes: the next write makes a new one.
        fs::remove_file(&spare).unwrap();
        put_record(&store, &handle, &record(7)).await;
        put_record(&store, &handle, &record(8)).await;
        assert_eq!(store.load(&handle).await.unwrap().unwrap().ver, 8);

        assert!(store.delete(&handle).await.unwrap());
        assert_eq!(names_in(&temp.0), Vec::<String>::new());
    }

    /// The record went, so the session is deleted: a spare that will not go
    /// is no failed delete (a kill or regenerate answered 503 after it).
    #[tokio::test]
    async fn a_delete_that_removed_the_record_succeeds_though_its_spare_stays() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-stuck-spare");
        put_record(&store, &handle, &record(1)).await;
        let spare = spare_of(&temp.0, &handle);
        let _ = fs::remove_file(&spare);
        fs::create_dir_all(spare.join("in-the-way")).unwrap();
        assert!(store.delete(&handle).await.unwrap());
        assert_eq!(store.load(&handle).await.unwrap(), None);
        assert_eq!(names_in(&temp.0), vec![format!(".{handle}.tmp")]);
    }

    /// A decision that bumps the version and counts, in the data, the
    /// versions it was made on.
    fn next(current: Option<&Record>) -> Result<Change, String> {
        let Some(current) = current else {
            return Ok(Change::Keep);
        };
        let mut data = current.data.to_map().unwrap();
        let seen = data.get("seen").and_then(|v| v.as_str()).unwrap_or("");
        let seen = format!("{seen}{},", current.ver);
        data.insert("seen".to_owned(), seen.into());
        Ok(Change::Put(Record {
            data: data.into(),
            ver: current.ver + 1,
            ..current.clone()
        }))
    }

    fn seen_versions(record: &Record) -> String {
        let data = record.data.to_map().unwrap();
        data["seen"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_write_on_the_version_this_process_wrote_last_does_not_read_it_again() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-seen");
        let put = |_: Option<&Record>| Ok(Change::Put(record(1)));
        store.modify(&handle, &put).await.unwrap();
        let loaded = store.load(&handle).await.unwrap().unwrap();

        // Edited behind the store's back (which only a deleting process
        // may do): the write goes by what was loaded, so it never read
        // the file again.
        let mut edited = loaded.clone();
        edited.ip = "198.51.100.1".into();
        fs::write(store.file_of(&handle), serde_json::to_vec(&edited).unwrap()).unwrap();
        let stored = store
            .modify_seen(&handle, &loaded, &next)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((stored.ver, &*stored.ip), (2, "192.0.2.7"));

        // A store that did not write it (a restarted proxy) reads it.
        fs::write(store.file_of(&handle), serde_json::to_vec(&edited).unwrap()).unwrap();
        let restarted = DiskStore::open(&temp.0, false).unwrap();
        let stored = restarted
            .modify_seen(&handle, &loaded, &next)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&*stored.ip, "198.51.100.1");
    }

    #[tokio::test]
    async fn a_write_on_an_older_version_than_this_process_wrote_reads_the_latest() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-older");
        let put = |_: Option<&Record>| Ok(Change::Put(record(1)));
        store.modify(&handle, &put).await.unwrap();
        // Two requests load version 1; the first writes version 2.
        let first = store.load(&handle).await.unwrap().unwrap();
        let second = store.load(&handle).await.unwrap().unwrap();
        store.modify_seen(&handle, &first, &next).await.unwrap();
        let stored = store
            .modify_seen(&handle, &second, &next)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.ver, 3);
        assert_eq!(seen_versions(&stored), "1,2,");
        assert_eq!(store.load(&handle).await.unwrap(), Some(stored));
    }

    #[tokio::test]
    async fn a_record_deleted_by_another_process_after_the_load_stays_deleted() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-killed");
        let put = |_: Option<&Record>| Ok(Change::Put(record(1)));
        store.modify(&handle, &put).await.unwrap();
        store.modify(&handle, &put).await.unwrap();
        let loaded = store.load(&handle).await.unwrap().unwrap();
        // `session-proxy sessions kill`, in its own process.
        let other = DiskStore::open(&temp.0, false).unwrap();
        assert!(other.delete(&handle).await.unwrap());

        // `next` keeps what is gone gone.
        let stored = store.modify_seen(&handle, &loaded, &next).await.unwrap();
        assert_eq!(stored, None);
        assert_eq!(names_in(&temp.0), Vec::<String>::new());
        assert_eq!(store.load(&handle).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_load_reads_a_small_record_this_process_wrote_last_only_if_its_file_changed() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-kept");
        let path = store.file_of(&handle);
        for written in [record(1), padded(record(2), KEPT_RECORD_MAX)] {
            put_record(&store, &handle, &written).await;
            // Rewritten in place to the same length, with the file's time
            // set back: only a record too large to keep is read again.
            let mut edited = written.clone();
            edited.ip = "192.0.2.8".into();
            let modified = fs::metadata(&path).unwrap().modified().unwrap();
            fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_modified(modified).unwrap();
            let kept = written.data.encoded_len() <= KEPT_RECORD_MAX;
            let expected = if kept { &written } else { &edited };
            assert_eq!(store.load(&handle).await.unwrap().as_ref(), Some(expected));
            // A rewrite that shows is read, kept or not.
            file.set_modified(modified + Duration::from_millis(1))
                .unwrap();
            assert_eq!(store.load(&handle).await.unwrap(), Some(edited));
        }
    }

    #[tokio::test]
    async fn a_load_of_a_record_another_process_deleted_after_this_one_wrote_it_finds_none() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-kept-killed");
        put_record(&store, &handle, &record(1)).await;
        assert_eq!(store.load(&handle).await.unwrap(), Some(record(1)));
        // `session-proxy sessions kill`, in its own process.
        let other = DiskStore::open(&temp.0, false).unwrap();
        assert!(other.delete(&handle).await.unwrap());
        assert_eq!(store.load(&handle).await.unwrap(), None);
        let put = |current: Option<&Record>| {
            assert_eq!(current, None, "decided on the deleted record");
            Ok(Change::Keep)
        };
        assert_eq!(store.modify(&handle, &put).await.unwrap(), None);
    }

    /// `session-proxy sessions kill` of `handle`, in another process,
    /// stopped after its first `steps` file removals.
    fn kill_in_another_process(dir: &Path, handle: &Handle, steps: std::ops::Range<usize>) {
        let files = removal_order(dir, &record_path(dir, handle));
        for file in &files[steps.start.min(files.len())..steps.end.min(files.len())] {
            remove_if_there(file).unwrap();
        }
    }

    #[tokio::test]
    async fn a_write_between_the_steps_of_a_kill_leaves_nothing_behind() {
        for steps_before_the_write in 0..=2 {
            let temp = TempDir::new();
            let store = DiskStore::open(&temp.0, false).unwrap();
            let handle = Handle::of_id("disk-unit-kill-steps");
            put_record(&store, &handle, &record(1)).await;
            put_record(&store, &handle, &record(2)).await;
            let loaded = store.load(&handle).await.unwrap().unwrap();

            kill_in_another_process(&temp.0, &handle, 0..steps_before_the_write);
            store.modify_seen(&handle, &loaded, &next).await.unwrap();
            kill_in_another_process(&temp.0, &handle, steps_before_the_write..usize::MAX);

            let names = names_in(&temp.0);
            assert_eq!(
                names,
                Vec::<String>::new(),
                "kill's step {steps_before_the_write}"
            );
        }
    }

    #[tokio::test]
    async fn a_change_decided_on_a_record_killed_since_it_was_read_is_not_written() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-killed-while-deciding");
        put_record(&store, &handle, &record(1)).await;
        put_record(&store, &handle, &record(2)).await;

        let decided_on = std::sync::Mutex::new(Vec::new());
        let kill_then_next = |current: Option<&Record>| {
            decided_on
                .lock()
                .unwrap()
                .push(current.map(|record| record.ver));
            kill_in_another_process(&temp.0, &handle, 0..usize::MAX);
            next(current)
        };
        let stored = store.modify(&handle, &kill_then_next).await.unwrap();

        assert_eq!(stored, None);
        assert_eq!(*decided_on.lock().unwrap(), [Some(2), None]);
        assert_eq!(names_in(&temp.0), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_record_larger_than_the_first_read_loads_whole() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("disk-unit-large");
        let large = padded(record(1), 10_000);
        let put = |_: Option<&Record>| Ok(Change::Put(large.clone()));
        store.modify(&handle, &put).await.unwrap();
        assert_eq!(store.load(&handle).await.unwrap(), Some(large.clone()));
    }

    #[test]
    fn put_in_place_swaps_with_an_existing_file_and_renames_onto_none() {
        let temp = TempDir::new();
        let (new, target) = (temp.0.join(".new.tmp"), temp.0.join("target"));
        fs::write(&new, "first").unwrap();
        let placed = put_in_place(&new, &target, Place::OverRecord).unwrap();
        assert_eq!(placed, Placed::RecordGone);
        assert!(!target.exists());
        let placed = put_in_place(&new, &target, Place::Anyway).unwrap();
        assert_eq!(placed, Placed::Renamed);
        assert!(!new.exists());
        fs::write(&new, "second").unwrap();
        let placed = put_in_place(&new, &target, Place::OverRecord).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "second");
        if placed == Placed::Swapped {
            assert_eq!(fs::read_to_string(&new).unwrap(), "first");
        } else {
            assert_eq!(placed, Placed::Renamed);
            assert!(!new.exists());
        }
    }

    /// `max_data_bytes = 9223372036854775807` (TOML's largest, a way of
    /// saying "no limit") makes the file limit `usize::MAX`; a record cut
    /// short is read again the long way, whose bound overflowed there.
    #[tokio::test]
    async fn a_record_cut_short_is_corrupt_under_the_largest_data_limit() {
        let temp = TempDir::new();
        let store = DiskStore::open(&temp.0, false)
            .unwrap()
            .with_max_data_bytes(i64::MAX as usize);
        let handle = Handle::of_id("disk-unit-no-limit");
        fs::write(store.file_of(&handle), br#"{"data":{"n":1},"created":"#).unwrap();
        let loaded = store.load(&handle).await;
        assert!(
            matches!(loaded, Err(StoreError::Corrupt { .. })),
            "{loaded:?}"
        );
    }

    #[test]
    fn a_corrupt_record_error_does_not_quote_the_file() {
        let temp = TempDir::new();
        let path = temp.0.join("x.json");
        fs::write(&path, br#"{"data": {"password": "hunter2"}, "created": "#).unwrap();
        let error = read_record(&path, "12345678", 1 << 20).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }));
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    /// Rough costs of the file operations; run with
    /// `cargo test --lib disk::tests::timing -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn timing() {
        let temp = TempDir::new();
        let rounds = 2_000u32;
        for fsync in [false, true] {
            let store = DiskStore::open(&temp.0, fsync).unwrap();
            let rounds = if fsync { rounds / 20 } else { rounds };
            let handle = Handle::of_id(&format!("timing-{fsync}"));
            let start = Instant::now();
            for n in 0..rounds {
                put_record(&store, &handle, &record(u64::from(n))).await;
            }
            println!("write (fsync {fsync}): {:?}", start.elapsed() / rounds);
        }
        let store = DiskStore::open(&temp.0, false).unwrap();
        let handle = Handle::of_id("timing-false");
        let start = Instant::now();
        for _ in 0..rounds {
            store.load(&handle).await.unwrap().unwrap();
        }
        println!(
            "load (no fsync: on this thread): {:?}",
            start.elapsed() / rounds
        );
        // In alternation, against what they replaced: `read_to_end`
        // (which asks for the size first) and `modify` (which reads the
        // record again).
        let path = store.file_of(&handle);
        let put =
            |current: Option<&Record>| Ok(Change::Put(record(current.map_or(1, |r| r.ver + 1))));
        let (mut small, mut whole, mut again, mut seen) = Default::default();
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..rounds {
                read_small_file(&path, 1 << 20).unwrap();
            }
            small += start.elapsed();
            let start = Instant::now();
            for _ in 0..rounds {
                let mut bytes = Vec::with_capacity(1024);
                File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
            }
            whole += start.elapsed();
            let start = Instant::now();
            for _ in 0..rounds {
                let loaded = store.load(&handle).await.unwrap().unwrap();
                store.modify(&handle, &put).await.unwrap();
                assert!(loaded.ver > 0);
            }
            again += start.elapsed();
            let start = Instant::now();
            for _ in 0..rounds {
                let loaded = store.load(&handle).await.unwrap().unwrap();
                store.modify_seen(&handle, &loaded, &put).await.unwrap();
            }
            seen += start.elapsed();
        }
        let per = |total: Duration| total / (5 * rounds);
        println!(
            "read_small_file: {:?}, read_to_end: {:?}",
            per(small),
            per(whole)
        );
        println!(
            "load + modify: {:?}, load + modify_seen: {:?}",
            per(again),
            per(seen)
        );
    }
}
