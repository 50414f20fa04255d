//! The config loader: `config::parse` on any text, with or without the
//! secret keys' environment variable.
//!
//! Input: the config text; a NUL byte, if any, ends it and what follows is
//! the value of SESSION_PROXY_SECRET_KEYS.
//!
//! Checked: nothing panics; an error is one line that names the file; a
//! config that loads holds what validation promises (at least one listen
//! address and upstream, keys of 32 bytes or more, a token TTL of 5 or
//! more, an initializer within max_data_bytes).
//!
//! The loader resolves host names (once, at start). So that the fuzzer sends
//! no DNS queries, inputs whose address keys hold anything but IP literals
//! are skipped; the rest of the file is fuzzed as is.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use session_proxy::config;

const FILE: &str = "fuzz/session-proxy.toml";

fuzz_target!(|data: &[u8]| {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env = match env.map(std::str::from_utf8) {
        Some(Ok(env)) => Some(env),
        Some(Err(_)) => return,
        None => None,
    };
    if !offline(text) {
        return;
    }
    match config::parse(text, Path::new(FILE), env) {
        Ok(config) => {
            assert!(!config.server.listen.is_empty());
            assert!(!config.upstream.addresses.is_empty());
            assert!(!config.session.secret_keys.is_empty());
            assert!(config.session.secret_keys.iter().all(|key| key.len() >= 32));
            assert!(config.headers.token_ttl >= 5);
            let initializer =
                session_proxy::session::data::SessionData::from_map(&config.session.initializer);
            assert!(initializer.encoded_len() <= config.session.max_data_bytes);
        }
        Err(error) => {
            let message = error.to_string();
            assert!(message.starts_with(FILE), "{message}");
            assert!(!message.contains('\n'), "{message}");
        }
    }
});

/// True when every address the loader would resolve is an IP literal (or
/// something `to_socket_addrs` refuses without asking DNS).
fn offline(text: &str) -> bool {
    let Ok(value) = text.parse::<toml::Table>() else {
        return true; // refused before any address is looked at
    };
    let section = |name: &str| value.get(name).and_then(toml::Value::as_table);
    let mut addresses = Vec::new();
    if let Some(server) = section("server") {
        addresses.extend(server.get("listen"));
        addresses.extend(server.get("admin_listen"));
    }
    if let Some(upstream) = section("upstream") {
        addresses.extend(upstream.get("addresses"));
    }
    addresses.into_iter().all(|address| match address {
        toml::Value::String(text) => no_lookup(text),
        toml::Value::Array(items) => items.iter().all(|item| match item {
            toml::Value::String(text) => no_lookup(text),
            _ => true,
        }),
        _ => true,
    })
}

fn no_lookup(address: &str) -> bool {
    if address.is_empty() || address.parse::<SocketAddr>().is_ok() {
        return true;
    }
    // A lookup needs "host:port" with a port that parses.
    match address.rsplit_once(':') {
        Some((_, port)) => port.parse::<u16>().is_err(),
        None => true,
    }
}
