//! A fixed table of memo slots for the request path's memos: one slot per
//! key, chosen by the key's first 8 bytes, each behind a lock that is
//! tried, never waited for. A slot busy with another thread is passed by:
//! that request does the work itself, as it would without a memo.

use std::sync::{Mutex, MutexGuard};

pub struct Slots<T> {
    slots: Box<[Mutex<Option<T>>]>,
}

impl<T> Slots<T> {
    /// `count` empty slots; `count` is a power of two, 2 or more (the
    /// index is the top bits of a 64-bit mix).
    pub fn new(count: usize) -> Slots<T> {
        debug_assert!(count.is_power_of_two() && count >= 2);
        Slots {
            slots: (0..count).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The slot of a key that starts with `prefix`, unless another thread
    /// holds it (or a thread panicked holding it).
    pub fn try_slot(&self, prefix: [u8; 8]) -> Option<MutexGuard<'_, Option<T>>> {
        self.slots[self.index(prefix)].try_lock().ok()
    }

    /// Fibonacci hashing of the prefix, top bits. The keys' first bytes
    /// are random (SHA-256 output, CSPRNG ids) but drawn from a small
    /// alphabet (hex, base64): the mix spreads their codes over the index.
    pub(super) fn index(&self, prefix: [u8; 8]) -> usize {
        let mixed = u64::from_le_bytes(prefix).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> (64 - self.slots.len().trailing_zeros())) as usize
    }
}

/// The first 8 bytes of `key` (fewer: padded with zeros).
pub fn prefix(key: &[u8]) -> [u8; 8] {
    let mut prefix = [0u8; 8];
    let len = key.len().min(8);
    prefix[..len].copy_from_slice(&key[..len]);
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::cookie::{Handle, SessionId};

    /// 16 keys per slot on average; a fair spread keeps every slot within 3×.
    fn assert_spread(keys: impl Iterator<Item = String>) {
        let slots = Slots::<()>::new(1024);
        let mut used = vec![0usize; 1024];
        for key in keys.take(1024 * 16) {
            used[slots.index(prefix(key.as_bytes()))] += 1;
        }
        assert!(
            used.iter().all(|&count| (1..=48).contains(&count)),
            "{used:?}"
        );
    }

    #[test]
    fn handles_spread_evenly() {
        assert_spread((0..).map(|n| Handle::of_id(&format!("spread-{n}")).to_string()));
    }

    #[test]
    fn session_ids_spread_evenly() {
        assert_spread((0..).map(|_| SessionId::generate().as_str().to_owned()));
    }

    #[test]
    fn a_slot_held_elsewhere_is_passed_by() {
        let slots = Slots::new(4);
        let held = slots.try_slot(*b"abcdefgh").unwrap();
        assert!(slots.try_slot(*b"abcdefgh").is_none());
        drop(held);
        *slots.try_slot(*b"abcdefgh").unwrap() = Some(1);
        assert_eq!(*slots.try_slot(*b"abcdefgh").unwrap(), Some(1));
    }

    #[test]
    fn a_short_key_is_padded() {
        assert_eq!(prefix(b"abc"), *b"abc\0\0\0\0\0");
        assert_eq!(prefix(b"abcdefghij"), *b"abcdefgh");
    }
}
