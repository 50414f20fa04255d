//! Header surgery: removing client-sent session headers and taking the
//! session cookie out of `Cookie` on the request; telling the upstream who
//! the client is (`X-Forwarded-For`, `X-Forwarded-Proto`); removing the
//! upstream's `Set-Cookie` of the session cookie from the response.

use std::net::IpAddr;

use http::header::{HeaderName, COOKIE, SET_COOKIE};
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The headers in `[headers]`, which only the proxy may write.
#[derive(Debug, Clone)]
pub struct SessionHeaders {
    pub session: HeaderName,
    pub update: HeaderName,
    pub action: HeaderName,
}

impl SessionHeaders {
    /// True when `name` is one of ours as an app's server may read it
    /// ([`same_variable`]): `X_Session` or `X.Session` from a client would
    /// reach the app as if the proxy had sent it.
    fn reserves(&self, name: &HeaderName) -> bool {
        [&self.session, &self.update, &self.action]
            .into_iter()
            .any(|ours| same_variable(ours.as_str(), name.as_str()))
    }

    /// Removes every client-sent copy of the session headers, the other
    /// spellings of the forwarding headers (`X_Forwarded_For`), which
    /// would reach a CGI/WSGI app as the proxy's [`forward_client`], those
    /// of the framing headers (`Content_Length`), and `Proxy`.
    pub fn strip_from(&self, request: &mut RequestHeader) {
        remove_where(request, |name| {
            self.reserves(name) || is_other_spelling(name) || is_httpoxy(name)
        });
    }
}

/// Another spelling ([`same_variable`]) of a header the app must read only
/// as the proxy sends it: the forwarding headers, and the framing headers,
/// by which a server that reads `_` as `-` would frame a body the proxy
/// never sent (and take the next request on the connection, another
/// client's, for it).
fn is_other_spelling(name: &HeaderName) -> bool {
    const GUARDED: [HeaderName; 4] = [
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
    ];
    GUARDED
        .iter()
        .any(|ours| same_variable(ours.as_str(), name.as_str()) && ours != name)
}

/// `Proxy`, which no client has a reason to send: a CGI app's server
/// makes it `HTTP_PROXY`, which many HTTP libraries take for the proxy of
/// the app's own outgoing requests, one the client names ("httpoxy",
/// CVE-2016-5385 and its kin). nginx and Apache setups remove it too.
fn is_httpoxy(name: &HeaderName) -> bool {
    name.as_str() == "proxy"
}

/// Tells the upstream who the client is, on the request as it leaves:
///
/// - `X-Forwarded-For`: the peer's address, after the chain the peer sent
///   when it is one of `trusted_proxies`; from any other peer what it sent
///   is dropped, so an app reading the first entry reads no forgery;
/// - `X-Forwarded-Proto`: `https` on TLS listeners, which apps need to
///   build their URLs and to know a request came over TLS. On plain ones
///   a trusted peer's value stays (a TLS load balancer in front) and any
///   other's goes: no header is `http` to apps, and inserting one would
///   cost every request about 2 000 instructions (callgrind);
/// - the other headers by which proxies name the client
///   (`names_the_client`) stay from a trusted peer and go from any other.
pub fn forward_client(
    request: &mut RequestHeader,
    peer: Option<IpAddr>,
    peer_is_trusted: bool,
    tls: bool,
) -> pingora::Result<()> {
    if !peer_is_trusted {
        remove_where(request, |name| names_the_client(name.as_str()));
    }
    if let Some(peer) = peer {
        let mut chain = Vec::with_capacity(16);
        if peer_is_trusted {
            for value in values(&request.headers, &X_FORWARDED_FOR) {
                chain.extend_from_slice(value);
                chain.extend_from_slice(b", ");
            }
        }
        write_ip(&mut chain, peer);
        request.insert_header("X-Forwarded-For", chain)?;
    }
    let keep_proto = peer_is_trusted && request.headers.contains_key(X_FORWARDED_PROTO);
    if tls && !keep_proto {
        request.insert_header("X-Forwarded-Proto", HeaderValue::from_static("https"))?;
    }
    Ok(())
}

/// Whether a header is one by which a proxy in front names the client,
/// its address, host, port or scheme, in any spelling ([`same_variable`]):
/// `Forwarded` (RFC 7239), every `X-Forwarded-*`, `X-Real-IP`, and the
/// `Client-IP` family. Frameworks read them as a proxy's word: Rails builds
/// its URLs (password-reset links) on `X-Forwarded-Host`, Spring reads
/// `Forwarded`, legacy PHP reads `HTTP_CLIENT_IP` before anything else for
/// the client's address. From a client they are forgeries.
fn names_the_client(name: &str) -> bool {
    const FAMILIES: [&str; 2] = ["x-forwarded", "forwarded"];
    const ADDRESSES: [&str; 5] = [
        "x-real-ip",
        "client-ip",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
    ];
    let in_family = |family: &str| {
        name.get(..family.len())
            .is_some_and(|head| same_variable(family, head))
            && name
                .as_bytes()
                .get(family.len())
                .is_none_or(|after| !after.is_ascii_alphanumeric())
    };
    FAMILIES.into_iter().any(in_family)
        || ADDRESSES.into_iter().any(|ours| same_variable(ours, name))
}

/// Removes every header whose name `remove` picks; allocates only when
/// there is one.
fn remove_where(request: &mut RequestHeader, remove: impl Fn(&HeaderName) -> bool) {
    let picked: Vec<HeaderName> = request
        .headers
        .keys()
        .filter(|name| remove(name))
        .cloned()
        .collect();
    for name in picked {
        request.remove_header(&name);
    }
}

/// An IP address as text; IPv4, the common case, without `fmt`.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// Whether two header names are one variable to an app's server. Both
/// are lower case (http's `HeaderName` guarantees it). CGI and WSGI
/// servers read `_` as `-`, and lighttpd (CGI, FastCGI, SCGI) every
/// character but a letter or digit (`X.Session` is its `HTTP_X_SESSION`):
/// all of them are one here, on either side, so a configured `X_Session`
/// is spoofed by a client's `X-Session` as surely as the other way round.
fn same_variable(ours: &str, theirs: &str) -> bool {
    let dash = |b: u8| if b.is_ascii_alphanumeric() { b } else { b'-' };
    ours.len() == theirs.len()
        && ours
            .bytes()
            .zip(theirs.bytes())
            .all(|(a, b)| dash(a) == dash(b))
}

/// How many session-cookie candidates are checked at most: a request
/// stuffed with copies of the cookie must not buy more HMACs than this.
const MAX_CANDIDATES: usize = 4;

/// What [`take_cookie`] found of the session cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cookie<T> {
    /// Not in the request.
    Absent,
    /// There, but no value of it was accepted.
    Refused,
    /// What the first accepted value gave.
    Accepted(T),
}

/// Removes the cookie `name` from the request's `Cookie` headers (several
/// headers are one list; an empty header is dropped; a pair that holds it
/// after a comma is read as its comma-separated parts, `session_pairs`)
/// and offers its values to `accept`, in order, at most `MAX_CANDIDATES`
/// of them, until one is accepted. Leaves the headers untouched when the
/// cookie is absent.
///
/// The values are offered where they lie in the header, and the headers
/// are rewritten only when the cookie is there: a request without it
/// costs a scan and no allocation, one with it a single new header value.
pub fn take_cookie<T>(
    request: &mut RequestHeader,
    name: &str,
    mut accept: impl FnMut(&[u8]) -> Option<T>,
) -> Cookie<T> {
    let name = name.as_bytes();
    let mut found = Cookie::Absent;
    let mut offered = 0;
    // The length of the other cookies joined with "; ".
    let mut rest_len = 0;
    for header in request.headers.get_all(COOKIE) {
        for pair in session_pairs(header.as_bytes(), name) {
            let Some(value) = cookie_value(pair, name) else {
                rest_len += pair.len() + if rest_len > 0 { 2 } else { 0 };
                continue;
            };
            if let Cookie::Accepted(_) = found {
                continue;
            }
            found = Cookie::Refused;
            if offered < MAX_CANDIDATES {
                offered += 1;
                if let Some(accepted) = accept(value) {
                    found = Cookie::Accepted(accepted);
                }
            }
        }
    }
    if !matches!(found, Cookie::Absent) {
        remove_pairs(request, name, rest_len);
    }
    found
}

/// Removes the cookie `name` from the request, as [`take_cookie`] does,
/// without looking at its values (a bypassed path).
pub fn remove_cookie(request: &mut RequestHeader, name: &str) {
    take_cookie(request, name, |_| None::<()>);
}

/// Joins the pairs of the `Cookie` headers other than `name` into one
/// header (`rest_len` bytes long), or drops the header if none is left.
fn remove_pairs(request: &mut RequestHeader, name: &[u8], rest_len: usize) {
    if rest_len == 0 {
        request.remove_header(&COOKIE);
        return;
    }
    // Exactly as long as it will be: the header value takes it as it is.
    let mut rest = Vec::with_capacity(rest_len);
    for header in request.headers.get_all(COOKIE) {
        for pair in session_pairs(header.as_bytes(), name) {
            if cookie_value(pair, name).is_none() {
                if !rest.is_empty() {
                    rest.extend_from_slice(b"; ");
                }
                rest.extend_from_slice(pair);
            }
        }
    }
    // Replaces every `Cookie` header. The bytes came from valid header
    // values joined with "; ". The name as text: pingora keeps the case
    // of a static str as it is, but copies the name of a `HeaderName` it
    // has no title case for (`cookie` among them) on every insert.
    let _ = request.insert_header("Cookie", rest);
}

/// Joins several `Cookie` headers into one, their pairs separated by
/// `; ` (RFC 9113 8.2.3: an HTTP/2 client may send each cookie in a field
/// of its own, and an HTTP/1.1 server reads one `Cookie` header). Empty
/// fields add no empty pair, which Python's `SimpleCookie` stops reading
/// at; nothing left, no header. One header, or none, is left as it is.
pub fn join_cookies(request: &mut RequestHeader) {
    let mut all = request.headers.get_all(COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in request.headers.get_all(COOKIE) {
        for pair in pairs(value.as_bytes()) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(pair);
        }
    }
    if joined.is_empty() {
        request.remove_header(&COOKIE);
        return;
    }
    // Parts of valid header values joined with "; ": it cannot be refused.
    let _ = request.insert_header("Cookie", joined);
}

/// The `name=value` pairs of one `Cookie` header value, trimmed, empty ones skipped.
fn pairs(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    header
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// The pairs of one `Cookie` header value as the cookie `name` is looked
/// for in them: [`pairs`], except that a pair holding the cookie after a
/// comma (`a=1, name=…`) is read as its comma-separated parts. An
/// intermediary that merges repeated `Cookie` lines with `, ` (Apache
/// httpd does) writes such a pair, and app parsers that split cookies at
/// commas too (Python's `SimpleCookie`, Rack before 2.1.4) find the cookie
/// there: it must be found and removed there as well.
fn session_pairs<'a>(header: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    pairs(header).flat_map(move |pair| {
        let merged = pair.contains(&b',')
            && comma_parts(pair).any(|part| cookie_value(part, name).is_some());
        let (whole, parts) = match merged {
            true => (None, Some(pair)),
            false => (Some(pair), None),
        };
        whole
            .into_iter()
            .chain(parts.into_iter().flat_map(comma_parts))
    })
}

/// The comma-separated parts of a pair, trimmed, empty ones skipped.
fn comma_parts(pair: &[u8]) -> impl Iterator<Item = &[u8]> {
    pair.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|part| !part.is_empty())
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

/// Removes the upstream's `Set-Cookie`s of the cookie `name`, the session
/// cookie, which the proxy owns: an app that sets a cookie of that name
/// would replace the browser's session. `true` if there were any.
pub fn remove_set_cookie(response: &mut ResponseHeader, name: &str) -> bool {
    let sets_ours = |value: &HeaderValue| set_cookie_name(value.as_bytes()) == name.as_bytes();
    let set_cookies = || response.headers.get_all(SET_COOKIE).iter();
    if !set_cookies().any(sets_ours) {
        return false;
    }
    let others: Vec<HeaderValue> = set_cookies().filter(|v| !sets_ours(v)).cloned().collect();
    response.remove_header(&SET_COOKIE);
    for value in others {
        // Values it held a moment ago: they cannot be refused.
        let _ = response.append_header(SET_COOKIE, value);
    }
    true
}

/// The name of the cookie a `Set-Cookie` value sets (RFC 6265 5.2: up to
/// the first `=` of the first pair, trimmed).
fn set_cookie_name(value: &[u8]) -> &[u8] {
    let pair = value.split(|&b| b == b';').next().unwrap_or_default();
    pair.split(|&b| b == b'=')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// The values of header `name`, in order.
pub fn values<'a>(headers: &'a http::HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .map(|value| value.as_bytes())
        .collect()
}

/// The length a message's `Content-Length` headers declare, when they
/// declare it in any form but one plain number: `5, 5`, two `5` headers,
/// `005`. pingora accepts those (RFC 9110 8.6 lets identical values
/// collapse) and frames the body by the one length, but passes the header
/// on as it came; lenient HTTP parsers read such a header differently
/// (`int("5, 5")` fails, `strtol("010", 0)` is 8), and the body bytes they
/// leave unread are taken for the next request on the connection. `None`
/// for a plain length, no header, or one pingora would have refused.
pub fn length_to_rewrite(headers: &http::HeaderMap) -> Option<u64> {
    let mut all = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = all.next()?.as_bytes();
    let plain = |v: &[u8]| {
        !v.is_empty() && v.iter().all(u8::is_ascii_digit) && (v[0] != b'0' || v.len() == 1)
    };
    let mut rest = all.peekable();
    if rest.peek().is_none() && plain(first) {
        return None;
    }
    let mut length = None;
    for value in std::iter::once(first).chain(rest.map(|v| v.as_bytes())) {
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() || !token.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u64 = std::str::from_utf8(token).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unusual_content_lengths_are_rewritten() {
        let length = |values: &[&str]| {
            let mut map = http::HeaderMap::new();
            for v in values {
                map.append(http::header::CONTENT_LENGTH, v.parse().unwrap());
            }
            length_to_rewrite(&map)
        };
        assert_eq!(length(&[]), None);
        assert_eq!(length(&["5"]), None);
        assert_eq!(length(&["0"]), None);
        assert_eq!(length(&["5", "5"]), Some(5));
        assert_eq!(length(&["5, 5"]), Some(5));
        assert_eq!(length(&["005"]), Some(5));
        assert_eq!(length(&["00"]), Some(0));
        assert_eq!(length(&["5", "6"]), None, "pingora refuses it");
        assert_eq!(length(&["+5"]), None, "pingora refuses it");
    }

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
            ("X.Session~Update", "{}"),
            ("X.Forwarded.For", "6.6.6.6"),
            ("X-Forwarded-For", "kept"),
            ("X-Sessions", "kept"),
            ("Proxy", "http://203.0.113.7:3128"),
            ("Proxy-Authorization", "kept"),
            ("Accept", "*/*"),
        ]);
        names().strip_from(&mut request);
        let mut left: Vec<&str> = request.headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "accept",
                "proxy-authorization",
                "x-forwarded-for",
                "x-sessions"
            ]
        );
    }

    /// Takes the cookie, accepting none of its values; returns them all.
    fn offered(request: &mut RequestHeader, name: &str) -> Vec<Vec<u8>> {
        let mut offered = Vec::new();
        let found = take_cookie(request, name, |value| {
            offered.push(value.to_vec());
            None::<()>
        });
        assert_eq!(found == Cookie::Absent, offered.is_empty());
        offered
    }

    #[test]
    fn the_session_cookie_is_taken_and_the_others_stay() {
        let mut request = request(&[("Cookie", "a=1; session_id=abc; b=2"), ("Cookie", "c=3")]);
        assert_eq!(offered(&mut request, "session_id"), vec![b"abc".to_vec()]);
        assert_eq!(
            values(&request.headers, &COOKIE),
            vec![&b"a=1; b=2; c=3"[..]]
        );
    }

    #[test]
    fn cookie_headers_are_joined_into_one() {
        let mut request = request(&[("Cookie", "a=1"), ("Cookie", "b=2; c=3")]);
        join_cookies(&mut request);
        assert_eq!(
            values(&request.headers, &COOKIE),
            vec![&b"a=1; b=2; c=3"[..]]
        );
        let mut empties =
            super::tests::request(&[("Cookie", "a=1;"), ("Cookie", ""), ("Cookie", " ; b=2 ")]);
        join_cookies(&mut empties);
        assert_eq!(values(&empties.headers, &COOKIE), vec![&b"a=1; b=2"[..]]);
        let mut nothing = super::tests::request(&[("Cookie", ""), ("Cookie", " ;")]);
        join_cookies(&mut nothing);
        assert!(nothing.headers.get(COOKIE).is_none());
        let mut one = super::tests::request(&[("Cookie", "a=1")]);
        join_cookies(&mut one);
        assert_eq!(values(&one.headers, &COOKIE), vec![&b"a=1"[..]]);
    }

    #[test]
    fn a_cookie_header_left_empty_is_dropped() {
        let mut request = request(&[("Cookie", "session_id=abc")]);
        remove_cookie(&mut request, "session_id");
        assert!(request.headers.get(COOKIE).is_none());
    }

    #[test]
    fn cookie_headers_without_the_session_cookie_are_untouched() {
        let mut request = request(&[("Cookie", "a=1;b=2"), ("Cookie", "session_idx=3")]);
        assert!(offered(&mut request, "session_id").is_empty());
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
        let found = offered(&mut request, "session_id");
        assert_eq!(found.len(), MAX_CANDIDATES);
        assert_eq!(found[0], b"v0");
        assert!(request.headers.get(COOKIE).is_none());
    }

    #[test]
    fn values_are_offered_until_one_is_accepted_and_all_are_removed() {
        let mut request = request(&[
            ("Cookie", "session_id=bad; a=1"),
            ("Cookie", "session_id=good; session_id=later"),
        ]);
        let mut offered = Vec::new();
        let found = take_cookie(&mut request, "session_id", |value| {
            offered.push(value.to_vec());
            (value == b"good").then_some(7)
        });
        assert_eq!(found, Cookie::Accepted(7));
        assert_eq!(offered, [b"bad".to_vec(), b"good".to_vec()]);
        assert_eq!(values(&request.headers, &COOKIE), vec![&b"a=1"[..]]);
    }

    #[test]
    fn the_cookie_is_found_and_removed_after_a_comma() {
        let mut request = request(&[
            ("Cookie", "a=1, session_id=v1 ,c=3; x=p, q"),
            ("Cookie", "session_id=v2,b=2"),
        ]);
        assert_eq!(
            offered(&mut request, "session_id"),
            [b"v1".to_vec(), b"v2".to_vec()]
        );
        assert_eq!(
            values(&request.headers, &COOKIE),
            vec![&b"a=1; c=3; x=p, q; b=2"[..]]
        );
        let mut commas_only = super::tests::request(&[("Cookie", "x=p, q,r")]);
        assert!(offered(&mut commas_only, "session_id").is_empty());
        assert_eq!(
            values(&commas_only.headers, &COOKIE),
            vec![&b"x=p, q,r"[..]]
        );
    }

    #[test]
    fn a_cookie_whose_values_are_all_refused_is_removed_too() {
        let mut request = request(&[("Cookie", "x=1;session_id=forged ;y=2")]);
        assert_eq!(
            take_cookie(&mut request, "session_id", |_| None::<()>),
            Cookie::Refused
        );
        assert_eq!(values(&request.headers, &COOKIE), vec![&b"x=1; y=2"[..]]);
    }

    #[test]
    fn headers_naming_the_client_are_told_from_others() {
        let named = [
            "forwarded",
            "forwarded-for",
            "x-forwarded",
            "x-forwarded-host",
            "x_forwarded_port",
            "x.forwarded.server",
            "x-real-ip",
            "x_real_ip",
            "client-ip",
            "true-client-ip",
            "x-cluster-client-ip",
        ];
        for name in named {
            assert!(names_the_client(name), "{name}");
        }
        let others = [
            "forwardedx",
            "x-forwardedhost",
            "x-real-ipv6",
            "host",
            "x-forwarde",
            "ip",
        ];
        for name in others {
            assert!(!names_the_client(name), "{name}");
        }
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let addresses = [
            "0.0.0.0",
            "255.255.255.255",
            "10.2.30.4",
            "::1",
            "2001:db8::7",
        ];
        for text in addresses {
            let ip: IpAddr = text.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, text.as_bytes());
        }
    }
}
