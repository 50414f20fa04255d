//! The config file: its TOML schema, its defaults and its validation.
//!
//! `load` turns a file into one validated [`Config`]; nothing past this
//! module sees raw TOML. Every error names the file, the line and column
//! where known, the key, and what was expected, and maps to exit code 2.
//!
//! The layers: `file` is the file as written (serde, defaults),
//! `validate` checks it into the types below, and `source` finds where
//! in the file an error belongs.
//!
//! ```no_run
//! let config = session_proxy::config::load(std::path::Path::new("config/session-proxy.toml"))?;
//! println!("listening on {:?}", config.server.listen);
//! # Ok::<(), session_proxy::config::ConfigError>(())
//! ```
//!
//! An error reads, on one line:
//!
//! ```text
//! config/session-proxy.toml:14:12: session.samesite: expected "strict", "lax", "none" or "" (no attribute), found "bogus"
//! ```

mod file;
mod source;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_json::{Map, Value};

use source::Source;

/// Where `-c` points when it is not given.
pub const DEFAULT_PATH: &str = "config/session-proxy.toml";

/// Comma-separated secret keys; when set and non-empty, they replace the
/// file's `session.secret_keys`, so secrets can stay out of the file.
pub const SECRET_KEYS_ENV: &str = "SESSION_PROXY_SECRET_KEYS";

/// The directory a file path names its file in (`.` for a bare name).
pub fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

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
    /// 0 in the file is replaced by the number of CPUs; at most 1024.
    pub threads: usize,
    /// Resolved at load time, every address of its name; empty = off.
    pub admin_listen: Vec<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    /// Both paths, or none.
    pub tls: Option<TlsFiles>,
    pub grace_period: u64,
    /// Seconds from the first byte of a request head to its end.
    pub header_timeout: u64,
    /// Seconds a client connection may sit idle before (and between) requests.
    pub keepalive_timeout: u64,
    /// Seconds a client may take to accept each write of a response.
    pub send_timeout: u64,
    /// Seconds a request body may go without a byte while the client may
    /// send (nginx's `client_body_timeout`).
    pub body_timeout: u64,
    /// Where a new process started with `run --upgrade` waits for the
    /// listening sockets of this one (`None`: no upgrades).
    pub upgrade_sock: Option<PathBuf>,
    /// Whether the TLS listeners offer HTTP/2 (`h2`) in ALPN besides
    /// HTTP/1.1. Plain listeners speak HTTP/1.1 only, whatever it says.
    pub http2: bool,
    /// Where the access log goes; `None`: no access log.
    pub access_log: Option<crate::access_log::Destination>,
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
    /// The host of each address as written (a name or an IP address):
    /// with `tls`, what the upstream's certificate must name when `sni`
    /// is empty.
    pub hosts: Vec<String>,
    pub tls: bool,
    pub sni: String,
    /// With `tls`: the CAs the upstream's certificate is checked against;
    /// `None` = the system's.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: u64,
    pub read_timeout: u64,
    /// Whether an upstream connection goes back to the pool after a
    /// request with a body: only safe with a server that reads or discards
    /// every request body (README, "Framing").
    pub reuse_after_body: bool,
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

#[derive(Clone)]
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

// By hand, so that logging a config never prints the secret keys.
impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<String> = self
            .secret_keys
            .iter()
            .map(|key| format!("<{} bytes>", key.len()))
            .collect();
        f.debug_struct("SessionConfig")
            .field("secret_keys", &keys)
            .field("cookie", &self.cookie)
            .field("timeout", &self.timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .field("touch_interval", &self.touch_interval)
            .field("ignore_expiry", &self.ignore_expiry)
            .field("ignore_change_ip", &self.ignore_change_ip)
            .field("expired_message", &self.expired_message)
            .field("expired_status", &self.expired_status)
            .field("initializer", &self.initializer)
            .field("save_uninitialized", &self.save_uninitialized)
            .field("max_data_bytes", &self.max_data_bytes)
            .field("lock", &self.lock)
            .field("bypass", &self.bypass)
            .finish()
    }
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
    /// PostgreSQL connections; 0 = four per proxy thread.
    pub pool_size: usize,
    /// Seconds a shared-store operation may take before it counts as a failure.
    pub timeout: u64,
}

/// A config that cannot be used. Displayed as one line a user can act on.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

/// Reads, defaults and validates the config file at `path`, taking secret
/// keys from [`SECRET_KEYS_ENV`] when it is set.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let env_keys = match std::env::var(SECRET_KEYS_ENV) {
        Ok(keys) => Some(keys),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(ConfigError {
                message: format!("{SECRET_KEYS_ENV} is not valid UTF-8; set it to keys printed by `session-proxy keygen`"),
            })
        }
    };
    load_with_env(path, env_keys.as_deref())
}

/// [`load`], with the value of [`SECRET_KEYS_ENV`] given rather than read,
/// so that tests need not change the process environment.
pub fn load_with_env(path: &Path, env_keys: Option<&str>) -> Result<Config, ConfigError> {
    let text = read_config_text(path).map_err(|error| ConfigError {
        message: match error.kind() {
            std::io::ErrorKind::FileTooLarge => format!(
                "{}: the config file is larger than {} MiB, which no config is; pass -c FILE with the config file's path",
                path.display(),
                MAX_CONFIG_BYTES >> 20
            ),
            // The file is there: creating it is not the fix.
            std::io::ErrorKind::InvalidData => format!(
                "{}: the config file is not UTF-8 text; save it as UTF-8 (TOML is UTF-8)",
                path.display()
            ),
            std::io::ErrorKind::NotFound => format!(
                "{}: cannot read the config file: {error}; create it (the repository's {DEFAULT_PATH} is a commented example) or pass -c FILE",
                path.display()
            ),
            std::io::ErrorKind::IsADirectory => format!(
                "{}: cannot read the config file: it is a directory; pass -c FILE with the config file's path",
                path.display()
            ),
            // There, but not readable (permissions): creating it is not the fix.
            _ => format!(
                "{}: cannot read the config file: {error}; let the proxy's user read it, or pass -c FILE",
                path.display()
            ),
        },
    })?;
    parse(&text, path, env_keys)
}

/// A config is a few KB; an initializer as large as `max_data_bytes` allows
/// fits many times over. Past this, `-c` names something else (`/dev/zero`,
/// a log file), which would otherwise be read into memory to its end.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The config file as text, at most [`MAX_CONFIG_BYTES`] of it.
fn read_config_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::ErrorKind::FileTooLarge.into());
    }
    String::from_utf8(bytes)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}

/// Validates config `text`, read from `file` (used in messages only).
pub fn parse(text: &str, file: &Path, env_keys: Option<&str>) -> Result<Config, ConfigError> {
    let source = Source::new(file, text);
    let raw: file::File = toml::from_str(text).map_err(|error| source.toml_error(&error))?;
    validate::config(raw, &source, env_keys)
}

#[cfg(test)]
mod tests;
