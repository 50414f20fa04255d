//! The rules: the file as written ([`super::file`]) becomes a [`Config`],
//! or an error naming the key, what was expected and what was found.

use std::fs::OpenOptions;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::file::{self, File, Listen};
use super::source::Source;
use super::{
    Config, ConfigError, CookieConfig, HeaderConfig, SameSite, ServerConfig, SessionConfig,
    StoreConfig, StoreKind, TlsFiles, UpstreamConfig, SECRET_KEYS_ENV,
};
use crate::access_log::Destination;
use crate::store::postgres::is_plain_identifier;
use crate::store::postgres::tls::PostgresTls;
use crate::store::redis::RedisStore;

const MIN_SECRET_BYTES: usize = 32;
const MIN_TOKEN_TTL: u64 = 5;
/// `{}`, the smallest session data as compact JSON.
const MIN_DATA_BYTES: usize = 2;
/// The most proxy threads: each is an event loop that serves any number of
/// connections, so threads past the CPUs add no throughput, only memory,
/// files (about 8 each) and contention. The largest machines have under
/// 1024 CPUs (two 192-core EPYCs: 768 threads). A fixed bound, not a
/// multiple of this machine's CPUs, so that a config `check`ed on one
/// machine means the same on another.
const MAX_THREADS: usize = 1024;

/// Headers the proxy or HTTP itself gives a meaning; a session header named
/// like one of them would be stripped, merged or forwarded by mistake.
const RESERVED_HEADERS: [&str; 15] = [
    "cookie",
    "x-forwarded-for",
    "x-forwarded-proto",
    "set-cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

type Result<T> = std::result::Result<T, ConfigError>;

pub(super) fn config(file: File, src: &Source, env_keys: Option<&str>) -> Result<Config> {
    Ok(Config {
        file: src.file().to_path_buf(),
        server: server(file.server, src)?,
        upstream: upstream(file.upstream, src)?,
        session: session(file.session, src, env_keys)?,
        headers: headers(file.headers, src)?,
        store: store(file.store, src)?,
    })
}

fn server(server: file::Server, src: &Source) -> Result<ServerConfig> {
    let listen_keys: Vec<(String, String)> = match server.listen {
        Listen::One(address) => vec![("server.listen".to_owned(), address)],
        Listen::Many(addresses) => addresses
            .into_iter()
            .enumerate()
            .map(|(index, address)| (format!("server.listen[{index}]"), address))
            .collect(),
    };
    if listen_keys.is_empty() {
        return Err(src.error(
            "server.listen",
            "expected at least one \"host:port\", found an empty array",
        ));
    }
    let mut listen: Vec<SocketAddr> = Vec::new();
    for (key, address) in &listen_keys {
        // Like nginx, a name bound to several addresses listens on all of them.
        for resolved in resolve(src, key, address)? {
            listening_port(src, key, address, resolved, "127.0.0.1:8080")?;
            if listen.contains(&resolved) {
                continue;
            }
            // Only one of the two sockets could be bound: pingora retries
            // the other for 30 s, then its listeners are gone.
            if let Some(other) = listen.iter().find(|other| overlap(**other, resolved)) {
                return Err(src.error(
                    key,
                    format!(
                        "{resolved} overlaps {other}, also in server.listen (a wildcard address, \
                         0.0.0.0 or [::], takes its port on every address): only one could be \
                         listened on; list one of the two"
                    ),
                ));
            }
            listen.push(resolved);
        }
    }

    let admin_listen = match server.admin_listen.as_str() {
        "" => Vec::new(),
        address => {
            let resolved = resolve(src, "server.admin_listen", address)?;
            admin_addresses(src, address, resolved, &listen)?
        }
    };

    let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
    let threads = match server.threads {
        0 => cpus.min(MAX_THREADS),
        threads if threads > MAX_THREADS => {
            return Err(src.error(
                "server.threads",
                format!(
                    "expected at most {MAX_THREADS}, found {threads}; each thread serves any number of \
                     connections, so more threads than CPUs (this machine has {cpus}) add none: \
                     use 0 for one per CPU"
                ),
            ))
        }
        threads => threads,
    };

    let trusted_proxies = server
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(index, proxy)| trusted_proxy(src, index, proxy))
        .collect::<Result<_>>()?;

    let tls = match (server.tls_cert.is_empty(), server.tls_key.is_empty()) {
        (true, true) => None,
        (false, false) => {
            let files = TlsFiles {
                cert: readable_file(src, "server.tls_cert", &server.tls_cert)?,
                key: readable_file(src, "server.tls_key", &server.tls_key)?,
            };
            // Read now: a bad file is a config error, not a failed start.
            if let Some((key, problem)) = crate::tls::listener_problem(&files) {
                return Err(src.error(key, problem));
            }
            Some(files)
        }
        (false, true) => return Err(tls_half(src, "server.tls_cert", "server.tls_key")),
        (true, false) => return Err(tls_half(src, "server.tls_key", "server.tls_cert")),
    };

    Ok(ServerConfig {
        listen,
        threads,
        admin_listen,
        trusted_proxies,
        tls,
        grace_period: seconds(src, "server.grace_period", server.grace_period, 0)?,
        header_timeout: seconds(src, "server.header_timeout", server.header_timeout, 1)?,
        keepalive_timeout: seconds(src, "server.keepalive_timeout", server.keepalive_timeout, 1)?,
        send_timeout: seconds(src, "server.send_timeout", server.send_timeout, 1)?,
        body_timeout: seconds(src, "server.body_timeout", server.body_timeout, 1)?,
        upgrade_sock: upgrade_sock(src, &server.upgrade_sock)?,
        http2: server.http2,
        access_log: access_log(src, &server.access_log)?,
    })
}

/// The access log: off, standard output, or a file that can be opened
/// for append now. A file that does not exist yet is not created here
/// (`check` leaves no trace): its directory must exist and be writable.
fn access_log(src: &Source, path: &str) -> Result<Option<Destination>> {
    const KEY: &str = "server.access_log";
    match path {
        "" => return Ok(None),
        "-" => return Ok(Some(Destination::Stdout)),
        _ => {}
    }
    let path = PathBuf::from(path);
    let problem = match std::fs::symlink_metadata(&path) {
        Ok(metadata) if metadata.is_dir() => Some("it is a directory".to_string()),
        // Without waiting: opened for writing, a FIFO waits for a reader.
        Ok(_) => match OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(_) => None,
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    && std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo()) =>
            {
                Some("it is a FIFO that no process has open for reading (the proxy would wait for one); start the reader first".to_string())
            }
            Err(e) => Some(format!("it cannot be opened for append: {e}")),
        },
        Err(_) => {
            let directory = super::directory_of(&path);
            match std::fs::metadata(directory) {
                Ok(metadata) if metadata.is_dir() => writable(directory).err().map(|e| {
                    format!(
                        "its directory {} cannot be written to: {e}",
                        directory.display()
                    )
                }),
                _ => Some(format!(
                    "its directory {} does not exist",
                    directory.display()
                )),
            }
        }
    };
    match problem {
        None => Ok(Some(Destination::File(path))),
        Some(problem) => Err(src.error(
            KEY,
            format!(
                "cannot log to {}: {problem}; give a file the proxy's user can append to, \"-\" for standard output, or \"\" for no access log",
                path.display()
            ),
        )),
    }
}

/// Whether this process may create files in `directory`.
fn writable(directory: &Path) -> std::io::Result<()> {
    let name = std::ffi::CString::new(directory.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: access reads the NUL-terminated path it is given and keeps no pointer.
    match unsafe { libc::access(name.as_ptr(), libc::W_OK | libc::X_OK) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The path of the upgrade socket: one a Unix socket can be bound at, and
/// not a file of anything else, which the new process would delete.
fn upgrade_sock(src: &Source, path: &str) -> Result<Option<PathBuf>> {
    const KEY: &str = "server.upgrade_sock";
    if path.is_empty() {
        return Ok(None);
    }
    // sun_path holds 108 bytes with the closing NUL.
    if path.len() > 107 {
        return Err(src.error(
            KEY,
            format!("a Unix socket path is at most 107 bytes, found {} bytes; choose a shorter path such as \"/run/session-proxy/upgrade.sock\"", path.len()),
        ));
    }
    let path = PathBuf::from(path);
    let directory = super::directory_of(&path);
    if !directory.is_dir() {
        return Err(src.error(
            KEY,
            format!("the directory {} does not exist; create it (owned by the proxy's user, mode 0700) or choose another path", directory.display()),
        ));
    }
    if let Ok(metadata) = std::fs::symlink_metadata(&path) {
        if !metadata.file_type().is_socket() {
            return Err(src.error(
                KEY,
                format!("{} exists and is not a socket; an upgrade would delete it: choose another path", path.display()),
            ));
        }
    }
    Ok(Some(path))
}

/// The admin listener's addresses: as for `listen`, every address its
/// name resolves to, none of them one of `listen`'s or overlapping one.
pub(super) fn admin_addresses(
    src: &Source,
    address: &str,
    resolved: Vec<SocketAddr>,
    listen: &[SocketAddr],
) -> Result<Vec<SocketAddr>> {
    const ADMIN: &str = "server.admin_listen";
    let mut admin_listen: Vec<SocketAddr> = Vec::new();
    for admin in resolved {
        listening_port(src, ADMIN, address, admin, "127.0.0.1:9090")?;
        if admin_listen.contains(&admin) {
            continue;
        }
        // One socket would serve both: requests split between the
        // proxy and the admin app, /metrics on the public port.
        if listen.contains(&admin) {
            return Err(src.error(
                ADMIN,
                format!(
                    "{admin} is also in server.listen; the admin port must be a port of its own"
                ),
            ));
        }
        // Or one of the two would not be bound at all, whichever lost.
        if let Some(other) = listen.iter().find(|other| overlap(**other, admin)) {
            return Err(src.error(
                ADMIN,
                format!(
                    "{admin} overlaps {other} of server.listen (a wildcard address, 0.0.0.0 or [::], \
                     takes its port on every address); the admin port must be a port of its own"
                ),
            ));
        }
        if let Some(other) = admin_listen.iter().find(|other| overlap(**other, admin)) {
            return Err(src.error(
                ADMIN,
                format!(
                    "{address:?} resolves to {other} and {admin}, which overlap (a wildcard \
                     address takes its port on every address): only one could be listened on; \
                     give one IP address"
                ),
            ));
        }
        admin_listen.push(admin);
    }
    Ok(admin_listen)
}

/// Refuses port 0 for a listener: the kernel would pick a port anew at
/// each start, one no client, load balancer, health check or Prometheus
/// scrape knows, and that the log would name as `:0`.
fn listening_port(
    src: &Source,
    key: &str,
    address: &str,
    resolved: SocketAddr,
    example: &str,
) -> Result<()> {
    if resolved.port() != 0 {
        return Ok(());
    }
    Err(src.error(
        key,
        format!(
            "expected a port clients can be given, found {address:?}: port 0 takes a port the \
             kernel picks anew at each start, which nobody could reach; choose one, e.g. {example:?}"
        ),
    ))
}

/// Whether `a` and `b` are different addresses that cannot both be
/// listened on: the same port, one of them a wildcard that covers the
/// other (`[::]` covers IPv4 too: pingora leaves it dual-stack, the
/// kernel's default), or one IPv4 address written twice (`[::ffff:a.b.c.d]`).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wildcard: SocketAddr, other: SocketAddr| {
        wildcard.ip().is_unspecified() && (wildcard.is_ipv6() || other.is_ipv4())
    };
    let same_ip = a.ip().to_canonical() == b.ip().to_canonical();
    a != b && a.port() == b.port() && (same_ip || covers(a, b) || covers(b, a))
}

fn trusted_proxy(src: &Source, index: usize, proxy: &str) -> Result<IpNet> {
    let proxy = proxy.trim();
    proxy
        .parse::<IpNet>()
        .or_else(|_| proxy.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            src.error(
                &format!("server.trusted_proxies[{index}]"),
                format!("expected a CIDR such as \"10.0.0.0/8\" or an IP address, found {proxy:?}"),
            )
        })
}

fn tls_half(src: &Source, set: &str, missing: &str) -> ConfigError {
    src.error_near(
        set,
        missing,
        format!("is empty while {set} is set; set both PEM paths for HTTPS, or neither"),
    )
}

fn readable_file(src: &Source, key: &str, path: &str) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => Ok(PathBuf::from(path)),
        Ok(_) => Err(src.error(key, format!("expected a PEM file, found {path:?}, which is not a file"))),
        Err(error) => Err(src.error(
            key,
            format!("cannot read {path:?}: {error}; fix the path (relative paths start from the working directory)"),
        )),
    }
}

fn upstream(upstream: file::Upstream, src: &Source) -> Result<UpstreamConfig> {
    let Some(addresses) = upstream.addresses else {
        return Err(src.error(
            "upstream.addresses",
            "required; set it to the app's addresses, e.g. addresses = [\"127.0.0.1:8000\"] under [upstream]",
        ));
    };
    if addresses.is_empty() {
        return Err(src.error(
            "upstream.addresses",
            "expected at least one \"host:port\", found an empty array",
        ));
    }
    let hosts: Vec<String> = addresses.iter().map(|address| host_of(address)).collect();
    let addresses = addresses
        .iter()
        .enumerate()
        .map(|(index, address)| {
            let key = format!("upstream.addresses[{index}]");
            // `resolve` never returns an empty list.
            let resolved = resolve(src, &key, address)?[0];
            // Nothing listens on port 0: every request would be a 502.
            if resolved.port() == 0 {
                return Err(src.error(
                    &key,
                    format!("expected the app's port, found {address:?}: port 0 is no port to connect to"),
                ));
            }
            Ok(resolved)
        })
        .collect::<Result<_>>()?;

    let ca_file = match (upstream.ca_file.is_empty(), upstream.tls) {
        (true, true) => {
            crate::tls::check_system_cas().map_err(|problem| src.error("upstream.tls", problem))?;
            None
        }
        (true, false) => None,
        (false, true) => {
            let path = readable_file(src, "upstream.ca_file", &upstream.ca_file)?;
            crate::tls::check_ca_file(&path).map_err(|problem| src.error("upstream.ca_file", problem))?;
            Some(path)
        }
        (false, false) => {
            return Err(src.error(
                "upstream.ca_file",
                "is set while upstream.tls = false; set tls = true to reach the app over HTTPS, or remove ca_file",
            ))
        }
    };

    if upstream.tls {
        // The name the app's certificate must carry; one rustls cannot take
        // failed every request (502) once the proxy ran.
        let names: Vec<(String, &str)> = match upstream.sni.as_str() {
            "" => hosts
                .iter()
                .enumerate()
                .map(|(index, host)| (format!("upstream.addresses[{index}]"), host.as_str()))
                .collect(),
            sni => vec![("upstream.sni".to_string(), sni)],
        };
        for (key, name) in names {
            if pingora::tls::ServerName::try_from(name).is_err() {
                return Err(src.error(
                    &key,
                    format!(
                        "expected a DNS name or an IP address for the app's certificate (no scheme, port or spaces), found {name:?}"
                    ),
                ));
            }
        }
    }

    Ok(UpstreamConfig {
        addresses,
        hosts,
        tls: upstream.tls,
        sni: upstream.sni,
        ca_file,
        connect_timeout: seconds(src, "upstream.connect_timeout", upstream.connect_timeout, 1)?,
        read_timeout: seconds(src, "upstream.read_timeout", upstream.read_timeout, 1)?,
        reuse_after_body: upstream.reuse_after_body,
    })
}

/// The host of "host:port" as written: a name, or an IP address without
/// the brackets of IPv6.
fn host_of(address: &str) -> String {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _port)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Resolves "host:port" now, so that no request ever waits for DNS; the
/// list is never empty.
fn resolve(src: &Source, key: &str, address: &str) -> Result<Vec<SocketAddr>> {
    let resolved: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|error| {
            src.error(
                key,
                format!(
                    "expected \"host:port\" (e.g. \"127.0.0.1:8080\"), found {address:?}: {error}"
                ),
            )
        })?
        .collect();
    if resolved.is_empty() {
        return Err(src.error(
            key,
            format!("{address:?} resolves to no address; use an IP address"),
        ));
    }
    Ok(resolved)
}

fn session(session: file::Session, src: &Source, env_keys: Option<&str>) -> Result<SessionConfig> {
    let secret_keys = secret_keys(&session, src, env_keys)?;
    let cookie = cookie(&session, src)?;

    if !(200..=599).contains(&session.expired_status) {
        return Err(src.error(
            "session.expired_status",
            format!(
                "expected an HTTP status from 200 to 599, found {}",
                session.expired_status
            ),
        ));
    }
    // The expired answer carries `expired_message`: not a status that has
    // no content (RFC 9110 15.3.5, 15.3.6, 15.4.5).
    if [204, 205, 304].contains(&session.expired_status) {
        return Err(src.error(
            "session.expired_status",
            format!(
                "{} has no content, and the expired answer carries expired_message; use e.g. 200, 401 or 440",
                session.expired_status
            ),
        ));
    }
    let expired_status = session.expired_status as u16;

    let max_data_bytes = session.max_data_bytes;
    if max_data_bytes < MIN_DATA_BYTES {
        return Err(src.error(
            "session.max_data_bytes",
            format!(
                "expected at least {MIN_DATA_BYTES} (the size of {{}}), found {max_data_bytes}"
            ),
        ));
    }

    let mut initializer = Map::new();
    for (key, value) in session.initializer {
        let json = json_value(src, &format!("session.initializer.{key}"), value)?;
        initializer.insert(key, json);
    }
    let initializer_bytes = Value::Object(initializer.clone()).to_string().len();
    if initializer_bytes > max_data_bytes {
        return Err(src.error(
            "session.initializer",
            format!(
                "is {initializer_bytes} bytes as JSON, more than max_data_bytes ({max_data_bytes}); shrink it or raise max_data_bytes"
            ),
        ));
    }

    for (index, prefix) in session.bypass.iter().enumerate() {
        if !prefix.starts_with('/') {
            return Err(src.error(
                &format!("session.bypass[{index}]"),
                format!("expected a path prefix starting with \"/\", found {prefix:?}"),
            ));
        }
        // Matched against the path as the client sent it: percent-encoded,
        // so a raw "/ä/" or "/a b/" would never match a request.
        if !prefix.is_ascii() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(src.error(
                &format!("session.bypass[{index}]"),
                format!(
                    "expected the prefix as clients send paths, percent-encoded (\"/%C3%A4/\" for \"/ä/\"), found {prefix:?}"
                ),
            ));
        }
    }

    let timeout = at_least(src, "session.timeout", session.timeout, 1)?;
    // The access time is written at most every touch_interval seconds: at
    // timeout or more, a session in use would expire.
    if session.touch_interval >= timeout {
        return Err(src.error(
            "session.touch_interval",
            format!(
                "expected less than session.timeout ({timeout}), found {}: the access time is \
                 written at most this often, so sessions in use would expire; lower it",
                session.touch_interval
            ),
        ));
    }

    Ok(SessionConfig {
        secret_keys,
        cookie,
        timeout,
        absolute_timeout: (session.absolute_timeout > 0).then_some(session.absolute_timeout),
        touch_interval: session.touch_interval,
        ignore_expiry: session.ignore_expiry,
        ignore_change_ip: session.ignore_change_ip,
        expired_message: session.expired_message,
        expired_status,
        initializer,
        save_uninitialized: session.save_uninitialized,
        max_data_bytes,
        lock: session.lock,
        bypass: session.bypass,
    })
}

/// The keys from the environment when it has any, else from the file.
/// Messages give a key's place and length, never its value.
fn secret_keys(
    session: &file::Session,
    src: &Source,
    env_keys: Option<&str>,
) -> Result<Vec<String>> {
    if session.secret_keys.is_some() && session.secret_key.is_some() {
        return Err(src.error(
            "session.secret_key",
            "set either secret_key (one key) or secret_keys (a list), not both; move this key into secret_keys",
        ));
    }

    let from_env: Vec<String> = env_keys
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(str::to_owned)
        .collect();
    if !from_env.is_empty() {
        let count = from_env.len();
        for (index, key) in from_env.iter().enumerate() {
            if key.len() < MIN_SECRET_BYTES {
                return Err(src.error_outside(
                    SECRET_KEYS_ENV,
                    format!(
                        "key {} of {count} is {} bytes, expected at least {MIN_SECRET_BYTES}; generate one with `session-proxy keygen`",
                        index + 1,
                        key.len()
                    ),
                ));
            }
        }
        return Ok(from_env);
    }

    let from_file: Vec<(String, &String)> = match (&session.secret_key, &session.secret_keys) {
        (Some(key), _) => vec![("session.secret_key".to_owned(), key)],
        (None, Some(keys)) => keys
            .iter()
            .enumerate()
            .map(|(index, key)| (format!("session.secret_keys[{index}]"), key))
            .collect(),
        (None, None) => Vec::new(),
    };
    if from_file.is_empty() {
        return Err(src.error(
            "session.secret_keys",
            format!(
                "no secret key; run `session-proxy keygen` and set secret_keys = [\"<its output>\"] under [session], or set {SECRET_KEYS_ENV}"
            ),
        ));
    }
    for (key_path, key) in &from_file {
        if key.len() < MIN_SECRET_BYTES {
            return Err(src.error(
                key_path,
                format!(
                    "expected a secret of at least {MIN_SECRET_BYTES} bytes, found {} bytes; generate one with `session-proxy keygen`",
                    key.len()
                ),
            ));
        }
    }
    Ok(from_file.into_iter().map(|(_, key)| key.clone()).collect())
}

fn cookie(session: &file::Session, src: &Source) -> Result<CookieConfig> {
    let name = &session.cookie_name;
    if !is_token(name) {
        return Err(src.error(
            "session.cookie_name",
            format!(
                "expected a cookie name of letters, digits and !#$%&'*+-.^_`|~, found {name:?}"
            ),
        ));
    }

    let path = &session.cookie_path;
    if !path.starts_with('/') || path.contains(';') || path.chars().any(char::is_control) {
        return Err(src.error(
            "session.cookie_path",
            format!("expected a path starting with \"/\", without \";\" or control characters, found {path:?}"),
        ));
    }
    // Browsers match the cookie's path against the request's path as
    // sent, percent-encoded: "/ä b" matches nothing, and the cookie never
    // comes back.
    if !path.is_ascii() || path.contains(' ') {
        return Err(src.error(
            "session.cookie_path",
            format!(
                "expected the path as browsers send it, percent-encoded (\"/%C3%A4%20b\" for \"/ä b\"), found {path:?}"
            ),
        ));
    }

    let domain = &session.cookie_domain;
    if domain.contains(';') || domain.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(src.error(
            "session.cookie_domain",
            format!(
                "expected a domain such as \"example.com\" (or \"\" for none), found {domain:?}"
            ),
        ));
    }
    // Browsers drop a cookie whose Domain is not ASCII (RFC 6265: a
    // host name, IDNs in their A-label form).
    if !domain.is_ascii() {
        return Err(src.error(
            "session.cookie_domain",
            format!(
                "expected an ASCII domain, an internationalized name in its xn-- form (\"xn--exmple-cua.com\" for \"exämple.com\"), found {domain:?}"
            ),
        ));
    }

    let samesite = match session.samesite.to_ascii_lowercase().as_str() {
        "strict" => SameSite::Strict,
        "lax" => SameSite::Lax,
        "none" => SameSite::None,
        "" => SameSite::Omitted,
        _ => {
            return Err(src.error(
                "session.samesite",
                format!(
                    "expected \"strict\", \"lax\", \"none\" or \"\" (no attribute), found {:?}",
                    session.samesite
                ),
            ))
        }
    };
    if samesite == SameSite::None && !session.secure {
        return Err(src.error(
            "session.samesite",
            "\"none\" requires secure = true (browsers drop SameSite=None cookies without Secure); set secure = true or use \"lax\"",
        ));
    }

    // Browsers silently drop cookies that break their name prefix's rules.
    let lowercase_name = name.to_ascii_lowercase();
    if lowercase_name.starts_with("__secure-") && !session.secure {
        return Err(src.error(
            "session.cookie_name",
            "a name starting with \"__Secure-\" requires secure = true; set it or rename the cookie",
        ));
    }
    if lowercase_name.starts_with("__host-")
        && (!session.secure || path != "/" || !domain.is_empty())
    {
        return Err(src.error(
            "session.cookie_name",
            "a name starting with \"__Host-\" requires secure = true, cookie_path = \"/\" and cookie_domain = \"\"; set them or rename the cookie",
        ));
    }

    Ok(CookieConfig {
        name: name.clone(),
        domain: (!domain.is_empty()).then(|| domain.clone()),
        path: path.clone(),
        max_age: session.cookie_max_age,
        secure: session.secure,
        httponly: session.httponly,
        samesite,
    })
}

/// TOML to JSON; datetimes become their TOML text.
fn json_value(src: &Source, key: &str, value: toml::Value) -> Result<Value> {
    Ok(match value {
        toml::Value::String(text) => Value::String(text),
        toml::Value::Integer(number) => Value::from(number),
        toml::Value::Float(number) => match serde_json::Number::from_f64(number) {
            Some(number) => Value::Number(number),
            None => {
                return Err(src.error(
                    key,
                    format!("expected a finite number (JSON has no {number}), found {number}"),
                ))
            }
        },
        toml::Value::Boolean(flag) => Value::Bool(flag),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(values) => Value::Array(
            values
                .into_iter()
                .enumerate()
                .map(|(index, value)| json_value(src, &format!("{key}[{index}]"), value))
                .collect::<Result<_>>()?,
        ),
        toml::Value::Table(table) => {
            let mut object = Map::new();
            for (name, value) in table {
                let json = json_value(src, &format!("{key}.{name}"), value)?;
                object.insert(name, json);
            }
            Value::Object(object)
        }
    })
}

fn headers(headers: file::Headers, src: &Source) -> Result<HeaderConfig> {
    let named = [
        ("headers.session", &headers.session),
        ("headers.update", &headers.update),
        ("headers.action", &headers.action),
    ];
    let mut seen: Vec<(&str, String)> = Vec::new();
    for (key, name) in named {
        if !is_token(name) {
            return Err(src.error(
                key,
                format!(
                    "expected a header name of letters, digits and !#$%&'*+-.^_`|~, found {name:?}"
                ),
            ));
        }
        // CGI/WSGI servers read `_` as `-`, lighttpd any character but a
        // letter or digit: compare names as they (and the stripping) do.
        let normalized = name
            .to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "-");
        if RESERVED_HEADERS.contains(&normalized.as_str()) {
            return Err(src.error(
                key,
                format!("{name:?} is a header HTTP or the proxy already uses; choose another name, e.g. \"X-Session\""),
            ));
        }
        if let Some((other, _)) = seen.iter().find(|(_, seen)| *seen == normalized) {
            return Err(src.error(
                key,
                format!("{name:?} is the same header as {other} (case does not count, nor which character is not a letter or digit); the three headers must differ"),
            ));
        }
        seen.push((key, normalized));
    }

    Ok(HeaderConfig {
        session: headers.session.to_ascii_lowercase(),
        update: headers.update.to_ascii_lowercase(),
        action: headers.action.to_ascii_lowercase(),
        // At most a year: past i64, `exp` is a number many JWT libraries
        // (Java's, .NET's, Go's int64 claims) cannot read, and every token
        // would be refused.
        token_ttl: seconds(src, "headers.token_ttl", headers.token_ttl, MIN_TOKEN_TTL)?,
    })
}

fn store(store: file::Store, src: &Source) -> Result<StoreConfig> {
    let kind = match store.kind.to_ascii_lowercase().as_str() {
        "disk" => StoreKind::Disk,
        "memory" => StoreKind::Memory,
        "postgres" => StoreKind::Postgres,
        "redis" => StoreKind::Redis,
        _ => {
            return Err(src.error(
                "store.kind",
                format!(
                    "expected \"disk\", \"memory\", \"postgres\" or \"redis\", found {:?}",
                    store.kind
                ),
            ))
        }
    };

    // The URL may hold a password: messages show its scheme at most.
    match kind {
        StoreKind::Postgres => {
            check_url(src, &store.url, kind, &["postgres://", "postgresql://"])?;
            // sslmode and sslrootcert, and the CAs read now: a bad one would
            // only show as an unreachable store.
            let (rest, tls) = PostgresTls::from_url(&store.url)
                .map_err(|problem| src.error("store.url", problem))?;
            tls.connector()
                .map_err(|problem| src.error("store.url", problem))?;
            // Read as the store reads it: a URL it refused made `check`
            // exit 1, as if the server were down. tokio-postgres's messages
            // name the option, never its value.
            if let Err(error) = tokio_postgres::Config::from_str(&rest) {
                let cause = std::error::Error::source(&error)
                    .map(|cause| format!(": {cause}"))
                    .unwrap_or_default();
                return Err(src.error(
                    "store.url",
                    format!(
                        "{error}{cause}; expected postgres://user[:password]@host[:port]/database[?option=value&…]"
                    ),
                ));
            }
        }
        StoreKind::Redis => {
            check_url(src, &store.url, kind, &["redis://", "rediss://"])?;
            // As the store reads it (see above).
            if RedisStore::check_urls(&store.url).is_err() {
                return Err(src.error(
                    "store.url",
                    "the Redis client cannot read it; expected redis://[user:password@]host:port[/database number] (rediss:// for TLS), comma-separated for a Cluster's nodes",
                ));
            }
        }
        StoreKind::Disk | StoreKind::Memory => {}
    }

    // The store's own check: a name this let through and the store then
    // refused made `check` exit 1, as if the server were down.
    if !is_plain_identifier(&store.table) {
        return Err(src.error(
            "store.table",
            format!(
                "expected a SQL name such as \"sessions\" or \"schema.sessions\" (letters, digits and _, not starting with a digit, at most 63 of them either side of the dot), found {:?}",
                store.table
            ),
        ));
    }

    if store.path.is_empty() {
        return Err(src.error(
            "store.path",
            "expected a directory, found \"\"; e.g. path = \"sessions\"",
        ));
    }

    Ok(StoreConfig {
        kind,
        path: PathBuf::from(store.path),
        url: store.url,
        table: store.table,
        key_prefix: store.key_prefix,
        sweep_interval: seconds(src, "store.sweep_interval", store.sweep_interval, 1)?,
        max_entries: at_least(src, "store.max_entries", store.max_entries, 1)?,
        fsync: store.fsync,
        pool_size: pool_size(src, store.pool_size)?,
        timeout: seconds(src, "store.timeout", store.timeout, 1)?,
    })
}

/// PostgreSQL's own ceiling on `max_connections` (2^18 - 1): no server
/// takes more connections than this.
const MAX_POOL_SIZE: usize = 262_143;

/// `pool_size`: 0 (four per thread) or at most what a server could take.
/// The pools set aside a slot per connection when they are made: a size
/// of TOML's order panicked the store's opening (`check`, `run` and
/// `sessions` alike) instead of exiting 2.
fn pool_size(src: &Source, pool_size: usize) -> Result<usize> {
    if pool_size > MAX_POOL_SIZE {
        return Err(src.error(
            "store.pool_size",
            format!(
                "expected at most {MAX_POOL_SIZE} (PostgreSQL's ceiling on max_connections), \
                 found {pool_size}; use 0 for four per proxy thread"
            ),
        ));
    }
    Ok(pool_size)
}

/// A Redis Cluster lists several nodes, comma-separated; each needs a scheme.
fn check_url(src: &Source, url: &str, kind: StoreKind, schemes: &[&str]) -> Result<()> {
    let expected = schemes
        .iter()
        .map(|scheme| format!("{scheme:?}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let kind_name = format!("{kind:?}").to_ascii_lowercase();
    if url.trim().is_empty() {
        return Err(src.error(
            "store.url",
            format!(
                "required for kind = \"{kind_name}\"; set url = \"{}…\"",
                schemes[0]
            ),
        ));
    }
    let entries: Vec<&str> = match kind {
        StoreKind::Redis => url.split(',').map(str::trim).collect(),
        _ => vec![url.trim()],
    };
    for (index, entry) in entries.iter().enumerate() {
        if !schemes.iter().any(|scheme| entry.starts_with(scheme)) {
            let found = match entry.find("://") {
                Some(end) => format!("one starting with {:?}", &entry[..end + 3]),
                None if entry.is_empty() => "an empty entry".to_owned(),
                None => "one without a scheme".to_owned(),
            };
            let which = if entries.len() > 1 {
                format!(" (entry {} of {})", index + 1, entries.len())
            } else {
                String::new()
            };
            return Err(src.error(
                "store.url",
                format!("expected a URL starting with {expected}{which}, found {found}"),
            ));
        }
    }
    Ok(())
}

fn at_least<T: PartialOrd + std::fmt::Display>(
    src: &Source,
    key: &str,
    value: T,
    min: T,
) -> Result<T> {
    if value < min {
        return Err(src.error(key, format!("expected at least {min}, found {value}")));
    }
    Ok(value)
}

/// The longest wait a server or store timeout may set: a year. A wait is
/// a deadline from now, and one past what the clock can hold would panic.
const MAX_WAIT_SECONDS: u64 = 365 * 24 * 3600;

/// A timeout or grace period of the server, upstream or store, or the
/// token's lifetime, in seconds.
fn seconds(src: &Source, key: &str, value: u64, min: u64) -> Result<u64> {
    let value = at_least(src, key, value, min)?;
    if value > MAX_WAIT_SECONDS {
        return Err(src.error(
            key,
            format!("expected at most {MAX_WAIT_SECONDS} (a year), found {value}"),
        ));
    }
    Ok(value)
}

/// An RFC 7230 token: what header names and RFC 6265 cookie names are made of.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}
