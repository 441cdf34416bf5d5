//! The engine facade the terminal daemon holds: start it with a store, a cloud client and a
//! clock; nudge it after a sale or on operator request; read its status; shut it down.
//!
//! Everything behind the facade is actors; the facade itself holds only the supervisor's
//! address and the status board, so it is cheap to share with HTTP handlers.

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorRef};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use thiserror::Error;

use possync_protocol::{ErrorCode, MAX_EVENTS_PER_REQUEST, MAX_PAGE_LIMIT};

use crate::backoff::{BackoffMsg, BackoffPolicy};
use crate::metrics::EngineMetrics;
use crate::ports::{Clock, CloudApi, CloudError, LocalStore, StoreError};
use crate::reconcile::{ReconcileAction, ReconcileReport};
use crate::status::{EngineStatus, SharedBoard};
use crate::supervisor::{SupervisorMsg, SyncSupervisor};

/// Tunables of the engine. Defaults follow the contract; tests shrink the intervals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Entities per snapshot page (1–1000).
    pub snapshot_page_limit: u32,
    /// Changes per delta page (1–1000).
    pub delta_page_limit: u32,
    /// Pause between delta polls when the catalog is current.
    pub delta_interval: Duration,
    /// Sales claimed per outbox batch (1–500, the cloud's per-request limit).
    pub outbox_batch: usize,
    /// Outbox batches in flight at once.
    pub outbox_concurrency: usize,
    /// Longest the outbox sleeps before looking for new sales on its own.
    pub outbox_idle_poll: Duration,
    /// Retry pacing for every actor.
    pub backoff: BackoffPolicy,
    /// Manifest entries per reconcile range (the server's default limit is 2000).
    pub reconcile_range_entries: usize,
    /// This terminal, for log lines.
    pub terminal_id: String,
    /// This terminal's branch, for log lines.
    pub branch_id: String,
    /// Seed of the backoff jitter; `None` = random (logged at start so a run can be replayed).
    pub rng_seed: Option<u64>,
    /// Supervisor restart intensity: at most this many restarts of one actor …
    pub max_restarts: u32,
    /// … within this window; beyond it the actor stays down and shows `failed`.
    pub restart_window: Duration,
    /// Automatic catalog verify: every this long, the first one at a random point of the
    /// first period so a fleet started together does not verify together. `None`: only on
    /// demand.
    pub verify_every: Option<Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            snapshot_page_limit: 1000,
            delta_page_limit: 1000,
            delta_interval: Duration::from_secs(5),
            outbox_batch: 200,
            outbox_concurrency: 2,
            outbox_idle_poll: Duration::from_secs(1),
            backoff: BackoffPolicy::default(),
            reconcile_range_entries: 2000,
            terminal_id: String::new(),
            branch_id: String::new(),
            rng_seed: None,
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            verify_every: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl EngineConfig {
    /// Rejects settings the cloud or the actors cannot work with.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Config(m.to_string()));
        if !(1..=MAX_PAGE_LIMIT).contains(&self.snapshot_page_limit)
            || !(1..=MAX_PAGE_LIMIT).contains(&self.delta_page_limit)
        {
            return bad("page limits must be 1-1000");
        }
        if !(1..=MAX_EVENTS_PER_REQUEST).contains(&self.outbox_batch) {
            return bad("outbox_batch must be 1-500");
        }
        if self.outbox_concurrency == 0 {
            return bad("outbox_concurrency must be at least 1");
        }
        if self.reconcile_range_entries == 0 {
            return bad("reconcile_range_entries must be at least 1");
        }
        if self.backoff.max_attempts == 0 {
            return bad("backoff.max_attempts must be at least 1");
        }
        Ok(())
    }
}

/// What can go wrong at the engine's boundary, each mapped to one stable code by [`EngineError::code`].
#[derive(Debug, Error)]
pub enum EngineError {
    /// The configuration was rejected before anything started.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// Metrics could not be registered (e.g. the registry already holds an engine's metrics).
    #[error("engine metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The supervisor could not be started.
    #[error("engine could not start: {0}")]
    Start(String),
    /// The actor that would do the work is down (being restarted, or failed for good).
    #[error("{0} is not running")]
    Unavailable(&'static str),
    /// The cloud refused or could not be reached.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The local database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// The stable code for logs and CLI lines: the cloud's code when it sent one,
    /// `POS_SYNC_STORAGE_FAILED` for local storage, and `NETWORK` / `ENGINE_UNAVAILABLE` /
    /// `ENGINE_CONFIG` for conditions no cloud code describes.
    pub fn code(&self) -> String {
        match self {
            EngineError::Cloud(e) => e.code_str(),
            EngineError::Store(_) => ErrorCode::PosSyncStorageFailed.as_str().to_string(),
            EngineError::Config(_) => "ENGINE_CONFIG".to_string(),
            EngineError::Metrics(_) | EngineError::Start(_) | EngineError::Unavailable(_) => {
                "ENGINE_UNAVAILABLE".to_string()
            }
        }
    }
}

/// Where the Backoff actor currently lives. The supervisor updates it on every (re)start so
/// the other actors always ask the live one.
#[derive(Clone, Default)]
pub struct BackoffAddress(Arc<RwLock<Option<ActorRef<BackoffMsg>>>>);

impl BackoffAddress {
    /// The live Backoff actor, if it is running.
    pub fn get(&self) -> Option<ActorRef<BackoffMsg>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the Backoff actor's new address (or `None` while it is down).
    pub fn set(&self, actor: Option<ActorRef<BackoffMsg>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = actor;
    }

    /// Tells Backoff whether the cloud answered; lost if Backoff is down, which only delays
    /// the online flag until the next call.
    pub fn report_contact(&self, reachable: bool) {
        if let Some(b) = self.get() {
            let _ = b.cast(BackoffMsg::Contact { reachable });
        }
    }
}

/// Everything the actors share: the ports, the config, the board and the metrics.
/// It is the typed start argument of every child, so a restarted child gets the same world.
pub struct SyncContext {
    /// Tunables.
    pub config: EngineConfig,
    /// The terminal's database (the truth every actor reloads from).
    pub store: Arc<dyn LocalStore>,
    /// The cloud sync API.
    pub cloud: Arc<dyn CloudApi>,
    /// Time source for retry instants and claims.
    pub clock: Arc<dyn Clock>,
    /// Status the actors publish.
    pub board: SharedBoard,
    /// Metrics the actors update.
    pub metrics: EngineMetrics,
    /// The live Backoff actor.
    pub backoff: BackoffAddress,
}

impl SyncContext {
    /// Runs a blocking store call on the blocking pool. A panic inside the store becomes a
    /// `StoreError`, which fails the calling actor so the supervisor restarts it.
    pub async fn store_call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn LocalStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Database(format!(
                "store call did not finish: {e}"
            ))),
        }
    }

    /// Clock time.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// The running sync engine.
pub struct Engine {
    supervisor: ActorRef<SupervisorMsg>,
    handle: tokio::task::JoinHandle<()>,
    board: SharedBoard,
}

/// How long a facade call waits for the supervisor before calling the engine unavailable.
const FACADE_TIMEOUT: Duration = Duration::from_secs(10);

impl Engine {
    /// Starts the supervisor and its four actors. Returns once they are spawned; the first
    /// snapshot and the outbox drain then proceed in the background.
    pub async fn start(
        config: EngineConfig,
        store: Arc<dyn LocalStore>,
        cloud: Arc<dyn CloudApi>,
        clock: Arc<dyn Clock>,
        registry: &prometheus::Registry,
    ) -> Result<Engine, EngineError> {
        config.validate()?;
        let metrics = EngineMetrics::register(registry)?;
        let board = SharedBoard::new();
        let ctx = Arc::new(SyncContext {
            config,
            store,
            cloud,
            clock,
            board: board.clone(),
            metrics,
            backoff: BackoffAddress::default(),
        });
        let (supervisor, handle) = Actor::spawn(None, SyncSupervisor, ctx)
            .await
            .map_err(|e| EngineError::Start(e.to_string()))?;
        Ok(Engine {
            supervisor,
            handle,
            board,
        })
    }

    /// Current status: each actor's state and restarts, online flag, catalog and outbox.
    pub fn status(&self) -> EngineStatus {
        self.board.snapshot()
    }

    /// The catalog position the CatalogSyncer last stored (snapshot progress included).
    pub fn catalog_position(&self) -> crate::ports::CatalogPosition {
        self.board.catalog()
    }

    /// Asks the CatalogSyncer to fetch deltas (or continue its snapshot) now.
    pub async fn sync_catalog_now(&self) -> Result<(), EngineError> {
        self.ask(SupervisorMsg::SyncCatalogNow).await?
    }

    /// Asks the SalesOutbox to look for sales now (call after an enqueue).
    pub async fn flush_outbox_now(&self) -> Result<(), EngineError> {
        self.ask(SupervisorMsg::FlushOutboxNow).await?
    }

    /// Verifies the local catalog against the cloud (`Verify`, changes nothing) or repairs it
    /// (`Apply`), range by range.
    pub async fn reconcile(&self, mode: ReconcileAction) -> Result<ReconcileReport, EngineError> {
        // Reconcile of a large catalog takes longer than a nudge: no facade timeout here; the
        // reconciler bounds its own retries.
        match self
            .supervisor
            .call(|reply| SupervisorMsg::Reconcile(mode, reply), None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(EngineError::Unavailable("reconciler")),
        }
    }

    async fn ask<T: Send + 'static>(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<T>) -> SupervisorMsg,
    ) -> Result<T, EngineError> {
        match self.supervisor.call(msg, Some(FACADE_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
            _ => Err(EngineError::Unavailable("supervisor")),
        }
    }

    /// Stops the supervisor and every child, and waits until all of them have exited.
    pub async fn shutdown(self) {
        // Children stop first (supervisor's post_stop waits for them), then the supervisor.
        let _ = self
            .supervisor
            .stop_and_wait(Some("engine shutdown".into()), None)
            .await;
        let _ = self.handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_bad_values_are_rejected() {
        assert!(EngineConfig::default().validate().is_ok());
        let c = EngineConfig {
            outbox_batch: 501,
            ..EngineConfig::default()
        };
        assert!(matches!(c.validate(), Err(EngineError::Config(_))));
        let c = EngineConfig {
            outbox_concurrency: 0,
            ..EngineConfig::default()
        };
        assert_eq!(
            c.validate().map_err(|e| e.code()),
            Err("ENGINE_CONFIG".to_string())
        );
    }

    #[test]
    fn errors_map_to_stable_codes() {
        let e = EngineError::Store(StoreError::Database("disk".into()));
        assert_eq!(e.code(), "POS_SYNC_STORAGE_FAILED");
        let e = EngineError::Cloud(CloudError::Unreachable("refused".into()));
        assert_eq!(e.code(), "NETWORK");
    }
}
