//! The world every sync actor starts with: the engine's tunables ([`EngineConfig`]), the ports,
//! the status board and metrics ([`SyncContext`]), and the engine's one error type
//! ([`EngineError`]).
//!
//! It is the typed start argument of every supervised child, so a restarted child gets the
//! same world; the [`crate::engine`] facade builds it once and the actors only read it.

use chrono::{DateTime, Utc};
use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use thiserror::Error;

use possync_protocol::{MAX_EVENTS_PER_REQUEST, MAX_PAGE_LIMIT};

use crate::backoff::{BackoffMsg, BackoffPolicy};
use crate::code::TerminalCode;
use crate::metrics::EngineMetrics;
use crate::ports::{Clock, CloudApi, CloudError, LocalStore, StoreError};
use crate::status::SharedBoard;

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
    /// Supervisor restart pacing: the first failure of an actor is restarted at once, each
    /// further one in a row after `restart_delay_base · 2^(n-2)`, capped at
    /// `restart_delay_cap`. An actor is never given up on (see `crate::supervisor`).
    pub restart_delay_base: Duration,
    /// The longest wait between two restarts of one actor.
    pub restart_delay_cap: Duration,
    /// An actor that ran this long since its last restart counts as healthy again: its next
    /// failure is restarted at once.
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
            restart_delay_base: Duration::from_millis(100),
            restart_delay_cap: Duration::from_secs(30),
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
        if self.backoff.cap > crate::backoff::MAX_DELAY {
            return bad("backoff.cap must be at most 1 h");
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
    /// The actor that would do the work is down (waiting for its restart).
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
    /// The code for logs and CLI lines: the cloud's code when it sent one,
    /// `POS_SYNC_STORAGE_FAILED` for local storage, and `NETWORK` / `ENGINE_UNAVAILABLE` /
    /// `ENGINE_CONFIG` for conditions no cloud code describes.
    pub fn code(&self) -> TerminalCode {
        match self {
            EngineError::Cloud(e) => e.code(),
            EngineError::Store(_) => TerminalCode::STORAGE_FAILED,
            EngineError::Config(_) => TerminalCode::EngineConfig,
            EngineError::Metrics(_) | EngineError::Start(_) | EngineError::Unavailable(_) => {
                TerminalCode::EngineUnavailable
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

#[cfg(test)]
mod tests {
    use super::*;
    use possync_protocol::ErrorCode;

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
            Err(TerminalCode::EngineConfig)
        );
    }

    #[test]
    fn errors_map_to_stable_codes() {
        let e = EngineError::Store(StoreError::Database("disk".into()));
        assert_eq!(e.code(), ErrorCode::PosSyncStorageFailed);
        let e = EngineError::Cloud(CloudError::Unreachable("refused".into()));
        assert_eq!(e.code(), TerminalCode::Network);
    }
}
