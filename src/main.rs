//! `session-proxy`: the command line, the config, then the server.

use std::process::ExitCode;

use clap::Parser;
use session_proxy::cli::{Cli, Command};
use session_proxy::{commands, config, logging};

// glibc's malloc and free were about a fifth of the proxy's user-space
// instructions per request; mimalloc cuts them (issue 5, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: session_proxy::allocator::MiMalloc = session_proxy::allocator::MiMalloc;

fn main() -> ExitCode {
    logging::init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run { upgrade: false });
    if let Command::Keygen = command {
        return commands::print_keygen();
    }
    let config = match config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            commands::complain(format_args!("{e}"));
            return ExitCode::from(2);
        }
    };
    logging::protect(&config.session.secret_keys);
    match command {
        Command::Run { upgrade } => commands::run(config, upgrade),
        Command::Check => commands::check(&config),
        Command::Sessions { action } => commands::sessions(&config, action),
        Command::Keygen => ExitCode::SUCCESS,
    }
}
