//! A hasher for map keys that no client chooses: a session handle (the
//! SHA-256 of an id this proxy generated; a client cannot choose one, its
//! cookie must carry our signature first), a thread id. Such keys need no
//! protection from crafted collisions, and a handle's bytes are uniform
//! already: SipHash over all of them, once for a `DashMap`'s shard and
//! once for the shard's table, only cost time on every lookup (about 300
//! instructions for a handle's 64 digits, a Redis write's share of them
//! 2 %).

use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a key by its first eight bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct FirstWord(u64);

impl Hasher for FirstWord {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let taken = bytes.len().min(word.len());
        word[..taken].copy_from_slice(&bytes[..taken]);
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
    }

    /// The length before a slice's bytes: a key's is fixed.
    fn write_usize(&mut self, _: usize) {}
}

/// A map's hasher for keys no client chooses: [`FirstWord`].
pub type FirstWordHashing = BuildHasherDefault<FirstWord>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::cookie::Handle;
    use std::hash::BuildHasher;

    #[test]
    fn a_handle_hashes_to_its_first_eight_bytes_however_it_was_made() {
        let hashing = FirstWordHashing::default();
        for n in 0..3 {
            let made = Handle::of_id(&format!("hashed-{n}"));
            let parsed = Handle::parse(made.as_str()).unwrap();
            let bytes = made.to_bytes();
            let first = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            assert_eq!(hashing.hash_one(&made), first);
            assert_eq!(hashing.hash_one(&parsed), first);
            assert_eq!(hashing.hash_one(bytes), first);
        }
    }

    #[test]
    fn thread_ids_hash_apart() {
        let hashing = FirstWordHashing::default();
        let other = std::thread::spawn(|| std::thread::current().id())
            .join()
            .unwrap();
        let this = std::thread::current().id();
        assert_ne!(hashing.hash_one(this), hashing.hash_one(other));
    }
}
