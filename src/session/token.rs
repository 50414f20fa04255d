//! The token sent upstream: a standard HS256 JWT (SPEC \[4\]), so any JWT
//! library verifies it with the shared secret.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::cookie::Handle;
use super::data::SessionData;

/// What the upstream reads from the token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Claims {
    pub sid: String,
    pub new: bool,
    pub ver: u64,
    pub iat: u64,
    pub exp: u64,
    pub data: Map<String, Value>,
}

/// The claims around the data, with the widest numbers: the payload's
/// size less the data's.
const CLAIMS_LEN: usize =
    r#"{"sid":"","new":false,"ver":,"iat":,"exp":,"data":}"#.len() + 64 + 3 * 20;

/// Signs tokens with one key. The encoded JWT header and the keyed HMAC
/// are computed once, at start.
#[derive(Clone)]
pub struct TokenSigner {
    mac: Hmac<Sha256>,
    /// `base64url(header) + "."`
    header_prefix: String,
    ttl: u64,
}

impl TokenSigner {
    pub fn new(key: &str, ttl: u64) -> TokenSigner {
        let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, key_id(key));
        let mut header_prefix = URL_SAFE_NO_PAD.encode(header);
        header_prefix.push('.');
        TokenSigner {
            // HMAC takes keys of any length.
            mac: Hmac::new_from_slice(key.as_bytes()).unwrap_or_else(|_| unreachable!()),
            header_prefix,
            ttl,
        }
    }

    /// The compact JWT for a session at time `now`. The claims are written
    /// as text around the data's JSON, which is spliced in as it is: the
    /// handle is hex and the rest are numbers, so nothing needs escaping.
    pub fn sign(
        &self,
        handle: &Handle,
        new: bool,
        ver: u64,
        now: u64,
        data: &SessionData,
    ) -> String {
        let mut payload = String::with_capacity(CLAIMS_LEN + data.encoded_len());
        let mut number = itoa::Buffer::new();
        payload.push_str(r#"{"sid":""#);
        payload.push_str(handle.as_str());
        payload.push_str(if new {
            r#"","new":true,"ver":"#
        } else {
            r#"","new":false,"ver":"#
        });
        payload.push_str(number.format(ver));
        payload.push_str(r#","iat":"#);
        payload.push_str(number.format(now));
        payload.push_str(r#","exp":"#);
        payload.push_str(number.format(now + self.ttl));
        payload.push_str(r#","data":"#);
        payload.push_str(data.as_str());
        payload.push('}');
        let mut token =
            String::with_capacity(self.header_prefix.len() + payload.len() * 4 / 3 + 48);
        token.push_str(&self.header_prefix);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
        token
    }

    /// The claims of a token this signer made, if its signature holds.
    /// Expiry is not checked: that is the upstream's business.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let (signed, signature) = token.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        mac.verify_slice(&signature).ok()?;
        let payload = signed.strip_prefix(&self.header_prefix)?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
    }
}

/// `kid`: the first 8 hex digits of SHA-256(key), so an upstream holding
/// several keys during a rotation knows which one to use.
pub fn key_id(key: &str) -> String {
    Sha256::digest(key.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk";

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    fn data() -> SessionData {
        SessionData::from_map(&map(serde_json::json!({"count": 3, "user": "zoé"})))
    }

    #[test]
    fn a_token_carries_every_claim_and_verifies() {
        let signer = TokenSigner::new(KEY, 60);
        let handle = Handle::of_id("x");
        let token = signer.sign(&handle, false, 7, 1_700_000_000, &data());
        let claims = signer.verify(&token).unwrap();
        assert_eq!(
            claims,
            Claims {
                sid: handle.to_string(),
                new: false,
                ver: 7,
                iat: 1_700_000_000,
                exp: 1_700_000_060,
                data: data().to_map().unwrap()
            }
        );
    }

    #[test]
    fn the_claims_are_json_with_the_data_spliced_in_and_its_escapes_kept() {
        let signer = TokenSigner::new(KEY, 60);
        let handle = Handle::of_id("y");
        let tricky = map(serde_json::json!({
            "quote\"": "a \"b\" \\ c",
            "lines": "one\ntwo\tthree\u{1}",
            "unicode": "zoé \u{2028} 😀",
            "nested": {"empty": {}, "list": [null, true, -1.5e-7, 18446744073709551615u64]}
        }));
        let data = SessionData::from_map(&tricky);
        let token = signer.sign(&handle, true, u64::MAX, 1_700_000_000, &data);
        let payload = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap();
        let claims: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({
                "sid": handle.as_str(),
                "new": true,
                "ver": u64::MAX,
                "iat": 1_700_000_000u64,
                "exp": 1_700_000_060u64,
                "data": Value::Object(tricky.clone()),
            })
        );
        let expected_start = format!(r#"{{"sid":"{handle}","new":true,"ver":{},"#, u64::MAX);
        assert!(payload.starts_with(expected_start.as_bytes()));
        assert_eq!(signer.verify(&token).unwrap().data, tricky);
    }

    #[test]
    fn the_header_names_hs256_and_the_key_id() {
        let token = TokenSigner::new(KEY, 60).sign(
            &Handle::of_id("x"),
            true,
            0,
            1,
            &SessionData::default(),
        );
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": key_id(KEY)})
        );
        assert_eq!(key_id(KEY).len(), 8);
    }

    #[test]
    fn a_token_signed_with_another_key_or_altered_does_not_verify() {
        let token = TokenSigner::new(KEY, 60).sign(&Handle::of_id("x"), true, 0, 1, &data());
        let other = TokenSigner::new(&KEY.replace('k', "j"), 60);
        assert!(other.verify(&token).is_none());
        let altered = token.replacen('.', ".e", 1);
        assert!(TokenSigner::new(KEY, 60).verify(&altered).is_none());
    }
}
