//! `session-proxy`: the command line, the config, then the server.

use std::process::ExitCode;

use clap::Parser;
use session_proxy::cli::{Cli, Command};
use session_proxy::{commands, config};

// glibc's malloc and free were about a fifth of the proxy's user-space
// instructions per request; mimalloc cuts them (issue 5, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Keygen = command {
        println!("{}", commands::keygen());
        return ExitCode::SUCCESS;
    }
    let config = match config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("session-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Run => commands::run(config),
        Command::Check => commands::check(&config),
        Command::Sessions { action } => commands::sessions(&config, action),
        Command::Keygen => ExitCode::SUCCESS,
    }
}
