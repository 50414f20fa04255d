//! The token last made for a session, kept to be sent again within its
//! second.
//!
//! A token is a pure function of the handle, `ver`, the second and the
//! data (SPEC \[4\]; `iat` and `exp` count whole seconds). A client that sends
//! a burst of requests (a page and the requests its scripts make, a polling
//! app, a load test) would otherwise have the same bytes made for each:
//! the claims' JSON, base64, the HMAC and the header value's check, about
//! 0.5 µs. The memo remembers the last token per slot of handles and gives
//! it back only when every input is the same, so it never changes what the
//! upstream receives.
//!
//! Fixed size: [`SLOTS`] slots chosen by the handle, each keeping one token
//! of at most [`MAX_TOKEN_BYTES`] (about 4 MB in all at most, data included).
//! A session not stored yet is never kept: its handle is new, and the
//! next request brings the stored version. A slot busy with another thread
//! is not waited for: that request signs its own token.

use http::HeaderValue;

use super::slots::{prefix, Slots};
use crate::session::cookie::Handle;
use crate::session::data::SessionData;
use crate::session::token::TokenSigner;

/// How many tokens are kept: a slot per handle, chosen by the handle.
pub const SLOTS: usize = 1024;

/// Tokens longer than this (data of more than ~1.4 KB) are made every time.
pub const MAX_TOKEN_BYTES: usize = 2048;

pub struct TokenMemo {
    signer: TokenSigner,
    slots: Slots<Memo>,
}

/// One token and what it was made of.
struct Memo {
    handle: String,
    ver: u64,
    now: u64,
    data: SessionData,
    token: HeaderValue,
}

impl TokenMemo {
    pub fn new(signer: TokenSigner) -> TokenMemo {
        TokenMemo {
            signer,
            slots: Slots::new(SLOTS),
        }
    }

    /// The token for the session `handle` at `now`, as a header value:
    /// the one made last for the same inputs, or a new one.
    pub fn token(
        &self,
        handle: &Handle,
        new: bool,
        ver: u64,
        now: u64,
        data: &SessionData,
    ) -> HeaderValue {
        let sign = || header_value(self.signer.sign(handle, new, ver, now, data));
        if new {
            return sign();
        }
        let key = prefix(handle.as_str().as_bytes());
        if let Some(memo) = self.slots.try_slot(key) {
            if let Some(memo) = memo.as_ref() {
                if memo.ver == ver
                    && memo.now == now
                    && memo.handle == handle.as_str()
                    && memo.data == *data
                {
                    return memo.token.clone();
                }
            }
        }
        let token = sign();
        if token.len() <= MAX_TOKEN_BYTES {
            if let Some(mut memo) = self.slots.try_slot(key) {
                // The handle's text refilled in place: no allocation.
                let mut text = memo.take().map(|old| old.handle).unwrap_or_default();
                text.clear();
                text.push_str(handle.as_str());
                *memo = Some(Memo {
                    handle: text,
                    ver,
                    now,
                    data: data.clone(),
                    token: token.clone(),
                });
            }
        }
        token
    }
}

/// A token as a header value. A token is base64url and dots: always valid.
fn header_value(token: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(token))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "token-memo-unit-key-token-memo-unit-key-0001";

    fn data(value: serde_json::Value) -> SessionData {
        SessionData::from_map(value.as_object().unwrap())
    }

    fn memo() -> TokenMemo {
        TokenMemo::new(TokenSigner::new(KEY, 60))
    }

    /// Whether two header values share one buffer: the second was the
    /// memo's, not made again.
    fn same_buffer(a: &HeaderValue, b: &HeaderValue) -> bool {
        a.as_bytes().as_ptr() == b.as_bytes().as_ptr()
    }

    #[test]
    fn the_same_inputs_within_a_second_get_the_same_token_back() {
        let memo = memo();
        let signer = TokenSigner::new(KEY, 60);
        let handle = Handle::of_id("memo-same");
        let data = data(json!({"count": 1}));
        let first = memo.token(&handle, false, 3, 1_700_000_000, &data);
        let again = memo.token(&handle, false, 3, 1_700_000_000, &data.clone());
        assert!(same_buffer(&first, &again));
        let signed = signer.sign(&handle, false, 3, 1_700_000_000, &data);
        assert_eq!(again.as_bytes(), signed.as_bytes());
    }

    /// Another handle in the same slot of `memo` as `handle`.
    fn sharing_the_slot_of(memo: &TokenMemo, handle: &Handle) -> Handle {
        let slot_of = |handle: &Handle| memo.slots.index(prefix(handle.as_str().as_bytes()));
        (1..)
            .map(|n| Handle::of_id(&format!("memo-slot-{n}")))
            .find(|other| other != handle && slot_of(other) == slot_of(handle))
            .unwrap()
    }

    #[test]
    fn any_other_input_gets_the_token_of_that_input() {
        let memo = memo();
        let signer = TokenSigner::new(KEY, 60);
        let handle = Handle::of_id("memo-inputs");
        let count = |n: u64| data(json!({"count": n}));
        let kept = (handle.clone(), false, 3, 1_700_000_000, count(1));
        let cases = [
            // The same data in a new allocation is the same data.
            kept.clone(),
            (
                sharing_the_slot_of(&memo, &handle),
                false,
                3,
                1_700_000_000,
                count(1),
            ),
            (handle.clone(), true, 3, 1_700_000_000, count(1)),
            (handle.clone(), false, 4, 1_700_000_000, count(1)),
            (handle.clone(), false, 3, 1_700_000_001, count(1)),
            (handle.clone(), false, 3, 1_700_000_000, count(2)),
        ];
        for (handle, new, ver, now, data) in cases {
            // What the slot holds before each case.
            memo.token(&kept.0, kept.1, kept.2, kept.3, &kept.4);
            let token = memo.token(&handle, new, ver, now, &data);
            let signed = signer.sign(&handle, new, ver, now, &data);
            assert_eq!(
                token.as_bytes(),
                signed.as_bytes(),
                "{handle} {new} {ver} {now}"
            );
        }
    }

    #[test]
    fn handles_sharing_a_slot_each_get_their_own_token() {
        let memo = memo();
        let signer = TokenSigner::new(KEY, 60);
        let first = Handle::of_id("memo-slot-0");
        let second = sharing_the_slot_of(&memo, &first);
        let data = data(json!({"count": 1}));
        for handle in [&first, &second, &first] {
            let token = memo.token(handle, false, 1, 1_700_000_000, &data);
            let signed = signer.sign(handle, false, 1, 1_700_000_000, &data);
            assert_eq!(token.as_bytes(), signed.as_bytes());
        }
    }

    #[test]
    fn new_sessions_and_large_tokens_are_not_kept() {
        let memo = memo();
        let handle = Handle::of_id("memo-not-kept");
        let small = data(json!({"count": 1}));
        let new = memo.token(&handle, true, 0, 1_700_000_000, &small);
        assert!(!same_buffer(
            &new,
            &memo.token(&handle, true, 0, 1_700_000_000, &small)
        ));
        let large = data(json!({"padding": "x".repeat(MAX_TOKEN_BYTES)}));
        let token = memo.token(&handle, false, 1, 1_700_000_000, &large);
        assert!(token.len() > MAX_TOKEN_BYTES);
        assert!(!same_buffer(
            &token,
            &memo.token(&handle, false, 1, 1_700_000_000, &large)
        ));
    }
}
