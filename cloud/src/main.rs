//! `cloud`: the possync cloud binary. All logic lives in the library; this only parses the
//! command line, runs it, and turns a failure into one line on stderr and a non-zero exit.

use clap::Parser as _;
use possync_cloud::cli::{self, Cli, Command};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other failure: clap's message without the usage block.
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            eprintln!("{}", line.join(" "));
            std::process::exit(2);
        }
    };
    let result = match &cli.command {
        Command::Serve(args) => {
            possync_cloud::telemetry::init("info");
            match cli::serve_config(&cli, args) {
                Ok(config) => actix_web::rt::System::new().block_on(cli::run_serve(config)),
                Err(e) => Err(e),
            }
        }
        _ => {
            possync_cloud::telemetry::init("warn");
            cli::run_admin_command(&cli)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
