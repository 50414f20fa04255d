//! The access log: one line per request, nginx's "combined" format
//! followed by what the proxy knows (`[server] access_log`).
//!
//! ```text
//! 127.0.0.1 - - [28/Nov/2026:06:00:00 +0000] "GET /count HTTP/1.1" 200 12 "-" "curl/8.0" rt=0.002 session=3fa9c2e1 path=session
//! ```
//!
//! The request path never waits for the disk: it formats its line and
//! hands it to a writer thread over a bounded channel. When the channel
//! is full the line is dropped and counted
//! (`session_proxy_access_log_dropped_total`, and a WARN at most every
//! `WARN_EVERY`). The writer buffers, flushes at least every second and
//! when asked ([`AccessLog::flush`], at shutdown), and reopens the file
//! on SIGUSR1 ([`AccessLog::reopen`]), for logrotate. While writes fail
//! (a full disk), what its buffer holds waits there, to be written whole
//! once they succeed again; a line that finds no room in it is dropped and
//! counted as well, and so is what the buffer holds when SIGUSR1 leaves
//! the old file.
//!
//! What the client sent (method, target, Referer, User-Agent) is escaped
//! as nginx escapes it: `"`, `\` and every byte outside printable ASCII
//! become `\xHH`, so no client can end a field or a line. Each is cut
//! at [`MAX_FIELD_BYTES`], and then ends with `...`.
//!
//! ```no_run
//! # use session_proxy::access_log::{AccessLog, Destination};
//! # let metrics = session_proxy::metrics::Metrics::new();
//! let log = AccessLog::start(&Destination::Stdout, metrics.access_log_dropped.clone())?;
//! # Ok::<(), String>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use pingora::http::RequestHeader;
use prometheus::IntCounter;

use crate::throttle::Throttle;

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `access_log = "-"`.
    Stdout,
    /// Opened for append, created with mode 0640 if missing.
    File(PathBuf),
}

/// The most bytes of one client-sent field that are logged.
pub const MAX_FIELD_BYTES: usize = 2048;
/// Lines waiting for the writer; past this, lines are dropped. At a few
/// hundred bytes each, about 4 MiB at most.
const QUEUE_LINES: usize = 16 * 1024;
/// The writer's buffer.
const BUFFER_BYTES: usize = 64 * 1024;
/// The writer flushes at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The writer takes the queued lines this often. A writer that waited on
/// the queue would be woken by every line (a futex call and a switch of
/// threads, on the core the request runs on): measured both at once
/// (`benches/ab.sh`), that made a logged `/read/x` cost 1.56 times the
/// CPU of one not logged; taking the lines in batches, 1.03 times.
/// [`QUEUE_LINES`] in this time is 800 000 lines a second.
const TAKE_EVERY: Duration = Duration::from_millis(20);
/// A WARN about dropped lines or write errors comes at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a flush at shutdown waits for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Opens a log file as the access log does: append, created 0640.
/// Without waiting: a FIFO no process reads is `ENXIO` at once, where a
/// plain open would wait for a reader; what is opened then blocks as
/// usual (the writer thread waits on a slow reader, not the requests).
pub fn open_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns; reads and sets its flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

enum Message {
    Line(Vec<u8>),
    /// Flush, then say so.
    Flush(mpsc::Sender<()>),
}

/// The request of a line.
pub enum Request<'a> {
    /// A head that was read whole.
    Parsed(&'a RequestHeader),
    /// The first line of a head refused before it was read whole (pingora's
    /// `400`, the `408` of a head too slow), as far as it came.
    Raw(&'a [u8]),
}

/// The request path's end of the access log.
pub struct AccessLog {
    lines: SyncSender<Message>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
    /// When the next WARN about dropped lines may come.
    drop_warnings: Throttle,
}

/// What one finished request tells the access log.
pub struct Entry<'a> {
    /// As the proxy decided it (`trusted_proxies`); `None`: not an IP peer.
    pub client: Option<IpAddr>,
    pub request: Request<'a>,
    /// Sent to the client; 499 when it hung up before an answer.
    pub status: u16,
    pub body_bytes: usize,
    pub elapsed: Duration,
    /// The first hex digits of the session's handle.
    pub session: Option<&'a str>,
    /// `session`, `bypass`, or `-` for a request refused before either.
    pub path: &'static str,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(destination: &Destination, dropped: IntCounter) -> Result<AccessLog, String> {
        let sink = Sink::open(destination).map_err(|e| match destination {
            Destination::File(path) => format!(
                "server.access_log: cannot open {} for append: {e}",
                path.display()
            ),
            Destination::Stdout => format!("server.access_log: standard output: {e}"),
        })?;
        let (log, queue) = AccessLog::queued(QUEUE_LINES, dropped);
        let writer = Writer {
            out: BufWriter::with_capacity(BUFFER_BYTES, sink),
            destination: destination.clone(),
            reopen: log.reopen.clone(),
            dropped: log.dropped.clone(),
            last_error_warning: None,
        };
        std::thread::Builder::new()
            .name("access-log".to_string())
            .spawn(move || writer.run(queue))
            .map_err(|e| format!("cannot start the access log's writer: {e}"))?;
        Ok(log)
    }

    /// The request path's end, and the writer's, of a queue of `lines`.
    fn queued(lines: usize, dropped: IntCounter) -> (AccessLog, Receiver<Message>) {
        let (sender, queue) = mpsc::sync_channel(lines);
        let log = AccessLog {
            lines: sender,
            reopen: Arc::new(AtomicBool::new(false)),
            dropped,
            drop_warnings: Throttle::new(WARN_EVERY),
        };
        (log, queue)
    }

    /// Queues the line of a finished request; never waits.
    pub fn record(&self, entry: &Entry) {
        let line = format_line(entry, SystemTime::now());
        match self.lines.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.count_dropped(),
            // The writer is gone (it never panics; only at exit).
            Err(TrySendError::Disconnected(_)) => self.count_dropped(),
        }
    }

    fn count_dropped(&self) {
        self.dropped.inc();
        if self.drop_warnings.due() {
            warn!(
                "access log: the writer cannot keep up, lines dropped ({} so far, session_proxy_access_log_dropped_total)",
                self.dropped.get()
            );
        }
    }

    /// Reopens the file (SIGUSR1, after logrotate moved it away).
    pub fn reopen(&self) {
        // The writer looks at it each time it takes the queued lines.
        self.reopen.store(true, Ordering::Release);
    }

    /// Writes out every line queued so far; waits at most `FLUSH_WAIT`
    /// (a writer stuck on a pipe nobody reads must not keep the process
    /// from exiting). Blocking: for shutdown, not for the request path.
    pub fn flush(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        let (done, flushed) = mpsc::channel();
        let mut request = Message::Flush(done);
        loop {
            match self.lines.try_send(request) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                    request = again;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => {
                    warn!("access log: lines still queued at exit are lost");
                    return;
                }
            }
        }
        let _ = flushed.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The writer thread's state.
struct Writer {
    out: BufWriter<Sink>,
    destination: Destination,
    reopen: Arc<AtomicBool>,
    /// Lines lost to failed writes count with those the queue dropped.
    dropped: IntCounter,
    last_error_warning: Option<Instant>,
}

impl Writer {
    fn run(mut self, queue: Receiver<Message>) {
        let mut next_flush = Instant::now() + FLUSH_EVERY;
        loop {
            // Sleeps rather than waits on the queue: see [`TAKE_EVERY`].
            std::thread::sleep(TAKE_EVERY);
            loop {
                match queue.try_recv() {
                    Ok(Message::Line(line)) => {
                        // `BufWriter` keeps what it could not write and
                        // takes no part of a line it has no room for.
                        let written = self.out.write_all(&line);
                        if written.is_err() {
                            self.dropped.inc();
                        }
                        self.report(written);
                    }
                    Ok(Message::Flush(done)) => {
                        let flushed = self.out.flush();
                        self.report(flushed);
                        let _ = done.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        let flushed = self.out.flush();
                        self.report(flushed);
                        return;
                    }
                }
            }
            if self.reopen.swap(false, Ordering::AcqRel) {
                self.reopen_file();
            }
            if Instant::now() >= next_flush {
                let flushed = self.out.flush();
                self.report(flushed);
                next_flush = Instant::now() + FLUSH_EVERY;
            }
        }
    }

    /// A failed write (a full disk) is a WARN, at most every `WARN_EVERY`.
    fn report(&mut self, outcome: io::Result<()>) {
        let Err(e) = outcome else {
            return;
        };
        if self
            .last_error_warning
            .is_some_and(|last| last.elapsed() < WARN_EVERY)
        {
            return;
        }
        self.last_error_warning = Some(Instant::now());
        warn!(
            "access log: cannot write ({e}): lines dropped until it can ({} so far, session_proxy_access_log_dropped_total)",
            self.dropped.get()
        );
    }

    fn reopen_file(&mut self) {
        let Destination::File(path) = &self.destination else {
            info!("SIGUSR1: the access log is standard output, nothing to reopen");
            return;
        };
        match open_file(path) {
            Ok(file) => {
                info!("SIGUSR1: access log reopened: {}", path.display());
                // What the old file's buffer holds goes to the old file;
                // what cannot be written there is lost, and counted.
                let flushed = self.out.flush();
                self.report(flushed);
                let old = std::mem::replace(
                    &mut self.out,
                    BufWriter::with_capacity(BUFFER_BYTES, Sink::File(file)),
                );
                // Not dropped as it is: that would try the write once more.
                let (_, unwritten) = old.into_parts();
                let lost =
                    unwritten.map_or(0, |bytes| bytes.iter().filter(|&&b| b == b'\n').count());
                self.dropped.inc_by(lost as u64);
            }
            Err(e) => warn!(
                "SIGUSR1: cannot reopen the access log {}, still writing to the old file: {e}",
                path.display()
            ),
        }
    }
}

enum Sink {
    Stdout(io::Stdout),
    File(File),
}

impl Sink {
    fn open(destination: &Destination) -> io::Result<Sink> {
        Ok(match destination {
            Destination::Stdout => Sink::Stdout(io::stdout()),
            Destination::File(path) => Sink::File(open_file(path)?),
        })
    }
}

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Stdout(out) => out.write(bytes),
            Sink::File(file) => file.write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.flush(),
            Sink::File(file) => file.flush(),
        }
    }
}

/// One line, newline included.
fn format_line(entry: &Entry, now: SystemTime) -> Vec<u8> {
    let mut line = Vec::with_capacity(256);
    let mut number = itoa::Buffer::new();
    match entry.client {
        Some(IpAddr::V4(ip)) => {
            for (n, octet) in ip.octets().into_iter().enumerate() {
                if n > 0 {
                    line.push(b'.');
                }
                line.extend_from_slice(number.format(octet).as_bytes());
            }
        }
        Some(ip) => {
            let _ = write!(line, "{ip}");
        }
        None => line.push(b'-'),
    }
    line.extend_from_slice(b" - - [");
    time_local_into(&mut line, now);
    line.extend_from_slice(b"] \"");
    let headers = match entry.request {
        Request::Parsed(request) => {
            escape_into(&mut line, request.method.as_str().as_bytes());
            line.push(b' ');
            escape_into(&mut line, request.raw_path());
            line.push(b' ');
            line.extend_from_slice(version(request.version).as_bytes());
            Some(request)
        }
        Request::Raw(first_line) => {
            let first_line = first_line.strip_suffix(b"\n").unwrap_or(first_line);
            let first_line = first_line.strip_suffix(b"\r").unwrap_or(first_line);
            escape_into(&mut line, first_line);
            None
        }
    };
    line.extend_from_slice(b"\" ");
    line.extend_from_slice(number.format(entry.status).as_bytes());
    line.push(b' ');
    line.extend_from_slice(number.format(entry.body_bytes).as_bytes());
    line.extend_from_slice(b" \"");
    header_into(&mut line, headers, http::header::REFERER);
    line.extend_from_slice(b"\" \"");
    header_into(&mut line, headers, http::header::USER_AGENT);
    let millis = entry.elapsed.as_millis();
    line.extend_from_slice(b"\" rt=");
    line.extend_from_slice(number.format(millis / 1000).as_bytes());
    let fraction = (millis % 1000) as u16;
    line.extend_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ]);
    line.extend_from_slice(b" session=");
    line.extend_from_slice(entry.session.unwrap_or("-").as_bytes());
    line.extend_from_slice(b" path=");
    line.extend_from_slice(entry.path.as_bytes());
    line.push(b'\n');
    line
}

fn header_into(line: &mut Vec<u8>, request: Option<&RequestHeader>, name: http::HeaderName) {
    match request.and_then(|request| request.headers.get(name)) {
        Some(value) => escape_into(line, value.as_bytes()),
        None => line.push(b'-'),
    }
}

fn version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Appends `field` as nginx escapes it: `"`, `\` and bytes outside
/// printable ASCII as `\xHH`; cut at [`MAX_FIELD_BYTES`] and then marked `...`.
pub fn escape_into(line: &mut Vec<u8>, field: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let kept = &field[..field.len().min(MAX_FIELD_BYTES)];
    for &byte in kept {
        if byte == b'"' || byte == b'\\' || !(0x20..0x7f).contains(&byte) {
            line.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[(byte >> 4) as usize],
                HEX[(byte & 0xf) as usize],
            ]);
        } else {
            line.push(byte);
        }
    }
    if kept.len() < field.len() {
        line.extend_from_slice(b"...");
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// nginx's `$time_local`, in UTC: `28/Nov/2026:06:00:00 +0000`.
fn time_local_into(line: &mut Vec<u8>, time: SystemTime) {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let two_digits = |line: &mut Vec<u8>, n: u64| {
        line.extend_from_slice(&[b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8]);
    };
    let seconds = unix_seconds(time);
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let in_day = seconds % 86_400;
    two_digits(line, u64::from(day));
    line.push(b'/');
    line.extend_from_slice(MONTHS[(month - 1) as usize]);
    line.push(b'/');
    line.extend_from_slice(itoa::Buffer::new().format(year).as_bytes());
    for part in [in_day / 3600, in_day / 60 % 60, in_day % 60] {
        line.push(b':');
        two_digits(line, part);
    }
    line.extend_from_slice(b" +0000");
}

/// Year, month (1-12) and day of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`; `sessions list` prints dates with it too).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_time(time: SystemTime) -> String {
        let mut line = Vec::new();
        time_local_into(&mut line, time);
        String::from_utf8(line).expect("ascii")
    }

    #[test]
    fn the_time_reads_as_nginx_writes_it() {
        // 2026-11-28T06:00:00Z
        let time = UNIX_EPOCH + Duration::from_secs(1_795_845_600);
        assert_eq!(local_time(time), "28/Nov/2026:06:00:00 +0000");
        assert_eq!(local_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        // A leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399);
        assert_eq!(local_time(leap), "29/Feb/2000:23:59:59 +0000");
    }

    #[test]
    fn client_bytes_cannot_end_a_field_or_a_line() {
        let mut line = Vec::new();
        escape_into(&mut line, b"a\"b\\c\nd\re\x00f\x7f\xc3\xa9 g");
        assert_eq!(line, br"a\x22b\x5Cc\x0Ad\x0De\x00f\x7F\xC3\xA9 g".to_vec());
    }

    #[test]
    fn a_long_field_is_cut_and_marked() {
        let mut line = Vec::new();
        escape_into(&mut line, &[b'a'; MAX_FIELD_BYTES + 1]);
        assert_eq!(line.len(), MAX_FIELD_BYTES + 3);
        assert!(line.ends_with(b"a..."));
        let mut exact = Vec::new();
        escape_into(&mut exact, &[b'a'; MAX_FIELD_BYTES]);
        assert_eq!(exact.len(), MAX_FIELD_BYTES);
    }

    #[test]
    fn a_line_that_finds_the_queue_full_is_dropped_and_counted() {
        let dropped = IntCounter::new("dropped", "test").expect("counter");
        let (log, queue) = AccessLog::queued(2, dropped.clone());
        let request = RequestHeader::build("GET", b"/", None).expect("request");
        let entry = Entry {
            client: None,
            request: Request::Parsed(&request),
            status: 200,
            body_bytes: 0,
            elapsed: Duration::ZERO,
            session: None,
            path: "bypass",
        };
        for _ in 0..5 {
            log.record(&entry);
        }
        assert_eq!(dropped.get(), 3);
        assert_eq!(queue.try_iter().count(), 2);
        log.record(&entry);
        assert_eq!(dropped.get(), 3, "room again once the writer took lines");
    }

    #[test]
    fn a_line_has_the_combined_fields_then_ours() {
        let mut request = RequestHeader::build("GET", b"/count?x=1", None).expect("request");
        request
            .insert_header("User-Agent", "curl/8.0")
            .expect("header");
        let entry = Entry {
            client: Some("127.0.0.1".parse().expect("ip")),
            request: Request::Parsed(&request),
            status: 200,
            body_bytes: 12,
            elapsed: Duration::from_micros(2_400),
            session: Some("3fa9c2e1"),
            path: "session",
        };
        let time = UNIX_EPOCH + Duration::from_secs(1_795_845_600);
        assert_eq!(
            String::from_utf8(format_line(&entry, time)).expect("ascii"),
            "127.0.0.1 - - [28/Nov/2026:06:00:00 +0000] \"GET /count?x=1 HTTP/1.1\" 200 12 \"-\" \"curl/8.0\" rt=0.002 session=3fa9c2e1 path=session\n"
        );
    }
}
