//! The engine facade the terminal daemon holds: start it with a store, a cloud client and a
//! clock; nudge it after a sale or on operator request; read its status; shut it down.
//!
//! Everything behind the facade is actors; the facade itself holds only the supervisor's
//! address and the status board, so it is cheap to share with HTTP handlers.

use ractor::{Actor, ActorRef};
use std::sync::Arc;
use std::time::Duration;

use crate::context::{BackoffAddress, SyncContext};
use crate::metrics::EngineMetrics;
use crate::ports::{Clock, CloudApi, LocalStore};
use crate::reconcile::{ReconcileAction, ReconcileReport};
use crate::status::{EngineStatus, SharedBoard};
use crate::supervisor::{SupervisorMsg, SyncSupervisor};

pub use crate::context::{EngineConfig, EngineError};

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
