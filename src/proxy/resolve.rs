//! Resolving a request's session (SPEC \[4.3\]): the cookie, the record and
//! whether it may be used (expiry, client IP), with `lock = true` the
//! session's turn, and the token the upstream gets.

use std::net::IpAddr;

use log::{debug, warn};
use pingora::proxy::Session;

use super::{answer, client_addr, headers, ActiveSession, Failure, RequestCtx, SessionProxy};
use crate::metrics::StoreOp;
use crate::session::cookie::{Handle, SessionId};
use crate::session::policy::{self, Expired};
use crate::store::StoreError;
use headers::Cookie;

impl SessionProxy {
    /// A session not stored yet, with a fresh id and a copy of the initializer.
    fn new_session(&self, client_ip: IpAddr) -> ActiveSession {
        let id = SessionId::generate();
        ActiveSession {
            handle: id.handle(),
            id,
            stored: None,
            client_ip,
        }
    }

    /// The session of a correctly signed cookie, if it may be used.
    async fn resume(
        &self,
        session: &mut Session,
        (id, handle): (SessionId, Handle),
        client_ip: IpAddr,
        ctx: &mut RequestCtx,
    ) -> Result<Result<ActiveSession, Expired>, Failure> {
        if let Some(wait) = self.settings.lock_wait {
            // Boxed: its waits and watches would otherwise grow every
            // request's future, `lock = true` or not.
            let turn = Box::pin(self.take_turn(session, &handle, wait)).await?;
            ctx.lock = Some(turn.lock);
            ctx.lease = turn.lease;
        }
        let record = match self.timed(StoreOp::Load, self.store.load(&handle)).await {
            Ok(record) => record,
            Err(StoreError::Corrupt { detail, .. }) => {
                warn!(
                    "session {}: stored record unreadable, starting over: {detail}",
                    handle.short()
                );
                None
            }
            Err(e) => {
                warn!("session {}: load failed: {e}", handle.short());
                return Err(Failure::StoreUnavailable);
            }
        };
        if let Err(expired) =
            self.settings
                .policy
                .judge(record.as_ref(), crate::session::now(), client_ip)
        {
            self.metrics.expired(expired.label());
            debug!("session {}: expired ({})", handle.short(), expired.label());
            return Ok(Err(expired));
        }
        Ok(Ok(ActiveSession {
            id,
            handle,
            stored: record,
            client_ip,
        }))
    }

    /// The session of the first of `ids` (the request's correctly signed
    /// cookies, with their handles) that may be used, else why the first
    /// may not.
    async fn resume_any(
        &self,
        session: &mut Session,
        ids: Vec<(SessionId, Handle)>,
        client_ip: IpAddr,
        ctx: &mut RequestCtx,
    ) -> Result<Result<ActiveSession, Expired>, Failure> {
        let mut first_refusal = None;
        for id in ids {
            match self.resume(session, id, client_ip, ctx).await? {
                Ok(active) => return Ok(Ok(active)),
                Err(expired) => {
                    // That session's turn is not needed any more.
                    ctx.lease = None;
                    ctx.lock = None;
                    first_refusal.get_or_insert(expired);
                }
            }
        }
        Ok(Err(first_refusal.unwrap_or(Expired::Missing)))
    }

    /// Resolves the request's session (SPEC \[4.3\]) and hands it to the
    /// upstream; `Ok(true)` when the proxy has answered itself.
    pub(super) async fn begin_session(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool, Failure> {
        let settings = &self.settings;
        let peer = client_addr(session).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let request = session.req_header_mut();
        // Every correctly signed value, in order: a browser sends each
        // cookie of the name it holds (a stale one of another Domain or
        // Path beside the current one), and any of them may name the session.
        let mut verified = Vec::new();
        let cookie = headers::take_cookie(request, &settings.cookie.name, |value| {
            verified.extend(settings.cookies.verify(value));
            None::<()>
        });
        if cookie != Cookie::Absent && verified.is_empty() {
            self.metrics.forged_cookies.inc();
        }
        // X-Forwarded-For counts only from a trusted proxy: read it only then.
        let forwarded_for = match settings.trusted_proxies.is_empty() {
            true => Vec::new(),
            false => headers::values(&request.headers, &headers::X_FORWARDED_FOR),
        };
        let client_ip = policy::client_ip(peer, &forwarded_for, &settings.trusted_proxies);

        let active = match verified.is_empty() {
            true => self.new_session(client_ip),
            false => match self.resume_any(session, verified, client_ip, ctx).await? {
                Ok(active) => active,
                Err(expired) if settings.ignore_expiry && expired != Expired::Ip => {
                    self.new_session(client_ip)
                }
                Err(_) => {
                    answer::expired(session, settings).await;
                    return Ok(true);
                }
            },
        };
        let now = crate::session::now();
        let (ver, data) = match &active.stored {
            Some(record) => (record.ver, &record.data),
            None => (0, &settings.initializer),
        };
        ctx.token =
            Some(
                settings
                    .tokens
                    .token(&active.handle, active.stored.is_none(), ver, now, data),
            );
        ctx.session = Some(active);
        Ok(false)
    }
}
