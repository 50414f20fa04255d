//! Which version of a record this process wrote last, for skipping the
//! re-read before a write.
//!
//! A request loads its session's record, and its write later must land on
//! the latest version. Reading the file again for that is a third of a
//! disk write's system calls. But every write of this process goes through
//! the handle's lock and is noted here, and other processes only delete
//! records (`session-proxy sessions kill` and `sweep`), which a write
//! notices by itself (the swap finds no record). So when the note for a
//! handle still names the version the request loaded, that is the version
//! on disk.
//!
//! The notes sit in a fixed table indexed by the handle's first bits: a
//! bounded cost, whatever the number of sessions. Two handles that share a
//! slot overwrite each other's note, which only costs the re-read.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::session::cookie::Handle;

/// 512 KiB of notes.
const SLOTS: usize = 1 << 16;

pub struct LastWritten {
    /// Per slot: the handle's tag in the high half and the version in the
    /// low half; 0 when nothing is known.
    slots: Box<[AtomicU64]>,
}

impl Default for LastWritten {
    fn default() -> Self {
        LastWritten {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LastWritten {
    /// Notes that `ver` of `handle` is now in place. The caller holds the
    /// handle's lock.
    pub fn wrote(&self, handle: &Handle, ver: u64) {
        let (slot, tag) = self.slot(handle);
        // Version 0 is never stored, and one past 32 bits is not noted.
        let note = match u32::try_from(ver) {
            Ok(ver) if ver > 0 => tag << 32 | u64::from(ver),
            _ => 0,
        };
        slot.store(note, Ordering::Relaxed);
    }

    /// Forgets what is known of `handle`, before a write or a delete that
    /// may not finish. The caller holds the handle's lock.
    pub fn forget(&self, handle: &Handle) {
        self.slot(handle).0.store(0, Ordering::Relaxed);
    }

    /// Whether this process's last write of `handle` was `ver`. The caller
    /// holds the handle's lock, which orders this with the notes of every
    /// earlier write of the handle.
    pub fn was_last(&self, handle: &Handle, ver: u64) -> bool {
        let (slot, tag) = self.slot(handle);
        match u32::try_from(ver) {
            Ok(ver) if ver > 0 => slot.load(Ordering::Relaxed) == tag << 32 | u64::from(ver),
            _ => false,
        }
    }

    /// The slot of `handle` and the tag that tells it from the other
    /// handles of that slot: both from its first 16 hex digits, which are
    /// SHA-256 output.
    fn slot(&self, handle: &Handle) -> (&AtomicU64, u64) {
        let prefix = u64::from_str_radix(&handle.as_str()[..16], 16).unwrap_or(0);
        let slot = &self.slots[prefix as usize % SLOTS];
        // A nonzero tag: no note is 0.
        (slot, prefix >> 32 | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_names_one_version_of_one_handle() {
        let notes = LastWritten::default();
        let (a, b) = (Handle::of_id("a"), Handle::of_id("b"));
        assert!(!notes.was_last(&a, 1));
        notes.wrote(&a, 7);
        assert!(notes.was_last(&a, 7));
        assert!(!notes.was_last(&a, 6) && !notes.was_last(&a, 8));
        assert!(!notes.was_last(&b, 7));
        notes.forget(&a);
        assert!(!notes.was_last(&a, 7));
        // Not noted: never stored as such, or too large.
        notes.wrote(&a, 0);
        assert!(!notes.was_last(&a, 0));
        notes.wrote(&a, 1 << 32);
        assert!(!notes.was_last(&a, 1 << 32) && !notes.was_last(&a, 0));
    }

    #[test]
    fn handles_sharing_a_slot_only_forget_each_other() {
        let notes = LastWritten::default();
        let a = Handle::parse(&format!(
            "{:016x}{}",
            0x1234_5678_0000_0001u64,
            "0".repeat(48)
        ))
        .unwrap();
        let b = Handle::parse(&format!(
            "{:016x}{}",
            0x8765_4321_0000_0001u64,
            "0".repeat(48)
        ))
        .unwrap();
        notes.wrote(&a, 3);
        notes.wrote(&b, 3);
        assert!(notes.was_last(&b, 3));
        assert!(!notes.was_last(&a, 3));
    }
}
