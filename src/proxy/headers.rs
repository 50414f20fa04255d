//! Header surgery on the request: removing client-sent session headers and
//! taking the session cookie out of `Cookie`.

use http::header::{HeaderName, COOKIE};
use pingora::http::RequestHeader;

/// The headers in `[headers]`, which only the proxy may write.
#[derive(Debug, Clone)]
pub struct SessionHeaders {
    pub session: HeaderName,
    pub update: HeaderName,
    pub action: HeaderName,
}

impl SessionHeaders {
    /// True when `name` is one of ours once `_` is read as `-`: CGI and
    /// WSGI servers turn both into the same variable, so `X_Session` from a
    /// client would reach the app as if the proxy had sent it.
    fn reserves(&self, name: &HeaderName) -> bool {
        [&self.session, &self.update, &self.action]
            .into_iter()
            .any(|ours| same_name_modulo_underscore(ours.as_str(), name.as_str()))
    }

    /// Removes every client-sent copy of the session headers.
    pub fn strip_from(&self, request: &mut RequestHeader) {
        let spoofed: Vec<HeaderName> = request
            .headers
            .keys()
            .filter(|name| self.reserves(name))
            .cloned()
            .collect();
        for name in spoofed {
            request.remove_header(&name);
        }
    }
}

/// Both names are lower case (http's `HeaderName` guarantees it). `_` and
/// `-` are one character on either side: a configured `X_Session` is
/// spoofed by a client's `X-Session` as surely as the other way round.
fn same_name_modulo_underscore(ours: &str, theirs: &str) -> bool {
    let dash = |b: u8| if b == b'_' { b'-' } else { b };
    ours.len() == theirs.len()
        && ours
            .bytes()
            .zip(theirs.bytes())
            .all(|(a, b)| dash(a) == dash(b))
}

/// How many session-cookie candidates are checked at most: a request
/// stuffed with copies of the cookie must not buy more HMACs than this.
const MAX_CANDIDATES: usize = 4;

/// Removes the cookie `name` from the request's `Cookie` headers (several
/// headers are one list; an empty header is dropped) and returns its
/// values, at most [`MAX_CANDIDATES`] of them. Leaves the headers untouched
/// when the cookie is absent.
pub fn take_cookie(request: &mut RequestHeader, name: &str) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut others: Vec<&[u8]> = Vec::new();
    let mut present = false;
    for header in request.headers.get_all(COOKIE) {
        for pair in header.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            match cookie_value(pair, name.as_bytes()) {
                Some(value) => {
                    present = true;
                    if found.len() < MAX_CANDIDATES {
                        found.push(value.to_vec());
                    }
                }
                None => others.push(pair),
            }
        }
    }
    if !present {
        return found;
    }
    let rest = others.join(&b"; "[..]);
    request.remove_header(&COOKIE);
    if !rest.is_empty() {
        // The bytes came from valid header values joined with "; ".
        let _ = request.insert_header(COOKIE, rest);
    }
    found
}

fn cookie_value<'a>(pair: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = pair.strip_prefix(name)?;
    let value = rest.trim_ascii_start().strip_prefix(b"=")?;
    let value = value.trim_ascii();
    // RFC 6265 allows the value in double quotes.
    Some(
        value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value),
    )
}

/// The values of header `name`, in order.
pub fn values<'a>(headers: &'a http::HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .map(|value| value.as_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    fn names() -> SessionHeaders {
        SessionHeaders {
            session: HeaderName::from_static("x-session"),
            update: HeaderName::from_static("x-session-update"),
            action: HeaderName::from_static("x-session-action"),
        }
    }

    #[test]
    fn session_headers_are_stripped_in_any_spelling() {
        let mut request = request(&[
            ("X-Session", "forged"),
            ("x_session", "forged"),
            ("X-Session-Update", "{}"),
            ("X_SESSION_ACTION", "kill"),
            ("X-Sessions", "kept"),
            ("Accept", "*/*"),
        ]);
        names().strip_from(&mut request);
        let mut left: Vec<&str> = request.headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "x-sessions"]);
    }

    #[test]
    fn the_session_cookie_is_taken_and_the_others_stay() {
        let mut request = request(&[("Cookie", "a=1; session_id=abc; b=2"), ("Cookie", "c=3")]);
        assert_eq!(
            take_cookie(&mut request, "session_id"),
            vec![b"abc".to_vec()]
        );
        assert_eq!(
            values(&request.headers, &COOKIE),
            vec![&b"a=1; b=2; c=3"[..]]
        );
    }

    #[test]
    fn a_cookie_header_left_empty_is_dropped() {
        let mut request = request(&[("Cookie", "session_id=abc")]);
        take_cookie(&mut request, "session_id");
        assert!(request.headers.get(COOKIE).is_none());
    }

    #[test]
    fn cookie_headers_without_the_session_cookie_are_untouched() {
        let mut request = request(&[("Cookie", "a=1;b=2"), ("Cookie", "session_idx=3")]);
        assert!(take_cookie(&mut request, "session_id").is_empty());
        assert_eq!(
            values(&request.headers, &COOKIE),
            vec![&b"a=1;b=2"[..], &b"session_idx=3"[..]]
        );
    }

    #[test]
    fn candidates_are_bounded_and_quotes_removed() {
        let many = (0..10)
            .map(|i| format!("session_id=\"v{i}\""))
            .collect::<Vec<_>>()
            .join("; ");
        let mut request = request(&[("Cookie", &many)]);
        let found = take_cookie(&mut request, "session_id");
        assert_eq!(found.len(), MAX_CANDIDATES);
        assert_eq!(found[0], b"v0");
        assert!(request.headers.get(COOKIE).is_none());
    }
}
