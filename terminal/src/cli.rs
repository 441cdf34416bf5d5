//! The `terminal` command line (README, Commands): enroll, run the daemon, and the operator commands
//! that work with or without a running daemon.
//!
//! Commands that change local data (`sale add`, `outbox retry`, `migrate`) write the database
//! directly — they must work while the cloud, or the daemon, is down; SQLite's locking makes
//! that safe beside a running daemon. `status` and `reconcile` prefer the running daemon
//! (live engine state, one engine per database) and fall back to working alone.
//!
//! Every failure prints ONE line `error: CODE: cause` on stderr and exits non-zero.

use clap::{Args, Parser, Subcommand};
use possync_actors::{CloudError, EngineError, ReconcileAction, TerminalCode};
use possync_protocol::ErrorCode;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use uuid::Uuid;

use crate::cloud_client::{CatalogEncoding, CloudTarget, HttpCloud};
use crate::daemon::{self, DaemonError, DaemonOptions, Tuning};
use crate::data_dir::{self, LocalTokenError};
use crate::local_api::{build_report, SaleRequest, DEFAULT_STATUS_BIND};
use crate::operator::{JournalStatus, RetryTarget, Till, TillError};
use crate::store::{off_thread, Enrollment, SqliteStore, TerminalStoreError, WorkerLost};
use crate::wiring::StoreTill;

/// The database file inside the data dir.
pub const DB_FILE: &str = "terminal.db";
/// Data dir when neither `--data-dir` nor `POSSYNC_TERMINAL_DATA` is given.
pub const DEFAULT_DATA_DIR: &str = "./data/terminal";
/// How long the CLI waits for a running daemon before working alone.
const DAEMON_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed command, reported as one line with a stable code.
#[derive(Debug, Error)]
pub enum CommandError {
    #[error(transparent)]
    /// The local database failed or refused the input.
    Store(#[from] TerminalStoreError),
    #[error(transparent)]
    /// A call to the cloud failed (enroll's token check).
    Cloud(#[from] CloudError),
    #[error(transparent)]
    /// The sync engine could not start or run the command.
    Engine(#[from] EngineError),
    #[error(transparent)]
    /// A till operation failed.
    Till(#[from] TillError),
    #[error(transparent)]
    /// The local API token could not be read or created.
    LocalToken(#[from] LocalTokenError),
    #[error("terminal is not enrolled (run `terminal enroll` first)")]
    /// No enrollment in the database yet.
    NotEnrolled,
    #[error(transparent)]
    /// The blocking worker running a database operation died (a panic in it).
    Worker(#[from] WorkerLost),
    #[error(transparent)]
    /// The daemon (or an engine for this command) could not start.
    Start(#[from] DaemonError),
    #[error("{what}: {source}")]
    /// A file or directory could not be read or written.
    Io {
        /// What was being done, e.g. `reading sale.json`.
        what: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Input the command could not use (a sale file that is not a sale).
    #[error("{0}")]
    Invalid(String),
    /// `audit verify` found a bad record (the first one).
    #[error("journal row {row} of {rows}: {fault}")]
    Chain {
        /// 1-based position in `(pos_id, local_event_id)` order.
        row: usize,
        /// Rows in the journal.
        rows: usize,
        /// What is wrong with it.
        fault: possync_protocol::journal_chain::ChainFault,
    },
    /// The enrolled token belongs to another terminal or branch than the one given.
    #[error("{0}")]
    WrongIdentity(String),
    /// `terminal run` found a live daemon on the same data dir.
    #[error("a daemon already runs on this data dir (status on {0})")]
    AlreadyRunning(String),
    /// The running daemon answered with an error.
    #[error("daemon: {message}")]
    Daemon {
        /// The code from the daemon's error envelope.
        code: Option<TerminalCode>,
        /// The daemon's message.
        message: String,
    },
}

impl CommandError {
    /// The code printed first on the error line and logged as `errorCode`.
    pub fn code(&self) -> TerminalCode {
        match self {
            CommandError::Store(e) => e.code().into(),
            CommandError::Cloud(e) => e.code(),
            CommandError::Engine(e) => e.code(),
            CommandError::Till(e) => e.code().into(),
            CommandError::NotEnrolled | CommandError::WrongIdentity(_) => {
                ErrorCode::PosSyncUnauthorized.into()
            }
            CommandError::Worker(_) => TerminalCode::STORAGE_FAILED,
            CommandError::Start(e) => e.code(),
            CommandError::Io { .. } | CommandError::LocalToken(_) => TerminalCode::IoFailed,
            CommandError::AlreadyRunning(_) => TerminalCode::DaemonAlreadyRunning,
            CommandError::Invalid(_) => ErrorCode::PosSyncEventInvalid.into(),
            CommandError::Chain { .. } => ErrorCode::PosSyncChainBreak.into(),
            CommandError::Daemon { code, .. } => code.unwrap_or(TerminalCode::DaemonFailed),
        }
    }

    /// The one line printed for this failure.
    pub fn line(&self) -> String {
        let msg = self.to_string().replace(['\n', '\r'], " ");
        format!("error: {}: {}", self.code(), msg)
    }
}

/// `terminal` — the possync POS daemon and its operator commands.
#[derive(Debug, Parser)]
#[command(name = "terminal", version, about)]
pub struct Cli {
    /// Directory holding `terminal.db` (and `daemon.json` while the daemon runs).
    #[arg(
        long,
        global = true,
        env = "POSSYNC_TERMINAL_DATA",
        default_value = DEFAULT_DATA_DIR
    )]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    /// What to do.
    pub command: Command,
}

/// The subcommands of README, Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stores this terminal's enrollment (checks the token if the cloud is reachable).
    Enroll(EnrollArgs),
    /// Runs the supervised sync daemon with its loopback status endpoint.
    Run(RunArgs),
    /// Prints the status document (from the running daemon, else from the database).
    Status,
    /// Verifies the local catalog against the cloud, or repairs it.
    Reconcile(ReconcileArgs),
    /// Sales: `sale add FILE`.
    #[command(subcommand)]
    Sale(SaleCommand),
    /// The sales outbox: `outbox list`, `outbox retry`.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Runs pending schema migrations, or converts a legacy (Google Drive era) database.
    Migrate(MigrateArgs),
    /// Prints the local API token POS software sends as `Authorization: Bearer` (generated
    /// into `<data-dir>/local-api.token` on first use).
    LocalToken,
    /// The enrollment's token: `token set TOKEN` after `cloud terminal rotate`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The sales journal's hash chains: `audit verify` (docs/journal-chain.md).
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `terminal audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verifies this till's own journal: exit 0 when every chain is intact and gapless, else
    /// exit 1 naming the first bad record.
    Verify,
}

/// `terminal token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Replaces the token of the current enrollment (same terminal, branch, pos_id, journal
    /// and catalog); checks it with the cloud when reachable. Sales parked because the old
    /// token was refused are released, and a running daemon uses the new token from its next
    /// request.
    Set {
        /// The token printed by `cloud terminal rotate`.
        token: String,
    },
}

/// `terminal enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    #[arg(long)]
    /// Base URL of the cloud, e.g. `https://cloud.example.com`.
    pub cloud_url: String,
    #[arg(long)]
    /// The terminal's bearer token from `cloud terminal add`.
    pub token: String,
    #[arg(long)]
    /// The terminal id from `cloud terminal add`.
    pub terminal_id: Uuid,
    #[arg(long)]
    /// The branch the terminal belongs to.
    pub branch: String,
    /// A CA certificate (PEM) to trust for the cloud's TLS besides the system's roots, e.g.
    /// the local CA of `scripts/cluster`; stored with the enrollment.
    #[arg(long, env = "POSSYNC_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
}

/// `terminal run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Loopback address of the status endpoint (port 0 picks a free one).
    #[arg(long, default_value = DEFAULT_STATUS_BIND)]
    pub status_bind: String,
    /// Another `Host` name the status endpoint answers to (besides localhost, 127.0.0.1 and
    /// [::1] with its port), e.g. `till-7.shop.lan` or `pos.local:8080`; repeatable.
    #[arg(long = "allowed-host", value_name = "HOST[:PORT]")]
    pub allowed_hosts: Vec<String>,
    /// Pause between catalog delta polls, in milliseconds.
    #[arg(long, env = "POSSYNC_DELTA_INTERVAL_MS")]
    pub delta_interval_ms: Option<u64>,
    /// Sales per outbox batch (1–500).
    #[arg(long)]
    pub outbox_batch: Option<usize>,
    /// Outbox batches in flight at once.
    #[arg(long)]
    pub outbox_concurrency: Option<usize>,
    /// First retry delay bound, in milliseconds.
    #[arg(long, env = "POSSYNC_BACKOFF_BASE_MS")]
    pub backoff_base_ms: Option<u64>,
    /// Longest retry delay, in milliseconds.
    #[arg(long, env = "POSSYNC_BACKOFF_CAP_MS")]
    pub backoff_cap_ms: Option<u64>,
    /// Failures blamed on one sale (it failed alone while the cloud stored others) before it
    /// needs an operator. Failures without an answer from the cloud never count.
    #[arg(long, env = "POSSYNC_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Pause between carry-over passes (fork after a clone or restore, re-key after a
    /// re-enrollment), in milliseconds.
    #[arg(long, env = "POSSYNC_CARRY_OVER_INTERVAL_MS")]
    pub carry_over_interval_ms: Option<u64>,
    /// Automatic catalog verify period in seconds (default 86400: nightly, the first one at a
    /// random point of the first day); 0 turns it off.
    #[arg(long, env = "POSSYNC_VERIFY_EVERY_S")]
    pub verify_every_s: Option<u64>,
    /// Content encoding asked for on the cloud's snapshot and delta pages: zstd (default,
    /// fewest bytes for little CPU), gzip (a proxy that strips zstd), identity (fast LAN).
    #[arg(long, env = "POSSYNC_CATALOG_ENCODING", value_enum, default_value_t = CatalogEncoding::Zstd)]
    pub catalog_encoding: CatalogEncoding,
}

impl RunArgs {
    fn tuning(&self) -> Tuning {
        let mut t = Tuning::default();
        if let Some(ms) = self.delta_interval_ms {
            t.delta_interval = Duration::from_millis(ms);
        }
        if let Some(n) = self.outbox_batch {
            t.outbox_batch = n;
        }
        if let Some(n) = self.outbox_concurrency {
            t.outbox_concurrency = n;
        }
        if let Some(ms) = self.backoff_base_ms {
            t.backoff_base = Duration::from_millis(ms);
        }
        if let Some(ms) = self.backoff_cap_ms {
            t.backoff_cap = Duration::from_millis(ms);
        }
        if let Some(n) = self.max_attempts {
            t.max_attempts = n;
        }
        if let Some(ms) = self.carry_over_interval_ms {
            t.carry_over_interval = Duration::from_millis(ms.max(1));
        }
        if let Some(s) = self.verify_every_s {
            t.verify_every = (s > 0).then(|| Duration::from_secs(s));
        }
        t.catalog_encoding = self.catalog_encoding;
        t
    }
}

/// `terminal reconcile --verify | --apply`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReconcileArgs {
    /// Report drift; change nothing.
    #[arg(long)]
    pub verify: bool,
    /// Repair the local catalog (catalog tables only).
    #[arg(long)]
    pub apply: bool,
}

/// `terminal sale …`.
#[derive(Debug, Subcommand)]
pub enum SaleCommand {
    /// Enqueues a sale from FILE (`-` for stdin): a SALE payload or a `POST /sales` body.
    Add {
        /// The sale file.
        file: PathBuf,
    },
}

/// `terminal outbox …`.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Lists journal rows, newest first.
    List {
        /// Only rows in this state (pending, in_flight, failed, synced, needs_attention).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        /// Most rows to print.
        limit: usize,
    },
    /// Releases needs-attention rows for another delivery.
    Retry {
        /// Journal id of one row.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every needs-attention row.
        #[arg(long)]
        all: bool,
    },
}

/// `terminal migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Convert this legacy database file in place (backed up first).
    #[arg(long)]
    pub legacy_db: Option<PathBuf>,
}

fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

fn ensure_dir(dir: &Path) -> Result<(), CommandError> {
    data_dir::create(dir).map_err(|source| CommandError::Io {
        what: format!("creating data dir {}", dir.display()),
        source,
    })
}

/// Opens the existing database (creating it only for `enroll`/`migrate`, which call
/// [`ensure_dir`] first).
fn open_store(data_dir: &Path) -> Result<SqliteStore, CommandError> {
    let path = db_path(data_dir);
    if !path.exists() {
        return Err(CommandError::NotEnrolled);
    }
    Ok(SqliteStore::open(&path)?)
}

fn print_json(v: &impl serde::Serialize) -> Result<(), CommandError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CommandError::Io {
        what: "writing the output as JSON".into(),
        source: e.into(),
    })?;
    println!("{text}");
    Ok(())
}

/// Runs one parsed command.
pub async fn execute(cli: Cli) -> Result<(), CommandError> {
    let data_dir = cli.data_dir;
    data_dir::tighten_existing(&data_dir);
    match cli.command {
        Command::Enroll(args) => enroll(&data_dir, args).await,
        Command::Run(args) => {
            // One engine per database: a second daemon would only race the first.
            if let Some((_, url)) = live_daemon(&data_dir).await {
                return Err(CommandError::AlreadyRunning(url));
            }
            daemon::run(DaemonOptions {
                data_dir,
                status_bind: args.status_bind.clone(),
                allowed_hosts: args.allowed_hosts.clone(),
                tuning: args.tuning(),
            })
            .await
            .map_err(CommandError::from)
        }
        Command::Status => status(&data_dir).await,
        Command::Reconcile(args) => {
            let action = if args.apply {
                ReconcileAction::Apply
            } else {
                ReconcileAction::Verify
            };
            reconcile(&data_dir, action).await
        }
        Command::Sale(SaleCommand::Add { file }) => sale_add(&data_dir, &file).await,
        Command::Outbox(OutboxCommand::List { status, limit }) => {
            let state = match status.as_deref() {
                None => None,
                Some(s) => Some(s.parse::<JournalStatus>().map_err(CommandError::Invalid)?),
            };
            let till = StoreTill::new(open_store(&data_dir)?);
            let rows = blocking(move || till.journal(state, limit.max(1))).await?;
            print_json(&rows)
        }
        Command::Outbox(OutboxCommand::Retry { id, all }) => {
            let selection = match (id, all) {
                (_, true) => RetryTarget::AllNeedingAttention,
                (Some(id), false) => RetryTarget::One(id),
                (None, false) => {
                    return Err(CommandError::Invalid("give a journal id or --all".into()))
                }
            };
            let till = StoreTill::new(open_store(&data_dir)?);
            let released = blocking(move || till.retry(selection)).await?;
            print_json(&serde_json::json!({ "released": released }))
        }
        Command::Migrate(args) => migrate(&data_dir, args).await,
        Command::LocalToken => {
            let token =
                off_thread(move || Ok::<_, CommandError>(data_dir::local_token(&data_dir)?))
                    .await?;
            println!("{token}");
            Ok(())
        }
        Command::Token(TokenCommand::Set { token }) => token_set(&data_dir, token).await,
        Command::Audit(AuditCommand::Verify) => {
            let store = open_store(&data_dir)?;
            let records = tokio::task::spawn_blocking(move || store.audit_records())
                .await
                .map_err(|e| CommandError::Invalid(format!("worker failed: {e}")))??;
            let mut verifier = possync_protocol::journal_chain::ChainVerifier::new();
            for (i, r) in records.iter().enumerate() {
                verifier.check(r).map_err(|fault| CommandError::Chain {
                    row: i + 1,
                    rows: records.len(),
                    fault,
                })?;
            }
            print_json(&serde_json::json!({
                "intact": true,
                "records": verifier.records,
                "chains": verifier.chains(),
                "links_verified": verifier.links_verified,
            }))
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TillError> + Send + 'static,
) -> Result<T, CommandError> {
    off_thread(move || f().map_err(CommandError::from)).await
}

async fn enroll(data_dir: &Path, args: EnrollArgs) -> Result<(), CommandError> {
    if !possync_protocol::valid_branch_id(&args.branch) {
        return Err(CommandError::Invalid(format!(
            "branch {:?} must be 1-64 of [a-z0-9_-]",
            args.branch
        )));
    }
    let ca_cert_pem = args.ca_cert.as_deref().map(read_ca_cert).transpose()?;
    let cloud = HttpCloud::trusting(
        CloudTarget {
            base_url: args.cloud_url.clone(),
            token: args.token.clone(),
        },
        ca_cert_pem.as_deref(),
    )?;
    let verified = match cloud.sync_status().await {
        Ok(s) => {
            if s.terminal_id != args.terminal_id || s.branch_id != args.branch {
                return Err(CommandError::WrongIdentity(format!(
                    "the token belongs to terminal {} of branch {}, not {} of {}",
                    s.terminal_id, s.branch_id, args.terminal_id, args.branch
                )));
            }
            true
        }
        // Offline enrollment is allowed: the till must be able to start selling before the
        // shop's internet works. A transient cloud failure is treated the same way.
        Err(e) if e.can_retry() => {
            eprintln!(
                "warning: token not verified ({}: {e}); enrolled anyway — it is checked on the first sync",
                e.code()
            );
            false
        }
        Err(e) => return Err(e.into()),
    };
    ensure_dir(data_dir)?;
    let store = SqliteStore::open(&db_path(data_dir))?;
    let enrollment = Enrollment {
        cloud_url: args.cloud_url.trim_end_matches('/').to_string(),
        terminal_id: args.terminal_id,
        branch_id: args.branch,
        token: args.token,
        ca_cert_pem,
    };
    let outcome = save_and_settle(&store, &enrollment, verified).await?;
    print_json(&serde_json::json!({
        "terminal_id": enrollment.terminal_id,
        "branch_id": enrollment.branch_id,
        "cloud_url": enrollment.cloud_url,
        "pos_id": store.pos_id(),
        "verified": verified,
        "forked_to": outcome.saved.forked_to,
        "released": outcome.saved.released,
        "carried_over": outcome.carried,
    }))
}

/// Reads and checks `--ca-cert`: a readable PEM file with at least one certificate.
fn read_ca_cert(path: &Path) -> Result<String, CommandError> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| CommandError::Invalid(format!("--ca-cert {}: {e}", path.display())))?;
    crate::cloud_client::parse_ca_pem(&pem)
        .map_err(|e| CommandError::Invalid(format!("--ca-cert {}: {e}", path.display())))?;
    Ok(pem)
}

/// What saving an enrollment changed, for the command's output.
struct EnrollmentOutcome {
    saved: crate::store::EnrollmentSaved,
    /// The carry-over pass run right away (`None` when the cloud was not reachable: the
    /// daemon's pass does it later).
    carried: Option<crate::carry_over::SettleReport>,
}

/// Saves the enrollment, then (cloud reachable) carries unsent sales of an earlier identity
/// over at once, so they flush with the next delivery.
async fn save_and_settle(
    store: &SqliteStore,
    enrollment: &Enrollment,
    reachable: bool,
) -> Result<EnrollmentOutcome, CommandError> {
    let saved = store.clone();
    let to_save = enrollment.clone();
    let saved =
        off_thread(move || saved.save_enrollment(&to_save).map_err(CommandError::from)).await?;
    let carried = if reachable {
        let cloud = daemon::cloud_for(store, enrollment)?;
        match crate::carry_over::settle(store, &cloud, crate::store::CarryScope::Everything).await {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!(
                    "warning: carry-over deferred to the daemon ({}: {e})",
                    e.code()
                );
                None
            }
        }
    } else {
        None
    };
    Ok(EnrollmentOutcome { saved, carried })
}

async fn token_set(data_dir: &Path, token: String) -> Result<(), CommandError> {
    let store = open_store(data_dir)?;
    let current = store.enrollment()?.ok_or(CommandError::NotEnrolled)?;
    let cloud = HttpCloud::trusting(
        CloudTarget {
            base_url: current.cloud_url.clone(),
            token: token.clone(),
        },
        current.ca_cert_pem.as_deref(),
    )?;
    let verified = match cloud.sync_status().await {
        Ok(s) => {
            if s.terminal_id != current.terminal_id || s.branch_id != current.branch_id {
                return Err(CommandError::WrongIdentity(format!(
                    "the token belongs to terminal {} of branch {}, not this till's {} of {}; \
                     use `terminal enroll` to enroll as another terminal",
                    s.terminal_id, s.branch_id, current.terminal_id, current.branch_id
                )));
            }
            true
        }
        Err(e) if e.can_retry() => {
            eprintln!(
                "warning: token not verified ({}: {e}); saved anyway — it is checked on the first sync",
                e.code()
            );
            false
        }
        Err(e) => return Err(e.into()),
    };
    let enrollment = Enrollment { token, ..current };
    let outcome = save_and_settle(&store, &enrollment, verified).await?;
    print_json(&serde_json::json!({
        "terminal_id": enrollment.terminal_id,
        "branch_id": enrollment.branch_id,
        "pos_id": store.pos_id(),
        "verified": verified,
        "released": outcome.saved.released,
        "carried_over": outcome.carried,
    }))
}

/// The running daemon's status URL, if it answers.
async fn live_daemon(data_dir: &Path) -> Option<(reqwest::Client, String)> {
    let info = daemon::read_daemon_file(data_dir)?;
    let client = reqwest::Client::builder()
        .timeout(DAEMON_PROBE_TIMEOUT)
        .build()
        .ok()?;
    let ok = client
        .get(format!("{}/status", info.status_url))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false);
    ok.then_some((client, info.status_url))
}

async fn status(data_dir: &Path) -> Result<(), CommandError> {
    if let Some((client, url)) = live_daemon(data_dir).await {
        if let Ok(resp) = client.get(format!("{url}/status")).send().await {
            if let Ok(v) = resp.json::<serde_json::Value>().await {
                return print_json(&v);
            }
        }
    }
    let till = StoreTill::new(open_store(data_dir)?);
    let report = blocking(move || build_report(&till, None, chrono::Utc::now())).await?;
    print_json(&report)
}

async fn reconcile(data_dir: &Path, action: ReconcileAction) -> Result<(), CommandError> {
    let mode = match action {
        ReconcileAction::Verify => "verify",
        ReconcileAction::Apply => "apply",
    };
    if let Some((_, url)) = live_daemon(data_dir).await {
        // Reconcile of a big catalog can take a while: no request timeout here.
        let client = reqwest::Client::new();
        let token = data_dir::local_token(data_dir)?;
        let resp = client
            .post(format!("{url}/reconcile"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "mode": mode }))
            .send()
            .await
            .map_err(|e| CommandError::Daemon {
                code: None,
                message: e.to_string(),
            })?;
        let ok = resp.status().is_success();
        let body: serde_json::Value = resp.json().await.map_err(|e| CommandError::Daemon {
            code: None,
            message: format!("answer did not parse: {e}"),
        })?;
        if !ok {
            return Err(CommandError::Daemon {
                code: body["error"]["code"].as_str().and_then(TerminalCode::parse),
                message: body["error"]["message"]
                    .as_str()
                    .unwrap_or("reconcile failed")
                    .to_string(),
            });
        }
        return print_json(&body);
    }
    // No daemon answered: run an engine just for this command — unless one runs after all
    // (too busy to answer the probe), which the engine lock tells.
    let _engine_lock = data_dir::EngineLock::acquire(data_dir).map_err(DaemonError::from)?;
    let store = open_store(data_dir)?;
    let registry = prometheus::Registry::new();
    let engine = daemon::start_engine(&store, &Tuning::default(), &registry).await?;
    let result = engine.reconcile(action).await;
    engine.shutdown().await;
    print_json(&result?)
}

async fn sale_add(data_dir: &Path, file: &Path) -> Result<(), CommandError> {
    let bytes = if file == Path::new("-") {
        use std::io::Read as _;
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|source| CommandError::Io {
                what: "reading stdin".into(),
                source,
            })?;
        buf
    } else {
        std::fs::read(file).map_err(|source| CommandError::Io {
            what: format!("reading {}", file.display()),
            source,
        })?
    };
    let req = SaleRequest::parse_lenient(&bytes).map_err(CommandError::Invalid)?;
    let till = StoreTill::new(open_store(data_dir)?);
    let occurred_at = req.occurred_at.unwrap_or_else(chrono::Utc::now);
    let receipt =
        blocking(move || till.enqueue_sale(req.event_type, occurred_at, &req.payload)).await?;
    println!(
        "{}",
        serde_json::json!({"pos_id": receipt.pos_id, "local_event_id": receipt.local_event_id})
    );
    Ok(())
}

async fn migrate(data_dir: &Path, args: MigrateArgs) -> Result<(), CommandError> {
    match args.legacy_db {
        Some(path) => {
            let report =
                off_thread(move || crate::store::migrate_legacy(&path).map_err(CommandError::from))
                    .await?;
            print_json(&report)
        }
        None => {
            ensure_dir(data_dir)?;
            let path = db_path(data_dir);
            let (_, report) = off_thread(move || {
                SqliteStore::open_with_report(&path).map_err(CommandError::from)
            })
            .await?;
            print_json(&report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_spellings_parse() {
        let c = Cli::try_parse_from(["terminal", "reconcile", "--verify"]).expect("parse");
        assert!(matches!(
            c.command,
            Command::Reconcile(ReconcileArgs {
                verify: true,
                apply: false
            })
        ));
        assert!(Cli::try_parse_from(["terminal", "reconcile"]).is_err());
        assert!(Cli::try_parse_from(["terminal", "reconcile", "--verify", "--apply"]).is_err());
        let c = Cli::try_parse_from(["terminal", "outbox", "retry", "--all"]).expect("parse");
        assert!(matches!(
            c.command,
            Command::Outbox(OutboxCommand::Retry {
                id: None,
                all: true
            })
        ));
        let c = Cli::try_parse_from(["terminal", "outbox", "retry", "7"]).expect("parse");
        assert!(matches!(
            c.command,
            Command::Outbox(OutboxCommand::Retry {
                id: Some(7),
                all: false
            })
        ));
        let c = Cli::try_parse_from([
            "terminal",
            "run",
            "--data-dir",
            "/tmp/x",
            "--status-bind",
            "127.0.0.1:0",
        ])
        .expect("parse");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        let c = Cli::try_parse_from(["terminal", "outbox", "list", "--status", "needs_attention"])
            .expect("parse");
        assert!(matches!(
            c.command,
            Command::Outbox(OutboxCommand::List { .. })
        ));
        let c = Cli::try_parse_from([
            "terminal",
            "run",
            "--allowed-host",
            "till-7.shop.lan",
            "--allowed-host",
            "pos.local:8080",
        ])
        .expect("parse");
        match c.command {
            Command::Run(args) => {
                assert_eq!(args.allowed_hosts, ["till-7.shop.lan", "pos.local:8080"])
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Cli::try_parse_from(["terminal", "local-token"])
                .expect("parse")
                .command,
            Command::LocalToken
        ));
        let c =
            Cli::try_parse_from(["terminal", "migrate", "--legacy-db", "old.db"]).expect("parse");
        assert!(matches!(
            c.command,
            Command::Migrate(MigrateArgs { legacy_db: Some(_) })
        ));
    }

    #[test]
    fn error_lines_are_one_line_and_start_with_the_code() {
        let e = CommandError::Invalid("lines[0].total_minor:\nmismatch".into());
        assert_eq!(
            e.line(),
            "error: POS_SYNC_EVENT_INVALID: lines[0].total_minor: mismatch"
        );
        assert!(CommandError::NotEnrolled
            .line()
            .starts_with("error: POS_SYNC_UNAUTHORIZED: "));
        let e = CommandError::Cloud(CloudError::Unreachable("connection refused".into()));
        assert_eq!(
            e.line(),
            "error: NETWORK: cloud unreachable: connection refused"
        );
    }
}
