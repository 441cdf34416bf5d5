//! The `/status` document: one snapshot of everything an operator checks at a glance, built
//! from the till's database and (when the daemon runs) the engine's live state.
//!
//! The CLI's `terminal status` prints the same document, built without an engine when no daemon
//! is running, so the two can never disagree about what a field means.

use chrono::{DateTime, Utc};
use possync_actors::EngineStatus;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::operator::{ActorView, EngineView, JournalRow, JournalStatus, Till, TillError};

/// Most needs-attention rows listed on the status page (the count is always exact).
pub const NEEDS_ATTENTION_LISTED: usize = 100;

/// The whole status document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    /// When the document was built.
    pub generated_at: DateTime<Utc>,
    /// Whether this came from a running daemon (live engine state) or from the database alone.
    pub daemon_running: bool,
    /// This database's `pos_id`.
    pub pos_id: Uuid,
    /// The enrolled terminal id.
    pub terminal_id: Option<Uuid>,
    /// The enrolled branch.
    pub branch_id: Option<String>,
    /// Recent changes of the key space: forks after a cloned disk or restored backup,
    /// re-enrollments, carry-overs of unsent sales (oldest first).
    #[serde(default)]
    pub identity_changes: Vec<crate::store::IdentityChange>,
    /// Whether the cloud answered lately; `None` when no daemon runs (unknown).
    pub online: Option<bool>,
    /// When the cloud last answered.
    pub last_contact_at: Option<DateTime<Utc>>,
    /// Since when the cloud has not answered (an outage in progress); `None` while online or
    /// when no daemon runs. Sales keep being recorded and wait in the outbox meanwhile.
    pub offline_since: Option<DateTime<Utc>>,
    /// Seconds the current outage has lasted.
    pub offline_seconds: Option<i64>,
    /// Each supervised actor's state, restarts and last error.
    pub actors: Vec<ActorView>,
    /// The local catalog copy.
    pub catalog: CatalogReport,
    /// The sales outbox.
    pub outbox: OutboxReport,
    /// Recent errors an operator may act on: actors' last failures and needs-attention causes.
    pub last_errors: Vec<String>,
    /// Journal rows waiting for an operator (first [`NEEDS_ATTENTION_LISTED`]).
    pub needs_attention: Vec<JournalRow>,
    /// The engine's own status document, when a daemon runs.
    pub engine: Option<EngineStatus>,
}

/// The local catalog copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogReport {
    /// Catalog version the copy is complete up to; `None` before the first snapshot finished.
    pub version: Option<i64>,
    /// Entities held locally.
    pub entities: i64,
    /// When the catalog last advanced.
    pub last_synced_at: Option<DateTime<Utc>>,
    /// Seconds since the catalog last advanced.
    pub age_seconds: Option<i64>,
    /// The first (or a forced) snapshot's progress.
    pub snapshot: SnapshotReport,
}

/// Progress of the snapshot in progress, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Whether a snapshot is running.
    pub in_progress: bool,
    /// Catalog version the snapshot was taken at.
    pub version: Option<i64>,
    /// Entities stored so far.
    pub received: i64,
    /// Entities the snapshot announced.
    pub total: i64,
    /// 0–100, `None` when no total is known yet.
    pub percent: Option<f64>,
}

/// The sales outbox (`sync_journal`) by state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxReport {
    /// Waiting for delivery.
    pub pending: i64,
    /// Being delivered now.
    pub in_flight: i64,
    /// Failed transiently, waiting for backoff.
    pub failed: i64,
    /// Held by the cloud.
    pub synced: i64,
    /// Waiting for an operator.
    pub needs_attention: i64,
    /// Everything not yet in the cloud and not waiting for an operator.
    pub queued: i64,
    /// When the oldest undelivered sale was queued.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Age of the oldest undelivered sale: a queue must never stall silently.
    pub oldest_pending_age_seconds: Option<i64>,
}

/// Builds the document. `engine` is `None` when no daemon runs.
pub fn build_report(
    till: &dyn Till,
    engine: Option<&EngineView>,
    now: DateTime<Utc>,
) -> Result<StatusReport, TillError> {
    let identity = till.identity()?;
    let summary = till.catalog_summary()?;
    let position = till.catalog_position()?;
    let counts = till.outbox_counts()?;
    let needs_attention =
        till.journal(Some(JournalStatus::NeedsAttention), NEEDS_ATTENTION_LISTED)?;

    let last_synced_at = summary.last_synced_at.or(position.last_synced_at);
    let percent = (position.snapshot_in_progress && position.snapshot_total > 0).then(|| {
        let p = position.snapshot_received as f64 * 100.0 / position.snapshot_total as f64;
        (p.clamp(0.0, 100.0) * 10.0).round() / 10.0
    });

    let mut last_errors: Vec<String> = Vec::new();
    if let Some(view) = engine {
        for a in &view.actors {
            if let Some(e) = &a.status.last_error {
                last_errors.push(format!("{}: {}", a.name.as_str(), e));
            }
        }
    }
    for row in needs_attention.iter().take(10) {
        let code = row.last_error_code.as_deref().unwrap_or("?");
        let msg = row.last_error_message.as_deref().unwrap_or("");
        last_errors.push(
            format!("sale {}: {code} {msg}", row.local_event_id)
                .trim_end()
                .to_string(),
        );
    }

    Ok(StatusReport {
        generated_at: now,
        daemon_running: engine.is_some(),
        pos_id: identity.pos_id,
        terminal_id: identity.terminal_id,
        branch_id: identity.branch_id,
        identity_changes: till.identity_changes()?,
        online: engine.map(|e| e.online),
        last_contact_at: engine.and_then(|e| e.last_contact_at),
        offline_since: engine.and_then(|e| e.offline_since),
        offline_seconds: engine
            .and_then(|e| e.offline_since)
            .map(|t| (now - t).num_seconds().max(0)),
        actors: engine.map(|e| e.actors.clone()).unwrap_or_default(),
        catalog: CatalogReport {
            version: summary.version.or(position.catalog_version),
            entities: summary.entities,
            last_synced_at,
            age_seconds: last_synced_at.map(|t| (now - t).num_seconds().max(0)),
            snapshot: SnapshotReport {
                in_progress: position.snapshot_in_progress,
                version: position.snapshot_version,
                received: position.snapshot_received,
                total: position.snapshot_total,
                percent,
            },
        },
        outbox: OutboxReport {
            pending: counts.pending,
            in_flight: counts.in_flight,
            failed: counts.failed,
            synced: counts.synced,
            needs_attention: counts.needs_attention,
            queued: counts.pending + counts.in_flight + counts.failed,
            oldest_pending_at: counts.oldest_pending_at,
            oldest_pending_age_seconds: counts
                .oldest_pending_at
                .map(|t| (now - t).num_seconds().max(0)),
        },
        last_errors,
        needs_attention,
        engine: engine.map(|e| e.detail.clone()),
    })
}
