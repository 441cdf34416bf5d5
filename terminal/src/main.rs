//! `terminal`: the possync POS daemon and its operator commands (see [`possync_terminal::cli`]).

use clap::Parser;
use possync_terminal::cli::{execute, Cli};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything is created: the database, its WAL, backups and the token are private.
    possync_terminal::data_dir::restrict_new_files();
    let cli = Cli::parse();
    possync_terminal::logging::init();
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(errorCode = %e.code(), error = %e, "command failed");
            eprintln!("{}", e.line());
            ExitCode::FAILURE
        }
    }
}
