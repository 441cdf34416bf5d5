//! `simulations run …`: many terminals, many branches, real cloud processes, seeded faults.
//! Exits 0 only when nothing was lost, doubled or crossed and every catalog converged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use possync_simulations::cloud_cluster::DEFAULT_PG_SERVER;
use possync_simulations::fault_schedule::{FaultMode, FaultSchedule};
use possync_simulations::scenario::{run, RunConfig};
use possync_simulations::terminal_fleet::DaemonTuning;

#[derive(Parser)]
#[command(
    name = "simulations",
    about = "Multi-terminal sync simulations with seeded faults"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a simulation and audit it.
    Run(RunArgs),
    /// Print the fault schedule a seed and shape produce, as JSON (nothing is started).
    Schedule(RunArgs),
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, default_value_t = 4)]
    terminals: usize,
    #[arg(long, default_value_t = 2)]
    branches: usize,
    /// Sales per terminal.
    #[arg(long, default_value_t = 30)]
    sales: u32,
    #[arg(long, value_enum, default_value_t = FaultMode::All)]
    faults: FaultMode,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/simulation-report.json")]
    report: PathBuf,
    #[arg(long, default_value_t = 1)]
    cloud_instances: usize,
    /// Use this (fresh) database instead of creating one on --pg-server.
    #[arg(long)]
    database_url: Option<String>,
    /// PostgreSQL server on which the run creates its database.
    #[arg(long, env = "POSSYNC_SIM_PG_SERVER", default_value = DEFAULT_PG_SERVER)]
    pg_server: String,
    /// Add a terminal that floods the API far over its rate limit.
    #[arg(long)]
    abusive_terminal: bool,
    /// Mean pause between two sales of one terminal, in ms.
    #[arg(long, default_value_t = 20)]
    pace_ms: u64,
    #[arg(long, default_value_t = 50)]
    backoff_base_ms: u64,
    #[arg(long, default_value_t = 1000)]
    backoff_cap_ms: u64,
    #[arg(long, default_value_t = 500)]
    delta_interval_ms: u64,
    /// The terminals' attempt budget (compressed, so the run's outage outlasts it several
    /// times over: no sale may end in needs_attention anyway).
    #[arg(long, default_value_t = 4)]
    max_attempts: u32,
    /// Longest wait for every journal to settle after the faults stop.
    #[arg(long, default_value_t = 180)]
    quiescence_timeout_s: u64,
    /// Longest wait for every catalog to match its branch's truth.
    #[arg(long, default_value_t = 60)]
    catalog_timeout_s: u64,
    /// Directory for logs and terminal data (default: a new one under the temp dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Keep the run directory and database even if the run passes.
    #[arg(long)]
    keep: bool,
    /// Harness self-test: forge `accepted` for terminal 0's first sales batch (never reaching
    /// the cloud). The run must then FAIL with lost > 0; if it passes, the audit is broken.
    #[arg(long)]
    sabotage: bool,
}

impl RunArgs {
    fn config(&self) -> RunConfig {
        RunConfig {
            terminals: self.terminals.max(1),
            branches: self.branches.max(1),
            sales: self.sales,
            faults: self.faults,
            seed: self.seed,
            cloud_instances: self.cloud_instances.max(1),
            database_url: self.database_url.clone(),
            pg_server: self.pg_server.clone(),
            abusive_terminal: self.abusive_terminal,
            pace_ms: self.pace_ms,
            tuning: DaemonTuning {
                backoff_base_ms: self.backoff_base_ms,
                backoff_cap_ms: self.backoff_cap_ms,
                delta_interval_ms: self.delta_interval_ms,
                max_attempts: self.max_attempts.max(1),
            },
            quiescence_timeout: Duration::from_secs(self.quiescence_timeout_s),
            catalog_timeout: Duration::from_secs(self.catalog_timeout_s),
            run_dir: self.run_dir.clone(),
            keep: self.keep,
            sabotage: self.sabotage,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .json()
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Schedule(args) => {
            let s = FaultSchedule::generate(args.config().shape());
            match serde_json::to_string_pretty(&s) {
                Ok(j) => {
                    println!("{j}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("schedule: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let cfg = args.config();
            match run(cfg).await {
                Ok(report) => {
                    if let Some(dir) = args.report.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    match serde_json::to_vec_pretty(&report) {
                        Ok(json) => {
                            if let Err(e) = std::fs::write(&args.report, json) {
                                eprintln!("writing {}: {e}", args.report.display());
                                return ExitCode::FAILURE;
                            }
                        }
                        Err(e) => {
                            eprintln!("report: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    print!("{}", report.summary());
                    println!("  report: {}", args.report.display());
                    if report.passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("simulation could not run (seed {}): {e}", args.seed);
                    ExitCode::from(2)
                }
            }
        }
    }
}
