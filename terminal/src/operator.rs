//! What the operator-facing surfaces — the loopback status endpoint and the `terminal` CLI —
//! need from the rest of the terminal: the till's local data ([`Till`]) and the running sync
//! engine ([`SyncControl`]).
//!
//! Why two small traits instead of using `SqliteStore` and `Engine` directly: the status page
//! and CLI are tested against fakes (a till with a given queue, an engine that is "offline"),
//! and the same surfaces work with the engine absent (the CLI reading the database while no
//! daemon runs). The production implementations live in [`crate::wiring`].
//!
//! The ports carry the store's and the engine's own types (queries, journal rows, reports);
//! only what the operator surfaces add of their own (identity, receipts, views) is defined
//! here.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use possync_actors::{
    ActorKind, ActorStatus, CatalogPosition, EngineStatus, OutboxCounts, ReconcileAction,
    ReconcileReport, TerminalCode,
};
use possync_protocol::{Entity, ErrorCode, EventType, SalePayload};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

pub use crate::store::{CatalogQuery, IdempotencyKey, JournalRow, JournalStatus, RetryTarget};

/// A failure of a till operation, mapped once to a stable code.
#[derive(Debug, Error)]
pub enum TillError {
    /// The sale (or request) failed the shared validation; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// The local database failed; nothing of the operation was half-stored.
    #[error("local database: {0}")]
    Storage(String),
    /// The terminal has no enrollment yet (`terminal enroll` first).
    #[error("terminal is not enrolled (run `terminal enroll` first)")]
    NotEnrolled,
    /// The stored enrollment is unusable (re-enroll the terminal).
    #[error("enrollment: {0}")]
    Enrollment(String),
    /// The thing asked for does not exist (e.g. an unknown journal id).
    #[error("not found: {0}")]
    NotFound(String),
    /// The sale's idempotency key already recorded another sale request; nothing was stored.
    #[error("{0}")]
    KeyReused(String),
}

impl TillError {
    /// The stable code this failure is reported under.
    pub fn code(&self) -> ErrorCode {
        match self {
            TillError::Invalid(_) | TillError::NotFound(_) => ErrorCode::PosSyncEventInvalid,
            TillError::Storage(_) => ErrorCode::PosSyncStorageFailed,
            TillError::NotEnrolled | TillError::Enrollment(_) => ErrorCode::PosSyncUnauthorized,
            TillError::KeyReused(_) => ErrorCode::PosLocalIdempotencyKeyReused,
        }
    }
}

/// Who this terminal is. `terminal_id`/`branch_id` are `None` before enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// This database's `pos_id`.
    pub pos_id: Uuid,
    /// The cloud-issued terminal id, once enrolled.
    pub terminal_id: Option<Uuid>,
    /// The terminal's branch, once enrolled.
    pub branch_id: Option<String>,
}

/// The answer to an enqueue: the idempotency-key parts the caller may keep on its receipt.
/// Returned only once the sale and its journal row are committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnqueueReceipt {
    /// The database that stored the sale.
    pub pos_id: Uuid,
    /// The sale's number in that database; with `pos_id` and the terminal id, its idempotency key.
    pub local_event_id: i64,
}

/// The answer to a keyed enqueue ([`Till::enqueue_sale_keyed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedReceipt {
    /// The sale's receipt: the new sale's, or on a replay the original one's.
    pub receipt: EnqueueReceipt,
    /// Whether the key had recorded this request before (nothing was stored now).
    pub replayed: bool,
}

/// How far the local catalog is, for the status page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CatalogSummary {
    /// Version the local copy is complete up to; `None` before the first snapshot.
    pub version: Option<i64>,
    /// Entities held locally.
    pub entities: i64,
    /// When the catalog last advanced.
    pub last_synced_at: Option<DateTime<Utc>>,
}

/// The terminal's local data as the operator surfaces use it. Blocking (SQLite): async
/// callers run it on a blocking thread.
pub trait Till: Send + Sync + 'static {
    /// `pos_id` and, once enrolled, terminal and branch.
    fn identity(&self) -> Result<Identity, TillError>;

    /// Recent changes of the key space (forks after a clone or restore, re-enrollments,
    /// carry-overs), oldest first. Tills that never change identity have none.
    fn identity_changes(&self) -> Result<Vec<crate::store::IdentityChange>, TillError> {
        Ok(Vec::new())
    }
    /// Validates, then stores the sale and its journal row in one transaction; returns after
    /// commit.
    fn enqueue_sale(
        &self,
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        payload: &SalePayload,
    ) -> Result<EnqueueReceipt, TillError>;
    /// [`Till::enqueue_sale`] under the client's idempotency key, in the same one
    /// transaction: a new key is stored with the sale; a key that recorded this same request
    /// (type, payload, `occurred_at` if given) answers the original receipt and stores
    /// nothing; a key that recorded another request is [`TillError::KeyReused`].
    /// `occurred_at` `None` means now.
    fn enqueue_sale_keyed(
        &self,
        key: &IdempotencyKey,
        event_type: EventType,
        occurred_at: Option<DateTime<Utc>>,
        payload: &SalePayload,
    ) -> Result<KeyedReceipt, TillError>;
    /// Offline catalog lookup over the local copy.
    fn lookup(&self, query: &CatalogQuery) -> Result<Vec<Entity>, TillError>;
    /// Catalog version, entity count and last sync time.
    fn catalog_summary(&self) -> Result<CatalogSummary, TillError>;
    /// Snapshot progress and delta position.
    fn catalog_position(&self) -> Result<CatalogPosition, TillError>;
    /// Journal rows by state and the oldest undelivered sale.
    fn outbox_counts(&self) -> Result<OutboxCounts, TillError>;
    /// Journal rows (newest first), optionally of one state.
    fn journal(
        &self,
        state: Option<JournalStatus>,
        limit: usize,
    ) -> Result<Vec<JournalRow>, TillError>;
    /// Moves `needs_attention` rows back to `pending` with attempts reset; returns how many.
    fn retry(&self, target: RetryTarget) -> Result<usize, TillError>;
}

/// One supervised actor as the status page shows it: `{"name", "state", "phase",
/// "restarts", "last_error"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActorView {
    /// Which actor.
    pub name: ActorKind,
    /// Its state, restarts and last error.
    #[serde(flatten)]
    pub status: ActorStatus,
}

/// The engine's live state, as far as the operator surfaces need it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineView {
    /// Whether the last call to the cloud got an answer.
    pub online: bool,
    /// When the cloud last answered.
    pub last_contact_at: Option<DateTime<Utc>>,
    /// Since when the cloud has not answered; `None` while online.
    pub offline_since: Option<DateTime<Utc>>,
    /// Each supervised actor.
    pub actors: Vec<ActorView>,
    /// The engine's whole status, for tools that want more.
    pub detail: EngineStatus,
}

/// A failure of an engine command (e.g. reconcile while the cloud is down).
#[derive(Debug, Error)]
#[error("{code}: {message}")]
pub struct SyncControlError {
    /// The engine's code: the cloud's refusal, a storage failure, `NETWORK`,
    /// `ENGINE_UNAVAILABLE`, …
    pub code: TerminalCode,
    /// What went wrong.
    pub message: String,
}

/// The running sync engine, as the operator surfaces command it.
#[async_trait]
pub trait SyncControl: Send + Sync + 'static {
    /// Current state (cheap; called on every `/status`).
    fn view(&self) -> EngineView;
    /// Runs a verify or apply reconcile to completion and returns its report.
    async fn reconcile(&self, action: ReconcileAction)
        -> Result<ReconcileReport, SyncControlError>;
    /// Asks the outbox to deliver now (after an enqueue or an operator retry).
    async fn flush_outbox_now(&self);
    /// Asks the catalog syncer to poll deltas now.
    async fn sync_catalog_now(&self);
}
