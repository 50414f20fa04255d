//! What a client can make the proxy hold, bounded: time to send a request
//! head, time a connection may sit idle, and the size of a head.
//!
//! pingora times out each read of a request head (60 s), never the whole
//! head, so a client sending a byte every few seconds (slowloris) holds a
//! connection for as long as it likes; and once a connection has served an
//! HTTP/1.1 request it waits for the next one forever. Every client
//! connection is therefore a [`ClockedStream`], which knows which phase
//! the connection is in:
//!
//! - idle (before the first request and between requests): closed quietly
//!   after `keepalive_timeout`;
//! - reading a head (from its first byte): cut off after `header_timeout`,
//!   with a `408`;
//! - serving (from the end of the head to the end of the response): not
//!   timed here; each read of the request body has `body_timeout` and
//!   each write of the response to the client `send_timeout` (pingora's,
//!   set per request by [`head_received`]), the upstream its own.
//!
//! The proxy moves the phases along: [`head_received`] from
//! `early_request_filter`, [`await_next_request`] when pingora keeps the
//! connection for another request.
//!
//! pingora's own limits stay in force: a request head of at most 1 MiB and
//! 256 header lines, or `400`. [`MAX_HEAD_BYTES`] is ours, and smaller;
//! [`MAX_H2_HEADER_FIELDS`] brings the bound on lines to HTTP/2.
//!
//! HTTP/2 (TLS listeners, `[server] http2`) multiplexes requests on one
//! connection, so the phases are not the connection's: its bytes are
//! read by the h2 codec, whichever stream they belong to. There
//! [`ClockedStream`] follows the frames instead: a header block (HEADERS
//! and CONTINUATION frames up to END_HEADERS, or a frame's 9-byte header,
//! or the connection preface) begun and not finished within
//! `header_timeout` closes the connection (no `408`: the connection
//! speaks frames). Idle is pingora's: a connection with no stream open is
//! closed after `keepalive_timeout` ([`h2_server_options`]); before its
//! first byte, the stream's own idle clock. Each stream's response writes
//! have `send_timeout` (pingora's write timeout, which covers waiting for
//! the client's flow-control window), and every write of the connection
//! as on HTTP/1.1. pingora times no read of an HTTP/2 body, so
//! [`ClockedStream`] follows each stream's body in the frames too: one
//! that brings nothing for `body_timeout` while the client may send has
//! its stream reset (`h2_bodies`). The size bounds are the h2 codec's
//! ([`h2_options`]).

mod h2_bodies;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::http::RequestHeader;
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN, IO,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::access_log::{AccessLog, Entry, Request};
use crate::metrics::Metrics;
use h2_bodies::{ClientFrame, H2Bodies};

/// The most a request head may hold, counting the request line and, per
/// header, its name, its value and 4 bytes of `: ` and CRLF. Over it: 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Streams an HTTP/2 client may have open at once on one connection: each
/// is a request in flight, with an upstream connection of its own. RFC
/// 9113 recommends no fewer than 100; nginx allows 128.
pub const H2_MAX_STREAMS: u32 = 100;

/// What one HTTP/2 stream may hold of its response, written by the proxy
/// and not yet taken by the client (h2's default is 400 KiB): at most
/// [`H2_MAX_STREAMS`] times this per connection.
const H2_SEND_BUFFER: usize = 64 * 1024;

/// Streams a client may open and reset before the proxy has taken them,
/// held at once, before its connection is closed (`ENHANCE_YOUR_CALM`):
/// the rapid reset attack (CVE-2023-44487) opens and resets streams
/// faster than a server can serve them. h2's default, set here so that a
/// new h2 cannot change it unseen.
const H2_MAX_PENDING_RESETS: usize = 20;

/// Streams the h2 codec may reset for a client's protocol errors before
/// it closes the connection (`ENHANCE_YOUR_CALM`); h2's default.
const H2_MAX_ERROR_RESETS: usize = 1024;

/// The h2 codec's bounds for a client connection: [`H2_MAX_STREAMS`]; a
/// decoded header list of at most [`MAX_HEAD_BYTES`] (RFC 7541 counts 32
/// bytes per field where we count 4, so it is the tighter bound; over it,
/// h2 answers `431` itself, and a header block of more CONTINUATION
/// frames than that size takes closes the connection); the default
/// flow-control windows (64 KiB a stream and a connection: what a
/// client's request bodies may hold in the proxy); and its bounds on
/// streams reset in bulk.
pub fn h2_options() -> H2Options {
    let mut options = default_h2_options();
    options
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_send_buffer_size(H2_SEND_BUFFER)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(H2_MAX_ERROR_RESETS));
    options
}

/// pingora's server options for HTTP/2: a connection with no stream open
/// is closed after `keepalive_timeout`, as an idle HTTP/1.1 one is.
pub fn h2_server_options(timeouts: ClientTimeouts) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(timeouts.keepalive);
    options
}

/// The `[server]` timeouts that apply to every client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// From the first byte of a request head to its end.
    pub header: Duration,
    /// Idle, before the first request and between requests.
    pub keepalive: Duration,
    /// For the client to accept each write of a response (pingora's
    /// downstream write timeout, which it leaves unset): a client that
    /// stops reading would otherwise hold its connection, and the
    /// upstream's that the proxy stops reading, for ever.
    pub send: Duration,
    /// For a request body to bring its next byte, while the client may
    /// send one (nginx's `client_body_timeout`).
    pub body: Duration,
}

/// A pingora app whose client connections are [`ClockedStream`]s.
pub struct Clocked<A> {
    app: Arc<A>,
    timeouts: ClientTimeouts,
    refusals: Refusals,
}

/// Where the heads refused before the app sees them are accounted: the
/// `408` of a head too slow, and pingora's own answers (`400` for a head
/// it cannot parse, `405` for `CONNECT`). No hook of the proxy sees them.
#[derive(Clone, Default)]
struct Refusals {
    access_log: Option<Arc<AccessLog>>,
    /// `session_proxy_responses_total`, which counts every answer.
    metrics: Option<Arc<Metrics>>,
}

impl Refusals {
    fn wanted(&self) -> bool {
        self.access_log.is_some() || self.metrics.is_some()
    }
}

impl<A> Clocked<A> {
    pub fn new(app: A, timeouts: ClientTimeouts) -> Clocked<A> {
        Clocked {
            app: Arc::new(app),
            timeouts,
            refusals: Refusals::default(),
        }
    }

    /// Logs the heads refused before the app sees them.
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> Clocked<A> {
        self.refusals.access_log = Some(log);
        self
    }

    /// Counts the answers to heads refused before the app sees them in
    /// `metrics`' answers by class, as the proxy's hooks count the others.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Clocked<A> {
        self.refusals.metrics = Some(metrics);
        self
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Clocked<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let clocked: Stream = Box::new(ClockedStream::new(
            stream,
            self.timeouts,
            self.refusals.clone(),
        ));
        self.app.process_new(clocked, shutdown).await
    }

    /// pingora closes the connections that wait for their next request as
    /// soon as it stops accepting (SIGTERM, an upgrade's hand-over): a
    /// client whose next request is on its way gets a reset, which it
    /// may not retry. For `LAST_CALL` they stay open: each next request
    /// is served with `Connection: close`, so a client that keeps sending
    /// moves to a new connection (the new process's, after an upgrade),
    /// and only idle connections are left to close.
    async fn cleanup(&self) {
        tokio::time::sleep(LAST_CALL).await;
        self.app.cleanup().await
    }
}

/// How long a proxy that stops accepting keeps serving the next request
/// of each open client connection (see `Clocked::cleanup`).
pub const LAST_CALL: Duration = Duration::from_millis(500);

/// The request head has been read: stop its clock, and time the writes of
/// the response instead (from `early_request_filter`, and the admin
/// listener's handler).
pub fn head_received(session: &mut ServerSession) {
    let Some(stream) = clocked(session) else {
        return;
    };
    stream.set_phase(Phase::Serving);
    let ClientTimeouts { send, body, .. } = stream.timeouts;
    session.set_write_timeout(Some(send));
    // pingora's timeout on each read of an HTTP/1.1 body (60 s unset);
    // HTTP/2 bodies are timed by the connection ([`ClockedStream`]).
    session.set_read_timeout(Some(body));
}

/// The connection will wait for another request: start the idle clock.
pub fn await_next_request(session: &ServerSession) {
    if let Some(stream) = clocked(session) {
        stream.set_phase(Phase::Idle(Instant::now()));
    }
}

fn clocked(session: &ServerSession) -> Option<&ClockedStream> {
    let stream: &dyn IO = &**session.stream()?;
    stream.as_any().downcast_ref::<ClockedStream>()
}

/// Header fields an HTTP/2 request may carry, its `cookie` fields aside:
/// pingora's bound on an HTTP/1 head's lines, which its HTTP/2 side does
/// not have (there only [`MAX_HEAD_BYTES`] bounds a header list, about
/// 1 700 empty fields). `cookie` fields do not count: RFC 9113 8.2.3 lets
/// a client send one per cookie, and the app gets them joined.
pub const MAX_H2_HEADER_FIELDS: usize = 256;

/// The fields of an HTTP/2 request as [`MAX_H2_HEADER_FIELDS`] counts them.
pub fn h2_header_fields(request: &RequestHeader) -> usize {
    let cookies = request.headers.get_all(http::header::COOKIE).iter().count();
    request.headers.len() - cookies
}

/// The size of a request head as [`MAX_HEAD_BYTES`] counts it.
pub fn head_bytes(request: &RequestHeader) -> usize {
    let line = request.method.as_str().len() + request.raw_path().len() + " HTTP/1.1\r\n".len() + 1;
    request.headers.iter().fold(line, |total, (name, value)| {
        total + name.as_str().len() + value.len() + 4
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request since then.
    Idle(Instant),
    /// The first byte of a head arrived then.
    Head(Instant),
    Serving,
}

/// A client connection that closes itself when a phase lasts too long,
/// or when the client accepts nothing for `send_timeout`.
pub struct ClockedStream {
    inner: Stream,
    timeouts: ClientTimeouts,
    /// On an HTTP/2 connection, where its frames are.
    h2: Option<H2Frames>,
    /// On an HTTP/2 connection, the clocks of its request bodies.
    bodies: Option<H2Bodies>,
    /// Set from the proxy's phases through a shared reference.
    phase: Mutex<Phase>,
    /// Wakes a read that waits past the deadline.
    timer: Option<Pin<Box<Sleep>>>,
    /// Since when a write, flush or shutdown has been waiting for the
    /// client to take something.
    send_blocked: Option<Instant>,
    /// Wakes a write, flush or shutdown that waits past `send_timeout`.
    send_timer: Option<Pin<Box<Sleep>>>,
    /// Where a head refused before it is parsed is accounted; with an
    /// access log, the first line of the head being read, for its line;
    /// and whether that refusal is accounted already.
    refusals: Refusals,
    head_line: Vec<u8>,
    refusal_accounted: bool,
}

/// `limit` after `since`; a limit too large to add is no limit in practice.
fn later(since: Instant, limit: Duration) -> Instant {
    since
        .checked_add(limit)
        .or_else(|| since.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(since)
}

/// What a client too slow with its head gets before the connection closes.
const TIMEOUT_ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 24\r\nConnection: close\r\n\r\nrequest header too slow\n";
const TIMEOUT_BODY_BYTES: usize = 24;
/// How much of a head's first line is kept for the access log; the log
/// cuts it to its field length anyway.
const HEAD_LINE_KEPT: usize = crate::access_log::MAX_FIELD_BYTES + 2;

impl ClockedStream {
    fn new(inner: Stream, timeouts: ClientTimeouts, refusals: Refusals) -> ClockedStream {
        let h2 = (inner.selected_alpn_proto() == Some(ALPN::H2)).then(H2Frames::new);
        let bodies = h2.as_ref().map(|_| H2Bodies::new(timeouts.body));
        ClockedStream {
            inner,
            timeouts,
            h2,
            bodies,
            phase: Mutex::new(Phase::Idle(Instant::now())),
            timer: None,
            send_blocked: None,
            send_timer: None,
            refusals,
            head_line: Vec::new(),
            refusal_accounted: false,
        }
    }

    /// Keeps the first line of an HTTP/1 head as it comes in.
    #[inline(never)]
    fn keep_head_line(&mut self, read: &[u8], head_begins: bool) {
        if head_begins {
            self.head_line.clear();
        }
        if self.head_line.last() == Some(&b'\n') {
            return;
        }
        let room = HEAD_LINE_KEPT.saturating_sub(self.head_line.len());
        let line = match read.iter().position(|&b| b == b'\n') {
            Some(end) => &read[..=end],
            None => read,
        };
        self.head_line
            .extend_from_slice(&line[..line.len().min(room)]);
    }

    /// Counts and logs a response written while a head is being read: one
    /// the proxy never saw a request for (pingora's `400` or `405`, our
    /// `408`). Every write of a response comes here: the head of an
    /// ordinary answer goes no further than its status.
    #[inline(never)]
    fn account_refusal(&mut self, written: &[u8], body_bytes: usize) {
        let status = match written {
            [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', code @ ..] => code
                .get(..3)
                .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok()),
            _ => None,
        };
        let Some(status) =
            status.filter(|&status| status >= 400 && !self.refusal_accounted && self.h2.is_none())
        else {
            return;
        };
        let Phase::Head(since) = self.phase() else {
            return;
        };
        self.refusal_accounted = true;
        if let Some(metrics) = &self.refusals.metrics {
            metrics.responded(status);
        }
        let Some(log) = &self.refusals.access_log else {
            return;
        };
        let client = self.inner.get_socket_digest().and_then(|digest| {
            digest
                .peer_addr()?
                .as_inet()
                .map(|addr| addr.ip().to_canonical())
        });
        log.record(&Entry {
            client,
            request: Request::Raw(&self.head_line),
            status,
            body_bytes,
            elapsed: since.elapsed(),
            session: None,
            path: "-",
        });
    }

    /// The outcome of a write, flush or shutdown of the client connection,
    /// bounded by `send_timeout`. pingora times each write of a response
    /// body (`head_received`), but neither the write of a head, nor a
    /// flush, nor the shutdown after `Connection: close`. On plain TCP those
    /// hardly ever wait; on TLS every response ends in a flush of what
    /// rustls holds (up to 64 KiB) and a `close_notify`, which wait for a
    /// client that stopped reading for ever.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.send_blocked = None;
            return outcome;
        }
        let now = Instant::now();
        let since = *self.send_blocked.get_or_insert(now);
        let deadline = later(since, self.timeouts.send);
        let timer = self
            .send_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if now < deadline && timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.send_blocked = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took nothing for send_timeout",
        )))
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
    }

    /// When the current phase ends, and whether a head was under way.
    fn deadline(&self) -> Option<(Instant, bool)> {
        match self.phase() {
            Phase::Idle(since) => Some((later(since, self.timeouts.keepalive), false)),
            Phase::Head(since) => Some((later(since, self.timeouts.header), true)),
            Phase::Serving => None,
        }
    }

    /// Ends the connection from a read: quietly when idle, with a 408 (as
    /// far as it can be written without waiting) during a head.
    fn expire(&mut self, in_head: bool, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.timer = None;
        if !in_head {
            return Poll::Ready(Ok(())); // end of stream: pingora closes
        }
        if self.h2.is_some() {
            // A 408 in HTTP/1.1 would be garbage to an h2 client.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP/2 header block not complete within header_timeout",
            )));
        }
        if self.refusals.wanted() {
            self.account_refusal(TIMEOUT_ANSWER, TIMEOUT_BODY_BYTES);
        }
        let inner = Pin::new(&mut self.inner);
        if let Poll::Ready(Ok(n)) = inner.poll_write(cx, TIMEOUT_ANSWER) {
            if n == TIMEOUT_ANSWER.len() {
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
            }
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head not complete within header_timeout",
        )))
    }
}

impl AsyncRead for ClockedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.h2.is_some() {
            return this.poll_read_frames(cx, buf);
        }
        let Some((deadline, in_head)) = this.deadline() else {
            // The timer stays armed while the request is served (should it
            // fire meanwhile, it wakes the connection's task once, for
            // nothing). Dropped here and armed again after each response,
            // it made tokio's time driver wake its own thread through its
            // eventfd on every request: the driver had parked with no timer
            // left, and any new one came too early for it.
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if Instant::now() >= deadline {
            return this.expire(in_head, cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let head_begins = !in_head && buf.filled().len() > before;
                if head_begins {
                    this.set_phase(Phase::Head(Instant::now()));
                    this.refusal_accounted = false;
                }
                if this.refusals.access_log.is_some() {
                    this.keep_head_line(&buf.filled()[before..], head_begins);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        this.wait_until(deadline, in_head, cx)
    }
}

impl ClockedStream {
    /// A read that found nothing: pending until `deadline`, then expired.
    fn wait_until(
        &mut self,
        deadline: Instant,
        in_head: bool,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => self.expire(in_head, cx),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A read of an HTTP/2 connection: the head clock runs while a header
    /// block is under way, whichever stream it opens, and stops when it
    /// ends; the connection is idle (pingora's clock) otherwise. Each
    /// request body has its own clock (`h2_bodies`): one silent for
    /// `body_timeout` is reset, and h2 reads the client's RST_STREAM for it
    /// here.
    fn poll_read_frames(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let now = Instant::now();
            let clock = self.deadline();
            if let Some((deadline, in_head)) = clock {
                if now >= deadline {
                    return self.expire(in_head, cx);
                }
            }
            let body_clock = match self.reset_stalled_bodies(now, cx) {
                Ok(body_clock) => body_clock,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if let Some(bodies) = self.bodies.as_mut() {
                if bodies.read_own_frames(buf) {
                    return Poll::Ready(Ok(()));
                }
            }
            let before = buf.filled().len();
            match Pin::new(&mut self.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    self.read_frames(before, buf);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            let wake = match (clock.map(|(deadline, _)| deadline), body_clock) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(wake) => wake,
                    None => return Poll::Pending,
                },
            };
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake)));
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A clock ran out: the next turn ends what it timed.
        }
    }

    /// Follows the client's frames just read, for the head and body clocks.
    fn read_frames(&mut self, before: usize, buf: &ReadBuf<'_>) {
        let Some(frames) = self.h2.as_mut() else {
            return;
        };
        let now = Instant::now();
        let bodies = &mut self.bodies;
        frames.read_with(&buf.filled()[before..], |frame| {
            if let Some(bodies) = bodies.as_mut() {
                bodies.client_frame(frame, now);
            }
        });
        let in_head = frames.in_head();
        match self.phase() {
            Phase::Head(_) if in_head => {}
            _ if in_head => self.set_phase(Phase::Head(now)),
            Phase::Serving => {}
            _ => self.set_phase(Phase::Serving),
        }
    }

    /// Resets the streams whose bodies have been silent for
    /// `body_timeout`, and tries to tell the client at once; when the
    /// next body falls silent (`None` while a head is under way: the head
    /// clock runs then, and no frame of ours can go in). A client silent
    /// inside a DATA frame stalls every stream of the connection: it is
    /// closed.
    fn reset_stalled_bodies(
        &mut self,
        now: Instant,
        cx: &mut Context<'_>,
    ) -> io::Result<Option<Instant>> {
        let (Some(frames), Some(bodies)) = (self.h2.as_ref(), self.bodies.as_mut()) else {
            return Ok(None);
        };
        if frames.in_head() {
            return Ok(None);
        }
        let Some(deadline) = bodies.deadline() else {
            return Ok(None);
        };
        if deadline > now {
            return Ok(Some(deadline));
        }
        if !frames.between_frames() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP/2 DATA frame not finished within body_timeout",
            ));
        }
        bodies.reset_stalled(now);
        // Said at once if h2 is between frames; else when it next writes.
        if bodies
            .poll_write_own_frames(Pin::new(&mut self.inner), cx)
            .is_ready()
        {
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
        Ok(bodies.deadline())
    }

    /// Writes our frames for the client (`h2_bodies`) before h2's next
    /// bytes, where h2's frames are at a boundary.
    fn poll_own_frames(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.bodies.as_mut() {
            Some(bodies) if bodies.has_own_frames_for_client() => {
                bodies.poll_write_own_frames(Pin::new(&mut self.inner), cx)
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Follows what h2 wrote, for the body clocks.
    fn wrote(&mut self, written: &[u8]) {
        if let Some(bodies) = self.bodies.as_mut() {
            bodies.sent(written, Instant::now());
        }
    }
}

/// Where the client's side of an HTTP/2 connection is in its frames
/// (RFC 9113 4.1), as far as the head clock needs: whether a header
/// block, or the 9-byte header of any frame, or the preface, has begun
/// and not ended; and each frame's head, and the parts of DATA payloads,
/// for the body clocks. Bodies (DATA frames) are not heads.
#[derive(Debug)]
struct H2Frames {
    /// Bytes of the 24-byte connection preface still to come.
    preface_left: usize,
    /// The frame header being read, and how much of it has come.
    header: [u8; 9],
    header_len: usize,
    /// Bytes of the current frame's payload still to come.
    payload_left: usize,
    /// Whether that payload is a header block fragment.
    payload_is_head: bool,
    /// The stream of that payload, if it is DATA.
    payload_of_data: Option<u32>,
    /// A HEADERS or PUSH_PROMISE frame came without END_HEADERS: its
    /// CONTINUATION frames are still to come.
    block_open: bool,
}

impl H2Frames {
    const PREFACE: usize = 24;

    fn new() -> H2Frames {
        H2Frames {
            preface_left: H2Frames::PREFACE,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            payload_is_head: false,
            payload_of_data: None,
            block_open: false,
        }
    }

    #[cfg(test)]
    fn read(&mut self, bytes: &[u8]) {
        self.read_with(bytes, |_| {});
    }

    fn read_with(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(ClientFrame)) {
        while !bytes.is_empty() {
            let taken = if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                n
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                if let Some(stream) = self.payload_of_data {
                    let last = self.payload_left == 0;
                    on_frame(ClientFrame::DataBytes { stream, last });
                }
                n
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                if self.header_len == 9 {
                    on_frame(self.frame_begins());
                }
                n
            };
            bytes = &bytes[taken..];
        }
    }

    fn frame_begins(&mut self) -> ClientFrame {
        const DATA: u8 = 0x0;
        const HEADERS: u8 = 0x1;
        const PUSH_PROMISE: u8 = 0x5;
        const CONTINUATION: u8 = 0x9;
        const END_HEADERS: u8 = 0x4;
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = self.header;
        let length = u32::from_be_bytes([0, l0, l1, l2]);
        let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
        self.header_len = 0;
        self.payload_left = length as usize;
        self.payload_is_head = matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION);
        self.payload_of_data = (kind == DATA).then_some(stream);
        if self.payload_is_head {
            self.block_open = flags & END_HEADERS == 0;
        }
        ClientFrame::Head {
            kind,
            flags,
            stream,
            length,
        }
    }

    /// Whether the client has sent whole frames, and no header block is
    /// open: a frame of ours may go in.
    fn between_frames(&self) -> bool {
        self.preface_left == 0 && self.header_len == 0 && self.payload_left == 0 && !self.block_open
    }

    fn in_head(&self) -> bool {
        (self.preface_left > 0 && self.preface_left < H2Frames::PREFACE)
            || self.header_len > 0
            || (self.payload_left > 0 && self.payload_is_head)
            || self.block_open
    }
}

impl AsyncWrite for ClockedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.refusals.wanted() {
            this.account_refusal(buf, 0);
        }
        match this.poll_own_frames(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return this.bounded(cx, Poll::Ready(Err(e))),
            Poll::Pending => return this.bounded(cx, Poll::Pending),
        }
        let outcome = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = outcome {
            this.wrote(&buf[..n]);
        }
        this.bounded(cx, outcome)
    }

    /// Our frames for the client go first: h2 flushes after its frames.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_own_frames(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return this.bounded(cx, Poll::Ready(Err(e))),
            Poll::Pending => return this.bounded(cx, Poll::Pending),
        }
        let outcome = Pin::new(&mut this.inner).poll_flush(cx);
        this.bounded(cx, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.bounded(cx, outcome)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let (true, Some(first)) = (this.refusals.wanted(), bufs.first()) {
            this.account_refusal(first, 0);
        }
        match this.poll_own_frames(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return this.bounded(cx, Poll::Ready(Err(e))),
            Poll::Pending => return this.bounded(cx, Poll::Pending),
        }
        let outcome = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = outcome {
            for buf in bufs {
                let part = &buf[..n.min(buf.len())];
                this.wrote(part);
                n -= part.len();
                if n == 0 {
                    break;
                }
            }
        }
        this.bounded(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// The rest of pingora's IO interface, passed through.

#[async_trait]
impl Shutdown for ClockedStream {
    /// As `poll_shutdown`: at most `send_timeout` for a client that takes
    /// nothing (TLS's `close_notify` waits for it).
    async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.timeouts.send, self.inner.shutdown()).await;
    }
}

impl UniqueID for ClockedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClockedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClockedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClockedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClockedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for ClockedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl std::fmt::Debug for ClockedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClockedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::H2Frames;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let length = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 1];
        frame.extend_from_slice(payload);
        frame
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn a_header_block_is_a_head_until_its_end_headers() {
        let mut frames = H2Frames::new();
        assert!(!frames.in_head(), "nothing came yet");
        frames.read(&PREFACE[..10]);
        assert!(frames.in_head(), "part of the preface");
        frames.read(&PREFACE[10..]);
        frames.read(&frame(0x4, 0, &[0; 6])); // SETTINGS
        assert!(!frames.in_head());

        let headers = frame(0x1, 0, b"abcdef"); // HEADERS, no END_HEADERS
        frames.read(&headers[..4]);
        assert!(frames.in_head(), "part of a frame header");
        frames.read(&headers[4..11]);
        assert!(frames.in_head(), "part of a header block");
        frames.read(&headers[11..]);
        assert!(frames.in_head(), "CONTINUATION still to come");
        frames.read(&frame(0x9, 0x4, b"gh")); // CONTINUATION, END_HEADERS
        assert!(!frames.in_head());
    }

    #[test]
    fn a_body_is_no_head() {
        let mut frames = H2Frames::new();
        frames.read(PREFACE);
        frames.read(&frame(0x1, 0x4, b"abc")); // HEADERS, END_HEADERS
        assert!(!frames.in_head());
        let data = frame(0x0, 0x1, &[7; 100]); // DATA
        frames.read(&data[..50]);
        assert!(!frames.in_head(), "half a DATA frame");
        frames.read(&data[50..]);
        let all_at_once = [frame(0x1, 0x4, b"x"), frame(0x0, 0x1, b"y")].concat();
        frames.read(&all_at_once);
        assert!(!frames.in_head());
    }
}
