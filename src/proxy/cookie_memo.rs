//! The session cookies verified last, kept so that the next request with
//! the same cookie skips verifying it again.
//!
//! Verifying a cookie and naming its session cost three SHA-256 blocks
//! (the HMAC's two, the handle's one), the base64 decoding of the value
//! and the handle's hex: 0.35 µs, where finding a kept value takes 0.04
//! (`benches/cookie.rs`; BENCHMARKS.md, round 27). A browser sends the same cookie with every request of its
//! session, so the memo keeps the last value that verified per slot of
//! values and, for a request that brings those very bytes, gives back
//! what verifying them gave.
//!
//! - **Only values that verified are kept**, with the id and handle they
//!   verified to. A value found again answers exactly as verifying it
//!   would: the keys do not change while the process runs.
//! - **A value is found again only by all its bytes, compared in constant
//!   time:** how long a look-up takes does not depend on how many leading
//!   bytes a client's guess shares with a kept value, so someone else's
//!   cookie cannot be guessed byte by byte.
//! - **Fixed size:** [`SLOTS`] slots, chosen by the value's first 8
//!   characters (the start of a random id), each keeping one value: about
//!   300 KB. A slot busy with another thread is passed by.
//! - **What it keeps is what the request path holds anyway:** recent
//!   cookie values, as pingora's request buffers do. SECURITY.md says so.

use super::slots::{prefix, Slots};
use crate::session::cookie::{CookieSigner, Handle, SessionId, COOKIE_VALUE_LEN};

/// How many verified cookie values are kept.
pub const SLOTS: usize = 1024;

pub struct CookieMemo {
    signer: CookieSigner,
    slots: Slots<Verified>,
}

/// A cookie value that verified, and what it verified to.
struct Verified {
    value: [u8; COOKIE_VALUE_LEN],
    id: SessionId,
    handle: Handle,
}

impl CookieMemo {
    pub fn new(signer: CookieSigner) -> CookieMemo {
        CookieMemo {
            signer,
            slots: Slots::new(SLOTS),
        }
    }

    /// The signer, for new cookies.
    pub fn signer(&self) -> &CookieSigner {
        &self.signer
    }

    /// The session id of a correctly signed cookie value, and its handle:
    /// as [`CookieSigner::verify`] and [`SessionId::handle`] give them.
    pub fn verify(&self, value: &[u8]) -> Option<(SessionId, Handle)> {
        let value: &[u8; COOKIE_VALUE_LEN] = value.try_into().ok()?;
        let key = prefix(value);
        if let Some(slot) = self.slots.try_slot(key) {
            if let Some(kept) = slot.as_ref().filter(|kept| same_bytes(&kept.value, value)) {
                return Some((kept.id.clone(), kept.handle.clone()));
            }
        }
        let id = self.signer.verify(value)?;
        let handle = id.handle();
        if let Some(mut slot) = self.slots.try_slot(key) {
            *slot = Some(Verified {
                value: *value,
                id: id.clone(),
                handle: handle.clone(),
            });
        }
        Some((id, handle))
    }
}

/// Whether `a` and `b` hold the same bytes, in a time that does not depend
/// on which bytes differ: every byte is looked at, and the differences are
/// folded together before the one branch.
fn same_bytes<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "cookie-memo-unit-key-cookie-memo-unit-key-01";
    const OTHER_KEY: &str = "cookie-memo-unit-key-cookie-memo-unit-key-02";

    fn memo() -> CookieMemo {
        CookieMemo::new(CookieSigner::new(&[KEY.to_owned()]))
    }

    fn signed(id: &SessionId) -> String {
        CookieSigner::new(&[KEY.to_owned()]).sign(id)
    }

    #[test]
    fn a_value_verifies_to_its_id_and_handle_first_time_and_again() {
        let memo = memo();
        let id = SessionId::generate();
        let value = signed(&id);
        for _ in 0..3 {
            let (verified, handle) = memo.verify(value.as_bytes()).unwrap();
            assert_eq!(verified, id);
            assert_eq!(handle, id.handle());
        }
    }

    /// Every single-byte change of a kept value, and the value signed with
    /// a key the memo's signer does not hold, are refused, though the
    /// value they differ from is kept in their very slot.
    #[test]
    fn a_value_that_differs_from_a_kept_one_is_verified_afresh() {
        let memo = memo();
        let id = SessionId::generate();
        let value = signed(&id);
        assert!(memo.verify(value.as_bytes()).is_some());
        for at in 0..COOKIE_VALUE_LEN {
            let mut changed = value.clone().into_bytes();
            changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
            assert_eq!(memo.verify(&changed), None, "byte {at} changed");
            // The kept value still answers.
            assert_eq!(
                memo.verify(value.as_bytes()).map(|(id, _)| id),
                Some(id.clone())
            );
        }
        let foreign = CookieSigner::new(&[OTHER_KEY.to_owned()]).sign(&id);
        assert_eq!(memo.verify(foreign.as_bytes()), None);
        assert_eq!(memo.verify(&value.as_bytes()[..COOKIE_VALUE_LEN - 1]), None);
    }

    #[test]
    fn values_sharing_a_slot_each_verify_to_their_own_id() {
        let memo = memo();
        let first = SessionId::generate();
        let slot_of = |id: &SessionId| memo.slots.index(prefix(signed(id).as_bytes()));
        let second = std::iter::repeat_with(SessionId::generate)
            .find(|other| slot_of(other) == slot_of(&first))
            .unwrap();
        for id in [&first, &second, &first, &second] {
            let (verified, handle) = memo.verify(signed(id).as_bytes()).unwrap();
            assert_eq!(&verified, id);
            assert_eq!(handle, id.handle());
        }
    }

    #[test]
    fn same_bytes_compares_every_byte() {
        let a = [7u8; COOKIE_VALUE_LEN];
        assert!(same_bytes(&a, &a.clone()));
        for at in 0..COOKIE_VALUE_LEN {
            let mut b = a;
            b[at] ^= 0x80;
            assert!(!same_bytes(&a, &b), "byte {at}");
        }
    }
}
