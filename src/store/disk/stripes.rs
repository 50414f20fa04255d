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
//! holds the stripe's lock and notes its version there, and other
//! processes only delete records (`session-proxy sessions kill` and
//! `sweep`), which a write notices by itself (the swap finds no record).
//! So when the note still names the handle and the version the request
//! loaded, that is the version on disk. Handles of one stripe overwrite
//! each other's note, which only costs the re-read.

use tokio::sync::{Mutex, MutexGuard};

use crate::session::cookie::Handle;

/// 16 384 stripes of 48 bytes: 768 KiB.
const STRIPES: usize = 1 << 14;

pub struct Stripes {
    stripes: Box<[Mutex<Note>]>,
}

/// The handle's tag in the high half and the version in the low half;
/// 0 when nothing is known.
#[derive(Default)]
struct Note(u64);

/// A handle's stripe, locked.
pub struct Held<'a> {
    note: MutexGuard<'a, Note>,
    tag: u64,
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Stripes {
    /// Waits for `handle`'s stripe.
    pub async fn lock(&self, handle: &Handle) -> Held<'_> {
        // The first 16 hex digits, SHA-256 output: the low bits choose the
        // stripe, the high ones tell the handles of a stripe apart.
        let prefix = u64::from_str_radix(&handle.as_str()[..16], 16).unwrap_or(0);
        Held {
            note: self.stripes[prefix as usize % STRIPES].lock().await,
            // Nonzero: no note is 0.
            tag: prefix >> 32 | 1,
        }
    }
}

impl Held<'_> {
    /// Notes that `ver` of the handle is now in place.
    pub fn wrote(&mut self, ver: u64) {
        // Version 0 is never stored, and one past 32 bits is not noted.
        self.note.0 = match u32::try_from(ver) {
            Ok(ver) if ver > 0 => self.tag << 32 | u64::from(ver),
            _ => 0,
        };
    }

    /// Forgets what is known, before a write or a delete that may not
    /// finish.
    pub fn forget(&mut self) {
        self.note.0 = 0;
    }

    /// Whether this process's last write of the handle was `ver`.
    pub fn wrote_last(&self, ver: u64) -> bool {
        match u32::try_from(ver) {
            Ok(ver) if ver > 0 => self.note.0 == self.tag << 32 | u64::from(ver),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle_with_prefix(prefix: u64) -> Handle {
        Handle::parse(&format!("{prefix:016x}{}", "0".repeat(48))).unwrap()
    }

    #[tokio::test]
    async fn a_note_names_one_version_of_one_handle() {
        let stripes = Stripes::default();
        let a = Handle::of_id("a");
        assert!(!stripes.lock(&a).await.wrote_last(1));
        stripes.lock(&a).await.wrote(7);
        let mut held = stripes.lock(&a).await;
        assert!(held.wrote_last(7));
        assert!(!held.wrote_last(6) && !held.wrote_last(8));
        held.forget();
        assert!(!held.wrote_last(7));
        // Not noted: never stored as such, or too large.
        held.wrote(0);
        assert!(!held.wrote_last(0));
        held.wrote(1 << 32);
        assert!(!held.wrote_last(1 << 32) && !held.wrote_last(0));
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

        stripes.lock(&a).await.wrote(3);
        stripes.lock(&b).await.wrote(3);
        assert!(stripes.lock(&b).await.wrote_last(3));
        assert!(!stripes.lock(&a).await.wrote_last(3));
    }
}
