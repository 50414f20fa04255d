//! `body_timeout` for HTTP/2: a request body that stops coming resets its
//! stream, and only its stream.
//!
//! pingora reads an HTTP/1.1 body with a timeout on each read; an HTTP/2
//! body it reads with none, and its stream API has no way to set one. A
//! stream whose body stops therefore held its upstream connection until
//! the app's `read_timeout`, and for ever once the app had answered
//! without reading it. So the connection's frames are followed both ways,
//! as the head clock follows them: for each stream whose body is under
//! way, since when the client has sent nothing on it while flow control
//! let it send (a window the proxy keeps shut, for an app that reads
//! slowly, is the proxy's doing and not timed). A stream silent for
//! `body_timeout` is reset both ways with `CANCEL`: h2 is handed an
//! RST_STREAM as if from the client, so that pingora's read of the body
//! fails, the request ends and its upstream connection, which got part of
//! a body, is closed; and the client is sent one, between h2's frames, so
//! that it knows. The other streams go on.
//!
//! Our frames go in only where the peer's parser expects a frame: between
//! the client's frames and outside a header block (else the head clock
//! runs, and ends the connection), and between h2's frames. A stream h2
//! has meanwhile closed takes no harm: h2 ignores an RST_STREAM for a
//! stream it knows as closed (RFC 9113 5.1), and so does the client for
//! one it has already seen reset. A client silent inside a DATA frame
//! leaves no such place, and stalls every stream of the connection: the
//! connection is closed then.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use log::debug;
use pingora::protocols::Stream;
use tokio::io::{AsyncWrite, ReadBuf};
use tokio::time::Instant;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const CANCEL: u32 = 0x8;
/// RFC 9113 6.9.2: both windows start here unless SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;

/// Streams followed at once: h2 refuses streams past
/// `SETTINGS_MAX_CONCURRENT_STREAMS`, and a client that opens more than
/// this many before the refusals reach it has the rest go untimed
/// (their upstream `read_timeout` still holds).
const MAX_FOLLOWED: usize = 4 * super::H2_MAX_STREAMS as usize;

/// A frame of the client's, as far as the body clocks need it: its head,
/// and each part of a DATA payload as it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFrame {
    Head {
        kind: u8,
        flags: u8,
        stream: u32,
        length: u32,
    },
    DataBytes {
        stream: u32,
        /// The frame's payload ends with these bytes.
        last: bool,
    },
}

/// A stream whose request body is under way.
#[derive(Debug)]
struct Body {
    stream: u32,
    /// The header block has ended: the body may come.
    begun: bool,
    /// The client's flow-control window on this stream.
    window: i64,
    /// A DATA frame of it is under way: the client may send the rest of
    /// it whatever the windows say (they counted it whole).
    in_frame: bool,
    /// That frame ends the body.
    ends_body: bool,
    /// Since when the client has sent nothing while it could; `None` while
    /// it cannot (its head still coming, or a window shut).
    since: Option<Instant>,
}

/// The request bodies of one HTTP/2 connection, and the frames of our
/// own that end the stalled ones.
#[derive(Debug)]
pub struct H2Bodies {
    timeout: Duration,
    bodies: Vec<Body>,
    /// The stream of the header block under way.
    block_stream: u32,
    /// The window each stream starts with (the server's
    /// SETTINGS_INITIAL_WINDOW_SIZE), and the connection's.
    initial_window: i64,
    connection_window: i64,
    /// The server's frames, as h2 writes them.
    sent: SentFrames,
    /// RST_STREAMs for h2, as if the client had sent them.
    to_codec: Vec<u8>,
    /// RST_STREAMs for the client, written between h2's frames.
    to_client: Vec<u8>,
    /// Part of `to_client` is written: the rest goes before h2's bytes.
    to_client_begun: bool,
}

impl H2Bodies {
    pub fn new(timeout: Duration) -> H2Bodies {
        H2Bodies {
            timeout,
            bodies: Vec::new(),
            block_stream: 0,
            initial_window: DEFAULT_WINDOW,
            connection_window: DEFAULT_WINDOW,
            sent: SentFrames::default(),
            to_codec: Vec::new(),
            to_client: Vec::new(),
            to_client_begun: false,
        }
    }

    /// A frame (or part of a DATA payload) the client sent.
    pub fn client_frame(&mut self, frame: ClientFrame, now: Instant) {
        match frame {
            ClientFrame::DataBytes { stream, last } => {
                let Some(body) = self.body(stream) else {
                    return;
                };
                body.since = Some(now);
                if last {
                    body.in_frame = false;
                    if body.ends_body {
                        self.forget(stream);
                    }
                    self.recheck(now);
                }
            }
            ClientFrame::Head {
                kind: DATA,
                flags,
                stream,
                length,
            } => {
                self.connection_window -= i64::from(length);
                let ends_body = flags & END_STREAM != 0;
                if ends_body && length == 0 {
                    self.forget(stream);
                } else if let Some(body) = self.body(stream) {
                    body.window -= i64::from(length);
                    body.since = Some(now);
                    body.in_frame = length > 0;
                    body.ends_body = ends_body;
                }
                self.recheck(now);
            }
            ClientFrame::Head {
                kind: HEADERS,
                flags,
                stream,
                ..
            } => {
                if self.body(stream).is_some() {
                    // Trailers: they end the stream.
                    if flags & END_STREAM != 0 {
                        self.forget(stream);
                    }
                } else if flags & END_STREAM == 0 && self.bodies.len() < MAX_FOLLOWED {
                    self.bodies.push(Body {
                        stream,
                        begun: false,
                        window: self.initial_window,
                        in_frame: false,
                        ends_body: false,
                        since: None,
                    });
                }
                self.block_stream = stream;
                if flags & END_HEADERS != 0 {
                    self.block_ended(now);
                }
            }
            ClientFrame::Head {
                kind: CONTINUATION,
                flags,
                ..
            } => {
                if flags & END_HEADERS != 0 {
                    self.block_ended(now);
                }
            }
            ClientFrame::Head {
                kind: RST_STREAM,
                stream,
                ..
            } => self.forget(stream),
            ClientFrame::Head { .. } => {}
        }
    }

    /// Bytes h2 wrote to the client.
    pub fn sent(&mut self, bytes: &[u8], now: Instant) {
        let H2Bodies { sent, .. } = self;
        let mut frames = Vec::new();
        sent.feed(bytes, |kind, flags, stream, payload| {
            if matches!(kind, RST_STREAM | WINDOW_UPDATE | SETTINGS) {
                frames.push((kind, flags, stream, payload.to_vec()));
            }
        });
        for (kind, flags, stream, payload) in frames {
            self.server_frame(kind, flags, stream, &payload, now);
        }
    }

    fn server_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8], now: Instant) {
        match kind {
            RST_STREAM => self.forget(stream),
            WINDOW_UPDATE => {
                let Some(increment) = payload.first_chunk::<4>() else {
                    return;
                };
                let increment = i64::from(u32::from_be_bytes(*increment) & 0x7fff_ffff);
                if stream == 0 {
                    self.connection_window += increment;
                } else if let Some(body) = self.body(stream) {
                    body.window += increment;
                }
                self.recheck(now);
            }
            SETTINGS if flags & ACK == 0 => {
                for setting in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    if id != SETTINGS_INITIAL_WINDOW_SIZE {
                        continue;
                    }
                    let value = i64::from(u32::from_be_bytes([
                        setting[2], setting[3], setting[4], setting[5],
                    ]));
                    let change = value - self.initial_window;
                    self.initial_window = value;
                    for body in &mut self.bodies {
                        body.window += change;
                    }
                }
                self.recheck(now);
            }
            _ => {}
        }
    }

    fn body(&mut self, stream: u32) -> Option<&mut Body> {
        self.bodies.iter_mut().find(|body| body.stream == stream)
    }

    fn forget(&mut self, stream: u32) {
        self.bodies.retain(|body| body.stream != stream);
    }

    fn block_ended(&mut self, now: Instant) {
        let stream = self.block_stream;
        if let Some(body) = self.body(stream) {
            body.begun = true;
        }
        self.recheck(now);
    }

    /// Each body's clock runs while the client may send on it, from when
    /// it could last send and did not.
    fn recheck(&mut self, now: Instant) {
        let connection_open = self.connection_window > 0;
        for body in &mut self.bodies {
            let may_send = body.begun && (body.in_frame || connection_open && body.window > 0);
            match (may_send, body.since) {
                (false, _) => body.since = None,
                (true, None) => body.since = Some(now),
                (true, Some(_)) => {}
            }
        }
    }

    /// When the first body falls silent for `body_timeout`.
    pub fn deadline(&self) -> Option<Instant> {
        self.bodies
            .iter()
            .filter_map(|body| body.since)
            .min()
            .map(|since| super::later(since, self.timeout))
    }

    /// Ends the bodies silent for `body_timeout` by now: their RST_STREAMs
    /// for h2 and for the client.
    pub fn reset_stalled(&mut self, now: Instant) {
        let timeout = self.timeout;
        let (stalled, going): (Vec<Body>, Vec<Body>) = std::mem::take(&mut self.bodies)
            .into_iter()
            .partition(|body| {
                body.since
                    .is_some_and(|since| super::later(since, timeout) <= now)
            });
        self.bodies = going;
        for body in stalled {
            debug!(
                "HTTP/2 stream {}: no request body for body_timeout ({timeout:?}); stream reset",
                body.stream
            );
            self.to_codec.extend_from_slice(&rst_stream(body.stream));
            self.to_client.extend_from_slice(&rst_stream(body.stream));
        }
    }

    /// Hands h2 the RST_STREAMs meant for it, as read bytes; false when
    /// there are none.
    pub fn read_own_frames(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        // An empty read would be the end of the connection to h2.
        if self.to_codec.is_empty() || buf.remaining() == 0 {
            return false;
        }
        let n = self.to_codec.len().min(buf.remaining());
        buf.put_slice(&self.to_codec[..n]);
        self.to_codec.drain(..n);
        true
    }

    /// Writes the RST_STREAMs meant for the client, if h2's frames are at
    /// a boundary (or ours are under way): ready once none is waiting.
    pub fn poll_write_own_frames(
        &mut self,
        mut inner: Pin<&mut Stream>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.to_client_begun && !self.sent.between_frames() {
            return Poll::Ready(Ok(()));
        }
        while !self.to_client.is_empty() {
            match inner.as_mut().poll_write(cx, &self.to_client) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.to_client.drain(..n);
                    self.to_client_begun = !self.to_client.is_empty();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    pub fn has_own_frames_for_client(&self) -> bool {
        !self.to_client.is_empty()
    }
}

fn rst_stream(stream: u32) -> [u8; 13] {
    let mut frame = [0u8; 13];
    frame[2] = 4;
    frame[3] = RST_STREAM;
    frame[5..9].copy_from_slice(&stream.to_be_bytes());
    frame[9..].copy_from_slice(&CANCEL.to_be_bytes());
    frame
}

/// Where h2's frames to the client begin and end, and the short payloads
/// of those the clocks read (SETTINGS, WINDOW_UPDATE, RST_STREAM).
#[derive(Debug, Default)]
struct SentFrames {
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    payload: Vec<u8>,
}

/// More than any SETTINGS frame h2 writes; a longer payload is not kept.
const MAX_KEPT_PAYLOAD: usize = 1024;

impl SentFrames {
    fn between_frames(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u8, u8, u32, &[u8])) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                if self.payload.len() + n <= MAX_KEPT_PAYLOAD {
                    self.payload.extend_from_slice(&bytes[..n]);
                }
                self.payload_left -= n;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.complete(&mut on_frame);
                }
                continue;
            }
            let n = (9 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 9 {
                let [l0, l1, l2, ..] = self.header;
                self.payload_left = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                self.payload.clear();
                if self.payload_left == 0 {
                    self.complete(&mut on_frame);
                }
            }
        }
    }

    fn complete(&mut self, on_frame: &mut impl FnMut(u8, u8, u32, &[u8])) {
        let [.., kind, flags, s0, s1, s2, s3] = self.header;
        let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
        self.header_len = 0;
        on_frame(kind, flags, stream, &self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(kind: u8, flags: u8, stream: u32, length: u32) -> ClientFrame {
        ClientFrame::Head {
            kind,
            flags,
            stream,
            length,
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn data_bytes(stream: u32, last: bool) -> ClientFrame {
        ClientFrame::DataBytes { stream, last }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_last_data_frame_ends_the_clock_only_once_it_has_all_come() {
        let start = Instant::now();
        let mut bodies = H2Bodies::new(SECOND);
        bodies.client_frame(head(HEADERS, END_HEADERS, 1, 10), start);
        bodies.client_frame(head(DATA, END_STREAM, 1, 10), start);
        bodies.client_frame(data_bytes(1, false), start);
        assert_eq!(bodies.deadline(), Some(start + SECOND), "half a frame");
        bodies.client_frame(data_bytes(1, true), start);
        assert_eq!(bodies.deadline(), None);
    }

    #[test]
    fn a_body_is_timed_from_its_head_and_from_each_data_frame() {
        let start = Instant::now();
        let mut bodies = H2Bodies::new(SECOND);
        bodies.client_frame(head(HEADERS, 0, 1, 10), start);
        assert_eq!(bodies.deadline(), None, "the header block is still coming");
        bodies.client_frame(head(CONTINUATION, END_HEADERS, 1, 10), start);
        assert_eq!(bodies.deadline(), Some(start + SECOND));
        let later = start + Duration::from_millis(500);
        bodies.client_frame(head(DATA, 0, 1, 100), later);
        assert_eq!(bodies.deadline(), Some(later + SECOND));
        bodies.client_frame(head(DATA, END_STREAM, 1, 0), later);
        assert_eq!(bodies.deadline(), None, "the body has ended");

        bodies.client_frame(head(HEADERS, END_STREAM | END_HEADERS, 3, 10), later);
        assert_eq!(bodies.deadline(), None, "no body at all");
    }

    #[test]
    fn a_shut_window_stops_the_clock_until_the_server_opens_it() {
        let start = Instant::now();
        let mut bodies = H2Bodies::new(SECOND);
        bodies.client_frame(head(HEADERS, END_HEADERS, 1, 10), start);
        bodies.client_frame(head(DATA, 0, 1, 65_535), start);
        assert_eq!(
            bodies.deadline(),
            Some(start + SECOND),
            "the frame is under way"
        );
        bodies.client_frame(data_bytes(1, true), start);
        assert_eq!(bodies.deadline(), None, "the client may not send");
        let later = start + Duration::from_secs(5);
        bodies.sent(&frame(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes()), later);
        assert_eq!(bodies.deadline(), None, "the connection's window is shut");
        bodies.sent(&frame(WINDOW_UPDATE, 0, 0, &100u32.to_be_bytes()), later);
        assert_eq!(bodies.deadline(), Some(later + SECOND));
    }

    #[test]
    fn a_stream_reset_by_either_side_is_no_longer_timed() {
        let start = Instant::now();
        let mut bodies = H2Bodies::new(SECOND);
        bodies.client_frame(head(HEADERS, END_HEADERS, 1, 10), start);
        bodies.client_frame(head(HEADERS, END_HEADERS, 3, 10), start);
        bodies.client_frame(head(RST_STREAM, 0, 1, 4), start);
        // h2 resets stream 3, in two writes.
        let reset = frame(RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
        bodies.sent(&reset[..5], start);
        assert!(!bodies.sent.between_frames());
        bodies.sent(&reset[5..], start);
        assert!(bodies.sent.between_frames());
        assert_eq!(bodies.deadline(), None);
    }

    #[test]
    fn a_stalled_body_is_reset_both_ways() {
        let start = Instant::now();
        let mut bodies = H2Bodies::new(SECOND);
        bodies.client_frame(head(HEADERS, END_HEADERS, 1, 10), start);
        bodies.client_frame(head(HEADERS, END_HEADERS, 3, 10), start + SECOND / 2);
        bodies.reset_stalled(start + SECOND);
        assert_eq!(bodies.to_codec, rst_stream(1));
        assert_eq!(bodies.to_client, rst_stream(1));
        assert_eq!(bodies.deadline(), Some(start + SECOND / 2 + SECOND));
    }
}
