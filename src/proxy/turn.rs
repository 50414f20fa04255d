//! A request's turn on its session (`lock = true`, SPEC \[4.6\]): the
//! in-process lock, then, on a shared store, the lease.
//!
//! A turn free now is taken at once, with nothing else done. A request that
//! must wait for its turn watches its client meanwhile (pingora watches it
//! only once the request is upstream): one whose client has gone gives up
//! its place and never reaches the app, as nginx sends nothing upstream for
//! a client that left first. What is watched, and how, is pingora's own
//! watch during the upstream wait where it can be:
//!
//! - HTTP/1 without a body: one-byte reads of the socket
//!   (`read_body_or_idle`). End of stream is a client gone (499); a byte
//!   is the start of a request pipelined after this one, and fails it as it
//!   fails while the app works (`400`, the connection closed), but before
//!   the app saw it. A pipelined request that came with this one's head is
//!   in pingora's buffer and is not read here: served as without `lock`.
//! - HTTP/1 with a body: its body bytes come before any end of stream, and
//!   reading them early would take them from pingora, which must pass them
//!   on. The socket is not read: the kernel's word that the client closed
//!   or reset it (`EPOLLRDHUP`, on a duplicate of it) is a client gone
//!   (499), body or no body left unread. Bytes it sends after its body are
//!   left for pingora, which fails the request on them once it is
//!   upstream, as without `lock`.
//! - HTTP/2: the stream's reset (`RST_STREAM`), or its connection's end,
//!   seen by h2 apart from the body, which is not read.

use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{Failure, SessionProxy, LEASE_TTL};
use crate::locks::HandleLock;
use crate::session::cookie::Handle;
use crate::store::{GiveUp, Lease, StoreError};

/// A request's turn: held until its change is stored.
pub(super) struct Turn {
    pub lock: HandleLock,
    pub lease: Option<Box<dyn Lease>>,
}

impl SessionProxy {
    /// Takes `handle`'s turn, waiting at most `wait` for each of the lock
    /// and the lease; gives up its place if the client goes meanwhile.
    pub(super) async fn take_turn(
        &self,
        session: &mut Session,
        handle: &Handle,
        wait: Duration,
    ) -> Result<Turn, Failure> {
        let lock = match self.locks.try_lock(handle) {
            Some(lock) => lock,
            None => {
                let waited = unless_client_goes(session, self.locks.lock_within(handle, wait));
                waited.await?.ok_or(Failure::SessionBusy)?
            }
        };
        // One try, not watched: a free lease (or a store without leases)
        // costs nothing more.
        let once = GiveUp::default();
        let lease = match self
            .store
            .acquire_lease(handle, Duration::ZERO, LEASE_TTL, &once)
            .await
        {
            Err(StoreError::Busy(_)) => self.wait_for_lease(session, handle, wait).await?,
            taken => taken,
        };
        match lease {
            Ok(lease) => Ok(Turn { lock, lease }),
            Err(StoreError::Busy(_)) => Err(Failure::SessionBusy),
            Err(e) => {
                log::warn!("session {}: lease failed: {e}", handle.short());
                self.metrics.store_errors.inc();
                Err(Failure::StoreUnavailable)
            }
        }
    }

    /// The lease's wait, given up if the client goes. The store ends it
    /// between two tries: a lease the try under way took is dropped here,
    /// which releases it.
    async fn wait_for_lease(
        &self,
        session: &mut Session,
        handle: &Handle,
        wait: Duration,
    ) -> Result<Result<Option<Box<dyn Lease>>, StoreError>, Failure> {
        let give_up = GiveUp::default();
        let acquire = self.store.acquire_lease(handle, wait, LEASE_TTL, &give_up);
        tokio::pin!(acquire);
        tokio::select! {
            biased;
            gone = client_gone(session) => {
                give_up.give_up();
                drop(acquire.await);
                Err(gone)
            }
            lease = &mut acquire => Ok(lease),
        }
    }
}

/// `wait`'s outcome, unless the client goes first: then why it went.
async fn unless_client_goes<T>(
    session: &mut Session,
    wait: impl std::future::Future<Output = T>,
) -> Result<T, Failure> {
    tokio::select! {
        // A client gone when the turn comes is not served either.
        biased;
        gone = client_gone(session) => Err(gone),
        outcome = wait => Ok(outcome),
    }
}

/// Resolves when the request's client has gone (see the module's
/// documentation); never for a request that cannot be watched.
async fn client_gone(session: &mut Session) -> Failure {
    let downstream = &mut *session.downstream_session;
    let watched = match downstream {
        ServerSession::H1(h1) => match h1.is_body_empty() {
            true => h1.read_body_or_idle(true).await,
            false => match peer_closed(h1.stream().id()).await {
                Ok(()) => return Failure::ClientGone,
                Err(e) => {
                    log::debug!("a waiting request's client is not watched: {e}");
                    Ok(None)
                }
            },
        },
        ServerSession::H2(h2) => h2.read_body_or_idle(true).await,
        _ => Ok(None),
    };
    match watched {
        // As pingora reads it during the upstream wait: `ClientGone` for
        // an end of stream or a stream reset, a `400` for bytes after an
        // HTTP/1 request.
        Err(e) => Failure::of_error(&e.into_down()),
        // Nothing to watch, or nothing that ends the request.
        Ok(_) => std::future::pending().await,
    }
}

/// Resolves when the peer of `socket` has closed or reset the connection,
/// whatever it sent before is left unread: a duplicate of the socket is
/// polled, so the proxy's own registration and buffers are left alone.
async fn peer_closed(socket: RawFd) -> std::io::Result<()> {
    // SAFETY: the request's connection, open as long as its request runs.
    // The duplicate is close-on-exec.
    let duplicate = unsafe { BorrowedFd::borrow_raw(socket) }.try_clone_to_owned()?;
    // Readable interest is `EPOLLIN | EPOLLRDHUP`, edge-triggered.
    // SAFETY: `AsyncFd` owns the descriptor, open until it is dropped.
    let watched = unsafe { AsyncFd::register_with_interest(duplicate, Interest::READABLE)? };
    loop {
        let mut ready = watched.readable().await?;
        if ready.ready().is_read_closed() {
            return Ok(());
        }
        // Bytes, not the end: wait for the next change.
        ready.clear_ready();
    }
}
