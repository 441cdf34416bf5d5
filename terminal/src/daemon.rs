//! `terminal run`: the supervised daemon. Opens the store, starts the sync engine against the
//! enrolled cloud, serves the loopback status endpoint, and on SIGINT/SIGTERM stops the
//! endpoint, then the engine, joining both before it exits.
//!
//! A sale is safe the moment its enqueue committed, so the daemon needs no shutdown step for
//! durability; shutdown order only makes sure no request is cut mid-answer.

use chrono::{DateTime, Utc};
use possync_actors::{
    BackoffPolicy, CloudError, Engine, EngineConfig, EngineError, SystemClock, TerminalCode,
};
use possync_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tracing::Instrument;

use crate::carry_over;
use crate::cloud_client::{CatalogEncoding, CloudTarget, HttpCloud, TillReporting};
use crate::data_dir::{EngineLock, EngineLockError, LocalTokenError};
use crate::local_api::{LocalApiConfig, StatusBindError, StatusServer};
use crate::store::{CarryScope, Enrollment, SqliteStore, TerminalStoreError, WAL_CHECKPOINT_EVERY};
use crate::wiring::{EngineControl, StoreTill};

/// Why the daemon could not start (or an engine for a one-off command could not).
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The local database failed or could not be migrated.
    #[error(transparent)]
    Store(#[from] TerminalStoreError),
    /// The cloud client could not be built (e.g. a malformed cloud URL).
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The sync engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The loopback API could not bind.
    #[error(transparent)]
    LocalApi(#[from] StatusBindError),
    /// The local API token could not be read or created.
    #[error(transparent)]
    LocalToken(#[from] LocalTokenError),
    /// The database has no enrollment yet.
    #[error("terminal is not enrolled (run `terminal enroll` first)")]
    NotEnrolled,
    /// Another process runs the sync engine on this data dir (or its lock file failed).
    #[error(transparent)]
    EngineLocked(#[from] EngineLockError),
    /// The data dir could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

impl DaemonError {
    /// The code logged and printed for this failure.
    pub fn code(&self) -> TerminalCode {
        match self {
            DaemonError::Store(e) => e.code().into(),
            DaemonError::Cloud(e) => e.code(),
            DaemonError::Engine(e) => e.code(),
            DaemonError::LocalApi(_) => TerminalCode::StatusBindFailed,
            DaemonError::LocalToken(_) | DaemonError::Io { .. } => TerminalCode::IoFailed,
            DaemonError::NotEnrolled => ErrorCode::PosSyncUnauthorized.into(),
            DaemonError::EngineLocked(EngineLockError::Held(_)) => {
                TerminalCode::DaemonAlreadyRunning
            }
            DaemonError::EngineLocked(EngineLockError::Io { .. }) => TerminalCode::IoFailed,
        }
    }
}

/// Name of the file, in the data dir, where a running daemon says where its status endpoint
/// is, so `terminal status` and `terminal reconcile` can reach it.
pub const DAEMON_FILE: &str = "daemon.json";

/// What `daemon.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonFile {
    /// Process id of the daemon.
    pub pid: u32,
    /// `http://127.0.0.1:PORT` of its status endpoint.
    pub status_url: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

/// Reads `daemon.json` if present (it may be stale after a crash: callers try the URL).
pub fn read_daemon_file(data_dir: &Path) -> Option<DaemonFile> {
    let text = std::fs::read_to_string(data_dir.join(DAEMON_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Engine tunables the command line can override (defaults follow the contract; tests and
/// demos shorten them).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Pause between catalog delta polls.
    pub delta_interval: Duration,
    /// Sales per outbox batch (1–500).
    pub outbox_batch: usize,
    /// Outbox batches in flight at once.
    pub outbox_concurrency: usize,
    /// Upper bound of the first retry delay.
    pub backoff_base: Duration,
    /// Longest retry delay (a longer `Retry-After` still wins).
    pub backoff_cap: Duration,
    /// Deliveries before a sale needs an operator.
    pub max_attempts: u32,
    /// Pause between carry-over passes (fork after a clone, re-key after a re-enrollment).
    pub carry_over_interval: Duration,
    /// Automatic catalog verify period (`None`: only on demand).
    pub verify_every: Option<Duration>,
    /// Content encoding asked for on the cloud's answers (snapshot and delta pages).
    pub catalog_encoding: CatalogEncoding,
}

/// Default pause between carry-over passes: a pass with nothing to do is one local query.
pub const DEFAULT_CARRY_OVER_INTERVAL: Duration = Duration::from_secs(5);

impl Default for Tuning {
    fn default() -> Self {
        let e = EngineConfig::default();
        Tuning {
            delta_interval: e.delta_interval,
            outbox_batch: e.outbox_batch,
            outbox_concurrency: e.outbox_concurrency,
            backoff_base: e.backoff.base,
            backoff_cap: e.backoff.cap,
            max_attempts: e.backoff.max_attempts,
            carry_over_interval: DEFAULT_CARRY_OVER_INTERVAL,
            verify_every: e.verify_every,
            catalog_encoding: CatalogEncoding::default(),
        }
    }
}

/// Everything `terminal run` needs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Directory holding `terminal.db`.
    pub data_dir: PathBuf,
    /// Loopback address of the status endpoint.
    pub status_bind: String,
    /// Further `Host` names the status endpoint answers to (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    /// Engine tunables.
    pub tuning: Tuning,
}

/// The engine configuration for this terminal.
pub fn engine_config(terminal_id: String, branch_id: String, t: &Tuning) -> EngineConfig {
    EngineConfig {
        delta_interval: t.delta_interval,
        outbox_batch: t.outbox_batch,
        outbox_concurrency: t.outbox_concurrency,
        backoff: BackoffPolicy {
            base: t.backoff_base,
            cap: t.backoff_cap,
            max_attempts: t.max_attempts,
        },
        terminal_id,
        branch_id,
        verify_every: t.verify_every,
        ..EngineConfig::default()
    }
}

/// The cloud client of an enrolled store: its device nonce on every sales request, and the
/// enrollment re-read from the store when the cloud refuses the token (so a `terminal token
/// set` reaches a running daemon without a restart).
pub fn cloud_for(store: &SqliteStore, enrollment: &Enrollment) -> Result<HttpCloud, DaemonError> {
    let source = store.clone();
    let inherited = store.inherited()?;
    Ok(HttpCloud::trusting(
        CloudTarget {
            base_url: enrollment.cloud_url.clone(),
            token: enrollment.token.clone(),
        },
        enrollment.ca_cert_pem.as_deref(),
    )?
    .with_device_nonce(store.device_nonce())
    .with_inherited_nonces(inherited.into_iter().map(|i| (i.pos_id, i.nonce)))
    .with_reload(Arc::new(move || {
        source.enrollment().ok().flatten().map(|e| CloudTarget {
            base_url: e.cloud_url,
            token: e.token,
        })
    })))
}

/// Starts the engine for an enrolled store (used by `run` and by a one-off `reconcile`).
pub async fn start_engine(
    store: &SqliteStore,
    tuning: &Tuning,
    registry: &prometheus::Registry,
) -> Result<Engine, DaemonError> {
    start_engine_with_cloud(store, tuning, registry)
        .await
        .map(|(engine, _)| engine)
}

/// [`start_engine`], also returning the engine's cloud client (its clones share the token).
pub async fn start_engine_with_cloud(
    store: &SqliteStore,
    tuning: &Tuning,
    registry: &prometheus::Registry,
) -> Result<(Engine, HttpCloud), DaemonError> {
    let enrollment = store.enrollment()?.ok_or(DaemonError::NotEnrolled)?;
    let cloud = cloud_for(store, &enrollment)?
        .with_catalog_encoding(tuning.catalog_encoding)?
        .with_metrics(registry)
        .map_err(EngineError::Metrics)?;
    let config = engine_config(
        enrollment.terminal_id.to_string(),
        enrollment.branch_id.clone(),
        tuning,
    );
    let engine = Engine::start(
        config,
        Arc::new(store.clone()),
        Arc::new(cloud.clone()),
        Arc::new(SystemClock),
        registry,
    )
    .await?;
    Ok((engine, cloud))
}

/// Checkpoints the WAL every [`WAL_CHECKPOINT_EVERY`] on the store's checkpoint connection,
/// so no sale's commit pays for one (see [`SqliteStore::checkpoint_in_background`]). A failed
/// checkpoint (the database busy past the timeout) is tried again on the next tick; until
/// then the WAL only grows.
async fn checkpoint_loop(store: SqliteStore) {
    let mut tick = tokio::time::interval(WAL_CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.checkpoint_wal()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint task failed; retrying"),
        }
    }
}

/// How often the daemon refreshes what its requests report to the cloud.
const REPORT_EVERY: Duration = Duration::from_secs(15);

/// Keeps the till's report to the cloud current (catalog version, sales needing attention;
/// see [`TillReporting`]), read from the store every [`REPORT_EVERY`] — cheap: one row and the
/// trigger-kept counts. A failed read leaves the last figures.
async fn report_loop(store: SqliteStore, report: Arc<TillReporting>) {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.till_report()).await {
            Ok(Ok((version, needs_attention))) => report.set(version, Some(needs_attention)),
            Ok(Err(e)) => tracing::debug!(error = %e, "till report not refreshed"),
            Err(e) => tracing::debug!(error = %e, "till report task failed"),
        }
    }
}

/// Runs a carry-over pass every `interval` until aborted, first taking a changed enrollment
/// into the shared cloud client. A failed pass (cloud unreachable,
/// token refused) changes nothing and is tried again on the next tick.
async fn carry_over_loop(store: SqliteStore, cloud: HttpCloud, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Thorough until one pass succeeded (see `CarryScope::Everything`), then cheap.
    let mut scope = CarryScope::Everything;
    let mut inherited_checked: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        // A new cloud URL saved by `terminal enroll` is taken here: the old URL may not refuse
        // (which would reload at once), it may simply be gone.
        cloud.refresh().await;
        if inherited_checked.is_none_or(|t| t.elapsed() >= carry_over::INHERITED_CHECK_EVERY) {
            inherited_checked = Some(tokio::time::Instant::now());
            match carry_over::settle_inherited(&store, &cloud).await {
                Ok(c) if c.already_held > 0 => tracing::info!(
                    alreadyHeld = c.already_held,
                    "inherited sales delivered by the original database marked synced"
                ),
                Ok(_) => {}
                Err(e) => tracing::debug!(errorCode = %e.code(), error = %e,
                    "inherited sales not checked; tried again later"),
            }
        }
        let result = carry_over::settle(&store, &cloud, scope).await;
        if result.is_ok() {
            scope = CarryScope::OtherPosIds;
        }
        match result {
            Ok(r) if r.forked_to.is_some() || r.carried != Default::default() => {
                tracing::warn!(
                    posId = ?r.forked_to,
                    rekeyed = r.carried.rekeyed,
                    alreadyHeld = r.carried.already_held,
                    skipped = r.carried.skipped,
                    "till identity settled"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(errorCode = %e.code(), error = %e, "carry-over pass failed; retried on the next tick");
            }
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(opts: DaemonOptions) -> Result<(), DaemonError> {
    crate::data_dir::create(&opts.data_dir).map_err(|e| DaemonError::Io {
        what: format!("creating data dir {}", opts.data_dir.display()),
        source: e,
    })?;
    // Held until this function returns: one engine per database (see `EngineLock`).
    let _engine_lock = EngineLock::acquire(&opts.data_dir)?;
    let local_token = crate::data_dir::local_token(&opts.data_dir)?;
    let db = opts.data_dir.join(crate::cli::DB_FILE);
    let (store, opened) = SqliteStore::open_with_report(&db)?;
    let enrollment = store.enrollment()?.ok_or(DaemonError::NotEnrolled)?;
    let root = tracing::info_span!(
        "terminal",
        terminalId = %enrollment.terminal_id,
        branchId = %enrollment.branch_id,
        posId = %store.pos_id(),
    );
    async move {
        tracing::info!(
            db = %db.display(),
            fromVersion = opened.from_version,
            applied = ?opened.applied,
            backup = ?opened.backup_path,
            cloud = %enrollment.cloud_url,
            "terminal daemon starting"
        );
        let registry = prometheus::Registry::new();
        store.checkpoint_in_background()?;
        let checkpointer = tokio::spawn(checkpoint_loop(store.clone()).in_current_span());
        let (engine, cloud) = start_engine_with_cloud(&store, &opts.tuning, &registry).await?;
        let reporter =
            tokio::spawn(report_loop(store.clone(), cloud.reporting()).in_current_span());
        let carrier = tokio::spawn(
            carry_over_loop(store.clone(), cloud, opts.tuning.carry_over_interval)
                .in_current_span(),
        );
        let control = Arc::new(EngineControl::new(engine));
        let progress = tokio::spawn(crate::first_sync::watch(control.clone()).in_current_span());
        let server = match StatusServer::start(
            &opts.status_bind,
            LocalApiConfig {
                local_token,
                allowed_hosts: opts.allowed_hosts.clone(),
            },
            Arc::new(StoreTill::new(store.clone())),
            control.clone(),
            registry,
        ) {
            Ok(s) => s,
            Err(e) => {
                carrier.abort();
                checkpointer.abort();
                progress.abort();
                reporter.abort();
                control.shutdown().await;
                return Err(e.into());
            }
        };
        let daemon_file = opts.data_dir.join(DAEMON_FILE);
        let info = DaemonFile {
            pid: std::process::id(),
            status_url: server.url(),
            started_at: Utc::now(),
        };
        if let Err(e) = serde_json::to_vec_pretty(&info)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&daemon_file, bytes))
        {
            tracing::warn!(error = %e, "could not write {}", daemon_file.display());
        }
        // The line tests and scripts wait for.
        println!("status on {}", server.url());
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tracing::info!(status = %server.url(), "terminal daemon running");

        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutting down");
        carrier.abort();
        checkpointer.abort();
        progress.abort();
        reporter.abort();
        server.stop().await;
        control.shutdown().await;
        let _ = std::fs::remove_file(&daemon_file);
        tracing::info!("terminal daemon stopped");
        Ok(())
    }
    .instrument(root)
    .await
}

/// Waits for SIGINT or SIGTERM; returns which.
async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
