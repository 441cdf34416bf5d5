//! `simulations run …`: many terminals, many branches, real cloud processes, seeded faults.
//! Exits 0 only when nothing was lost, doubled or crossed and every catalog converged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use possync_simulations::cloud_cluster::DEFAULT_PG_SERVER;
use possync_simulations::fault_schedule::{FaultMode, FaultSchedule};
use possync_simulations::load::LoadConfig;
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
    /// A virtual fleet against the TLS deployment (docs/deployment.md); exits non-zero on any
    /// lost or duplicated sale or any response that is neither 2xx nor 429.
    Load(LoadArgs),
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Virtual terminals (async tasks speaking the real protocol).
    #[arg(long)]
    terminals: usize,
    /// Branches (terminal i belongs to branch i mod M).
    #[arg(long)]
    branches: usize,
    /// Seconds of selling and polling (then up to 120 s to deliver what is held).
    #[arg(long)]
    duration: u64,
    /// An existing deployment (HTTPS URL); needs --database-url and POSSYNC_ADMIN_TOKEN.
    #[arg(long, conflicts_with = "instances")]
    cloud_url: Option<String>,
    /// CA certificate (PEM) for --cloud-url.
    #[arg(long, requires = "cloud_url")]
    ca_cert: Option<PathBuf>,
    /// The --cloud-url deployment's database (bulk enrolment and the audit).
    #[arg(long, requires = "cloud_url")]
    database_url: Option<String>,
    /// Cloud instances of the cluster the run starts (scripts/cluster) without --cloud-url.
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Catalog entities seeded before the run.
    #[arg(long, default_value_t = 1000)]
    catalog: usize,
    /// Terminals that start cold: a full snapshot, all at the same moment.
    #[arg(long, default_value_t = 0)]
    cold: usize,
    /// Sales per terminal per minute.
    #[arg(long, default_value_t = 1.0)]
    sales_per_terminal_per_minute: f64,
    /// Seconds between two delta polls of one terminal (±20 % jitter).
    #[arg(long, default_value_t = 30.0)]
    poll_seconds: f64,
    /// Catalog changes per minute during the run.
    #[arg(long, default_value_t = 4.0)]
    catalog_changes_per_minute: f64,
    /// kill -9 one cloud instance a third into the run, and start it again.
    #[arg(long)]
    chaos: bool,
    /// PostgreSQL server on which the run creates its database.
    #[arg(long, env = "POSSYNC_SIM_PG_SERVER", default_value = DEFAULT_PG_SERVER)]
    pg_server: String,
    /// With --chaos: shell command restarting that PostgreSQL server during the run, e.g.
    /// `pg_ctlcluster 15 chaos restart` — give the run a server of its own (--pg-server).
    #[arg(long, requires = "chaos")]
    chaos_restart_postgres: Option<String>,
    #[arg(long)]
    seed: u64,
    /// Where the JSON report goes.
    #[arg(long)]
    report: PathBuf,
}

impl LoadArgs {
    fn config(&self) -> LoadConfig {
        LoadConfig {
            terminals: self.terminals,
            branches: self.branches,
            duration: Duration::from_secs(self.duration),
            cloud_url: self.cloud_url.clone(),
            ca_cert: self.ca_cert.clone(),
            database_url: self.database_url.clone(),
            instances: self.instances,
            catalog: self.catalog,
            cold: self.cold,
            sales_per_minute: self.sales_per_terminal_per_minute,
            poll_seconds: self.poll_seconds,
            changes_per_minute: self.catalog_changes_per_minute,
            seed: self.seed,
            chaos: self.chaos,
            pg_server: self.pg_server.clone(),
            postgres_restart: self.chaos_restart_postgres.clone(),
        }
    }
}

/// Writes the report, prints its summary and picks the exit status: 0 passed, 1 failed (a
/// defect found), 2 the run could not be carried out.
fn finish<R: serde::Serialize, E: std::fmt::Display>(
    path: &std::path::Path,
    seed: u64,
    what: &str,
    outcome: Result<(bool, String, R), E>,
) -> ExitCode {
    match outcome {
        Ok((passed, summary, report)) => {
            if let Err(e) = write_report(path, &report) {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
            print!("{summary}");
            println!("  report: {}", path.display());
            if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{what} could not run (seed {seed}): {e}");
            ExitCode::from(2)
        }
    }
}

/// Writes `report` as pretty JSON to `path` (creating its directory).
fn write_report(path: &std::path::Path, report: &impl serde::Serialize) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let json = serde_json::to_vec_pretty(report).map_err(|e| format!("report: {e}"))?;
    std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))
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
        Command::Load(args) => {
            let outcome = possync_simulations::load::run(args.config())
                .await
                .map(|r| (r.passed, r.summary(), r));
            finish(&args.report, args.seed, "load", outcome)
        }
        Command::Run(args) => {
            let outcome = run(args.config()).await.map(|r| (r.passed, r.summary(), r));
            finish(&args.report, args.seed, "simulation", outcome)
        }
    }
}
