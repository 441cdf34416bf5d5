//! The three small interfaces the sync engine is written against: the terminal's local store,
//! the cloud API, and the clock.
//!
//! The daemon implements them with SQLite and HTTP; tests and simulations implement them with
//! in-memory or fault-injecting versions. Keeping them narrow is what lets the same actors run
//! in production and under a seeded fault schedule.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use possync_protocol::fingerprint::{
    FingerprintRequest, FingerprintResponse, FingerprintTree, LeafReconcileRequest,
};
use possync_protocol::{
    DeltaPage, ErrorCode, KeyRange, ManifestEntry, ReconcilePlan, ReconcileRequest,
    ReconcileResponse, SaleEvent, SalesEventsResponse, SnapshotPage,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

use crate::code::TerminalCode;

/// Primary key of a `sync_journal` row (its SQLite rowid).
pub type JournalId = i64;

/// A failure of the local store (stable code `POS_SYNC_STORAGE_FAILED`, mapped in
/// `EngineError::code`). The engine never retries these blindly: the supervisor
/// restarts the actor, which reloads its state from the store.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("local database: {0}")]
    /// SQLite (or the test store) refused or failed the operation.
    Database(String),
    #[error("local data is inconsistent: {0}")]
    /// Stored data contradicts itself (e.g. a journal row whose event does not parse).
    Corrupt(String),
}

/// The catalog sync position the store keeps in `sync_state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogPosition {
    /// Version the local catalog is complete up to; `None` until the first snapshot finished.
    pub catalog_version: Option<i64>,
    /// Snapshot in progress: the cursor of the next page to fetch (`None` = first page).
    pub snapshot_cursor: Option<String>,
    /// Whether a snapshot is in progress (started, not yet finished).
    pub snapshot_in_progress: bool,
    /// Version the in-progress snapshot was taken at.
    pub snapshot_version: Option<i64>,
    /// Entities stored so far / announced by the snapshot, for progress display.
    pub snapshot_received: i64,
    /// Entities the in-progress snapshot announced in total (0 before its first page).
    pub snapshot_total: i64,
    /// When the catalog last advanced (snapshot finished or delta applied).
    pub last_synced_at: Option<DateTime<Utc>>,
}

/// One sale waiting in the outbox, claimed for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// The `sync_journal` row this item came from.
    pub journal_id: JournalId,
    /// The sale exactly as it was stored at enqueue: its bytes never change between deliveries.
    pub event: SaleEvent,
    /// Delivery attempts made before this one (every kind of failure; paces the retries and
    /// is sent as `x-sync-attempt`).
    pub attempts: u32,
    /// What earlier failed attempts said about this sale.
    pub history: FailureHistory,
}

/// The part of a sale's delivery history that decides blame (see `outbox::blame_sale`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureHistory {
    /// Attempts the cloud answered with a retryable error of its own (5xx with an envelope).
    /// A sale with any goes alone in its next request, so a failure can be pinned on it.
    pub answered_failures: u32,
    /// Failures blamed on the sale itself: the only ones that use up `max_attempts`.
    pub sale_failures: u32,
    /// When the last failed attempt came back.
    pub last_failed_at: Option<DateTime<Utc>>,
}

impl FailureHistory {
    /// The history after one more transient failure: what every store records.
    pub fn after(self, failure: TransientFailure, at: DateTime<Utc>) -> FailureHistory {
        let (answered, blamed) = match failure {
            TransientFailure::NoAnswer => (0, 0),
            TransientFailure::CloudAnswered { blamed } => (1, u32::from(blamed)),
        };
        FailureHistory {
            answered_failures: self.answered_failures.saturating_add(answered),
            sale_failures: self.sale_failures.saturating_add(blamed),
            last_failed_at: Some(at),
        }
    }
}

/// Why a transient failure happened, as the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransientFailure {
    /// The cloud itself did not answer (see [`FailureClass::NoAnswer`]). Never counts toward
    /// the attempt budget.
    NoAnswer,
    /// The cloud answered with a retryable error. `blamed`: the failure belongs to this sale
    /// (it failed alone while the cloud stored other sales), and counts toward the budget.
    CloudAnswered {
        /// Whether this failure is the sale's own.
        blamed: bool,
    },
}

/// What became of one claimed outbox item, to be recorded in `sync_journal`.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// `accepted` or `duplicate`: the cloud holds it. Row → `synced`.
    Synced {
        /// The delivered row.
        journal_id: JournalId,
        /// The cloud's id for the sale (the first one, for a duplicate).
        cloud_event_id: Option<String>,
        /// Whether the cloud already held it (an earlier delivery's answer was lost).
        duplicate: bool,
    },
    /// `conflict`, `rejected`, or attempts exhausted. Row → `needs_attention`.
    NeedsAttention {
        /// The row that needs an operator.
        journal_id: JournalId,
        /// The cloud's code, or [`TerminalCode::AttemptsExhausted`].
        code: TerminalCode,
        /// What happened, for the status page.
        message: String,
    },
    /// Transient failure. Row → `failed`, due again at `not_before`.
    RetryLater {
        /// The row to retry.
        journal_id: JournalId,
        /// What kind of failure (decides which history counters move).
        failure: TransientFailure,
        /// When the failure came back (engine clock): becomes `last_failed_at`.
        failed_at: DateTime<Utc>,
        /// Not to be claimed again before this time (backoff, `Retry-After`).
        not_before: DateTime<Utc>,
        /// Code of the failure (`NETWORK`, `POS_SYNC_STORAGE_FAILED`, …).
        code: TerminalCode,
        /// The failure, for the status page.
        message: String,
    },
}

/// Counts of `sync_journal` rows by state, and the age of the oldest undelivered sale.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxCounts {
    /// Recorded, never sent yet.
    pub pending: i64,
    /// Claimed and being sent now.
    pub in_flight: i64,
    /// Sent, failed transiently, waiting for their retry time.
    pub failed: i64,
    /// Held by the cloud: final.
    pub synced: i64,
    /// Waiting for an operator (rejected, conflict, or attempts exhausted).
    pub needs_attention: i64,
    /// `occurred_at`/enqueue time of the oldest row not yet synced nor needing attention.
    pub oldest_pending_at: Option<DateTime<Utc>>,
}

/// The terminal's local database as the engine sees it. Methods are blocking (SQLite);
/// actors call them from `spawn_blocking`. Every method that writes does so in one
/// transaction: after a crash, either all of it happened or none of it did.
pub trait LocalStore: Send + Sync + 'static {
    /// Reads the catalog sync position.
    fn catalog_position(&self) -> Result<CatalogPosition, StoreError>;

    /// Stores one snapshot page: upserts its entities (version-guarded), records
    /// `page.next_cursor` as the resume point, and when it is `None`, marks the snapshot done
    /// with `catalog_version = page.snapshot_version`. `started_fresh` means this page is the
    /// first one of a new snapshot (no cursor was sent): the store then remembers the snapshot
    /// version and total, and on completion removes local entities the snapshot did not list.
    fn apply_snapshot_page(
        &self,
        page: &SnapshotPage,
        started_fresh: bool,
    ) -> Result<(), StoreError>;

    /// Applies a delta page: upserts newer versions, deletes tombstoned keys (never older over
    /// newer), then sets `catalog_version = page.next_since`.
    fn apply_delta_page(&self, page: &DeltaPage) -> Result<(), StoreError>;

    /// Forgets any delta position and snapshot cursor so the next sync takes a fresh snapshot
    /// (after a 410 `resnapshot_required`). Local entities stay usable meanwhile.
    fn require_resnapshot(&self) -> Result<(), StoreError>;

    /// Up to `limit` manifest entries with key bytewise greater than `after`, in key order.
    fn manifest_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ManifestEntry>, StoreError>;

    /// The fingerprint tree of the live local catalog, hashes recomputed from the stored data
    /// (so a row edited behind the store's back shows). Must not block sales while it reads.
    fn fingerprint_tree(&self) -> Result<FingerprintTree, StoreError>;

    /// Manifest entries (hash recomputed) of the live entities in fingerprint `leaves`.
    fn manifest_in_leaves(&self, leaves: &[u32]) -> Result<Vec<ManifestEntry>, StoreError>;

    /// Applies one reconcile range's plan in one transaction: upserts and deletes, catalog
    /// tables only. `cloud_version` is the catalog version the cloud computed the plan at: a
    /// local row newer than that arrived by a delta while reconcile ran and is kept, so a
    /// reconcile racing the `CatalogSyncer` can never undo a newer change.
    fn apply_reconcile_plan(
        &self,
        range: &KeyRange,
        plan: &ReconcilePlan,
        cloud_version: i64,
    ) -> Result<(), StoreError>;

    /// Moves every `in_flight` row back to `pending` (crash recovery at start-up: the cloud's
    /// idempotency ledger makes resending safe). Returns how many rows moved.
    fn release_in_flight(&self) -> Result<usize, StoreError>;

    /// Claims up to `limit` rows that are `pending`, or `failed` and due at `now`, oldest
    /// `local_event_id` first: marks them `in_flight` and returns them.
    ///
    /// A `failed` row is due when its `next_attempt_at <= now`, and also when it lies more
    /// than [`MAX_DELAY`](crate::backoff::MAX_DELAY) after `now`: no backoff sets a retry that
    /// far ahead, so the wall clock was stepped back since, and waiting for it would stall the
    /// sale for as long as the step (hours, after NTP corrects a wrong RTC).
    fn claim_batch(&self, limit: usize, now: DateTime<Utc>) -> Result<Vec<OutboxItem>, StoreError>;

    /// Records outcomes for claimed rows (one transaction), incrementing their attempt count.
    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError>;

    /// Earliest `next_attempt_at` among `failed` rows, so the outbox knows when to wake.
    fn next_due_at(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Counts rows by state.
    fn outbox_counts(&self) -> Result<OutboxCounts, StoreError>;
}

/// A failed call to the cloud, classified for the retry decision.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum CloudError {
    /// No answer: connection refused, reset, timed out, or the response was cut.
    #[error("cloud unreachable: {0}")]
    Unreachable(String),
    /// The cloud answered with an error envelope (or a non-2xx without one: `code` is `None`).
    #[error("cloud answered {status}: {message}")]
    Rejected {
        /// HTTP status of the answer.
        status: u16,
        /// The envelope's stable code, when the body carried one.
        code: Option<ErrorCode>,
        /// The envelope's message, or an excerpt of the body.
        message: String,
        /// `Retry-After`, when the answer carried one.
        retry_after: Option<Duration>,
        /// `details.reason`, e.g. `resnapshot_required`.
        reason: Option<String>,
    },
    /// A 2xx whose body did not parse.
    #[error("cloud answer did not parse: {0}")]
    BadResponse(String),
}

/// What a failed call says about the cloud: the one rule that separates "the cloud did not
/// answer" from "the cloud answered and this request failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Nobody who speaks for the cloud answered: no connection, a timeout, a reset, a cut
    /// body, a 2xx that is not ours (a captive portal), a 502/503/504 without our error
    /// envelope (a proxy in front of a cloud that is down), any 4xx other than 401 without our
    /// envelope (a WAF's 403 page, a CDN's 404 during a deploy, a proxy's 400 or 413: the
    /// request never reached the cloud, so it says nothing about the sales), a 408, or a 429
    /// (the cloud asks us to wait: nothing is wrong with the request). Retried forever, never
    /// blamed on a sale, never parked.
    NoAnswer,
    /// The cloud answered with a retryable error of its own (5xx with an envelope, e.g.
    /// `POS_SYNC_STORAGE_FAILED`). Usually the cloud's trouble; the sale's only when it fails
    /// alone while the cloud stores other sales.
    CloudTrouble,
    /// The cloud refused our credentials (401 `POS_SYNC_UNAUTHORIZED`: a revoked or rotated
    /// token). Nothing is wrong with the sales: they wait, paced like an outage, until the till
    /// has new credentials (`terminal token set`, a re-enrollment), and are never parked.
    CredentialsRefused,
    /// The cloud refused the request with its own error envelope (a stable code); resending
    /// it unchanged cannot succeed. Only the cloud can refuse: without the envelope the answer
    /// is a middlebox's ([`FailureClass::NoAnswer`]).
    Refused,
}

impl CloudError {
    /// Classifies this failure (a pure function of the answer; property-tested).
    pub fn class(&self) -> FailureClass {
        match self {
            CloudError::Unreachable(_) | CloudError::BadResponse(_) => FailureClass::NoAnswer,
            CloudError::Rejected { status, code, .. } => {
                if *status == 401 && matches!(code, Some(ErrorCode::PosSyncUnauthorized) | None) {
                    FailureClass::CredentialsRefused
                } else if matches!(status, 408 | 429)
                    || code == &Some(ErrorCode::PosSyncRateLimited)
                    || (code.is_none() && matches!(status, 502..=504))
                {
                    FailureClass::NoAnswer
                } else if self.can_retry() {
                    FailureClass::CloudTrouble
                } else if code.is_none() {
                    // A refusal parks every sale of the request for an operator; only the
                    // cloud's own envelope may do that. An error page from nginx, a WAF or a
                    // CDN (403, 404 mid-deploy, 400, 413) did not come from the cloud.
                    FailureClass::NoAnswer
                } else {
                    FailureClass::Refused
                }
            }
        }
    }

    /// Whether the cloud itself answered (for the online flag).
    pub fn cloud_answered(&self) -> bool {
        self.class() != FailureClass::NoAnswer
    }

    /// Whether the same request may succeed later unchanged.
    pub fn can_retry(&self) -> bool {
        match self {
            CloudError::Unreachable(_) | CloudError::BadResponse(_) => true,
            CloudError::Rejected { status, code, .. } => match code {
                Some(c) => c.can_retry(*status),
                None => *status >= 500 || *status == 429 || *status == 408,
            },
        }
    }

    /// The cloud no longer holds history back to our cursor: take a fresh snapshot.
    pub fn resnapshot_required(&self) -> bool {
        matches!(self, CloudError::Rejected { status: 410, .. })
            || matches!(self, CloudError::Rejected { reason: Some(r), .. } if r == "resnapshot_required")
    }

    /// The `Retry-After` the cloud asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CloudError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The code for logs and the journal's `last_error_code`: the cloud's own when it sent
    /// one, else what kind of non-answer this was.
    pub fn code(&self) -> TerminalCode {
        match self {
            CloudError::Unreachable(_) => TerminalCode::Network,
            CloudError::BadResponse(_) => TerminalCode::BadResponse,
            CloudError::Rejected { code: Some(c), .. } => TerminalCode::Api(*c),
            CloudError::Rejected { status, .. } => TerminalCode::Http(*status),
        }
    }
}

/// The cloud sync API as the engine uses it (`/v1/pos/*`, authenticated as this terminal).
#[async_trait]
pub trait CloudApi: Send + Sync + 'static {
    /// `GET /v1/pos/catalog/snapshot`: one page; no cursor starts a new snapshot.
    async fn snapshot(&self, cursor: Option<&str>, limit: u32) -> Result<SnapshotPage, CloudError>;
    /// `GET /v1/pos/catalog/delta`: changes after `since`.
    async fn delta(&self, since: i64, limit: u32) -> Result<DeltaPage, CloudError>;
    /// `POST /v1/pos/catalog/reconcile`: one key range's verification or repair plan.
    async fn reconcile(&self, req: &ReconcileRequest) -> Result<ReconcileResponse, CloudError>;
    /// `POST /v1/pos/catalog/fingerprints`: fingerprints of tree nodes of the branch's view.
    async fn fingerprints(
        &self,
        req: &FingerprintRequest,
    ) -> Result<FingerprintResponse, CloudError>;
    /// `POST /v1/pos/catalog/reconcile/leaves`: verification or repair plan of whole leaves.
    async fn reconcile_leaves(
        &self,
        req: &LeafReconcileRequest,
    ) -> Result<ReconcileResponse, CloudError>;
    /// Reconcile traffic so far (requests and HTTP body bytes of the reconcile family), for
    /// a verify's cost report: the difference across one run is that run's cost.
    fn reconcile_traffic(&self) -> Traffic {
        Traffic::default()
    }
    /// Posts one batch. `sync_attempt` is the delivery attempt of the batch (1 for a first
    /// delivery, from the journal's attempt counts, so it survives restarts); the cloud logs it
    /// as `syncAttempt`.
    async fn post_events(
        &self,
        events: &[SaleEvent],
        sync_attempt: u32,
    ) -> Result<SalesEventsResponse, CloudError>;
    /// A cheap "is the cloud back?" question (`GET /readyz`: the process serves and its
    /// database answers). The outbox asks it at the backoff cadence while an outage holds
    /// the queue, instead of spending a batch of sales on each guess.
    async fn probe(&self) -> Result<(), CloudError>;
}

/// Requests and bytes of one family of cloud calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Requests made (each one round trip).
    pub requests: u64,
    /// Request body bytes sent.
    pub bytes_sent: u64,
    /// Response body bytes received, as they came over the wire (compressed if they were).
    pub bytes_received: u64,
}

impl Traffic {
    /// `self - earlier`, per field.
    pub fn since(self, earlier: Traffic) -> Traffic {
        Traffic {
            requests: self.requests.saturating_sub(earlier.requests),
            bytes_sent: self.bytes_sent.saturating_sub(earlier.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
        }
    }
}

/// Time, injectable so simulations and tests control it: the wall clock (stored instants,
/// status lines) and a monotonic clock (how long to wait in memory).
///
/// The two differ on purpose. The wall clock can be stepped by hours (NTP correcting a wrong
/// RTC after boot); a wait measured on it would stall for as long. Every in-memory wait (the
/// outbox's hold) is measured on [`Clock::monotonic`], which only moves forward.
pub trait Clock: Send + Sync + 'static {
    /// The current time (UTC).
    fn now(&self) -> DateTime<Utc>;

    /// A monotonic instant (never stepped). Defaults to tokio's clock.
    fn monotonic(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
