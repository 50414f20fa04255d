//! The command line (SPEC \[1\]).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "session-proxy",
    version,
    about = "A reverse proxy that gives legacy web apps server-side sessions"
)]
pub struct Cli {
    /// The config file.
    #[arg(short = 'c', long = "config", global = true, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run {
        /// Take the listening sockets over from a running proxy, which hands
        /// them over on SIGQUIT (`[server] upgrade_sock`), instead of binding.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the config and reach the store; prints `ok`.
    Check,
    /// Print a fresh 32-byte random secret, base64url.
    Keygen,
    /// Inspect or change the stored sessions (disk, postgres or redis store).
    Sessions {
        #[command(subcommand)]
        action: SessionsCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// One line per session: handle, created, last access, data size, ver.
    List,
    /// The record of one session, as JSON.
    Show { handle: String },
    /// Delete one session.
    Kill { handle: String },
    /// Delete every expired session now.
    PurgeExpired,
}
