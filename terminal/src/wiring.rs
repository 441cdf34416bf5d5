//! The production implementations of the operator ports: [`StoreTill`] over the SQLite store
//! and [`EngineControl`] over the running `possync_actors::Engine`.
//!
//! They only translate types; every decision lives in the store or the engine. Keeping the
//! translation here means the status endpoint and CLI never depend on those types' details.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use possync_actors::{
    CatalogPosition, Engine, EngineError, LocalStore, OutboxCounts, ReconcileAction,
    ReconcileReport, TerminalCode,
};
use possync_protocol::{Entity, EventType, SalePayload};
use tokio::sync::RwLock;

use crate::operator::{
    ActorView, CatalogSummary, EngineView, EnqueueReceipt, Identity, KeyedReceipt, SyncControl,
    SyncControlError, Till, TillError,
};
use crate::store::{
    CatalogQuery, IdempotencyKey, JournalRow, JournalStatus, KeyedSale, RetryTarget, SqliteStore,
    TerminalStoreError,
};

impl From<TerminalStoreError> for TillError {
    fn from(e: TerminalStoreError) -> Self {
        match e {
            TerminalStoreError::Invalid(i) => TillError::Invalid(i.to_string()),
            TerminalStoreError::NotEnrolled => TillError::NotEnrolled,
            TerminalStoreError::InvalidEnrollment(m) => TillError::Enrollment(m),
            reused @ TerminalStoreError::IdempotencyKeyReused { .. } => {
                TillError::KeyReused(reused.to_string())
            }
            other => TillError::Storage(other.to_string()),
        }
    }
}

/// The till's data, read and written through the SQLite store.
#[derive(Debug, Clone)]
pub struct StoreTill {
    store: SqliteStore,
}

impl StoreTill {
    /// Wraps an open store.
    pub fn new(store: SqliteStore) -> StoreTill {
        StoreTill { store }
    }
}

impl Till for StoreTill {
    fn identity(&self) -> Result<Identity, TillError> {
        let enrollment = self.store.enrollment()?;
        Ok(Identity {
            pos_id: self.store.pos_id(),
            terminal_id: enrollment.as_ref().map(|e| e.terminal_id),
            branch_id: enrollment.map(|e| e.branch_id),
        })
    }

    fn identity_changes(&self) -> Result<Vec<crate::store::IdentityChange>, TillError> {
        Ok(self.store.identity_changes()?)
    }

    fn enqueue_sale(
        &self,
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        payload: &SalePayload,
    ) -> Result<EnqueueReceipt, TillError> {
        let sale = self.store.enqueue_sale(event_type, occurred_at, payload)?;
        Ok(EnqueueReceipt {
            pos_id: sale.pos_id,
            local_event_id: sale.local_event_id,
        })
    }

    fn enqueue_sale_keyed(
        &self,
        key: &IdempotencyKey,
        event_type: EventType,
        occurred_at: Option<DateTime<Utc>>,
        payload: &SalePayload,
    ) -> Result<KeyedReceipt, TillError> {
        let (pos_id, local_event_id, replayed) =
            match self
                .store
                .enqueue_sale_keyed(key, event_type, occurred_at, payload)?
            {
                KeyedSale::Recorded(sale) => (sale.pos_id, sale.local_event_id, false),
                KeyedSale::Replayed {
                    pos_id,
                    local_event_id,
                } => (pos_id, local_event_id, true),
            };
        Ok(KeyedReceipt {
            receipt: EnqueueReceipt {
                pos_id,
                local_event_id,
            },
            replayed,
        })
    }

    fn lookup(&self, query: &CatalogQuery) -> Result<Vec<Entity>, TillError> {
        Ok(self.store.lookup(query.clone())?)
    }

    fn catalog_summary(&self) -> Result<CatalogSummary, TillError> {
        let s = self.store.catalog_stats()?;
        Ok(CatalogSummary {
            version: s.version,
            entities: s.entities,
            last_synced_at: s.last_synced_at,
        })
    }

    fn catalog_position(&self) -> Result<CatalogPosition, TillError> {
        Ok(self.store.catalog_position_local()?)
    }

    fn outbox_counts(&self) -> Result<OutboxCounts, TillError> {
        LocalStore::outbox_counts(&self.store).map_err(|e| TillError::Storage(e.to_string()))
    }

    fn journal(
        &self,
        state: Option<JournalStatus>,
        limit: usize,
    ) -> Result<Vec<JournalRow>, TillError> {
        Ok(self.store.list_journal(state, limit)?)
    }

    fn retry(&self, target: RetryTarget) -> Result<usize, TillError> {
        let n = self.store.retry_journal(target)?;
        if n == 0 {
            if let RetryTarget::One(id) = target {
                return Err(TillError::NotFound(format!(
                    "journal row {id} is not waiting for a retry (needs_attention or failed)"
                )));
            }
        }
        Ok(n)
    }
}

/// Maps an engine failure to the operator-facing error, keeping the engine's code.
fn control_error(e: EngineError) -> SyncControlError {
    SyncControlError {
        code: e.code(),
        message: e.to_string(),
    }
}

/// The running engine, shared by the status endpoint; taken out for shutdown.
pub struct EngineControl {
    engine: RwLock<Option<Engine>>,
}

impl EngineControl {
    /// Wraps a started engine.
    pub fn new(engine: Engine) -> EngineControl {
        EngineControl {
            engine: RwLock::new(Some(engine)),
        }
    }

    /// Stops the engine and joins its actors. Later commands answer "engine stopped".
    pub async fn shutdown(&self) {
        let engine = self.engine.write().await.take();
        if let Some(engine) = engine {
            engine.shutdown().await;
        }
    }

    /// The catalog position the engine last stored; `None` once the engine is stopped.
    pub async fn catalog_position(&self) -> Option<possync_actors::CatalogPosition> {
        self.engine
            .read()
            .await
            .as_ref()
            .map(|e| e.catalog_position())
    }

    fn stopped() -> SyncControlError {
        SyncControlError {
            code: TerminalCode::EngineUnavailable,
            message: "the sync engine is stopped".into(),
        }
    }
}

#[async_trait]
impl SyncControl for EngineControl {
    fn view(&self) -> EngineView {
        let Ok(guard) = self.engine.try_read() else {
            return EngineView::default();
        };
        let Some(engine) = guard.as_ref() else {
            return EngineView::default();
        };
        let status = engine.status();
        EngineView {
            online: status.online,
            last_contact_at: status.last_contact_at,
            offline_since: status.offline_since,
            actors: status
                .actors
                .iter()
                .map(|(kind, a)| ActorView {
                    name: *kind,
                    status: a.clone(),
                })
                .collect(),
            detail: status,
        }
    }

    async fn reconcile(
        &self,
        action: ReconcileAction,
    ) -> Result<ReconcileReport, SyncControlError> {
        let guard = self.engine.read().await;
        let engine = guard.as_ref().ok_or_else(Self::stopped)?;
        engine.reconcile(action).await.map_err(control_error)
    }

    async fn flush_outbox_now(&self) {
        let guard = self.engine.read().await;
        if let Some(engine) = guard.as_ref() {
            if let Err(e) = engine.flush_outbox_now().await {
                tracing::warn!(errorCode = %e.code(), error = %e, "outbox nudge failed");
            }
        }
    }

    async fn sync_catalog_now(&self) {
        let guard = self.engine.read().await;
        if let Some(engine) = guard.as_ref() {
            if let Err(e) = engine.sync_catalog_now().await {
                tracing::warn!(errorCode = %e.code(), error = %e, "catalog nudge failed");
            }
        }
    }
}
