//! The config file: its TOML schema, its defaults and its validation.
//!
//! `load` turns a file into one validated [`Config`]; nothing past this
//! module sees raw TOML. Every error names the file, the line and column
//! where known, the key, and what was expected, and maps to exit code 2.
//!
//! ```no_run
//! let config = session_proxy::config::load(std::path::Path::new("config/session-proxy.toml"))?;
//! println!("listening on {:?}", config.server.listen);
//! # Ok::<(), session_proxy::config::ConfigError>(())
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_json::{Map, Value};

/// The validated configuration. Times are whole seconds, as in the file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, for messages.
    pub file: PathBuf,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub session: SessionConfig,
    pub headers: HeaderConfig,
    pub store: StoreConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Resolved at load time; at least one.
    pub listen: Vec<SocketAddr>,
    /// 0 in the file is replaced by the number of CPUs.
    pub threads: usize,
    pub admin_listen: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    /// Both paths, or none.
    pub tls: Option<TlsFiles>,
    pub grace_period: u64,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Resolved once at load time (pingora must never resolve per request).
    pub addresses: Vec<SocketAddr>,
    pub tls: bool,
    pub sni: String,
    pub connect_timeout: u64,
    pub read_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
    /// `samesite = ""`: the attribute is left out.
    Omitted,
}

#[derive(Debug, Clone)]
pub struct CookieConfig {
    pub name: String,
    /// `None` for `cookie_domain = ""`.
    pub domain: Option<String>,
    pub path: String,
    /// 0 = a browser-session cookie.
    pub max_age: u64,
    pub secure: bool,
    pub httponly: bool,
    pub samesite: SameSite,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// At least one, each at least 32 bytes; the first signs.
    pub secret_keys: Vec<String>,
    pub cookie: CookieConfig,
    pub timeout: u64,
    /// `None` for `absolute_timeout = 0`.
    pub absolute_timeout: Option<u64>,
    pub touch_interval: u64,
    pub ignore_expiry: bool,
    pub ignore_change_ip: bool,
    pub expired_message: String,
    pub expired_status: u16,
    pub initializer: Map<String, Value>,
    pub save_uninitialized: bool,
    pub max_data_bytes: usize,
    pub lock: bool,
    /// Path prefixes, each starting with `/`.
    pub bypass: Vec<String>,
}

/// Header names, lower-cased and validated as HTTP header names.
#[derive(Debug, Clone)]
pub struct HeaderConfig {
    pub session: String,
    pub update: String,
    pub action: String,
    pub token_ttl: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Disk,
    Memory,
    Postgres,
    Redis,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub path: PathBuf,
    /// Required (non-empty) for postgres and redis.
    pub url: String,
    /// A plain SQL identifier (letters, digits, `_`, optionally `schema.`).
    pub table: String,
    pub key_prefix: String,
    pub sweep_interval: u64,
    pub max_entries: usize,
    pub fsync: bool,
}

/// A config that cannot be used. Displayed as one line a user can act on.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

/// Reads, defaults and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let _ = path;
    todo!("helper: config")
}
