//! The session id, its signed cookie value and its handle (SPEC [3]).

use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of a session id: the store key, the token's `sid`
/// and, by its prefix, the name of a session in logs. A copy of the store
/// or of a log cannot be turned back into a cookie.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(String);

impl Handle {
    /// The handle of the session id `id` (the 43-character text).
    pub fn of_id(id: &str) -> Handle {
        let digest = Sha256::digest(id.as_bytes());
        let mut hex = String::with_capacity(64);
        for byte in digest {
            hex.push(char::from(HEX[usize::from(byte >> 4)]));
            hex.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        Handle(hex)
    }

    /// A handle typed by a person or read back from a store: exactly 64
    /// lowercase hex digits.
    pub fn parse(text: &str) -> Option<Handle> {
        let valid = text.len() == 64 && text.bytes().all(|b| HEX.contains(&b));
        valid.then(|| Handle(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 8 hex digits: how logs name a session.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";
