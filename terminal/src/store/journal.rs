//! The sales outbox (`sync_journal`) and the till's own receipts (`sales`).
//!
//! A sale is enqueued in one transaction that takes the next `local_event_id`, writes the
//! receipt and writes its journal row; the engine then moves the row
//! `pending → in_flight → synced | failed | needs_attention`. A trigger makes `synced` final.

use chrono::{DateTime, Utc};
use possync_actors::{
    DeliveryOutcome, FailureHistory, OutboxCounts, OutboxItem, TerminalCode, TransientFailure,
};
use possync_protocol::journal_chain::{canonical_event_bytes, chain_hash, prev_of};
use possync_protocol::{validate_event, ErrorCode, EventType, SaleEvent, SalePayload};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use super::error::TerminalStoreError;
use super::idempotency::{self, IdempotencyKey};
use super::{parse_time, read_enrollment, time_text, Enrollment, Kv};

/// A journal row's delivery state (the `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalStatus {
    /// Waiting for its first (or an operator-requested) delivery.
    Pending,
    /// Claimed by the outbox; back to `pending` if the daemon restarts before an answer.
    InFlight,
    /// A transient failure; due again at `next_attempt_at`.
    Failed,
    /// The cloud holds it. Final.
    Synced,
    /// Rejected, conflicting, or out of attempts: an operator must look.
    NeedsAttention,
}

impl JournalStatus {
    /// Every state, in lifecycle order.
    pub const ALL: [JournalStatus; 5] = [
        JournalStatus::Pending,
        JournalStatus::InFlight,
        JournalStatus::Failed,
        JournalStatus::Synced,
        JournalStatus::NeedsAttention,
    ];

    /// The stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            JournalStatus::Pending => "pending",
            JournalStatus::InFlight => "in_flight",
            JournalStatus::Failed => "failed",
            JournalStatus::Synced => "synced",
            JournalStatus::NeedsAttention => "needs_attention",
        }
    }
}

impl fmt::Display for JournalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JournalStatus {
    type Err = String;
    /// The stored spelling; `needs-attention` (as typed on a command line) is accepted too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().replace('-', "_");
        JournalStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == wanted)
            .ok_or_else(|| {
                format!("unknown journal status {s:?} (pending, in_flight, failed, synced, needs_attention)")
            })
    }
}

/// What `enqueue_sale` stored, returned only after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EnqueuedSale {
    /// This database's id (second part of the idempotency key).
    pub pos_id: Uuid,
    /// The id the sale got (third part of the idempotency key).
    pub local_event_id: i64,
    /// The outbox row, for `terminal outbox retry`.
    pub journal_id: i64,
}

/// What a keyed sale request did (see [`super::idempotency`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyedSale {
    /// The key was new: the sale and the key were stored and committed together.
    Recorded(EnqueuedSale),
    /// The key had recorded this same request before: nothing was stored, and this is the
    /// original sale's receipt.
    Replayed {
        /// The `pos_id` the sale was recorded under (a later carry-over re-keys its journal
        /// row, never the receipt the client was given).
        pos_id: Uuid,
        /// The sale's `local_event_id` in that `pos_id`.
        local_event_id: i64,
    },
}

/// The key of a keyed sale request and the hash of the request it stands for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestKey<'a> {
    pub key: &'a IdempotencyKey,
    pub request_hash: &'a str,
}

/// One `sync_journal` row as the operator sees it (`terminal outbox list`, `GET /outbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRow {
    /// Row id, the handle for an operator retry.
    pub journal_id: i64,
    /// The sale's id within this `pos_id`.
    pub local_event_id: i64,
    /// Where the row is in its lifecycle.
    pub status: JournalStatus,
    /// Delivery attempts so far (reset by an operator retry).
    pub attempts: i64,
    /// When a `failed` row is due again.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Stable code of the last failure (`POS_SYNC_*`, `NETWORK`, `HTTP_503` …); for a synced
    /// row, `POS_SYNC_EVENT_DUPLICATE` if the cloud already held it.
    pub last_error_code: Option<String>,
    /// Human text of the last failure.
    pub last_error_message: Option<String>,
    /// The cloud's id for the stored sale, once synced.
    pub cloud_event_id: Option<String>,
    /// When the sale was enqueued.
    pub created_at: DateTime<Utc>,
    /// The receipt number, so an operator recognises the sale.
    pub receipt_no: Option<String>,
}

/// Which rows an operator retry moves back to `pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryTarget {
    /// One row by `journal_id` (if it is `needs_attention` or `failed`).
    One(i64),
    /// Every `needs_attention` row.
    AllNeedingAttention,
}

/// The journal's `event` JSON: the full `SaleEvent`, except that `terminal_id` and
/// `branch_id` are `null` for sales queued before enrollment (stamped by `save_enrollment`).
fn event_json(
    pos_id: Uuid,
    local_event_id: i64,
    enrollment: Option<&Enrollment>,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &SalePayload,
) -> Result<String, TerminalStoreError> {
    let event = SaleEvent {
        terminal_id: enrollment.map_or(Uuid::nil(), |e| e.terminal_id),
        pos_id,
        local_event_id,
        branch_id: enrollment.map_or_else(String::new, |e| e.branch_id.clone()),
        event_type,
        occurred_at,
        payload: payload.clone(),
        chain_hash: None,
    };
    let mut value = serde_json::to_value(&event)?;
    if enrollment.is_some() {
        validate_event(&event)?;
    } else if let Some(obj) = value.as_object_mut() {
        obj.insert("terminal_id".into(), serde_json::Value::Null);
        obj.insert("branch_id".into(), serde_json::Value::Null);
    }
    Ok(serde_json::to_string(&value)?)
}

/// Takes the next `local_event_id` inside the caller's transaction.
pub(crate) fn take_local_event_id(tx: &Transaction<'_>) -> Result<i64, TerminalStoreError> {
    let next = Kv::SyncState
        .get_i64(tx, "next_local_event_id")?
        .unwrap_or(1);
    Kv::SyncState.set(tx, "next_local_event_id", &(next + 1).to_string())?;
    Ok(next)
}

/// The `chain_hash` of event `local_event_id` of `pos_id` (docs/journal-chain.md): linked to
/// the row `(pos_id, local_event_id - 1)` as this transaction sees it, or to the genesis when
/// that row has no `chain_hash` (enqueued before chaining began) or there is none.
pub(crate) fn chain_link(
    tx: &Transaction<'_>,
    pos_id: Uuid,
    local_event_id: i64,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &serde_json::Value,
) -> Result<String, TerminalStoreError> {
    let predecessor: Option<String> = if local_event_id > 1 {
        tx.prepare_cached(
            "SELECT chain_hash FROM sync_journal WHERE pos_id = ?1 AND local_event_id = ?2",
        )?
        .query_row(params![pos_id.to_string(), local_event_id - 1], |r| {
            r.get::<_, Option<String>>(0)
        })
        .optional()?
        .flatten()
    } else {
        None
    };
    let prev = prev_of(pos_id, local_event_id, predecessor.as_deref());
    let bytes = canonical_event_bytes(pos_id, local_event_id, event_type, occurred_at, payload);
    chain_hash(&prev, &bytes)
        .map_err(|e| TerminalStoreError::Corrupt(format!("chain of {pos_id}: {e}")))
}

/// What `insert_queued_sale` needs beyond the sale itself.
pub(crate) struct QueuedSale<'a> {
    pub pos_id: Uuid,
    pub event_type: EventType,
    /// When the sale happened at the till.
    pub occurred_at: DateTime<Utc>,
    pub payload: &'a SalePayload,
    /// `Some((code, message))` stores the row as `needs_attention` instead of `pending`.
    pub needs_attention: Option<(String, String)>,
    pub legacy_sale_id: Option<i64>,
    /// The terminal's enrollment, read once by the caller (`None` before enrollment: the
    /// event is stamped later by [`stamp_identity`]).
    pub enrollment: Option<&'a Enrollment>,
    /// The client's idempotency key, stored in the receipt's row (`POST /sales` only).
    pub key: Option<RequestKey<'a>>,
}

/// Inserts a receipt and its journal row in the caller's transaction.
pub(crate) fn insert_queued_sale(
    tx: &Transaction<'_>,
    s: &QueuedSale<'_>,
) -> Result<EnqueuedSale, TerminalStoreError> {
    let now = time_text(Utc::now());
    let local_event_id = take_local_event_id(tx)?;
    let event = event_json(
        s.pos_id,
        local_event_id,
        s.enrollment,
        s.event_type,
        s.occurred_at,
        s.payload,
    )?;
    insert_sale_record(
        tx,
        s.pos_id,
        Some(local_event_id),
        s.event_type,
        s.occurred_at,
        s.payload,
        s.legacy_sale_id,
        s.key,
        &now,
    )?;
    let (status, code, message) = match &s.needs_attention {
        None => ("pending", None, None),
        Some((c, m)) => ("needs_attention", Some(c.as_str()), Some(m.as_str())),
    };
    let link = chain_link(
        tx,
        s.pos_id,
        local_event_id,
        s.event_type,
        s.occurred_at,
        &serde_json::to_value(s.payload)?,
    )?;
    tx.prepare_cached(
        "INSERT INTO sync_journal
            (pos_id, local_event_id, event_type, event, status, attempts,
             last_error_code, last_error_message, created_at, updated_at, chain_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?8, ?9)",
    )?
    .execute(params![
        s.pos_id.to_string(),
        local_event_id,
        s.event_type.as_str(),
        event,
        status,
        code,
        message,
        now,
        link
    ])?;
    let journal_id = tx.last_insert_rowid();
    Ok(EnqueuedSale {
        pos_id: s.pos_id,
        local_event_id,
        journal_id,
    })
}

/// Inserts one `sales` row (`local_event_id` is `None` for legacy history-only receipts).
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_sale_record(
    tx: &Transaction<'_>,
    pos_id: Uuid,
    local_event_id: Option<i64>,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &SalePayload,
    legacy_sale_id: Option<i64>,
    key: Option<RequestKey<'_>>,
    now: &str,
) -> Result<(), TerminalStoreError> {
    tx.prepare_cached(
        "INSERT INTO sales (pos_id, local_event_id, event_type, receipt_no, currency, total_minor,
                            payload, occurred_at, created_at, source, legacy_sale_id,
                            idempotency_key, request_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        pos_id.to_string(),
        local_event_id,
        event_type.as_str(),
        payload.receipt_no,
        payload.currency,
        payload.totals.total_minor,
        serde_json::to_string(payload)?,
        time_text(occurred_at),
        now,
        if legacy_sale_id.is_some() {
            "legacy"
        } else {
            "pos"
        },
        legacy_sale_id,
        key.map(|k| k.key.as_str()),
        key.map(|k| k.request_hash),
    ])?;
    Ok(())
}

/// One transaction: next id, receipt, journal row. The payload was validated by the caller.
pub fn enqueue(
    conn: &mut Connection,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &SalePayload,
) -> Result<EnqueuedSale, TerminalStoreError> {
    match record(conn, event_type, occurred_at, payload, None)? {
        KeyedSale::Recorded(done) => Ok(done),
        // Only a keyed request can be a replay.
        KeyedSale::Replayed { .. } => Err(TerminalStoreError::Corrupt(
            "a sale without a key was answered as a replay".into(),
        )),
    }
}

/// [`enqueue`] under the client's idempotency key, in the same one transaction: a key not
/// seen before is stored with the sale (same commit, same fsync); a key that recorded the
/// same request (`request_hash`) answers that sale's receipt and writes nothing; a key that
/// recorded another request is [`TerminalStoreError::IdempotencyKeyReused`]. The payload was
/// validated by the caller.
pub fn enqueue_keyed(
    conn: &mut Connection,
    key: &IdempotencyKey,
    request_hash: &str,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &SalePayload,
) -> Result<KeyedSale, TerminalStoreError> {
    record(
        conn,
        event_type,
        occurred_at,
        payload,
        Some(RequestKey { key, request_hash }),
    )
}

fn record(
    conn: &mut Connection,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &SalePayload,
    key: Option<RequestKey<'_>>,
) -> Result<KeyedSale, TerminalStoreError> {
    // A sale is a fact: its commit waits for the fsync whatever a `redoable_write` before it
    // did to the connection (setting the flag costs no I/O; the statement is prepared once).
    conn.prepare_cached("PRAGMA synchronous = FULL")?
        .execute([])?;
    // IMMEDIATE (the connection's default): the write lock is held from here, so two
    // requests with one key — two handlers, or another process on the same file — run one
    // after the other, and the second finds the first's key below. The unique index would
    // refuse a second row anyway.
    let tx = conn.transaction()?;
    let enrollment = read_enrollment(&tx)?;
    let terminal_id = enrollment
        .as_ref()
        .map(|e| e.terminal_id.to_string())
        .unwrap_or_default();
    let branch_id = enrollment
        .as_ref()
        .map(|e| e.branch_id.clone())
        .unwrap_or_default();
    if let Some(k) = key {
        if let Some(found) = idempotency::lookup(&tx, k.key)? {
            // Nothing was written: dropping `tx` rolls back without touching the disk.
            drop(tx);
            if found.request_hash != k.request_hash {
                tracing::warn!(
                    terminalId = %terminal_id,
                    branchId = %branch_id,
                    eventId = found.local_event_id,
                    syncAttempt = 0,
                    errorCode = %possync_protocol::ErrorCode::PosLocalIdempotencyKeyReused,
                    idempotency_key = %k.key,
                    "idempotency key reused for another sale request; nothing stored"
                );
                return Err(TerminalStoreError::IdempotencyKeyReused {
                    key: k.key.as_str().to_string(),
                    pos_id: found.pos_id,
                    local_event_id: found.local_event_id,
                });
            }
            tracing::info!(
                terminalId = %terminal_id,
                branchId = %branch_id,
                eventId = found.local_event_id,
                syncAttempt = 0,
                errorCode = "",
                idempotency_key = %k.key,
                "sale retried under its idempotency key; original receipt answered"
            );
            return Ok(KeyedSale::Replayed {
                pos_id: found.pos_id,
                local_event_id: found.local_event_id,
            });
        }
    }
    // Read in the transaction: a fork (perhaps by another process) may have changed it.
    let pos_id = super::identity::pos_id(&tx)?;
    let done = insert_queued_sale(
        &tx,
        &QueuedSale {
            pos_id,
            event_type,
            occurred_at,
            payload,
            needs_attention: None,
            legacy_sale_id: None,
            enrollment: enrollment.as_ref(),
            key,
        },
    )?;
    tx.commit()?;
    tracing::info!(
        terminalId = %terminal_id,
        branchId = %branch_id,
        eventId = done.local_event_id,
        syncAttempt = 0,
        errorCode = "",
        journal_id = done.journal_id,
        keyed = key.is_some(),
        "sale enqueued"
    );
    Ok(KeyedSale::Recorded(done))
}

/// Fills `terminal_id` / `branch_id` into undelivered events queued before enrollment.
pub fn stamp_identity(tx: &Transaction<'_>, e: &Enrollment) -> Result<usize, TerminalStoreError> {
    let n = tx.execute(
        "UPDATE sync_journal
         SET event = json_set(event, '$.terminal_id', ?1, '$.branch_id', ?2), updated_at = ?3
         WHERE status <> 'synced' AND json_extract(event, '$.terminal_id') IS NULL",
        params![
            e.terminal_id.to_string(),
            e.branch_id,
            time_text(Utc::now())
        ],
    )?;
    if n > 0 {
        tracing::info!(
            terminalId = %e.terminal_id,
            branchId = %e.branch_id,
            stamped = n,
            "queued sales stamped with the new enrollment"
        );
    }
    // Rows already stamped keep their identity: one may have reached the cloud under it (an
    // answer lost in flight), and re-keying it would make the cloud store that sale twice.
    let foreign: i64 = tx.query_row(
        "SELECT count(*) FROM sync_journal
         WHERE status <> 'synced'
           AND (json_extract(event, '$.terminal_id') <> ?1 OR json_extract(event, '$.branch_id') <> ?2)",
        params![e.terminal_id.to_string(), e.branch_id],
        |r| r.get(0),
    )?;
    if foreign > 0 {
        tracing::warn!(
            terminalId = %e.terminal_id,
            branchId = %e.branch_id,
            unsynced = foreign,
            "unsynced sales keep the previous enrollment's keys until the carry-over asks the cloud which of them it holds"
        );
    }
    Ok(n)
}

/// Moves every `in_flight` row back to `pending`.
pub fn release_in_flight(conn: &Connection) -> Result<usize, TerminalStoreError> {
    // A claimed row may have been sent, and its request may still be committing in the cloud:
    // its outcome is unknown, exactly as after a timeout. It says so (`NETWORK`), which is what
    // keeps a carry-over from re-keying it before that request has had time to commit
    // (`identity::UNANSWERED_QUIET_SECS`). Delivery itself ignores the code.
    Ok(conn.execute(
        "UPDATE sync_journal SET status = 'pending', updated_at = ?1,
             last_error_code = ?2,
             last_error_message = 'delivery interrupted before its answer was read (restart)'
         WHERE status = 'in_flight'",
        params![time_text(Utc::now()), TerminalCode::Network.as_str()],
    )?)
}

/// Claims up to `limit` deliverable rows (oldest `local_event_id` first) as `in_flight`.
/// A row whose stored event no longer parses is moved to `needs_attention` instead of
/// blocking the queue forever.
pub fn claim_batch(
    conn: &mut Connection,
    limit: usize,
    now: DateTime<Utc>,
) -> Result<Vec<OutboxItem>, TerminalStoreError> {
    let now_text = time_text(now);
    // A retry time further ahead than any backoff sets was stamped before the wall clock was
    // stepped back: due now, not in as many hours as the step (LocalStore::claim_batch).
    let stepped_text = time_text(possync_actors::backoff::retry_instant(
        now,
        possync_actors::backoff::MAX_DELAY,
        std::time::Duration::ZERO,
    ));
    let stamp = time_text(Utc::now());
    let tx = conn.transaction()?;
    // Only the current key space: a row stamped with another terminal, branch or pos_id waits
    // for its carry-over (the cloud would refuse it as a stranger, with its whole batch).
    let Some(ks) = super::identity::key_space(&tx)? else {
        return Ok(Vec::new());
    };
    // Sales inherited from the database this one was copied from keep their keys too (see
    // `identity::Inherited`). One request carries one pos_id, because the device nonce sent
    // with it depends on the pos_id: the batch is the first pos_id's rows.
    let inherited = serde_json::to_string(&super::identity::inherited(&tx)?)?;
    type ClaimedRow = (
        i64,
        String,
        i64,
        i64,
        i64,
        Option<String>,
        String,
        Option<String>,
    );
    let mut rows: Vec<ClaimedRow> = tx
        .prepare_cached(
            "SELECT journal_id, event, attempts, answered_failures, sale_failures, last_failed_at,
                    pos_id, chain_hash
             FROM sync_journal
             WHERE (status = 'pending'
                    OR (status = 'failed' AND (next_attempt_at <= ?1 OR next_attempt_at > ?7)))
               AND json_extract(event, '$.terminal_id') = ?4
               AND json_extract(event, '$.branch_id') = ?5
               AND (pos_id = ?3
                    OR EXISTS (SELECT 1 FROM json_each(?6) i
                               WHERE json_extract(i.value, '$.pos_id') = sync_journal.pos_id
                                 AND sync_journal.local_event_id < json_extract(i.value, '$.below')))
             ORDER BY local_event_id LIMIT ?2",
        )?
        .query_map(
            params![
                now_text,
                i64::try_from(limit).unwrap_or(i64::MAX),
                ks.pos_id.to_string(),
                ks.terminal_id.to_string(),
                ks.branch_id,
                inherited,
                stepped_text
            ],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )?
        .collect::<Result<_, _>>()?;
    if let Some(first_pos) = rows.first().map(|r| r.6.clone()) {
        rows.retain(|r| r.6 == first_pos);
    }
    let mut items = Vec::with_capacity(rows.len());
    for (journal_id, text, attempts, answered, blamed, last_failed_at, _, link) in rows {
        let history = FailureHistory {
            answered_failures: u32::try_from(answered).unwrap_or(u32::MAX),
            sale_failures: u32::try_from(blamed).unwrap_or(u32::MAX),
            last_failed_at: last_failed_at.as_deref().map(parse_time).transpose()?,
        };
        match serde_json::from_str::<SaleEvent>(&text) {
            Ok(mut event) => {
                event.chain_hash = link;
                tx.prepare_cached(
                    "UPDATE sync_journal SET status = 'in_flight', updated_at = ?2 WHERE journal_id = ?1",
                )?
                .execute(params![journal_id, stamp])?;
                items.push(OutboxItem {
                    journal_id,
                    event,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    history,
                });
            }
            Err(e) => {
                let code = ErrorCode::PosSyncEventInvalid;
                tracing::error!(journal_id, error = %e, errorCode = %code, "stored event unreadable");
                tx.prepare_cached(
                    "UPDATE sync_journal SET status = 'needs_attention', last_error_code = ?4,
                         last_error_message = ?2, updated_at = ?3 WHERE journal_id = ?1",
                )?
                .execute(params![
                    journal_id,
                    format!("stored event unreadable: {e}"),
                    stamp,
                    code.as_str()
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok(items)
}

/// Records delivery outcomes in one transaction, each incrementing the row's attempt count.
/// Rows already `synced` are left alone (a repeated outcome must not trip the trigger and
/// roll back the others).
pub fn record_outcomes(
    conn: &mut Connection,
    outcomes: &[DeliveryOutcome],
) -> Result<(), TerminalStoreError> {
    let now = time_text(Utc::now());
    let tx = conn.transaction()?;
    for o in outcomes {
        match o {
            DeliveryOutcome::Synced {
                journal_id,
                cloud_event_id,
                duplicate,
            } => {
                tx.prepare_cached(
                    "UPDATE sync_journal SET status = 'synced', attempts = attempts + 1,
                         cloud_event_id = ?2, synced_at = ?3, updated_at = ?3, next_attempt_at = NULL,
                         last_error_code = ?4, last_error_message = NULL
                     WHERE journal_id = ?1 AND status <> 'synced'",
                )?
                .execute(params![
                    journal_id,
                    cloud_event_id,
                    now,
                    duplicate.then_some(ErrorCode::PosSyncEventDuplicate.as_str()),
                ])?;
            }
            DeliveryOutcome::NeedsAttention {
                journal_id,
                code,
                message,
            } => {
                tx.prepare_cached(
                    "UPDATE sync_journal SET status = 'needs_attention', attempts = attempts + 1,
                         last_error_code = ?2, last_error_message = ?3, next_attempt_at = NULL, updated_at = ?4
                     WHERE journal_id = ?1 AND status <> 'synced'",
                )?
                .execute(params![journal_id, code.to_string(), message, now])?;
            }
            DeliveryOutcome::RetryLater {
                journal_id,
                failure,
                failed_at,
                not_before,
                code,
                message,
            } => {
                // The same arithmetic as FailureHistory::after, in SQL.
                let (answered, blamed) = match failure {
                    TransientFailure::NoAnswer => (0, 0),
                    TransientFailure::CloudAnswered { blamed } => (1, i64::from(*blamed)),
                };
                tx.prepare_cached(
                    "UPDATE sync_journal SET status = 'failed', attempts = attempts + 1,
                         answered_failures = answered_failures + ?6, sale_failures = sale_failures + ?7,
                         last_failed_at = ?8,
                         last_error_code = ?2, last_error_message = ?3, next_attempt_at = ?4, updated_at = ?5
                     WHERE journal_id = ?1 AND status <> 'synced'",
                )?
                .execute(params![
                    journal_id,
                    code.to_string(),
                    message,
                    time_text(*not_before),
                    now,
                    answered,
                    blamed,
                    time_text(*failed_at),
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Earliest `next_attempt_at` among `failed` rows.
pub fn next_due_at(conn: &Connection) -> Result<Option<DateTime<Utc>>, TerminalStoreError> {
    let t: Option<String> = conn.query_row(
        "SELECT min(next_attempt_at) FROM sync_journal WHERE status = 'failed'",
        [],
        |r| r.get(0),
    )?;
    t.map(|s| parse_time(&s)).transpose()
}

/// Row counts by state and the enqueue time of the oldest undelivered row. The counts come
/// from `sync_journal_counts` (kept by triggers), so this costs the same however many sales
/// were ever synced.
pub fn counts(conn: &Connection) -> Result<OutboxCounts, TerminalStoreError> {
    let mut c = OutboxCounts::default();
    let mut stmt = conn.prepare_cached("SELECT status, n FROM sync_journal_counts")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (status, n) = row?;
        match status.as_str() {
            "pending" => c.pending = n,
            "in_flight" => c.in_flight = n,
            "failed" => c.failed = n,
            "synced" => c.synced = n,
            "needs_attention" => c.needs_attention = n,
            other => {
                return Err(TerminalStoreError::Corrupt(format!(
                    "journal status {other:?}"
                )))
            }
        }
    }
    let oldest: Option<String> = conn.query_row(
        "SELECT min(created_at) FROM sync_journal WHERE status IN ('pending', 'in_flight', 'failed')",
        [],
        |r| r.get(0),
    )?;
    c.oldest_pending_at = oldest.map(|s| parse_time(&s)).transpose()?;
    Ok(c)
}

/// Journal rows for the operator, newest first: with a limit (default 100) an operator sees
/// the latest sales, not the oldest ones of a long history.
pub fn list(
    conn: &Connection,
    status: Option<JournalStatus>,
    limit: usize,
) -> Result<Vec<JournalRow>, TerminalStoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT journal_id, local_event_id, status, attempts, next_attempt_at, last_error_code,
                last_error_message, cloud_event_id, created_at, json_extract(event, '$.payload.receipt_no')
         FROM sync_journal WHERE (?1 IS NULL OR status = ?1)
         ORDER BY journal_id DESC LIMIT ?2",
    )?;
    type Raw = (
        i64,
        i64,
        String,
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
    );
    let raw: Vec<Raw> = stmt
        .query_map(
            params![
                status.map(JournalStatus::as_str),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            },
        )?
        .collect::<Result<_, _>>()?;
    raw.into_iter()
        .map(
            |(id, leid, st, attempts, next, code, msg, cloud, created, receipt)| {
                Ok(JournalRow {
                    journal_id: id,
                    local_event_id: leid,
                    status: st.parse().map_err(TerminalStoreError::Corrupt)?,
                    attempts,
                    next_attempt_at: next.map(|s| parse_time(&s)).transpose()?,
                    last_error_code: code,
                    last_error_message: msg,
                    cloud_event_id: cloud,
                    created_at: parse_time(&created)?,
                    receipt_no: receipt,
                })
            },
        )
        .collect()
}

/// Operator retry; see `SqliteStore::retry_journal`.
pub fn retry(conn: &Connection, target: RetryTarget) -> Result<usize, TerminalStoreError> {
    let now = time_text(Utc::now());
    let n = match target {
        RetryTarget::One(id) => conn.execute(
            "UPDATE sync_journal SET status = 'pending', attempts = 0, answered_failures = 0,
                 sale_failures = 0, last_failed_at = NULL, next_attempt_at = NULL, updated_at = ?2
             WHERE journal_id = ?1 AND status IN ('needs_attention', 'failed')",
            params![id, now],
        )?,
        RetryTarget::AllNeedingAttention => conn.execute(
            "UPDATE sync_journal SET status = 'pending', attempts = 0, answered_failures = 0,
                 sale_failures = 0, last_failed_at = NULL, next_attempt_at = NULL, updated_at = ?1
             WHERE status = 'needs_attention'",
            params![now],
        )?,
    };
    tracing::info!(?target, moved = n, "operator retry");
    Ok(n)
}

/// `(pos_id, local_event_id, status)` of every row, in id order.
pub fn for_report(conn: &Connection) -> Result<Vec<(Uuid, i64, String)>, TerminalStoreError> {
    let raw: Vec<(String, i64, String)> = conn
        .prepare_cached(
            "SELECT pos_id, local_event_id, status FROM sync_journal ORDER BY pos_id, local_event_id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    raw.into_iter()
        .map(|(p, id, st)| {
            let pos = Uuid::parse_str(&p)
                .map_err(|e| TerminalStoreError::Corrupt(format!("pos_id {p:?}: {e}")))?;
            Ok((pos, id, st))
        })
        .collect()
}

/// The whole journal as audit records, by `pos_id` then `local_event_id`, for
/// `terminal audit verify` (`possync_protocol::journal_chain::ChainVerifier`). The chained
/// fields are read from the stored event, so an edit of a stored sale shows as a break.
pub fn audit_records(
    conn: &Connection,
) -> Result<Vec<possync_protocol::journal_chain::AuditRecord>, TerminalStoreError> {
    #[derive(Deserialize)]
    struct Stored {
        terminal_id: Option<Uuid>,
        branch_id: Option<String>,
        #[serde(rename = "type")]
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        payload: SalePayload,
    }
    let mut stmt = conn.prepare(
        "SELECT pos_id, local_event_id, event, chain_hash FROM sync_journal
         ORDER BY pos_id, local_event_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (pos, local_event_id, event, chain_hash) = row?;
        let pos_id = Uuid::parse_str(&pos)
            .map_err(|e| TerminalStoreError::Corrupt(format!("pos_id {pos:?}: {e}")))?;
        let e: Stored = serde_json::from_str(&event)?;
        out.push(possync_protocol::journal_chain::AuditRecord {
            pos_id,
            local_event_id,
            terminal_id: e.terminal_id,
            branch_id: e.branch_id,
            event_type: e.event_type,
            occurred_at: e.occurred_at,
            payload: serde_json::to_value(&e.payload)?,
            chain_hash,
            prev_chain_hash: None,
            cloud_event_id: None,
            received_at: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_spelling_round_trips() {
        for st in JournalStatus::ALL {
            assert_eq!(st.as_str().parse::<JournalStatus>(), Ok(st));
            assert_eq!(
                serde_json::to_value(st).expect("ser"),
                serde_json::Value::String(st.as_str().into())
            );
        }
        assert!("done".parse::<JournalStatus>().is_err());
    }
}
