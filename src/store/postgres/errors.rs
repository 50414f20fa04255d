//! How the `postgres` store's operations fail: [`Failure`] tells what
//! became of the connection (and what can be mended), and the functions
//! here turn the server's errors into [`StoreError`]s, whose messages
//! never quote a statement's parameters.

use std::fmt::Write;

use tokio_postgres::error::SqlState;

use crate::store::{Handle, StoreError};

/// Why an operation on a connection failed: the connection's state is
/// unknown (it is dropped, not returned to the pool), or the store refused
/// cleanly. The last three are mended (a closed connection is left
/// behind) and the operation made once more ([`PostgresStore::run`]).
///
/// [`PostgresStore::run`]: super::PostgresStore::run
pub(super) enum Failure {
    Connection(StoreError),
    Clean(StoreError),
    /// The connection was found closed: the server (a restart,
    /// `idle_session_timeout`) or something on the way (a firewall or a NAT
    /// that forgets idle connections, a pooler) closed it while it sat in
    /// the pool, unseen until this statement. Made once more on a new
    /// connection, as a Redis command is. Only a server that went away in
    /// the middle of the statement can have run it; the second run then
    /// decides again on what the first left, since the writes are
    /// versioned (it finds its version taken) or idempotent.
    Closed(StoreError),
    /// `undefined_table` (42P01): the table was dropped under the running
    /// proxy. Every statement on a pooled connection names only the table.
    NoTable(StoreError),
    /// A statement prepared on the connection no longer fits the table,
    /// made again in another layout ("cached plan must not change result
    /// type", 0A000).
    StalePlan(StoreError),
}

impl Failure {
    pub(super) fn into_error(self) -> StoreError {
        match self {
            Failure::Connection(error)
            | Failure::Clean(error)
            | Failure::Closed(error)
            | Failure::NoTable(error)
            | Failure::StalePlan(error) => error,
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Failure {
        let stale_plan = |db: &tokio_postgres::error::DbError| {
            db.code() == &SqlState::FEATURE_NOT_SUPPORTED
                && db
                    .message()
                    .starts_with("cached plan must not change result type")
        };
        match error.as_db_error() {
            Some(db) if db.code() == &SqlState::UNDEFINED_TABLE => {
                Failure::NoTable(unavailable(&error))
            }
            Some(db) if stale_plan(db) => Failure::StalePlan(unavailable(&error)),
            None if error.is_closed() => Failure::Closed(unavailable(&error)),
            _ => Failure::Connection(unavailable(&error)),
        }
    }
}

pub(super) fn timed_out() -> StoreError {
    StoreError::Unavailable("postgres: timed out".into())
}

pub(super) fn corrupt(handle: &Handle, detail: String) -> StoreError {
    StoreError::Corrupt {
        handle: handle.short().to_owned(),
        detail,
    }
}

/// A short message: the server's primary message or the I/O or TLS failure
/// with its causes ("error performing TLS handshake" alone says not why),
/// never the statement's parameters.
pub(super) fn unavailable(error: &tokio_postgres::Error) -> StoreError {
    let message = match error.as_db_error() {
        Some(db) => format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            certificate_hint(db)
        ),
        None => {
            let mut message = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                let _ = write!(message, ": {inner}");
                cause = inner.source();
            }
            message
        }
    };
    StoreError::Unavailable(format!("postgres: {message}"))
}

/// What to do when the server refuses a login for want of the right
/// client certificate (pg_hba.conf's `cert` method); else nothing.
fn certificate_hint(db: &tokio_postgres::error::DbError) -> &'static str {
    if db.code() != &SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        return "";
    }
    if db.message().contains("requires a valid client certificate") {
        "; the server takes a client certificate: name it and its key in the store URL's \
         sslcert and sslkey (README, \"TLS\")"
    } else if db
        .message()
        .starts_with("certificate authentication failed")
    {
        "; the certificate's CN must be the URL's user name (or be mapped to it in the \
         server's pg_ident.conf)"
    } else {
        ""
    }
}

/// The stored data is not JSON, or its atime not a number.
pub(super) fn is_bad_data(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::INVALID_TEXT_REPRESENTATION)
        || error.code() == Some(&SqlState::INVALID_PARAMETER_VALUE)
}

/// The stored data is JSON that `jsonb` cannot hold: a string with
/// `\u0000` in it, which `text` and JSON allow; a number past `numeric`
/// (`1e200000`); nesting deeper than the server's stack takes (some
/// thousands of levels, `max_stack_depth`). The proxy reads and keeps such
/// data as written. Only the one-statement write casts to `jsonb`; the
/// locking `modify` reads the text.
pub(super) fn is_beyond_jsonb(error: &tokio_postgres::Error) -> bool {
    [
        SqlState::UNTRANSLATABLE_CHARACTER,
        SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        SqlState::STATEMENT_TOO_COMPLEX,
    ]
    .iter()
    .any(|code| error.code() == Some(code))
}
