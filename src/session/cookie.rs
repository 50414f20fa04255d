//! The session id, its signed cookie value and its handle (SPEC \[3\]).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{CookieConfig, SameSite};

/// Lowercase hex SHA-256 of a session id: the store key, the token's `sid`
/// and, by its prefix, the name of a session in logs. A copy of the store
/// or of a log cannot be turned back into a cookie. Shared text: a
/// request passes its handle around (memos, locks, the store) by clones.
/// The 32 bytes the digits spell come along, for the memory store's keys:
/// made with the digits, never decoded from them on the request path.
/// One pointer wide, so that the request's futures that hold it stay small.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Handle(Arc<Spelling>);

/// By the bytes, uniform already (SHA-256 output): a map of handles
/// needs no more than [`crate::hashing::FirstWordHashing`].
impl Hash for Handle {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.bytes);
    }
}

/// A handle's digits, and the bytes they spell (ordered by the digits).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Spelling {
    text: Box<str>,
    bytes: [u8; 32],
}

impl Handle {
    /// The handle of the session id `id` (the 43-character text).
    pub fn of_id(id: &str) -> Handle {
        Handle::from_bytes(&Sha256::digest(id.as_bytes()).into())
    }

    /// The handle whose 64 hex digits spell `bytes`.
    pub fn from_bytes(bytes: &[u8; 32]) -> Handle {
        let mut hex = [0u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        // Hex digits are ASCII: checked in a few word-wide steps, where
        // `from_utf8_lossy` walked them as chunks of text (perf: 0.06 µs).
        Handle(Arc::new(Spelling {
            text: Box::from(std::str::from_utf8(&hex).unwrap_or_default()),
            bytes: *bytes,
        }))
    }

    /// The 32 bytes the hex digits spell: half the size, for keeping many.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.bytes
    }

    /// A handle typed by a person or read back from a store: exactly 64
    /// lowercase hex digits.
    pub fn parse(text: &str) -> Option<Handle> {
        if text.len() != 64 || !text.bytes().all(|b| HEX.contains(&b)) {
            return None;
        }
        let nibble = |digit: u8| match digit {
            b'0'..=b'9' => digit - b'0',
            _ => digit - b'a' + 10,
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = nibble(pair[0]) << 4 | nibble(pair[1]);
        }
        Some(Handle(Arc::new(Spelling {
            text: Box::from(text),
            bytes,
        })))
    }

    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The first 8 hex digits: how logs name a session.
    pub fn short(&self) -> &str {
        &self.0.text[..8]
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Handle").field(&self.as_str()).finish()
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A session id: 32 bytes from a CSPRNG, base64url without padding.
/// Shared text, as a [`Handle`] is.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionId(Arc<str>);

/// Characters of an id and of a tag.
const ID_LEN: usize = 43;
const TAG_LEN: usize = 22;
/// `ID.TAG`: anything longer or shorter is not a cookie of ours.
pub const COOKIE_VALUE_LEN: usize = ID_LEN + 1 + TAG_LEN;

impl SessionId {
    pub fn generate() -> SessionId {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        SessionId(Arc::from(URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn handle(&self) -> Handle {
        Handle::of_id(&self.0)
    }
}

/// Never print an id: it is a bearer credential.
impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId(..)")
    }
}

/// Signs ids into cookie values with the first key and verifies them
/// against every key, so old cookies stay valid while their key is listed.
#[derive(Clone)]
pub struct CookieSigner {
    /// One HMAC already keyed per secret: cloning it skips the key schedule.
    macs: Vec<HmacSha256>,
}

impl CookieSigner {
    /// `keys` is non-empty (the config guarantees it).
    pub fn new(keys: &[String]) -> CookieSigner {
        let macs = keys
            .iter()
            .filter_map(|key| HmacSha256::new_from_slice(key.as_bytes()).ok())
            .collect();
        CookieSigner { macs }
    }

    /// `ID.TAG`, TAG being the first 16 bytes of HMAC-SHA256(first key, ID).
    pub fn sign(&self, id: &SessionId) -> String {
        let mut value = String::with_capacity(COOKIE_VALUE_LEN);
        value.push_str(&id.0);
        value.push('.');
        if let Some(mac) = self.macs.first() {
            let mut mac = mac.clone();
            mac.update(id.0.as_bytes());
            let tag = mac.finalize().into_bytes();
            URL_SAFE_NO_PAD.encode_string(&tag[..16], &mut value);
        }
        value
    }

    /// The id in a cookie value, if it is well formed and signed by one of
    /// the keys. The comparison is the `hmac` crate's constant-time one.
    pub fn verify(&self, value: &[u8]) -> Option<SessionId> {
        if value.len() != COOKIE_VALUE_LEN || value[ID_LEN] != b'.' {
            return None;
        }
        let (id, tag) = (&value[..ID_LEN], &value[ID_LEN + 1..]);
        let mut id_bytes = [0u8; 33];
        let mut tag_bytes = [0u8; 17];
        // Decoding rejects anything but canonical base64url of the right size.
        if URL_SAFE_NO_PAD.decode_slice(id, &mut id_bytes).ok()? != 32
            || URL_SAFE_NO_PAD.decode_slice(tag, &mut tag_bytes).ok()? != 16
        {
            return None;
        }
        let verified = self.macs.iter().any(|mac| {
            let mut mac = mac.clone();
            mac.update(id);
            mac.verify_truncated_left(&tag_bytes[..16]).is_ok()
        });
        if !verified {
            return None;
        }
        // `id` is base64url, hence ASCII.
        Some(SessionId(Arc::from(std::str::from_utf8(id).ok()?)))
    }
}

/// The `Set-Cookie` value that stores `value` in the browser, or clears
/// the cookie when `value` is `None`.
pub fn set_cookie(config: &CookieConfig, value: Option<&str>) -> String {
    use std::fmt::Write;
    let mut header = String::with_capacity(160);
    let _ = write!(
        header,
        "{}={}; Path={}",
        config.name,
        value.unwrap_or(""),
        config.path
    );
    if let Some(domain) = &config.domain {
        let _ = write!(header, "; Domain={domain}");
    }
    match value {
        None => header.push_str("; Max-Age=0"),
        Some(_) if config.max_age > 0 => {
            let _ = write!(header, "; Max-Age={}", config.max_age);
        }
        Some(_) => {}
    }
    if config.httponly {
        header.push_str("; HttpOnly");
    }
    if config.secure {
        header.push_str("; Secure");
    }
    match config.samesite {
        SameSite::Strict => header.push_str("; SameSite=Strict"),
        SameSite::Lax => header.push_str("; SameSite=Lax"),
        SameSite::None => header.push_str("; SameSite=None"),
        SameSite::Omitted => {}
    }
    header
}

type HmacSha256 = Hmac<Sha256>;

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn signer(keys: &[&str]) -> CookieSigner {
        CookieSigner::new(&keys.iter().map(|k| k.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn generated_ids_are_43_base64url_chars_and_differ() {
        let (a, b) = (SessionId::generate(), SessionId::generate());
        assert_eq!(a.as_str().len(), 43);
        assert!(a
            .as_str()
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(a, b);
    }

    #[test]
    fn a_signed_cookie_verifies_to_its_id() {
        let id = SessionId::generate();
        let value = signer(&[KEY_A]).sign(&id);
        assert_eq!(value.len(), COOKIE_VALUE_LEN);
        assert_eq!(signer(&[KEY_A]).verify(value.as_bytes()), Some(id));
    }

    #[test]
    fn the_tag_is_the_first_16_bytes_of_hmac_sha256() {
        let id = SessionId(Arc::from("A".repeat(42) + "A"));
        let mut mac = HmacSha256::new_from_slice(KEY_A.as_bytes()).unwrap();
        mac.update(id.as_str().as_bytes());
        let expected = URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..16]);
        assert_eq!(
            signer(&[KEY_A]).sign(&id),
            format!("{}.{}", id.as_str(), expected)
        );
    }

    #[test]
    fn old_keys_verify_while_listed_and_the_first_signs() {
        let id = SessionId::generate();
        let old = signer(&[KEY_A]).sign(&id);
        let rotated = signer(&[KEY_B, KEY_A]);
        assert_eq!(rotated.verify(old.as_bytes()), Some(id.clone()));
        assert_eq!(rotated.sign(&id), signer(&[KEY_B]).sign(&id));
        assert_eq!(signer(&[KEY_B]).verify(old.as_bytes()), None);
    }

    #[test]
    fn tampered_truncated_or_padded_cookies_do_not_verify() {
        let signer = signer(&[KEY_A]);
        let value = signer.sign(&SessionId::generate());
        let mut flipped = value.clone().into_bytes();
        flipped[3] = if flipped[3] == b'x' { b'y' } else { b'x' };
        let mut bad_tag = value.clone().into_bytes();
        bad_tag[COOKIE_VALUE_LEN - 2] = if bad_tag[COOKIE_VALUE_LEN - 2] == b'A' {
            b'B'
        } else {
            b'A'
        };
        for candidate in [
            flipped,
            bad_tag,
            value.as_bytes()[..COOKIE_VALUE_LEN - 1].to_vec(),
            format!("{value}A").into_bytes(),
            value.replace('.', "-").into_bytes(),
            vec![b'.'; COOKIE_VALUE_LEN],
            Vec::new(),
        ] {
            assert_eq!(
                signer.verify(&candidate),
                None,
                "{:?}",
                String::from_utf8_lossy(&candidate)
            );
        }
    }

    #[test]
    fn the_handle_is_hex_sha256_of_the_id_text() {
        let handle = Handle::of_id("abc");
        assert_eq!(
            handle.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(handle.short(), "ba7816bf");
        assert_eq!(Handle::parse(handle.as_str()), Some(handle.clone()));
        assert_eq!(Handle::parse("BA7816BF"), None);
        let bytes = handle.to_bytes();
        assert_eq!(bytes[..3], [0xba, 0x78, 0x16]);
        assert_eq!(Handle::from_bytes(&bytes), handle);
    }

    #[test]
    fn set_cookie_carries_every_configured_attribute() {
        let mut config = CookieConfig {
            name: "sid".into(),
            domain: Some("example.org".into()),
            path: "/app".into(),
            max_age: 600,
            secure: true,
            httponly: true,
            samesite: SameSite::Strict,
        };
        assert_eq!(
            set_cookie(&config, Some("v")),
            "sid=v; Path=/app; Domain=example.org; Max-Age=600; HttpOnly; Secure; SameSite=Strict"
        );
        assert_eq!(
            set_cookie(&config, None),
            "sid=; Path=/app; Domain=example.org; Max-Age=0; HttpOnly; Secure; SameSite=Strict"
        );
        config = CookieConfig {
            domain: None,
            max_age: 0,
            secure: false,
            httponly: false,
            samesite: SameSite::Omitted,
            ..config
        };
        assert_eq!(set_cookie(&config, Some("v")), "sid=v; Path=/app");
    }
}
