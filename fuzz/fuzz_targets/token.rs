//! The session token: encode any session data, decode it back.
//!
//! Input: 17 bytes of claims (`new`, `ver`, `iat`), then the session data
//! as JSON (anything that is not a JSON object becomes `{"raw": text}`).
//! The whole input is also offered to `verify` as a token.
//!
//! Checked: nothing panics; a signed token is three base64url parts whose
//! header is HS256 with the key id; it verifies to exactly the claims
//! signed; a token from another key, or one with any byte of its signature
//! changed, does not verify; arbitrary text verifies only if it is a token
//! this key signed.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use session_proxy::session::cookie::Handle;
use session_proxy::session::data::SessionData;
use session_proxy::session::token::{key_id, Claims, TokenSigner};

const KEY: &str = "fuzz-token-key-0123456789abcdefghijklmnopqrstuvwxyz";
const OTHER_KEY: &str = "fuzz-token-other-0123456789abcdefghijklmnopqrstuv";
const TTL: u64 = 60;
/// Times come from the clock, not from a client: keep them below the year
/// 10^10 or so, where `iat + ttl` is far from overflowing.
const MAX_NOW: u64 = 1 << 40;

fn signers() -> &'static (TokenSigner, TokenSigner) {
    static SIGNERS: OnceLock<(TokenSigner, TokenSigner)> = OnceLock::new();
    SIGNERS.get_or_init(|| (TokenSigner::new(KEY, TTL), TokenSigner::new(OTHER_KEY, TTL)))
}

fuzz_target!(|input: &[u8]| {
    let (signer, other) = signers();

    // Arbitrary text as a token.
    if let Ok(text) = std::str::from_utf8(input) {
        if let Some(claims) = signer.verify(text) {
            assert_eq!(signer.sign_claims(&claims), text, "a forged token verified");
        }
    }

    if input.len() < 17 {
        return;
    }
    let (head, body) = input.split_at(17);
    let new = head[0] & 1 == 1;
    let ver = u64::from_le_bytes(head[1..9].try_into().unwrap());
    let now = u64::from_le_bytes(head[9..17].try_into().unwrap()) % MAX_NOW;
    let data = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        _ => {
            let mut map = Map::new();
            map.insert(
                "raw".into(),
                Value::String(String::from_utf8_lossy(body).into_owned()),
            );
            map
        }
    };
    let handle = Handle::of_id(&String::from_utf8_lossy(body));

    let token = signer.sign(&handle, new, ver, now, &SessionData::from_map(&data));

    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    for part in &parts {
        assert!(part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(
        header,
        json!({"alg": "HS256", "typ": "JWT", "kid": key_id(KEY)})
    );

    let claims = signer.verify(&token).expect("a token we signed verifies");
    assert_eq!(
        claims,
        Claims {
            sid: handle.to_string(),
            new,
            ver,
            iat: now,
            exp: now + TTL,
            data,
        }
    );
    assert!(
        other.verify(&token).is_none(),
        "another key's signer accepted it"
    );

    // Any one byte of the signature changed: refused.
    let mut altered = token.clone().into_bytes();
    let last = altered.len() - 1 - usize::from(head[0] >> 1) % parts[2].len();
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    assert!(signer.verify(&altered).is_none(), "{altered}");
});

/// Re-signing a verified token's claims gives the token back.
trait SignClaims {
    fn sign_claims(&self, claims: &Claims) -> String;
}

impl SignClaims for TokenSigner {
    fn sign_claims(&self, claims: &Claims) -> String {
        let handle = Handle::parse(&claims.sid).expect("a signed sid is a handle");
        assert_eq!(claims.exp, claims.iat + TTL);
        let data = SessionData::from_map(&claims.data);
        self.sign(&handle, claims.new, claims.ver, claims.iat, &data)
    }
}
