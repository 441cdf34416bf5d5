//! What the operator-facing surfaces — the loopback status endpoint and the `terminal` CLI —
//! need from the rest of the terminal: the till's local data ([`Till`]) and the running sync
//! engine ([`SyncControl`]).
//!
//! Why two small traits instead of using `SqliteStore` and `Engine` directly: the status page
//! and CLI are tested against fakes (a till with a given queue, an engine that is "offline"),
//! and the same surfaces work with the engine absent (the CLI reading the database while no
//! daemon runs). The production implementations live in [`crate::wiring`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use possync_actors::{CatalogPosition, OutboxCounts};
use possync_protocol::{Entity, ErrorCode, EventType, SalePayload};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

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
}

impl TillError {
    /// The stable code this failure is reported under.
    pub fn code(&self) -> ErrorCode {
        match self {
            TillError::Invalid(_) | TillError::NotFound(_) => ErrorCode::PosSyncEventInvalid,
            TillError::Storage(_) => ErrorCode::PosSyncStorageFailed,
            TillError::NotEnrolled | TillError::Enrollment(_) => ErrorCode::PosSyncUnauthorized,
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

/// An offline catalog lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupQuery {
    /// Exact barcode of a product.
    Barcode(String),
    /// Exact SKU of a product.
    Sku(String),
    /// Free text over product names.
    Text(String),
}

/// Which `sync_journal` rows an operator retry releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySelection {
    /// One row, by journal id.
    One(i64),
    /// Every row in `needs_attention`.
    AllNeedingAttention,
}

/// The states a `sync_journal` row moves through (docs/local-schema.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalState {
    /// Waiting for delivery.
    Pending,
    /// Claimed by the outbox, answer not yet recorded.
    InFlight,
    /// A transient failure; due again after backoff.
    Failed,
    /// The cloud holds it. Final.
    Synced,
    /// Rejected, conflicting or out of attempts: an operator must look.
    NeedsAttention,
}

impl JournalState {
    /// Parses the wire/CLI spelling (`needs_attention`, also accepting `needs-attention`).
    pub fn parse(s: &str) -> Option<JournalState> {
        match s.trim().replace('-', "_").as_str() {
            "pending" => Some(JournalState::Pending),
            "in_flight" => Some(JournalState::InFlight),
            "failed" => Some(JournalState::Failed),
            "synced" => Some(JournalState::Synced),
            "needs_attention" => Some(JournalState::NeedsAttention),
            _ => None,
        }
    }
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
    /// Offline catalog lookup over the local copy.
    fn lookup(&self, query: &LookupQuery) -> Result<Vec<Entity>, TillError>;
    /// Catalog version, entity count and last sync time.
    fn catalog_summary(&self) -> Result<CatalogSummary, TillError>;
    /// Snapshot progress and delta position.
    fn catalog_position(&self) -> Result<CatalogPosition, TillError>;
    /// Journal rows by state and the oldest undelivered sale.
    fn outbox_counts(&self) -> Result<OutboxCounts, TillError>;
    /// Journal rows (newest first), optionally of one state, as JSON objects with at least
    /// `journal_id`, `local_event_id`, `status`, `attempts`, `last_error_code`,
    /// `last_error_message`, `receipt_no`.
    fn journal(
        &self,
        state: Option<JournalState>,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, TillError>;
    /// Moves `needs_attention` rows back to `pending` with attempts reset; returns how many.
    fn retry(&self, selection: RetrySelection) -> Result<usize, TillError>;
}

/// Verify (report drift, change nothing) or apply (repair the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileChoice {
    /// Report drift only.
    Verify,
    /// Repair the local catalog.
    Apply,
}

/// One supervised actor as the status page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorView {
    /// Actor name, e.g. `catalog_syncer`.
    pub name: String,
    /// Human-readable state, e.g. `idle`, `offline`.
    pub state: String,
    /// Supervisor restarts since the engine started.
    pub restarts: u32,
    /// The last error it hit (kept after recovery).
    pub last_error: Option<String>,
}

/// The engine's live state, as far as the operator surfaces need it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineView {
    /// Whether the last call to the cloud got an answer.
    pub online: bool,
    /// When the cloud last answered.
    pub last_contact_at: Option<DateTime<Utc>>,
    /// Since when the cloud has not answered; `None` while online.
    pub offline_since: Option<DateTime<Utc>>,
    /// Each supervised actor.
    pub actors: Vec<ActorView>,
    /// The engine's own status document, passed through for tools that want more.
    pub detail: serde_json::Value,
}

/// A failure of an engine command (e.g. reconcile while the cloud is down).
#[derive(Debug, Error)]
#[error("{message}")]
pub struct SyncControlError {
    /// The stable code of the cloud's refusal, when there was one.
    pub code: Option<ErrorCode>,
    /// What went wrong, led by the engine's code.
    pub message: String,
}

/// The running sync engine, as the operator surfaces command it.
#[async_trait]
pub trait SyncControl: Send + Sync + 'static {
    /// Current state (cheap; called on every `/status`).
    fn view(&self) -> EngineView;
    /// Runs a verify or apply reconcile to completion and returns its report as JSON
    /// (`checked`, `unchanged`, `upserts`, `deletes`, `applied`, `catalog_version`, …).
    async fn reconcile(
        &self,
        choice: ReconcileChoice,
    ) -> Result<serde_json::Value, SyncControlError>;
    /// Asks the outbox to deliver now (after an enqueue or an operator retry).
    async fn flush_outbox_now(&self);
    /// Asks the catalog syncer to poll deltas now.
    async fn sync_catalog_now(&self);
}
