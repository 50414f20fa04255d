//! The config file as written: the serde schema of SPEC section 2.
//!
//! Every table rejects unknown keys, and every key that is not required has
//! the default the spec shows, spelled out once in the `Default` impls below.
//! Nothing here checks values; `validate` does, into the internal types.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct File {
    pub server: Server,
    pub upstream: Upstream,
    pub session: Session,
    pub headers: Headers,
    pub store: Store,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Server {
    pub listen: Listen,
    pub threads: usize,
    pub admin_listen: String,
    pub trusted_proxies: Vec<String>,
    pub tls_cert: String,
    pub tls_key: String,
    pub grace_period: u64,
    pub header_timeout: u64,
    pub keepalive_timeout: u64,
    pub send_timeout: u64,
    pub body_timeout: u64,
    pub upgrade_sock: String,
    pub http2: bool,
    pub access_log: String,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: Listen::One("127.0.0.1:8080".into()),
            threads: 0,
            admin_listen: String::new(),
            trusted_proxies: Vec::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            grace_period: 10,
            header_timeout: 10,
            keepalive_timeout: 60,
            send_timeout: 60,
            body_timeout: 60,
            upgrade_sock: String::new(),
            http2: true,
            access_log: String::new(),
        }
    }
}

/// `listen = "host:port"` or `listen = ["host:port", …]`.
#[derive(Debug)]
pub(super) enum Listen {
    One(String),
    Many(Vec<String>),
}

// Hand-written rather than `#[serde(untagged)]`, whose error ("did not match
// any variant") would not say what is expected.
impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListenVisitor;

        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = Listen;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a \"host:port\" string or an array of them")
            }

            fn visit_str<E: de::Error>(self, address: &str) -> Result<Listen, E> {
                Ok(Listen::One(address.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listen, A::Error> {
                let mut addresses = Vec::new();
                while let Some(address) = seq.next_element()? {
                    addresses.push(address);
                }
                Ok(Listen::Many(addresses))
            }
        }

        deserializer.deserialize_any(ListenVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Upstream {
    /// Required: `None` when the key is absent.
    pub addresses: Option<Vec<String>>,
    pub tls: bool,
    pub sni: String,
    pub ca_file: String,
    pub connect_timeout: u64,
    pub read_timeout: u64,
    pub reuse_after_body: bool,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            addresses: None,
            tls: false,
            sni: String::new(),
            ca_file: String::new(),
            connect_timeout: 2,
            read_timeout: 30,
            reuse_after_body: false,
        }
    }
}

// No `Debug`: it would print the secret keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Session {
    /// `None` when absent, so that setting it next to `secret_key` is caught.
    pub secret_keys: Option<Vec<String>>,
    pub secret_key: Option<String>,
    pub cookie_name: String,
    pub cookie_domain: String,
    pub cookie_path: String,
    pub cookie_max_age: u64,
    pub secure: bool,
    pub httponly: bool,
    pub samesite: String,
    pub timeout: u64,
    pub absolute_timeout: u64,
    pub touch_interval: u64,
    pub ignore_expiry: bool,
    pub ignore_change_ip: bool,
    pub expired_message: String,
    pub expired_status: u64,
    pub initializer: toml::Table,
    pub save_uninitialized: bool,
    pub max_data_bytes: usize,
    pub lock: bool,
    pub bypass: Vec<String>,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            secret_keys: None,
            secret_key: None,
            cookie_name: "session_id".into(),
            cookie_domain: String::new(),
            cookie_path: "/".into(),
            cookie_max_age: 0,
            secure: false,
            httponly: true,
            samesite: "lax".into(),
            timeout: 86400,
            absolute_timeout: 0,
            touch_interval: 60,
            ignore_expiry: true,
            ignore_change_ip: true,
            expired_message: "Session expired".into(),
            expired_status: 200,
            initializer: toml::Table::new(),
            save_uninitialized: false,
            max_data_bytes: 4096,
            lock: false,
            bypass: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("cookie_name", &self.cookie_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Headers {
    pub session: String,
    pub update: String,
    pub action: String,
    pub token_ttl: u64,
}

impl Default for Headers {
    fn default() -> Self {
        Self {
            session: "X-Session".into(),
            update: "X-Session-Update".into(),
            action: "X-Session-Action".into(),
            token_ttl: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Store {
    pub kind: String,
    pub path: String,
    pub url: String,
    pub table: String,
    pub key_prefix: String,
    pub sweep_interval: u64,
    pub max_entries: usize,
    pub fsync: bool,
    pub pool_size: usize,
    pub timeout: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            kind: "disk".into(),
            path: "sessions".into(),
            url: String::new(),
            table: "sessions".into(),
            key_prefix: "session:".into(),
            sweep_interval: 60,
            max_entries: 1_000_000,
            fsync: false,
            pool_size: 0,
            timeout: 2,
        }
    }
}
