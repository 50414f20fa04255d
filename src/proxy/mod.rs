//! The proxy: one [`ProxyHttp`] implementation, one method per phase.
//!
//! - `request_filter`: strip spoofed headers, resolve the session, answer
//!   an expired one ourselves, or hand the upstream its token;
//! - `upstream_peer`: round-robin over the configured addresses;
//! - `upstream_response_filter`: read and remove the upstream's
//!   instructions, store the change, set the cookie — all before the
//!   response head leaves;
//! - `fail_to_proxy`: our own short `text/plain` answers.
//!
//! The session's resolution (SPEC \[4.3\]) is in `resolve`, the turn of
//! `lock = true` (and the watch on a client while it waits) in `turn`, the storing of
//! the upstream's instructions (SPEC \[4.5\]) in `commit`, our own answers in
//! `answer`, the header surgery in `headers`.

mod answer;
mod commit;
pub mod cookie_memo;
pub mod headers;
mod resolve;
mod slots;
pub mod token_memo;
mod turn;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::header::{CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, SET_COOKIE, TRANSFER_ENCODING};
use http::HeaderName;
use log::{debug, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use prometheus::IntGauge;

use crate::access_log::{self, AccessLog};
use crate::config::{Config, CookieConfig};
use crate::limits;
use crate::locks::{HandleLock, HandleLocks};
use crate::metrics::{Metrics, StoreOp};
use crate::session::cookie::{set_cookie, CookieSigner, Handle, SessionId};
use crate::session::data::SessionData;
use crate::session::patch::Instructions;
use crate::session::policy::{self, Policy};
use crate::session::token::TokenSigner;
use crate::store::{Lease, Record, Store, StoreError};
pub use answer::Failure;
use commit::CookieChange;
use cookie_memo::CookieMemo;
use headers::SessionHeaders;
use token_memo::TokenMemo;

/// Everything a request needs, prepared once at start.
pub struct SessionProxy {
    settings: Settings,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    peers: Vec<HttpPeer>,
    next_peer: AtomicUsize,
    locks: HandleLocks,
    in_flight: IntGauge,
    /// `None`: no access log, and nothing of it on the request path.
    access_log: Option<Arc<AccessLog>>,
}

/// The session settings of the config, in the shape the request path uses.
struct Settings {
    headers: SessionHeaders,
    /// `headers.session` as the name pingora writes (lowercase, as it
    /// would spell a `HeaderName`): shared, where a `HeaderName` is copied
    /// into a new case-preserving name on every insert.
    token_header: bytes::Bytes,
    cookie: CookieConfig,
    cookies: CookieMemo,
    tokens: TokenMemo,
    policy: Policy,
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether the listeners speak HTTPS, for `X-Forwarded-Proto`.
    tls: bool,
    /// `[upstream] reuse_after_body`.
    reuse_after_body: bool,
    /// `[server] send_timeout`, for HTTP/2 streams, whose connection is
    /// not the request's to clock.
    send_timeout: Duration,
    bypass: Vec<String>,
    ignore_expiry: bool,
    expired_status: u16,
    expired_message: bytes::Bytes,
    initializer: SessionData,
    save_uninitialized: bool,
    max_data_bytes: usize,
    touch_interval: u64,
    lock_wait: Option<Duration>,
}

/// What one request carries from phase to phase.
pub struct RequestCtx {
    _in_flight: InFlight,
    /// `None` on a bypassed path.
    session: Option<ActiveSession>,
    /// The session's token, for the upstream request.
    token: Option<http::HeaderValue>,
    /// Why the proxy answers this request itself.
    failure: Option<Failure>,
    /// Held until the change is stored (`lock = true`): the in-process
    /// turn, then, on a shared store, the lease that keeps other proxies out.
    lock: Option<HandleLock>,
    lease: Option<Box<dyn Lease>>,
    /// When the request's head was in; only with an access log.
    started: Option<Instant>,
    /// Set by `request_filter`, for the access log.
    route: Route,
}

/// The session a request resolved to.
struct ActiveSession {
    id: SessionId,
    handle: Handle,
    /// The stored record; `None` for a session not stored yet, whose data
    /// is the initializer.
    stored: Option<Record>,
    client_ip: IpAddr,
}

impl SessionProxy {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<SessionProxy, String> {
        let session = &config.session;
        let header_name = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("invalid header name {name:?}: {e}"))
        };
        let token_header = header_name(&config.headers.session)?;
        let settings = Settings {
            token_header: bytes::Bytes::from(token_header.as_str().to_owned()),
            headers: SessionHeaders {
                session: header_name(&config.headers.session)?,
                update: header_name(&config.headers.update)?,
                action: header_name(&config.headers.action)?,
            },
            cookie: session.cookie.clone(),
            cookies: CookieMemo::new(CookieSigner::new(&session.secret_keys)),
            tokens: TokenMemo::new(TokenSigner::new(
                session.secret_keys.first().ok_or("no secret key")?,
                config.headers.token_ttl,
            )),
            policy: Policy {
                expiry: crate::store::Expiry {
                    timeout: session.timeout,
                    absolute: session.absolute_timeout,
                },
                check_ip: !session.ignore_change_ip,
            },
            trusted_proxies: config.server.trusted_proxies.clone(),
            tls: config.server.tls.is_some(),
            reuse_after_body: config.upstream.reuse_after_body,
            send_timeout: Duration::from_secs(config.server.send_timeout),
            bypass: session.bypass.clone(),
            ignore_expiry: session.ignore_expiry,
            expired_status: session.expired_status,
            expired_message: bytes::Bytes::from(session.expired_message.clone()),
            initializer: SessionData::from_map(&session.initializer),
            save_uninitialized: session.save_uninitialized,
            max_data_bytes: session.max_data_bytes,
            touch_interval: session.touch_interval,
            // A turn comes at the latest when the request ahead times out
            // upstream. With TLS, pingora gives the handshake a connect_timeout of
            // its own, after the TCP connect's.
            lock_wait: session.lock.then(|| {
                let connects = if config.upstream.tls { 2 } else { 1 };
                Duration::from_secs(
                    connects * config.upstream.connect_timeout + config.upstream.read_timeout + 1,
                )
            }),
        };
        let peers = config
            .upstream
            .addresses
            .iter()
            .zip(&config.upstream.hosts)
            .map(|(address, host)| {
                // With TLS, the name the upstream's certificate must carry
                // (sent as SNI unless it is an IP address). Never empty:
                // pingora turns the certificate checks off for no SNI.
                let tls_name = match config.upstream.sni.as_str() {
                    _ if !config.upstream.tls => String::new(),
                    "" => host.clone(),
                    sni => sni.to_string(),
                };
                let mut peer = HttpPeer::new(*address, config.upstream.tls, tls_name);
                peer.options.verify_cert = true;
                peer.options.verify_hostname = true;
                peer.options.connection_timeout =
                    Some(Duration::from_secs(config.upstream.connect_timeout));
                peer.options.read_timeout = Some(Duration::from_secs(config.upstream.read_timeout));
                peer.options.write_timeout =
                    Some(Duration::from_secs(config.upstream.read_timeout));
                peer.options.idle_timeout = Some(Duration::from_secs(60));
                peer
            })
            .collect();
        Ok(SessionProxy {
            settings,
            store,
            in_flight: metrics.requests_in_flight.clone(),
            metrics,
            peers,
            next_peer: AtomicUsize::new(0),
            locks: HandleLocks::default(),
            access_log: None,
        })
    }

    /// Writes a line per finished request to `log`.
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> SessionProxy {
        self.access_log = Some(log);
        self
    }

    /// The access log line of a finished request (`logging`). Out of
    /// line: the request path without an access log carries none of it.
    #[inline(never)]
    fn log_access(&self, log: &AccessLog, session: &Session, status: u16, ctx: &RequestCtx) {
        let request = session.req_header();
        // As the session policy reads it: X-Forwarded-For only from a
        // trusted proxy.
        let trusted = &self.settings.trusted_proxies;
        let client = client_addr(session).map(|peer| {
            let forwarded_for = match trusted.is_empty() {
                true => Vec::new(),
                false => headers::values(&request.headers, &headers::X_FORWARDED_FOR),
            };
            policy::client_ip(peer, &forwarded_for, trusted)
        });
        log.record(&access_log::Entry {
            client,
            request: access_log::Request::Parsed(request),
            status,
            body_bytes: session.body_bytes_sent(),
            elapsed: ctx.started.map(|at| at.elapsed()).unwrap_or_default(),
            session: ctx.session.as_ref().map(|active| active.handle.short()),
            path: ctx.route.as_str(),
        });
    }

    /// Requests being served now; shutdown waits for this to reach zero.
    pub fn in_flight(&self) -> IntGauge {
        self.in_flight.clone()
    }

    fn is_bypassed(&self, path: &str) -> bool {
        is_under(&self.settings.bypass, path)
    }

    /// Times a store call for the latency histogram and counts its errors.
    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .observe_store(op, started.elapsed().as_secs_f64());
        if matches!(
            result,
            Err(StoreError::Unavailable(_)) | Err(StoreError::Corrupt { .. })
        ) {
            self.metrics.store_errors.inc();
        }
        result
    }
}

/// Whether `path` is under one of the `bypass` prefixes, and stays there
/// whichever way the app reads it. A path the app could resolve out of its
/// prefix is not: `/static/../admin` would reach `/admin` without the
/// session, and so would the spellings servers resolve after routing:
/// `%2e`, `%2f` and `%5c` (Tomcat, IIS, and double-decoding servers, hence
/// `%25`), IIS's `%u` escapes and overlong UTF-8 for `.`, `/` and `\`
/// (`%c0%ae`), `\` for `/` (IIS), `..;` (Tomcat's path parameters). Such a path
/// gets the session work, which no request is harmed by.
fn is_under(bypass: &[String], path: &str) -> bool {
    bypass
        .iter()
        .any(|prefix| path.starts_with(prefix.as_str()))
        && !may_leave_its_prefix(path)
}

fn may_leave_its_prefix(path: &str) -> bool {
    let encoded = |code: &[u8]| {
        path.as_bytes()
            .windows(code.len())
            .any(|window| window.eq_ignore_ascii_case(code))
    };
    // IIS's `%u002e`, and overlong UTF-8 (`%c0%ae` is `.` to a lax
    // decoder): never in a valid path, so never worth a bypass.
    const LEAVING: [&str; 9] = [
        "%2e", "%2f", "%5c", "%25", "%u", "%c0", "%c1", "%e0%80", "%f0%80",
    ];
    LEAVING.iter().any(|code| encoded(code.as_bytes()))
        || path.split(['/', '\\']).any(|segment| {
            let segment = segment.split(';').next().unwrap_or_default();
            segment == "." || segment == ".."
        })
}

/// Whether an HTTP/2 request's `:path` may go to the app as the target of
/// an HTTP/1.1 request line: it starts with `/` (or is `*`, for
/// `OPTIONS`), as RFC 9113 8.3.1 requires. h2 and pingora refuse an empty
/// one, control characters and absolute forms, but pass `x` or `?q`,
/// which an app would resolve no one knows where, and the bypass prefixes
/// would not see.
fn is_origin_form(request: &RequestHeader) -> bool {
    match request.raw_path() {
        [b'/', ..] => true,
        b"*" => request.method == http::Method::OPTIONS,
        _ => false,
    }
}

/// How long a shared store's lease outlives a proxy that crashed holding it.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// The IP address of the connection's peer (the client, or a proxy in
/// front). An IPv4 client of a dual-stack listener (`[::]`) is named as
/// IPv4, not `::ffff:a.b.c.d`: as `trusted_proxies`, the stored IP and
/// `X-Forwarded-For` name it.
fn client_addr(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|addr| addr.as_inet())
        .map(|addr| addr.ip().to_canonical())
}

/// Which way `request_filter` sent a request, as the access log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Refused before (a `431`, an HTTP/2 `:path` not in origin form).
    Undecided,
    Session,
    Bypass,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Undecided => "-",
            Route::Session => "session",
            Route::Bypass => "bypass",
        }
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl ProxyHttp for SessionProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.in_flight.inc();
        RequestCtx {
            _in_flight: InFlight(self.in_flight.clone()),
            session: None,
            token: None,
            failure: None,
            lock: None,
            lease: None,
            started: self.access_log.as_ref().map(|_| Instant::now()),
            route: Route::Undecided,
        }
    }

    /// No downstream modules. pingora's default adds a response compression
    /// module, disabled, whose filters still ran on every request (callgrind:
    /// about 300 of a bypassed request's 82 000 instructions); the proxy
    /// passes bodies through as the upstream sent them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// The head is in: stop its clock, and refuse one over our size limit.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        limits::head_received(session);
        // RFC 9110 15.2: no 1xx to an HTTP/1.0 client, which would take it
        // for the answer; pingora passes the upstream's on (103 Early Hints).
        if session.req_header().version < http::Version::HTTP_11 {
            if let ServerSession::H1(h1) = &mut *session.downstream_session {
                h1.set_ignore_info_resp(true);
            }
        } else if session.req_header().version == http::Version::HTTP_2 {
            // Each stream's writes, the wait for its flow-control window
            // included; HTTP/1.1's are set by `head_received`.
            session.set_write_timeout(Some(self.settings.send_timeout));
            if !is_origin_form(session.req_header()) {
                return Err(Error::new(ErrorType::HTTPStatus(400)));
            }
            if limits::h2_header_fields(session.req_header()) > limits::MAX_H2_HEADER_FIELDS {
                return Err(Error::new(ErrorType::HTTPStatus(431)));
            }
        }
        if limits::head_bytes(session.req_header()) > limits::MAX_HEAD_BYTES {
            return Err(Error::new(ErrorType::HTTPStatus(431)));
        }
        Ok(())
    }

    /// The connection waits for another request: start its idle clock.
    fn persist_connection_context(
        &self,
        session: &Session,
        _ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        limits::await_next_request(session);
        None
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let request = session.req_header_mut();
        self.settings.headers.strip_from(request);
        // RFC 9113 8.2.3: an h2 client may split `Cookie` into one field per
        // cookie; an HTTP/1.1 app gets them joined into one.
        if request.version == http::Version::HTTP_2 {
            headers::join_cookies(request);
        }
        if self.is_bypassed(request.uri.path()) {
            ctx.route = Route::Bypass;
            self.metrics.requests_bypass.inc();
            headers::remove_cookie(request, &self.settings.cookie.name);
            return Ok(false);
        }
        ctx.route = Route::Session;
        self.metrics.requests_session.inc();
        match self.begin_session(session, ctx).await {
            Ok(answered) => Ok(answered),
            Err(failure) => {
                ctx.failure = Some(failure);
                Err(Error::new(ErrorType::HTTPStatus(failure.status())))
            }
        }
    }

    /// The token goes in last, into the request as it leaves: pingora has
    /// removed the headers a client named in `Connection` by then, which
    /// could otherwise name the token's.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer = client_addr(session);
        let trusted = peer.is_some_and(|peer| {
            self.settings
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&peer))
        });
        headers::forward_client(upstream_request, peer, trusted, self.settings.tls)?;
        // One plain length, the one pingora frames the body by.
        if let Some(length) = headers::length_to_rewrite(&upstream_request.headers) {
            upstream_request.insert_header(CONTENT_LENGTH, length)?;
        }
        // No upstream connection is reused whose end the app may see
        // elsewhere than pingora: what the app leaves on it would be read
        // in the next exchange on it, another client's. An app may write a
        // body for HEAD (a CGI script that ignores the method), or answer
        // without reading a request body, which a server that does not
        // drain it then parses as a request of its own, one without the
        // session work. With `Connection: close` the app stops after its
        // answer and pingora does not pool the connection. A body costs a
        // new connection each (2.5 times fewer POSTs a second, benches/HISTORY.md
        // round 16):
        // `reuse_after_body` is for apps whose server drains every body.
        let body_unsafe = !self.settings.reuse_after_body && !session.is_body_empty();
        if upstream_request.method == http::Method::HEAD || body_unsafe {
            let close = match upstream_request.headers.contains_key(http::header::UPGRADE) {
                true => "Upgrade, close",
                false => "close",
            };
            upstream_request.insert_header(CONNECTION, close)?;
        }
        // Cloned, not taken: a retry on another connection comes here again.
        if let Some(token) = &ctx.token {
            upstream_request.insert_header(self.settings.token_header.clone(), token.clone())?;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let turn = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let peer = self
            .peers
            .get(turn % self.peers.len().max(1))
            .ok_or_else(|| Error::new(ErrorType::ConnectNoRoute))?;
        Ok(Box::new(peer.clone()))
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let names = &self.settings.headers;
        // As on the request: whatever is in front of the proxy reads one
        // plain length, the one pingora framed the body by.
        if let Some(length) = headers::length_to_rewrite(&response.headers) {
            response.insert_header(CONTENT_LENGTH, length)?;
        }
        if headers::remove_set_cookie(response, &self.settings.cookie.name) {
            debug!("the upstream set the session cookie: removed");
        }
        // An app that echoes its request's headers (a debug page, an echo
        // service) would hand the client its token: a signed copy of the
        // session data that the app trusts. Never sent on.
        response.remove_header(&names.session);
        // Instructions count only in the final response of a session path
        // (a `101` ends an upgrade's exchange: it is final too); none ever
        // reach the client.
        let active = match ctx.session.as_ref() {
            Some(active) if !is_interim(response.status) => active,
            _ => {
                response.remove_header(&names.update);
                response.remove_header(&names.action);
                return Ok(());
            }
        };
        let parsed = Instructions::parse(
            &headers::values(&response.headers, &names.update),
            &headers::values(&response.headers, &names.action),
            self.settings.max_data_bytes,
        );
        response.remove_header(&names.update);
        response.remove_header(&names.action);
        // `lock = true` promised the app this session to itself: with the
        // lease lost, another proxy may have served it meanwhile, and a
        // change was decided on what may be an old version. A response
        // with nothing to store goes as it is.
        let lease_lost = ctx.lease.as_ref().is_some_and(|lease| !lease.is_held());
        if lease_lost && matches!(&parsed, Ok(instructions) if !instructions.is_empty()) {
            warn!(
                "session {}: lease lost before the commit; nothing stored",
                active.handle.short()
            );
            ctx.failure = Some(Failure::SessionBusy);
            return Err(Error::new(ErrorType::HTTPStatus(503)));
        }
        let outcome = match parsed {
            Ok(instructions) => self.commit(active, instructions).await,
            Err(invalid) => {
                warn!(
                    "session {}: invalid session update from upstream: {invalid}",
                    active.handle.short()
                );
                Err(Failure::InvalidUpdate)
            }
        };
        let cookie = match outcome {
            Ok(cookie) => cookie,
            Err(failure) => {
                if failure == Failure::InvalidUpdate {
                    self.metrics.invalid_updates.inc();
                }
                ctx.failure = Some(failure);
                return Err(Error::new(ErrorType::HTTPStatus(failure.status())));
            }
        };
        // Stored: the session's next request may go now, not when this
        // response's body ends (a download, a stream, a slow reader).
        release_turn(ctx).await;
        if let Some(cookie) = cookie {
            let value = match &cookie {
                CookieChange::Set(value) => set_cookie(&self.settings.cookie, Some(value)),
                CookieChange::Clear => set_cookie(&self.settings.cookie, None),
            };
            response.append_header(SET_COOKIE, value)?;
            if !forbids_shared_caching(response) {
                response.append_header(CACHE_CONTROL, r#"no-cache="Set-Cookie""#)?;
            }
        }
        Ok(())
    }

    /// An HTTP/1.0 client cannot read chunked framing, and a server must
    /// not send it one (RFC 9112 6.1). pingora asks the upstream in
    /// HTTP/1.1 whatever the client spoke, passes on its chunked
    /// responses and turns one without a length into a chunked one: for a
    /// 1.0 client the coding goes, and the body ends with the connection.
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if session.req_header().version < http::Version::HTTP_11
            && !response.status.is_informational()
        {
            response.remove_header(&TRANSFER_ENCODING);
        }
        // pingora announces `Connection: keep-alive` before it finds that
        // such a body ends only with the connection (and then closes it);
        // an intermediary in front that believed the header would read
        // the body's bytes, the app's, as its next response.
        // And a proxy that is shutting down (SIGTERM, or an upgrade's
        // hand-over) closes the connection after this response: said in
        // the response, the client opens a new one for its next request
        // instead of sending it into the close, where it would fail.
        if ends_with_connection(&session.req_header().method, response)
            || session.is_process_shutting_down()
        {
            session.set_keepalive(None);
        }
        Ok(())
    }

    /// A request that stored nothing (it failed, or the proxy answered
    /// itself) still holds its turn here.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        release_turn(ctx).await;
        let status = status_answered(session, e, ctx);
        self.metrics.responded(status);
        if let Some(log) = &self.access_log {
            self.log_access(log, session, status, ctx);
        }
    }

    /// A client that hangs up or sends a request we refuse is the client's
    /// business, not an error of the proxy's: pingora would log it at
    /// ERROR, the level operators are paged on, and any client can make as
    /// many as it likes.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        let failure = failure_of(ctx, e);
        // A busy session is its own requests crowding it with `lock =
        // true`, which any client can do as often as it likes; its other
        // causes (a lost lease, a regenerate outrun) have a WARN line of
        // their own, as a refused update has: pingora's ERROR line would
        // repeat it without the handle, once per request of a buggy app.
        let quiet = failure.is_clients_doing()
            || failure.is_apps_doing()
            || failure == Failure::SessionBusy;
        if quiet {
            debug!("request failed, not the proxy's doing ({failure:?}): {e}");
        }
        quiet
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let failure = failure_of(ctx, e);
        let code = match failure {
            Failure::ClientGone => 0,
            failure => {
                // The connection ends after this answer (below): said in
                // it, a kept-alive client does not send its next request
                // into the close.
                session.set_keepalive(None);
                answer::failure(session, failure).await;
                failure.status()
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// Ends the request's turn on its session (`lock = true`): the lease
/// first, released now rather than left to time out, so that the next
/// proxy in line goes, then the in-process lock.
async fn release_turn(ctx: &mut RequestCtx) {
    if let Some(lease) = ctx.lease.take() {
        if let Err(e) = lease.release().await {
            debug!("lease release failed (it will expire): {e}");
        }
    }
    ctx.lock = None;
}

/// Whether a response head is an interim one (`100 Continue`, `103 Early
/// Hints`), which a final one follows. A `101` ends its exchange: final.
fn is_interim(status: http::StatusCode) -> bool {
    status.is_informational() && status != http::StatusCode::SWITCHING_PROTOCOLS
}

/// The status the client got: nginx's 499 when it left before it had an
/// answer. An interim head written before is no answer.
fn status_answered(session: &Session, e: Option<&Error>, ctx: &RequestCtx) -> u16 {
    let answered = session
        .response_written()
        .filter(|head| !is_interim(head.status));
    match (answered, e) {
        (Some(head), _) => head.status.as_u16(),
        (None, Some(e)) if failure_of(ctx, e) != Failure::ClientGone => failure_of(ctx, e).status(),
        (None, _) => 499,
    }
}

/// Why a request failed: what the proxy decided, else what pingora reports.
fn failure_of(ctx: &RequestCtx, e: &Error) -> Failure {
    ctx.failure.unwrap_or_else(|| Failure::of_error(e))
}

/// Whether a response's body ends only with the connection: it may have
/// one, and has no length and no chunked coding last.
fn ends_with_connection(method: &http::Method, response: &ResponseHeader) -> bool {
    let status = response.status;
    if status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
        || method == http::Method::HEAD
        || response.headers.contains_key(CONTENT_LENGTH)
    {
        return false;
    }
    let last_coding = response
        .headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|value| value.as_bytes().rsplit(|&b| b == b',').next());
    !last_coding.is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The upstream already keeps the response out of shared caches.
fn forbids_shared_caching(response: &ResponseHeader) -> bool {
    response.headers.get_all(CACHE_CONTROL).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|directive| {
            let directive = directive.trim_ascii();
            directive.eq_ignore_ascii_case(b"private")
                || directive.eq_ignore_ascii_case(b"no-store")
        })
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::store::memory::MemoryStore;

    fn lock_wait(upstream: &str) -> Option<Duration> {
        let text = format!(
            "[upstream]\naddresses = [\"127.0.0.1:8000\"]\nconnect_timeout = 2\nread_timeout = 30\n{upstream}\n[session]\nlock = true\n"
        );
        let config = crate::config::parse(
            &text,
            Path::new("test.toml"),
            Some("0123456789abcdef0123456789abcdef"),
        )
        .expect("valid config");
        let store = Arc::new(MemoryStore::new(10));
        let proxy = SessionProxy::new(&config, store, Arc::new(Metrics::new())).expect("proxy");
        proxy.settings.lock_wait
    }

    #[test]
    fn a_path_that_could_leave_its_bypass_prefix_is_not_bypassed() {
        let bypass = ["/static/".to_string()];
        for path in [
            "/static/app.css",
            "/static/a/b.js",
            "/static/..x/y",
            "/static/x..",
            "/static/%C3%A4.css",
            "/static/%e0%a4%85.js",
        ] {
            assert!(is_under(&bypass, path), "{path}");
        }
        for path in [
            "/count",
            "/static/../admin",
            "/static/./../admin",
            "/static/..",
            "/static/%2e%2e/admin",
            "/static/%2E./admin",
            "/static/..%2fadmin",
            "/static/..%5cadmin",
            "/static/%252e%252e/admin",
            "/static/..\\admin",
            "/static/..;/admin",
            "/static/%u002e%u002e/admin",
            "/static/%U002E./admin",
            "/static/%c0%ae%c0%ae/admin",
            "/static/..%c0%afadmin",
            "/static/..%C1%9Cadmin",
            "/static/%e0%80%ae./admin",
            "/static/%f0%80%80%ae./admin",
        ] {
            assert!(!is_under(&bypass, path), "{path}");
        }
    }

    #[test]
    fn a_turn_is_awaited_as_long_as_the_request_ahead_can_take_upstream() {
        assert_eq!(lock_wait(""), Some(Duration::from_secs(2 + 30 + 1)));
        // The TLS handshake has a connect_timeout of its own.
        assert_eq!(
            lock_wait("tls = true"),
            Some(Duration::from_secs(2 * 2 + 30 + 1))
        );
    }
}
