//! The proxy's own answers: short `text/plain` messages that name the
//! problem and never carry session data, ids or handles (SPEC \[5\]).

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, SET_COOKIE};
use log::debug;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};

use super::Settings;
use crate::session::cookie::set_cookie;

/// Why the proxy answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    StoreUnavailable,
    InvalidUpdate,
    /// `lock = true` and the session's earlier request did not finish in time.
    SessionBusy,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// A status pingora chose (e.g. 400 for a malformed request).
    Status(u16),
    /// The client went away: nothing to answer.
    ClientGone,
    Internal,
}

impl Failure {
    pub fn status(self) -> u16 {
        match self {
            Failure::StoreUnavailable | Failure::SessionBusy => 503,
            Failure::InvalidUpdate | Failure::UpstreamUnreachable => 502,
            Failure::UpstreamTimeout => 504,
            Failure::Status(code) => code,
            Failure::ClientGone => 0,
            Failure::Internal => 500,
        }
    }

    /// The client's doing: it went away, or its request was refused
    /// (pingora's 400, our 431). Nothing for the proxy's operators.
    pub fn is_clients_doing(self) -> bool {
        matches!(self, Failure::ClientGone | Failure::Status(400..=499))
    }

    /// The app's doing, and already logged at WARN with the session's
    /// handle where it was found (SPEC \[5\]): an update or action refused.
    pub fn is_apps_doing(self) -> bool {
        self == Failure::InvalidUpdate
    }

    fn message(self) -> &'static str {
        match self {
            Failure::StoreUnavailable => "session store unavailable",
            Failure::InvalidUpdate => "invalid session update from upstream",
            Failure::SessionBusy => {
                "session busy: an earlier request of this session has not finished"
            }
            Failure::UpstreamUnreachable => "upstream unreachable",
            Failure::UpstreamTimeout => "upstream timed out",
            Failure::Status(400) => "bad request",
            Failure::Status(408) => "request body too slow",
            Failure::Status(431) => "request header too large",
            Failure::Status(_) | Failure::ClientGone => "request failed",
            Failure::Internal => "internal error",
        }
    }

    /// The failure behind an error pingora reports.
    pub fn of_error(e: &Error) -> Failure {
        match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(code)) => Failure::Status(*code),
            (
                ErrorSource::Upstream,
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
            ) => Failure::UpstreamTimeout,
            (ErrorSource::Upstream, _) => Failure::UpstreamUnreachable,
            // pingora's timeout on each read of an HTTP/1.1 body:
            // `body_timeout` (a head too slow never gets this far).
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => Failure::Status(408),
            (
                ErrorSource::Downstream,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
            ) => Failure::ClientGone,
            // pingora's watch on an HTTP/2 stream whose request is in:
            // the client reset it, or its connection ended.
            (ErrorSource::Downstream, ErrorType::H2Error) => Failure::ClientGone,
            (ErrorSource::Downstream, _) => Failure::Status(400),
            _ => Failure::Internal,
        }
    }
}

/// Writes a short `text/plain` answer; a client gone meanwhile is not an error.
async fn respond(session: &mut Session, status: u16, body: Bytes, clear_cookie: Option<String>) {
    // A response under way (its head sent) cannot be replaced, and a
    // message written now would land in its body: the connection just ends.
    if session
        .response_written()
        .is_some_and(|written| !super::is_interim(written.status))
    {
        return;
    }
    let Ok(mut head) = ResponseHeader::build(status, Some(4)) else {
        return;
    };
    let _ = head.insert_header(CONTENT_TYPE, "text/plain; charset=utf-8");
    let _ = head.insert_header(CONTENT_LENGTH, body.len());
    // An answer about this client's session, or this request: no cache
    // may keep it for the URL and serve it to others (a `200` "session
    // expired" on a CDN). `no-store` covers the cookie's clearing too.
    let _ = head.insert_header(CACHE_CONTROL, "no-store");
    if let Some(cookie) = clear_cookie {
        let _ = head.insert_header(SET_COOKIE, cookie);
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    let written = match session
        .write_response_header(Box::new(head), head_only)
        .await
    {
        Ok(()) if !head_only => session.write_response_body(Some(body), true).await,
        other => other,
    };
    if let Err(e) = written {
        debug!("could not answer the client: {e}");
    }
}

/// `expired_status` with `expired_message`, and the cookie cleared.
pub async fn expired(session: &mut Session, settings: &Settings) {
    let clear = set_cookie(&settings.cookie, None);
    respond(
        session,
        settings.expired_status,
        settings.expired_message.clone(),
        Some(clear),
    )
    .await;
}

pub async fn failure(session: &mut Session, failure: Failure) {
    let body = Bytes::from_static(failure.message().as_bytes());
    respond(session, failure.status(), body, None).await;
}
