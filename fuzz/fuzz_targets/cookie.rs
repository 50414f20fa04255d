//! Cookie parsing and verification: `Cookie` headers as a client may send
//! them, through `take_cookie`, and every candidate through
//! `CookieSigner::verify`.
//!
//! Input: Cookie header values separated by 0xFF bytes. The first byte
//! picks the cookie name; when it is odd, the input is also spliced into a
//! genuinely signed cookie value.
//!
//! Checked: nothing panics; at most 4 candidates; the session cookie is
//! gone from what goes upstream, after a comma too, and every other cookie
//! stays, in order; a value verifies only if it is exactly the genuine one.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::header::COOKIE;
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use session_proxy::proxy::headers::{take_cookie, values, Cookie};
use session_proxy::session::cookie::{CookieSigner, COOKIE_VALUE_LEN};

const KEYS: [&str; 2] = [
    "fuzz-key-new-0123456789abcdefghijklmnopqrstuvwxyz",
    "fuzz-key-old-0123456789abcdefghijklmnopqrstuvwxyz",
];
const NAMES: [&str; 4] = ["session_id", "s", "sid.v2", "__Host-session"];
/// A canonical id (its last character carries no stray bits).
const ID: &str = "Zm96LWlkLWZvci10aGUtY29va2llLXRhcmdldC0xMjM";

struct Fixture {
    signer: CookieSigner,
    /// `ID.TAG`, signed with the old key: it verifies through rotation.
    genuine: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEYS[1].as_bytes()).unwrap();
        mac.update(ID.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..16]);
        let genuine = format!("{ID}.{tag}").into_bytes();
        let keys: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
        let signer = CookieSigner::new(&keys);
        assert!(signer.verify(&genuine).is_some(), "the fixture must verify");
        Fixture { signer, genuine }
    })
}

/// The pairs of a Cookie header, split and trimmed as RFC 6265 reads them.
fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b';')
        .map(|pair| pair.trim_ascii())
        .filter(|pair| !pair.is_empty())
}

/// The pairs as the session cookie is looked for in them: one that holds
/// it after a comma is read as its comma-separated parts, trimmed.
fn session_pairs<'a>(value: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    pairs(value).flat_map(move |pair| {
        let parts: Vec<&[u8]> = comma_parts(pair).collect();
        match parts.iter().any(|part| is_named(part, name)) {
            true => parts,
            false => vec![pair],
        }
    })
}

fn comma_parts(pair: &[u8]) -> impl Iterator<Item = &[u8]> {
    pair.split(|&b| b == b',')
        .map(|part| part.trim_ascii())
        .filter(|part| !part.is_empty())
}

/// `name = value`, with optional blanks around `=` (as `take_cookie` reads it).
fn is_named(pair: &[u8], name: &str) -> bool {
    pair.strip_prefix(name.as_bytes())
        .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"="))
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let name = NAMES[usize::from(selector >> 1) % NAMES.len()];

    // Any bytes as a cookie value.
    check_verify(fixture, rest);
    // The genuine value with part of it overwritten.
    if selector & 1 == 1 && !rest.is_empty() {
        let mut spliced = fixture.genuine.clone();
        let at = usize::from(rest[0]) % COOKIE_VALUE_LEN;
        for (slot, byte) in spliced[at..].iter_mut().zip(&rest[1..]) {
            *slot = *byte;
        }
        check_verify(fixture, &spliced);
    }

    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    for value in rest.split(|&b| b == 0xff) {
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            request.append_header(COOKIE, value).unwrap();
        }
    }
    let before: Vec<Vec<u8>> = values(&request.headers, &COOKIE)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let present = before
        .iter()
        .any(|value| session_pairs(value, name).any(|pair| is_named(pair, name)));
    let others_before: Vec<&[u8]> = before
        .iter()
        .flat_map(|value| session_pairs(value, name))
        .filter(|pair| !is_named(pair, name))
        .collect();

    let mut candidates = Vec::new();
    let found = take_cookie(&mut request, name, |value| {
        candidates.push(value.to_vec());
        None::<()>
    });

    assert!(candidates.len() <= 4, "{} candidates", candidates.len());
    assert_eq!(present, !candidates.is_empty());
    assert_eq!(found == Cookie::Absent, !present);
    for candidate in &candidates {
        check_verify(fixture, candidate);
    }
    let after = values(&request.headers, &COOKIE);
    if present {
        assert!(after.len() <= 1, "one Cookie header at most is left");
    } else {
        assert_eq!(after.len(), before.len(), "untouched without the cookie");
    }
    for value in &after {
        // Rewritten only when the session cookie was there; then never empty.
        assert!(
            !present || !value.is_empty(),
            "an empty Cookie header was left"
        );
        assert!(
            !pairs(value)
                .flat_map(comma_parts)
                .any(|part| is_named(part, name)),
            "the session cookie went upstream"
        );
    }
    let others_after: Vec<&[u8]> = after.iter().flat_map(|value| pairs(value)).collect();
    assert_eq!(others_after, others_before, "other cookies changed");
});

fn check_verify(fixture: &Fixture, value: &[u8]) {
    let verified = fixture.signer.verify(value);
    assert_eq!(
        verified.is_some(),
        value == fixture.genuine.as_slice(),
        "verify({:?})",
        String::from_utf8_lossy(value)
    );
}
