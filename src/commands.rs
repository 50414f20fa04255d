//! What each command of the command line does, once the config is loaded.

use std::io::{self, Write};
use std::process::ExitCode;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::cli::SessionsCommand;
use crate::config::{Config, StoreKind};
use crate::session::cookie::Handle;
use crate::store::{self, Expiry, Store};

/// 32 bytes from the OS's CSPRNG, base64url without padding (43 chars).
pub fn keygen() -> String {
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    URL_SAFE_NO_PAD.encode(key)
}

/// Writes `session-proxy: MESSAGE` to standard error. One that cannot be
/// written (a full disk, a pipe closed early) is lost, not the exit code:
/// `eprintln!` panicked there, and a config error exited 101, not 2.
pub fn complain(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "session-proxy: {message}");
}

/// `keygen`: a fresh key on standard output. A key that could not be
/// written (`keygen > key.txt` on a full disk) is an error, exit 1.
pub fn print_keygen() -> ExitCode {
    let key = keygen();
    match print_out(|out| writeln!(out, "{key}")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            complain(format_args!("keygen: {e}"));
            ExitCode::FAILURE
        }
    }
}

pub fn run(config: Config, upgrade: bool) -> ExitCode {
    if upgrade && config.server.upgrade_sock.is_none() {
        complain(format_args!(
            "{}: run --upgrade takes the listeners over a Unix socket: set [server] upgrade_sock, in this config and in the running proxy's",
            config.file.display()
        ));
        return ExitCode::from(2);
    }
    // Named as `check` names it: with several proxies on one host, which
    // config could not start.
    let file = config.file.clone();
    match crate::server::run(config, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            complain(format_args!("{}: {e}", file.display()));
            ExitCode::FAILURE
        }
    }
}

/// `ok` and 0, or the store's error (or the output's) and 1 (a bad
/// config exits 2 earlier).
pub fn check(config: &Config) -> ExitCode {
    match crate::server::check_store(config).and_then(|()| print_out(|out| writeln!(out, "ok"))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            complain(format_args!("{}: {e}", config.file.display()));
            ExitCode::FAILURE
        }
    }
}

pub fn sessions(config: &Config, command: SessionsCommand) -> ExitCode {
    // This process would open a memory store of its own, empty: `list`
    // would show nothing and `kill` say "no session" of a session that
    // the running proxy goes on serving.
    if config.store.kind == StoreKind::Memory {
        complain(format_args!(
            "{}: store.kind = \"memory\" keeps the sessions inside the running proxy, \
             where `sessions` cannot reach them; use the disk, postgres or redis store to list or kill \
             sessions from the command line",
            config.file.display()
        ));
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            complain(format_args!(
                "{}: cannot start a runtime: {e}",
                config.file.display()
            ));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let store = store::open(config).await.map_err(|e| e.to_string())?;
        sessions_with(store.as_ref(), config, command).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // As `check`: the config whose store it is (the store's own
        // errors name its directory or server).
        Err(e) => {
            complain(format_args!("{}: {e}", config.file.display()));
            ExitCode::FAILURE
        }
    }
}

async fn sessions_with(
    store: &dyn Store,
    config: &Config,
    command: SessionsCommand,
) -> Result<(), String> {
    match command {
        SessionsCommand::List => {
            let mut sessions = store.list().await.map_err(|e| e.to_string())?;
            sessions.sort_by_key(|(_, record)| std::cmp::Reverse(record.atime));
            print_out(|out| {
                writeln!(
                    out,
                    "{:<64}  {:<20}  {:<20}  {:>6}  ver",
                    "handle", "created", "last access", "bytes"
                )?;
                for (handle, record) in sessions {
                    writeln!(
                        out,
                        "{handle}  {}  {}  {:>6}  {}",
                        utc(record.created),
                        utc(record.atime),
                        record.data.encoded_len(),
                        record.ver
                    )?;
                }
                Ok(())
            })
        }
        SessionsCommand::Show { handle } => {
            let handle = parse_handle(&handle)?;
            let record = store.load(&handle).await.map_err(|e| e.to_string())?;
            let record = record.ok_or_else(|| format!("no session {handle}"))?;
            // Through a Value, so the data is indented too (it is kept as
            // compact text, which would print as one line). Data a Value
            // cannot hold (a number past f64's range, such as `1e400`, which
            // the stores keep as text) is printed as it is stored, on one line.
            let text = match serde_json::to_value(&record) {
                Ok(value) => serde_json::to_string_pretty(&value),
                Err(_) => serde_json::to_string(&record),
            }
            .map_err(|e| e.to_string())?;
            print_out(|out| writeln!(out, "{text}"))
        }
        SessionsCommand::Kill { handle } => {
            let handle = parse_handle(&handle)?;
            match store.delete(&handle).await.map_err(|e| e.to_string())? {
                true => print_out(|out| writeln!(out, "killed {handle}")),
                false => Err(format!("no session {handle}")),
            }
        }
        SessionsCommand::PurgeExpired => {
            let expiry = Expiry {
                timeout: config.session.timeout,
                absolute: config.session.absolute_timeout,
            };
            let deleted = store
                .delete_expired(crate::session::now(), expiry)
                .await
                .map_err(|e| e.to_string())?;
            print_out(|out| writeln!(out, "deleted {deleted} expired session(s)"))
        }
    }
}

/// Writes a command's output to standard output. A reader that went away
/// early (`sessions list | head`) ends the output and is no failure, as
/// for other command-line tools: `println!` panicked on the broken pipe.
fn print_out(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), String> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write the output: {error}"))
        }
        _ => Ok(()),
    }
}

fn parse_handle(text: &str) -> Result<Handle, String> {
    Handle::parse(text).ok_or_else(|| {
        format!(
            "{text:?} is not a session handle (64 lowercase hex digits, as `sessions list` prints)"
        )
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (proleptic Gregorian).
fn utc(seconds: u64) -> String {
    let (year, month, day) = crate::access_log::civil_from_days((seconds / 86_400) as i64);
    let rem = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_43_base64url_characters_and_differ() {
        let (a, b) = (keygen(), keygen());
        assert_eq!(a.len(), 43);
        assert!(URL_SAFE_NO_PAD
            .decode(&a)
            .is_ok_and(|bytes| bytes.len() == 32));
        assert_ne!(a, b);
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_687_713), "2026-11-26T10:08:33Z");
    }
}
