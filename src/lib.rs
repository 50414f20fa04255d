//! session-proxy: a reverse proxy that gives legacy web apps server-side
//! sessions from the outside.
//!
//! The request path, in the order a request meets it:
//! [`proxy`] strips client-sent session headers, resolves the session from
//! the cookie ([`session::cookie`]) and the [`store`], checks expiry and IP
//! ([`session::policy`]), forwards the data as a signed token
//! ([`session::token`]), and applies the upstream's merge patch or action
//! ([`session::patch`]) before the response head leaves.

pub mod access_log;
pub mod admin;
pub mod allocator;
pub mod cli;
pub mod commands;
pub mod config;
pub mod hashing;
pub mod limits;
pub mod locks;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod session;
pub mod store;
pub mod throttle;
pub mod tls;
