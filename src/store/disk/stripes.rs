//! The disk store's locks, one per stripe of handles, each guarding a note
//! of the version this process wrote last.
//!
//! **Locks.** A load, and a read-decide-write, of one record hold its
//! stripe's lock. A fixed table rather than a lock per handle in a map: a
//! map entry costs a key, an allocation and a removal per use, about 2 900
//! instructions a load (callgrind), where a stripe costs a hash and an
//! uncontended lock. Handles that share a stripe wait for each other's
//! file operations (a few µs), which only a store's short sections can
//! afford: the proxy's own per-session lock (`lock = true`) waits for
//! whole requests and stays per handle (`crate::locks`).
//!
//! **Notes.** A request loads its session's record, and its write later
//! must land on the latest version. Reading the file again for that was a
//! third of a disk write's system calls. But every write of this process
//! holds the stripe's lock and notes its handle and version there, and
//! other processes only delete records (`session-proxy sessions kill` and
//! `sweep`), which a write notices by itself (the swap finds no record).
//! So when the note still names the handle and the version the request
//! loaded, that is the version on disk. Handles of one stripe overwrite
//! each other's note, which only costs the re-read.
//!
//! The note also keeps the record itself when it is small, with the
//! [`Stamp`] its file had once written, so that a load need only look the
//! file up (one `statx`) instead of opening, reading and decoding it: 3
//! of a request's 8 file system calls (benches/HISTORY.md, round 7). A
//! file deleted since (`sessions kill`), or rewritten by hand, reads as it
//! is. A kept record holds at most [`KEPT_RECORD_MAX`] bytes of session
//! data, so the notes hold at most about 20 MiB however many sessions
//! there are.
//!
//! **File turns.** Where the file operations run on the blocking pool
//! (`fsync`), a request dropped while its write runs there (its client
//! gone, its upstream failed) releases the stripe's lock, but the write
//! goes on. The next writer of the handle would then write the same spare
//! at the same time, and the two swaps could leave the version before
//! both. So that work takes a second lock of the stripe, its [`FileTurn`],
//! in the pool thread itself, for as long as it runs.

use std::sync::{Arc, PoisonError};

use tokio::sync::{Mutex, MutexGuard};

use super::files::Stamp;
use crate::session::cookie::Handle;
use crate::store::Record;

/// 16 384 stripes of 48 bytes (768 KiB), plus a note per stripe in use.
const STRIPES: usize = 1 << 14;

/// The largest session data a note keeps, in bytes of JSON.
pub const KEPT_RECORD_MAX: usize = 1024;

pub struct Stripes {
    stripes: Box<[Mutex<Note>]>,
    /// One per stripe, where file work runs on the blocking pool.
    file_turns: Option<Arc<[std::sync::Mutex<()>]>>,
}

/// What this process wrote last in a stripe, if anything is known.
#[derive(Default)]
struct Note(Option<Box<Written>>);

struct Written {
    handle: Handle,
    /// 0 when nothing is known: version 0 is never stored.
    ver: u64,
    /// The access time of `ver` as written (a touch writes `ver` again).
    atime: u64,
    /// The record of `ver` and its file's stamp, when its data is small
    /// enough to keep.
    record: Option<(Record, Stamp)>,
}

/// A handle's stripe, locked.
pub struct Held<'a> {
    note: MutexGuard<'a, Note>,
    handle: &'a Handle,
    stripe: usize,
    file_turns: Option<&'a Arc<[std::sync::Mutex<()>]>>,
}

/// The right to do a stripe's file work on the blocking pool: see the
/// module's comment.
pub struct FileTurn {
    turns: Arc<[std::sync::Mutex<()>]>,
    stripe: usize,
}

impl FileTurn {
    /// Runs `work` once the file work of the stripe before it has ended.
    pub fn run<T>(&self, work: impl FnOnce() -> T) -> T {
        // A panic in earlier work left nothing half-done that this lock
        // guards: the files are what they are.
        let _turn = self.turns[self.stripe]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        work()
    }
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes::new(false)
    }
}

impl Stripes {
    /// The table; with `file_turns` where file work runs on the blocking
    /// pool.
    pub fn new(file_turns: bool) -> Stripes {
        Stripes {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            file_turns: file_turns.then(|| (0..STRIPES).map(|_| Default::default()).collect()),
        }
    }

    /// Waits for `handle`'s stripe.
    pub async fn lock<'a>(&'a self, handle: &'a Handle) -> Held<'a> {
        // Hex digits of SHA-256 output: any few of them are uniform.
        let prefix = u64::from_str_radix(&handle.as_str()[..16], 16).unwrap_or(0);
        let stripe = prefix as usize % STRIPES;
        Held {
            note: self.stripes[stripe].lock().await,
            handle,
            stripe,
            file_turns: self.file_turns.as_ref(),
        }
    }
}

impl Held<'_> {
    /// The stripe's file turn, where file work runs on the blocking pool.
    pub fn file_turn(&self) -> Option<FileTurn> {
        self.file_turns.map(|turns| FileTurn {
            turns: turns.clone(),
            stripe: self.stripe,
        })
    }

    /// Notes that `record` is now the handle's record on disk, in a file
    /// stamped `stamp`.
    pub fn wrote(&mut self, record: &Record, stamp: Stamp) {
        let kept = (record.data.encoded_len() <= KEPT_RECORD_MAX).then(|| (record.clone(), stamp));
        match &mut self.note.0 {
            // The stripe's last writer was this handle: no new allocation.
            Some(written) if written.handle == *self.handle => {
                written.ver = record.ver;
                written.atime = record.atime;
                written.record = kept;
            }
            note => {
                *note = Some(Box::new(Written {
                    handle: self.handle.clone(),
                    ver: record.ver,
                    atime: record.atime,
                    record: kept,
                }));
            }
        }
    }

    /// Forgets what is known, before a write or a delete that may not
    /// finish.
    pub fn forget(&mut self) {
        if let Some(written) = &mut self.note.0 {
            written.ver = 0;
            written.record = None;
        }
    }

    /// Whether this process's last write of the handle was `ver` with
    /// access time `atime`.
    pub fn wrote_last(&self, ver: u64, atime: u64) -> bool {
        ver > 0
            && self
                .written()
                .is_some_and(|written| (written.ver, written.atime) == (ver, atime))
    }

    /// The record this process wrote last for the handle and its file's
    /// stamp, if it was kept.
    pub fn last_record(&self) -> Option<(&Record, Stamp)> {
        let (record, stamp) = self.written()?.record.as_ref()?;
        Some((record, *stamp))
    }

    fn written(&self) -> Option<&Written> {
        self.note
            .0
            .as_deref()
            .filter(|written| written.handle == *self.handle && written.ver > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle_with_prefix(prefix: u64) -> Handle {
        Handle::parse(&format!("{prefix:016x}{}", "0".repeat(48))).unwrap()
    }

    const STAMP: Stamp = Stamp {
        inode: 7,
        len: 100,
        modified: (1, 2),
    };

    fn record(ver: u64, data: &str) -> Record {
        Record {
            data: serde_json::from_str(data).unwrap(),
            created: 1,
            atime: 1,
            ip: "192.0.2.1".into(),
            ver,
        }
    }

    #[tokio::test]
    async fn a_note_names_one_version_of_one_handle() {
        let stripes = Stripes::default();
        let a = Handle::of_id("a");
        assert!(!stripes.lock(&a).await.wrote_last(1, 1));
        stripes.lock(&a).await.wrote(&record(7, "{}"), STAMP);
        let mut held = stripes.lock(&a).await;
        assert!(held.wrote_last(7, 1));
        assert!(!held.wrote_last(6, 1) && !held.wrote_last(8, 1));
        // Written again since with another access time (a touch).
        assert!(!held.wrote_last(7, 2));
        assert_eq!(held.last_record(), Some((&record(7, "{}"), STAMP)));
        held.forget();
        assert!(!held.wrote_last(7, 1));
        assert_eq!(held.last_record(), None);
        // Version 0 is never stored as such.
        held.wrote(&record(0, "{}"), STAMP);
        assert!(!held.wrote_last(0, 1));
        assert_eq!(held.last_record(), None);
    }

    #[tokio::test]
    async fn handles_of_one_stripe_share_its_lock_and_only_forget_each_others_note() {
        let stripes = Stripes::default();
        let a = handle_with_prefix(0x1234_5678_0000_0001);
        let b = handle_with_prefix(0x8765_4321_0000_0001);
        let c = handle_with_prefix(0x8765_4321_0000_0002);
        let held = stripes.lock(&a).await;
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), stripes.lock(&b));
        assert!(waiting.await.is_err(), "b waits for a's stripe");
        drop(stripes.lock(&c).await);
        drop(held);

        stripes.lock(&a).await.wrote(&record(3, "{}"), STAMP);
        stripes.lock(&b).await.wrote(&record(3, "{}"), STAMP);
        assert!(stripes.lock(&b).await.wrote_last(3, 1));
        assert!(!stripes.lock(&a).await.wrote_last(3, 1));
        assert_eq!(stripes.lock(&a).await.last_record(), None);
    }

    #[tokio::test]
    async fn handles_that_agree_in_every_digit_the_stripe_reads_get_no_record_of_the_other() {
        let stripes = Stripes::default();
        let a = Handle::parse(&format!("{}{}", "1".repeat(16), "a".repeat(48))).unwrap();
        let b = Handle::parse(&format!("{}{}", "1".repeat(16), "b".repeat(48))).unwrap();
        stripes
            .lock(&a)
            .await
            .wrote(&record(1, r#"{"user":"a"}"#), STAMP);
        assert_eq!(stripes.lock(&b).await.last_record(), None);
        assert!(!stripes.lock(&b).await.wrote_last(1, 1));
        stripes
            .lock(&b)
            .await
            .wrote(&record(1, r#"{"user":"b"}"#), STAMP);
        assert_eq!(stripes.lock(&a).await.last_record(), None);
        assert_eq!(
            stripes.lock(&b).await.last_record(),
            Some((&record(1, r#"{"user":"b"}"#), STAMP))
        );
    }

    #[tokio::test]
    async fn only_small_records_are_kept() {
        let stripes = Stripes::default();
        let a = Handle::of_id("a");
        let small = format!(r#"{{"v":"{}"}}"#, "x".repeat(KEPT_RECORD_MAX - 8));
        let large = format!(r#"{{"v":"{}"}}"#, "x".repeat(KEPT_RECORD_MAX - 7));
        stripes.lock(&a).await.wrote(&record(1, &small), STAMP);
        assert_eq!(
            stripes.lock(&a).await.last_record(),
            Some((&record(1, &small), STAMP))
        );
        stripes.lock(&a).await.wrote(&record(2, &large), STAMP);
        let held = stripes.lock(&a).await;
        assert!(held.wrote_last(2, 1));
        assert_eq!(held.last_record(), None);
    }
}
